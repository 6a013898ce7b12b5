"""The `r1v` command: one subcommand per job, each a module of this package with `add_arguments` and `run`.

Subcommand modules import only argparse at the top and keep heavy imports inside `run`, so
`r1v --help` stays fast and torch-free.
"""
from __future__ import annotations

import argparse
import importlib
import os
import sys

from r1v.cli.conventions import Parser, set_epilogs
from r1v.cli.examples import epilog
from r1v.converters.errors import CheckpointError

# name -> (module under r1v.cli, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "inspect": ("inspect_cmd", "show what a checkpoint holds: components, parameters, dtypes, tokens, template"),
    "plan": ("plan_cmd", "memory each way of running a model needs, from config.json alone"),
    "convert": ("convert_cmd", "convert a checkpoint: `r1v convert gguf` (llama.cpp) or `r1v convert awq` (GPU)"),
    "bench": ("bench_cmd", "benchmarks against a baseline measured in the same run"),
    "demo": ("demo_cmd", "run the main job on the bundled default model"),
    "generate": ("generate_cmd", "answer a question about images with a model, streaming to the terminal"),
    "chat": ("chat_cmd", "chat with a model interactively (/image PATH attaches an image, /reset starts over)"),
    "cache": ("cache_cmd", "the prefix cache of prompts with images: `r1v cache ls` / `r1v cache clear`"),
    "ls": ("ls_cmd", "models on disk and the space each takes: r1v builds, Hugging Face repos, the prefix cache"),
    "rm": ("rm_cmd", "remove a model from disk (`r1v ls` names it): a build, a hub repo or one quant of it"),
    "serve": ("serve_cmd", "serve a model over an OpenAI-compatible HTTP API (/v1/chat/completions)"),
    "batch": ("batch_cmd", "answer a JSONL file of {image, question} items, resumably (Skywork's r1v4 format)"),
    "view": ("view_cmd", "a local web page of `r1v batch` results: image, question, reasoning rounds, answer"),
    "micro-data": ("micro_data_cmd", "write items of the micro-r1v visual reasoning task (JSONL + PNGs)"),
    "train-micro": ("train_micro_cmd", "train the micro-r1v demo model on CPU and write its checkpoint"),
    "eval": ("eval_cmd", "exact-match accuracy of a model over a JSONL of questions; KL and top-1 agreement to a reference"),
}


def build_parser() -> argparse.ArgumentParser:
    from r1v import __version__

    parser = Parser(prog="r1v", description="Convert and run Skywork-R1V models off the datacenter.")
    parser.add_argument("--version", action="version", version=f"r1v-edge {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, (module, help_text) in COMMANDS.items():
        cmd = sub.add_parser(name, help=help_text, description=help_text)
        cmd.set_defaults(_module=module)
        importlib.import_module(f"r1v.cli.{module}").add_arguments(cmd)
    set_epilogs(parser, epilog)  # every --help ends with examples (r1v/cli/examples.py)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv:  # bare `r1v`: the help on stdout and status 0, as `ollama` does (git prints it and exits 1)
        build_parser().print_help()
        return 0
    args = build_parser().parse_args(argv)
    module = importlib.import_module(f"r1v.cli.{args._module}")
    try:
        status = int(module.run(args) or 0)
        sys.stdout.flush()  # a closed pipe shows here, inside the handler, not at interpreter exit
        return status
    except BrokenPipeError:
        return _stdout_closed()
    except (CheckpointError, ValueError, FileNotFoundError) as e:
        print(f"r1v {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"r1v {args.command}: interrupted", file=sys.stderr)
        return 130


def _stdout_closed() -> int:
    """`r1v ... | head`: the reader left. Quiet, as Python's docs advise (signal module, "Note on SIGPIPE"):
    point stdout at /dev/null so the flush at exit does not fail again, and exit as a process killed by
    SIGPIPE does."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    return 128 + 13  # SIGPIPE


if __name__ == "__main__":
    sys.exit(main())
