"""`r1v plan PATH [--context N] [--json]`: memory each way of running needs, from config.json alone."""
from __future__ import annotations

import argparse
import json


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("path", help="checkpoint directory or config.json (weights not needed)")
    parser.add_argument("--context", type=int, default=8192, help="context length for the KV cache (tokens)")
    parser.add_argument("--json", action="store_true", help="print byte counts as JSON for scripts")


def run(args: argparse.Namespace) -> int:
    from r1v.converters.checkpoint import load_checked_config
    from r1v.runtime.files.plan import format_plan, plan_memory

    if args.context <= 0:
        raise ValueError(f"--context must be positive, got {args.context}")
    plan = plan_memory(load_checked_config(args.path), context=args.context)
    print(json.dumps(plan.to_json(), indent=2) if args.json else format_plan(plan))
    return 0
