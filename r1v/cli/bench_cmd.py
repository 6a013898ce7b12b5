"""`r1v bench convert|...`: measurements against a baseline taken in the same run."""
from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

from r1v.cli.conventions import add_model_positional, quant_name


def default_llama_cpp_dir() -> Path | None:
    if os.environ.get("R1V_LLAMA_CPP_DIR"):
        return Path(os.environ["R1V_LLAMA_CPP_DIR"])
    fetched = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "r1v" / "llama.cpp-src"
    return fetched if (fetched / "convert_hf_to_gguf.py").is_file() else None


def add_arguments(parser: argparse.ArgumentParser) -> None:
    jobs = parser.add_subparsers(dest="job", metavar="JOB", required=True)
    convert = jobs.add_parser("convert", help="GGUF conversion: ours vs llama.cpp's convert_hf_to_gguf.py",
                              description="Wall time and peak RSS of GGUF conversion, ours next to llama.cpp's "
                                          "converter, on a generated checkpoint of a few GB.")
    convert.add_argument("--layers", type=int, default=12, help="decoder layers of the base checkpoint")
    convert.add_argument("--scale", type=int, default=4, help="layer multiple for the memory-scaling run")
    convert.add_argument("--llama-cpp-dir", type=Path, default=default_llama_cpp_dir(),
                         help="llama.cpp source tree (scripts/fetch-llama-cpp-src.sh unpacks the one vendored in "
                              "llama-cpp-python's sdist); default $R1V_LLAMA_CPP_DIR or that script's output; "
                              "without it only ours is measured")
    convert.add_argument("--workdir", type=Path, default=None, help="keep generated files here")
    convert.add_argument("--json", action="store_true", help="print JSON for scripts")

    generate = jobs.add_parser("generate", help="GGUF: our runtime vs llama-cpp-python; AWQ: 4-bit vs fp16",
                               description="Prefill/decode tokens/s, time to first token and peak memory, "
                                           "alternating rounds; decode as a fraction of the memory bandwidth bound. "
                                           "A GGUF model runs next to llama-cpp-python used directly on the same "
                                           "files; an AWQ checkpoint next to the same model dequantized to fp16.")
    add_model_positional(generate, "GGUF file, AWQ checkpoint directory, or model name")
    generate.add_argument("--mmproj", default=None, help="projector file when not beside the model")
    generate.add_argument("--image", default=None, help="image for the image-prompt figures (448x448 is one tile)")
    generate.add_argument("--quant", type=quant_name, default=None,
                          help="GGUF quant when the source holds several (e.g. Q4_K_M)")
    generate.add_argument("--prompt-repeats", type=int, default=12, help="length of the text prompt, in paragraphs")
    generate.add_argument("--max-tokens", "-n", "--n-predict", dest="max_tokens", type=int, default=64,
                          help="tokens decoded per round")
    generate.add_argument("--n-ctx", "-c", "--ctx-size", dest="n_ctx", type=int, default=4096, metavar="N",
                          help="context window in tokens")
    generate.add_argument("--n-threads", "-t", "--threads", dest="n_threads", type=int, default=None, metavar="N",
                          help="decoding threads (default: half the CPUs)")
    generate.add_argument("--n-batch", "-b", "--batch-size", dest="n_batch", type=int, default=512, metavar="N",
                          help="prompt tokens per llama.cpp batch")
    generate.add_argument("--no-flash-attn", dest="flash_attn", action="store_false",
                          help="flash attention off on both sides (default: on for both)")
    generate.add_argument("--extra-buffers", choices=["auto", "on", "off"], default="auto",
                          help="GGUF, both sides: llama.cpp's extra weight buffer types (CPU_REPACK, AMX); "
                               "auto: on unless llama.cpp has AMX (R1V_LLAMA_AMX=1 allows it); default %(default)s")
    generate.add_argument("--rounds", type=int, default=3, help="alternating rounds per side (medians reported)")
    generate.add_argument("--repeat", type=int, default=None, metavar="N",
                          help="instead: the prefix cache - time to first token for N questions about --image, the "
                               "first vs later ones in the same process and in a new process (from disk)")
    generate.add_argument("--max-tiles", type=int, default=None, help="with --repeat: most tiles for the image")
    generate.add_argument("--device", default=None, help="AWQ: cuda, cuda:N or cpu (default: CUDA when present)")
    generate.add_argument("--kernel", default="auto", choices=["auto", "int4", "triton", "torch"],
                          help="AWQ: the 4-bit side's kernels (default: torch's int4 kernels where available)")
    generate.add_argument("--json", action="store_true", help="print JSON for scripts")


def run(args: argparse.Namespace) -> int:
    if args.job == "convert":
        from r1v.bench.convert import bench_convert, format_results

        results = bench_convert(args.layers, args.scale, args.llama_cpp_dir, args.workdir)
    elif args.repeat is not None:
        from r1v.bench.generate import bench_repeat, format_repeat

        if not args.image:
            raise ValueError("--repeat needs --image IMG (the image the questions are about)")
        results = bench_repeat(args.model, image=args.image, repeat=args.repeat, mmproj=args.mmproj, quant=args.quant,
                               n_ctx=args.n_ctx, n_threads=args.n_threads, n_batch=args.n_batch,
                               flash_attn=args.flash_attn, max_tiles=args.max_tiles)
        print(json.dumps(results, indent=2) if args.json else format_repeat(results))
        return 0
    elif _is_awq(args.model, args.quant):
        from r1v.bench.generate_awq import bench_generate_awq, format_results

        results = bench_generate_awq(args.model, image=args.image, prompt_repeats=args.prompt_repeats,
                                     max_tokens=args.max_tokens, n_ctx=args.n_ctx, n_batch=args.n_batch,
                                     n_threads=args.n_threads, device=args.device, kernel=args.kernel,
                                     rounds=args.rounds)
    else:
        from r1v.bench.generate import bench_generate, format_results

        results = bench_generate(args.model, mmproj=args.mmproj, image=args.image, quant=args.quant,
                                 prompt_repeats=args.prompt_repeats, max_tokens=args.max_tokens, n_ctx=args.n_ctx,
                                 n_threads=args.n_threads, n_batch=args.n_batch, flash_attn=args.flash_attn,
                                 rounds=args.rounds, extra_buffers=_on_off(args.extra_buffers))
    print(json.dumps(results, indent=2) if args.json else format_results(results))
    return 0


def _on_off(value: str) -> bool | None:
    return {"auto": None, "on": True, "off": False}[value]


def _is_awq(model: str, quant: str | None) -> bool:
    from r1v.runtime.files.resolve import resolve_model

    return resolve_model(model, quant=quant).format == "awq"
