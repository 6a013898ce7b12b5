"""`r1v view OUT.jsonl`: a local web page of batch results (image, question, reasoning rounds, answer)."""
from __future__ import annotations

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("results", help="a JSONL written by `r1v batch` (or by Skywork's r1v4 batch tools)")
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=8001, help="port (default 8001; 0 picks a free one)")
    parser.add_argument("--open", action="store_true", help="open the page in the default browser")


def run(args: argparse.Namespace) -> int:
    from r1v.runtime.viewer import serve_viewer

    serve_viewer(args.results, args.host, args.port, open_browser=args.open)
    return 0
