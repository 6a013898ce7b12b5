"""`r1v convert gguf|... CHECKPOINT -o OUTDIR ...`: one sub-command per output format."""
from __future__ import annotations

import argparse
from pathlib import Path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from r1v.converters.gguf import LLM_QUANTS, MMPROJ_QUANTS

    formats = parser.add_subparsers(dest="format", metavar="FORMAT", required=True)
    gguf = formats.add_parser("gguf", help="LLM + vision projector (mmproj) GGUF files for llama.cpp",
                              description="Convert a checkpoint to GGUF: the LLM at each --quant, and the mmproj.")
    gguf.add_argument("checkpoint", type=Path, help="checkpoint directory (config.json, safetensors, tokenizer)")
    gguf.add_argument("-o", "--outdir", type=Path, required=True, help="output directory (created if missing)")
    gguf.add_argument("--quant", nargs="+", default=["q4_k_m"], choices=LLM_QUANTS, metavar="QUANT",
                      help=f"LLM quant type(s), several share one 16-bit intermediate: {', '.join(LLM_QUANTS)}")
    gguf.add_argument("--no-llm", dest="quant", action="store_const", const=[], help="only the mmproj")
    gguf.add_argument("--mmproj-quant", default="f16", choices=MMPROJ_QUANTS, help="vision projector type")
    gguf.add_argument("--no-mmproj", dest="mmproj_quant", action="store_const", const=None,
                      help="skip the vision projector")
    gguf.add_argument("--name", default=None, help="file name stem (default: the checkpoint directory name)")
    gguf.add_argument("--pre-tokenizer", default=None, help="llama.cpp pre-tokenizer name (default: by family)")
    gguf.add_argument("--imatrix", type=Path, default=None, help="importance matrix for low-bit types")
    gguf.add_argument("--threads", type=int, default=None, help="threads for llama.cpp's quantizer")
    gguf.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bars")


def run(args: argparse.Namespace) -> int:
    from r1v.converters.gguf import convert_gguf

    result = convert_gguf(
        args.checkpoint, args.outdir, args.quant, args.mmproj_quant, name=args.name,
        pre_tokenizer=args.pre_tokenizer, imatrix=args.imatrix, threads=args.threads, progress=args.progress,
    )
    for path in result.files:
        print(f"{path}  ({path.stat().st_size / 1e6:.1f} MB)")
    return 0
