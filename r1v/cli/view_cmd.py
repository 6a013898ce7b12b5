"""`r1v view OUT.jsonl`: a local web page of batch results (image, question, reasoning rounds, answer, and the
expected answer with a correct / incorrect mark when the input had one)."""
from __future__ import annotations

import argparse
import sys


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("results", help="a JSONL written by `r1v batch` (or by Skywork's r1v4 batch tools)")
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default %(default)s)")
    parser.add_argument("--port", type=int, default=8001, help="port (default %(default)s; 0 picks a free one)")
    parser.add_argument("--image-root", default=None, metavar="DIR",
                        help="serve the results' images only from under DIR (default: the results file's folder)")
    parser.add_argument("--open", action="store_true", help="open the page in the default browser")


def run(args: argparse.Namespace) -> int:
    from r1v.apps.viewer import ViewerBindError, serve_viewer

    try:
        serve_viewer(args.results, args.host, args.port, open_browser=args.open, image_root=args.image_root)
    except ViewerBindError as e:
        print(f"r1v view: error: {e}", file=sys.stderr)
        return 2
    return 0
