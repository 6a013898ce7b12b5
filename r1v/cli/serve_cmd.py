"""`r1v serve MODEL`: an OpenAI-compatible server (`/v1/chat/completions`, `/v1/models`, `/health`).

Flags are `r1v.load`'s (LoadOptions) and `ServerConfig`'s. The model is loaded once; --max-concurrency N > 1 loads
it with N sequences (`LoadOptions.parallel`: continuous batching, one forward per token for every running request,
each with the whole --ctx-size window). The port is bound before the model loads, so a busy one is reported at
once. Needs the `server` extra (FastAPI, uvicorn).
"""
from __future__ import annotations

import argparse
import errno
import os
import sys
from pathlib import Path

from r1v.cli.generate_cmd import add_model_arguments, load_options

_LOOPBACK = ("127.0.0.1", "localhost", "::1")
_BUSY_HINT = " (another server is listening there: stop it or choose another --port)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_model_arguments(parser, ctx_aliases=("--max-model-len",))  # vLLM's name for the context window
    server = parser.add_argument_group("server (ServerConfig)")
    server.add_argument("--host", default="127.0.0.1", help="address to bind (default %(default)s: this machine only)")
    server.add_argument("--port", type=int, default=8000, help="port to listen on")
    server.add_argument("--api-key", default=None,  # $R1V_API_KEY is read in run(): --help must not show it
                        help="require 'Authorization: Bearer KEY' on /v1/* (default: $R1V_API_KEY, else none)")
    server.add_argument("--max-concurrency", "-np", "--parallel", "--max-num-seqs", dest="max_concurrency", type=int,
                        default=1, metavar="N",
                        help="generation slots (llama-server's -np, vLLM's --max-num-seqs): requests generated at the "
                             "same time, batched over one copy of the model (each slot has the whole context window: "
                             "the KV cache holds N x --ctx-size positions)")
    server.add_argument("--queue", type=int, default=8, metavar="N",
                        help="requests that may wait for a slot; beyond them the answer is 429 (default %(default)s)")
    server.add_argument("--served-model-name", "--alias", "-a", dest="served_model_name", default=None, metavar="NAME",
                        help="model id in /v1/models and responses (default: the model's file or registry name)")
    server.add_argument("--allow-local-images", action="store_true",
                        help="accept image_url parts naming files on this machine (default: data: URLs only)")
    server.add_argument("--local-image-root", default=None, metavar="DIR",
                        help="with --allow-local-images: only files under DIR (relative paths taken from it)")
    server.add_argument("--max-body-mb", type=float, default=32.0, help="largest request body in MB")
    server.add_argument("--max-image-mb", type=float, default=20.0, help="largest image in MB")
    server.add_argument("--max-megapixels", type=float, default=16.0, metavar="MPX",
                        help="pixels of all images in one request together, in millions, read from the image headers "
                             "before any is decoded (default %(default)s; decoding holds ~3 bytes a pixel, more while "
                             "converting)")
    server.add_argument("--log-level", default="info", choices=("critical", "error", "warning", "info", "debug"),
                        help="uvicorn's log level")


def _model_name(source: str) -> str:
    path = Path(source)
    return path.stem if path.suffix == ".gguf" else path.name if path.exists() else source


def run(args: argparse.Namespace) -> int:
    try:
        from r1v.apps.serve.app import ServerConfig, bind_socket, serve
    except ImportError as e:
        print(f"r1v serve: error: {e.name or e} is missing; install the server extra: pip install 'r1v-edge[server]'",
              file=sys.stderr)
        return 2
    from r1v.runtime.api import load
    from r1v.apps.serve.protocol import ServerLimits

    if args.max_concurrency < 1:
        raise ValueError(f"--max-concurrency must be >= 1, got {args.max_concurrency}")
    if args.local_image_root and not args.allow_local_images:
        raise ValueError("--local-image-root needs --allow-local-images")
    limits = ServerLimits(max_image_bytes=int(args.max_image_mb * 2**20),
                          max_request_pixels=int(args.max_megapixels * 1e6), allow_local_images=args.allow_local_images,
                          local_image_root=Path(args.local_image_root) if args.local_image_root else None)
    api_key = args.api_key or os.environ.get("R1V_API_KEY") or None
    config = ServerConfig(model_name=args.served_model_name or _model_name(args.model), api_key=api_key,
                          queue=args.queue, max_body_bytes=int(args.max_body_mb * 2**20), limits=limits)
    if args.host not in _LOOPBACK and config.api_key is None:
        print(f"r1v serve: warning: listening on {args.host} without --api-key: anyone who can reach it can use it",
              file=sys.stderr)
    try:  # before loading: a busy port is known in a moment, not after the model loaded
        sock = bind_socket(args.host, args.port)
    except OSError as e:
        print(f"r1v serve: error: cannot listen on {args.host}:{args.port}: {e.strerror or e}"
              f"{_BUSY_HINT if e.errno == errno.EADDRINUSE else ''}", file=sys.stderr)
        return 2
    model = None
    try:
        model = load(args.model, **load_options(args), parallel=args.max_concurrency)
        print(f"r1v serve: {model!r} as {config.model_name!r} on http://{args.host}:{args.port}/v1 "
              f"({args.max_concurrency} slot(s), queue {args.queue})", file=sys.stderr, flush=True)
        serve([model] * args.max_concurrency, config, host=args.host, port=args.port, log_level=args.log_level,
              sock=sock)  # each slot a thread streaming from the one model
    finally:
        sock.close()
        if model is not None:
            model.close()
    return 0
