"""`r1v batch MODEL IN.jsonl OUT.jsonl`: answer a JSONL file of {"image", "question"} items (Skywork's r1v4 batch
format), appending one line per item to OUT; a rerun skips what OUT already holds. Each OUT line is the input
line unchanged plus the model's output under `response` (Skywork's) and `r1v` (ours).

Exit status: 0 when every item has an answer, 1 when some failed (their lines say why; --retry-errors runs
them again), 2 on a usage error or when another `r1v batch` is writing OUT.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from r1v.cli.generate_cmd import add_model_arguments, add_sampling_arguments, load_options, sampling_overrides


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_model_arguments(parser)
    parser.add_argument("input", help="JSONL of {\"image\": path relative to this file or \"\", \"question\": text}")
    parser.add_argument("output", help="JSONL to append results to (created if missing): each input line plus "
                                       "`response` (Skywork's) and `r1v` (the parsed answer, reasoning, rounds)")
    parser.add_argument("--stream", action="store_true",
                        help="print each answer as it is generated and keep the SSE events (raw_events)")
    parser.add_argument("--retry-errors", action="store_true", help="run again the items whose output is an error")
    parser.add_argument("--model-name", default="r1v", help="the 'model' field of raw_response (default %(default)s)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    add_sampling_arguments(parser)


def run(args: argparse.Namespace) -> int:
    from r1v.runtime.api import load
    from r1v.apps.batch import BatchBusyError, BatchConfig, plan_batch, run_batch

    config = BatchConfig(Path(args.input), Path(args.output), stream=args.stream, sampling=sampling_overrides(args),
                         model_name=args.model_name, retry_errors=args.retry_errors, progress=not args.no_progress)
    try:
        plan = plan_batch(config)  # holds OUT's lock until the run ends
    except BatchBusyError as e:
        print(f"r1v batch: error: {e}", file=sys.stderr)
        return 2
    with plan:
        if not plan.todo:
            print(f"r1v batch: all {len(plan.items)} items are already in {config.output}", file=sys.stderr)
            return 0
        with load(args.model, **load_options(args)) as model:
            summary = run_batch(model, config, plan)
    print(f"r1v batch: {summary.answered} answered, {summary.failed} failed, {summary.skipped} already done "
          f"({summary.total} items) in {summary.seconds:.1f} s -> {config.output}", file=sys.stderr)
    return 1 if summary.failed else 0
