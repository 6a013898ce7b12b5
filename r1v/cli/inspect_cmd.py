"""`r1v inspect PATH [--json]`: what a checkpoint holds."""
from __future__ import annotations

import argparse
import json

from r1v.converters.inspect import format_summary, inspect_checkpoint


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("path", help="checkpoint directory (config.json, safetensors, tokenizer), or a model name / "
                                     "Hugging Face repo id (Org/Repo): only config.json and the tokenizer are fetched")
    parser.add_argument("--fallback-template", default=None,
                        help="bundled chat template to report when the checkpoint carries none")
    parser.add_argument("--json", action="store_true", help="print JSON for scripts")


def run(args: argparse.Namespace) -> int:
    from r1v.runtime.files.resolve import fetch_config

    summary = inspect_checkpoint(fetch_config(args.path, tokenizer=True), fallback_template=args.fallback_template)
    print(json.dumps(summary.to_json(), indent=2, ensure_ascii=False) if args.json else format_summary(summary))
    return 0
