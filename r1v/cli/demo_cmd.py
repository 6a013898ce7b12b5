"""`r1v demo`: the main job on the bundled default model.

Until the runtime lands, the demo builds the tiny R1V-layout checkpoint, then inspects and plans it.
"""
from __future__ import annotations

import argparse
import os
from pathlib import Path


def default_workdir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "r1v" / "demo"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--workdir", type=Path, default=None, help="where the demo checkpoint is written")
    parser.add_argument("--seed", type=int, default=0)


def run(args: argparse.Namespace) -> int:
    from r1v.cli.inspect_cmd import run as inspect_run
    from r1v.testing import make_tiny_checkpoint

    workdir = args.workdir or default_workdir()
    path = make_tiny_checkpoint(workdir / "tiny-r1v", vit="6b", seed=args.seed)
    print(f"built a tiny Skywork-R1V-layout checkpoint at {path}\n")
    return inspect_run(argparse.Namespace(path=str(path), fallback_template=None, json=False))
