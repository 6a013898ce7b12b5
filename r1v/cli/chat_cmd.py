"""`r1v chat MODEL`: an interactive conversation, one line per message.

Commands: ``/image PATH`` attaches an image to the next message (repeatable), ``/reset`` starts a new
conversation, ``/exit`` (or end of input) quits. The conversation is kept and each turn reuses the KV cache
for what it shares with the previous one; stderr shows the prompt and cached token counts per turn. The
answer, not the reasoning, goes into the history. Flags as `r1v generate`.
"""
from __future__ import annotations

import argparse
import sys
from typing import Any

from r1v.cli.generate_cmd import add_model_arguments, add_sampling_arguments

HELP = "/image PATH attaches an image to your next message; /reset starts over; /exit quits"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_model_arguments(parser)
    parser.add_argument("--system", default=None, help="a system message to start the conversation with")
    parser.add_argument("--show-reasoning", action="store_true", help="print the reasoning, not only the answer")
    add_sampling_arguments(parser)


def run(args: argparse.Namespace) -> int:
    from r1v.cli.generate_cmd import load_options, print_stream, report, sampling_overrides
    from r1v.runtime.api import load
    from r1v.runtime.image import ImageError, load_image
    from r1v.runtime.backends.llamacpp.mtmd import MtmdError

    interactive = sys.stdin.isatty()
    start = [{"role": "system", "content": args.system}] if args.system else []
    try:
        model = load(args.model, **load_options(args))
    except (NotImplementedError, MtmdError, RuntimeError) as e:
        print(f"r1v chat: error: {e}", file=sys.stderr)
        return 2
    with model:
        print(f"{model!r}. {HELP}", file=sys.stderr)
        messages: list[dict[str, Any]] = list(start)
        images: list[Any] = []
        turn = 0
        while True:
            if interactive:
                print("> ", end="", file=sys.stderr, flush=True)
            line = sys.stdin.readline()
            if not line:
                break
            text = line.rstrip("\n")
            command, _, rest = text.strip().partition(" ")
            if command in ("/exit", "/quit"):
                break
            if command == "/reset":
                messages, images, turn = list(start), [], 0
                model.reset()
                print("(new conversation)", file=sys.stderr)
                continue
            if command == "/image":
                path = rest.strip()
                try:
                    load_image(path)  # refuse a bad file now, not after the question is typed
                except ImageError as e:
                    print(f"r1v chat: {e}", file=sys.stderr)
                    continue
                images.append(path)
                print(f"(image {len(images)} attached: {path})", file=sys.stderr)
                continue
            if command.startswith("/") and command not in ("/",):
                print(f"unknown command {command}; {HELP}", file=sys.stderr)
                continue
            if not text.strip() and not images:
                continue
            content = [{"type": "image", "image": p} for p in images] + [{"type": "text", "text": text}]
            messages.append({"role": "user", "content": content if images else text})
            images = []
            turn += 1
            try:
                stream = model.stream(messages, **sampling_overrides(args))
            except ValueError as e:  # context overflow, unreadable image: the turn is dropped, the chat goes on
                messages.pop()
                print(f"r1v chat: {e}", file=sys.stderr)
                continue
            result = print_stream(stream, args.show_reasoning)
            messages.append(result.message)
            print(f"[turn {turn}] ", end="", file=sys.stderr)
            report(result, args.show_reasoning)
    return 0
