"""`r1v eval MODEL DATA.jsonl [--limit N] [--reference MODEL] [-o REPORT.json] [--force]`: exact-match accuracy
of a model over `{"image", "question", "answer"}` items, mean output length, and with a reference model the
mean per-token KL divergence and top-1 agreement to it. Resumable: run it again with the same arguments;
--force starts over. The default report name says which model, quant and data it is about.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from r1v.cli.conventions import quant_name


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from r1v.cli.generate_cmd import add_model_arguments

    add_model_arguments(parser)
    parser.add_argument("data", help="JSONL of {\"image\", \"question\", \"answer\"} items (`r1v micro-data` writes one)")
    parser.add_argument("--limit", type=int, default=None, help="only the first N items")
    parser.add_argument("--reference", default=None, metavar="MODEL",
                        help="a model to compare distributions with (e.g. the F16 GGUF of the same checkpoint)")
    parser.add_argument("--reference-quant", type=quant_name, default=None,
                        help="GGUF quant of the reference, when it is a name or folder")
    parser.add_argument("--max-tokens", "-n", "--n-predict", dest="max_tokens", type=int, default=256,
                        help="most output tokens per item (default %(default)s)")
    parser.add_argument("-o", "--output", default=None,
                        help="report file (default: eval-<model>-<quant>-<data>[-vs-<reference>].json in the current "
                             "folder); finished items go to REPORT.items.jsonl beside it, so an interrupted run resumes")
    parser.add_argument("--force", action="store_true",
                        help="start over: discard the results REPORT.items.jsonl holds (of this run or another)")
    parser.add_argument("--json", action="store_true", help="print the report as JSON")


def _stem(source: str) -> str:
    path = Path(source.rstrip("/"))
    stem = path.stem if path.suffix in (".gguf", ".jsonl", ".json") else path.name
    return stem.replace(" ", "_").replace("/", "_") or "model"


def default_output(model: str, quant: str | None, data: str, reference: str | None = None) -> str:
    """eval-<model>-<quant>-<data>[-vs-<reference>].json: runs of other models, quants or data get other files
    (the quant is left out when the model's name already ends with it, as GGUF file names do)."""
    name = _stem(model)
    if quant and not name.lower().endswith(quant.lower()):
        name += f"-{quant.lower()}"
    vs = f"-vs-{_stem(reference)}" if reference else ""
    return f"eval-{name}-{_stem(data)}{vs}.json"


def _quant_of(model: Any, asked: str | None) -> str | None:
    """The quant the loaded model runs at: the resolved file's (a name or folder picks a default), else asked."""
    resolved = getattr(model, "resolved", None)
    if resolved is not None and resolved.format == "awq":
        return "awq"
    return getattr(resolved, "quant", None) or asked


def run(args: argparse.Namespace) -> int:
    from r1v.cli.generate_cmd import load_options
    from r1v.runtime.api import load
    from r1v.apps.evaluation import evaluate, read_items, write_report

    items = read_items(args.data, args.limit)
    if not items:
        raise ValueError(f"{args.data}: no items")
    options = load_options(args)
    quant = f" ({args.quant})" if args.quant else ""
    reference_name = None
    if args.reference:
        reference_name = args.reference + (f" ({args.reference_quant})" if args.reference_quant else "")
    names = {"model": args.model + quant, "data": str(Path(args.data).resolve()), "reference": reference_name,
             "limit": args.limit}
    with load(args.model, **options) as model:
        output = Path(args.output or default_output(args.model, _quant_of(model, args.quant), args.data,
                                                    args.reference))
        reference = None
        if args.reference:
            ref_options = {**options, "quant": args.reference_quant}
            ref_options = {k: v for k, v in ref_options.items() if v is not None and k != "mmproj"}
            reference = load(args.reference, **ref_options)
        try:
            report = evaluate(model, items, reference=reference, names=names, max_tokens=args.max_tokens,
                              results_path=output.with_name(output.name + ".items.jsonl"),
                              progress=True, overwrite=args.force)
        finally:
            if reference is not None:
                reference.close()
    write_report(report, output)
    if args.json:
        print(json.dumps(report.to_json(), indent=2))
    else:
        print(f"{args.model}{quant} on {len(items)} items of {args.data}: {report.summary()}")
        for task, entry in report.by_task.items():
            print(f"  {task:16s} {entry['accuracy']:6.1%}  ({entry['correct']}/{entry['total']})")
        print(f"report: {output}")
    return 0
