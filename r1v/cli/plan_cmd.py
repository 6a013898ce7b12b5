"""`r1v plan PATH [--context N] [-ngl N] [--quant Q] [--json]`: memory each way of running needs, from config.json
alone; with -ngl, how llama.cpp splits each LLM GGUF between GPU and CPU."""
from __future__ import annotations

import argparse
import json

from r1v.cli.conventions import quant_name


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("path", help="checkpoint directory or config.json (weights not needed), or a model name / "
                                     "Hugging Face repo id (Org/Repo): only its config.json is fetched")
    parser.add_argument("--context", "-c", "--ctx-size", dest="context", type=int, default=8192, metavar="N",
                        help="context length for the KV cache (tokens)")
    parser.add_argument("--n-gpu-layers", "-ngl", "--gpu-layers", dest="n_gpu_layers", type=int, default=None,
                        metavar="N", help="also show each GGUF's split with N layers on the GPU (-1: all), as "
                                          "llama.cpp's -ngl places them")
    parser.add_argument("--quant", type=quant_name, default=None,
                        help="only this LLM GGUF type among the gguf.llm rows (e.g. Q4_K_M)")
    parser.add_argument("--json", action="store_true", help="print byte counts as JSON for scripts")


def run(args: argparse.Namespace) -> int:
    import dataclasses

    from r1v.converters.checkpoint import load_checked_config
    from r1v.runtime.files.plan import LLM_GGUF_MIXES, format_plan, plan_memory

    if args.context <= 0:
        raise ValueError(f"--context must be positive, got {args.context}")
    from r1v.runtime.files.resolve import fetch_config

    config = load_checked_config(fetch_config(args.path))  # a name: only its config.json is fetched
    plan = plan_memory(config, context=args.context, n_gpu_layers=args.n_gpu_layers)
    if args.quant is not None:
        mixes = {m.lower(): m for m in LLM_GGUF_MIXES}
        if args.quant not in mixes:
            raise ValueError(f"--quant {args.quant}: the plan knows the GGUF types {', '.join(mixes)}")
        keep = mixes[args.quant]
        plan = dataclasses.replace(
            plan, entries=tuple(e for e in plan.entries if not e.key.startswith("gguf.llm.") or e.key.endswith(keep)),
            offload=tuple(o for o in plan.offload if o.mix == keep))
    print(json.dumps(plan.to_json(), indent=2) if args.json else format_plan(plan))
    return 0
