"""`python -m r1v.bench.extra_buffers MODEL.gguf`: what llama.cpp's extra weight buffer types (CPU_REPACK, and
AMX where built in) are worth on this machine - the cost of the AMX guard (runtime/backends/llamacpp/llama_params.py) where it
turns them off. Both settings load side by side in one process and alternate (prefill of a fixed prompt, then
single-token decodes), so load on the machine affects both alike; medians are reported.
"""
from __future__ import annotations

import argparse
import json
import statistics
import time
from typing import Any

from .generate import PROMPT_PARAGRAPH


def bench_extra_buffers(model: str, *, repeats: int = 6, decode_tokens: int = 64, prompt_repeats: int = 12,
                        n_threads: int = 1, n_threads_batch: int | None = None) -> dict[str, Any]:
    from r1v.runtime.backends.llamacpp.gguf_header import read_gguf_header
    from r1v.runtime.backends.llamacpp.llama_params import open_llama

    read_gguf_header(model, "model")  # a missing, foreign or truncated file named before llama.cpp sees it
    models = {on: open_llama(model, extra_buffers=on, n_ctx=2048, n_batch=512, n_threads=n_threads,
                             n_threads_batch=n_threads_batch, flash_attn=True, verbose=False) for on in (True, False)}
    try:
        ids = models[True].tokenize((PROMPT_PARAGRAPH * prompt_repeats).encode(), add_bos=True)
        rates: dict[bool, dict[str, list[float]]] = {on: {"prefill": [], "decode": []} for on in models}
        for rep in range(repeats):
            for on in ((True, False) if rep % 2 == 0 else (False, True)):
                llama = models[on]
                llama.reset()
                start = time.perf_counter()
                llama.eval(ids)
                prefilled = time.perf_counter()
                for _ in range(decode_tokens):
                    llama.eval([ids[-1]])
                done = time.perf_counter()
                rates[on]["prefill"].append(len(ids) / (prefilled - start))
                rates[on]["decode"].append(decode_tokens / (done - prefilled))
    finally:
        for llama in models.values():
            llama.close()
    med = {("on" if on else "off"): {k: statistics.median(v) for k, v in r.items()} for on, r in rates.items()}
    return {"model": model, "prompt_tokens": len(ids), "repeats": repeats, "tokens_per_second": med,
            "off_over_on": {k: med["off"][k] / med["on"][k] for k in ("prefill", "decode")}}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m r1v.bench.extra_buffers", description=__doc__.split("\n\n")[0])
    parser.add_argument("model", help="a GGUF file")
    parser.add_argument("--repeats", type=int, default=6, help="alternations (default %(default)s)")
    parser.add_argument("--json", action="store_true", help="print JSON for scripts")
    args = parser.parse_args(argv)
    try:
        result = bench_extra_buffers(args.model, repeats=args.repeats)
    except (OSError, ValueError) as e:
        parser.exit(2, f"{parser.prog}: error: {e}\n")
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        tps, ratio = result["tokens_per_second"], result["off_over_on"]
        print(f"{result['model']}: {result['prompt_tokens']}-token prefill, {result['repeats']} alternations")
        for key in ("prefill", "decode"):
            print(f"  {key:<8} on {tps['on'][key]:8.1f} tok/s   off {tps['off'][key]:8.1f} tok/s   "
                  f"off/on {ratio[key]:.3f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
