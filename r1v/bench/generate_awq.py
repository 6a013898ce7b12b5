"""`r1v bench generate AWQ_DIR`: the AWQ backend next to the same model dequantized to fp16 (every quantized linear
dequantized once at load into a plain linear, `kernel="dense"`), in the same run, on the same device: prefill and
decode tokens/s, time to first token (text, and an image prompt with --image), peak memory (GPU: torch's peak
allocation; CPU: peak RSS), and decode as a fraction of the memory-bandwidth bound (bandwidth / bytes of weights one
decode step reads).

Each side runs in its own child process (clean peak memory; on CUDA the backend warms up and captures its decode
graphs at load, timed as `load_seconds`). In it the same text request runs twice: the first is the process's first
request (first-time costs land there: reported apart), the second is steady state (the main figures); then a
prompt one paragraph longer shows the decode rate at a sequence length not seen before. The sides alternate `rounds`
times and medians are reported. Both decode exactly `max_tokens` tokens: the end token is ignored while measuring.
On CPU the compute dtype is fp32, so the "fp16" side holds the fp16 values in fp32 (4 bytes per weight); on CUDA
the AWQ side computes in bf16 with kernel "int4" (what torch's int4 kernel multiplies): the figures say which dtype
ran.

`bench_batched_decode`: the decode rate with M = 1, 2, 4, 8 sequences advanced per forward (one model copy,
`parallel=8`; scripts/gpu-check.sh's "batched" stage).
"""
from __future__ import annotations

import json
import statistics
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from .generate import IMAGE_QUESTION, PROMPT_PARAGRAPH
from .measure import TIMING_ROWS, gpu_copy_bandwidth_gbps, memory_bandwidth_gbps, ratio, run_side, timing_figures

SIDES = ("awq", "fp16")


@dataclass
class AWQBenchSpec:
    model: str
    image: str | None
    prompt_repeats: int
    max_tokens: int
    n_ctx: int
    n_batch: int
    n_threads: int | None
    device: str | None
    kernel: str


@dataclass
class AWQSideFigures:
    prompt_tokens: int = 0
    prefill_tokens_per_second: float = 0.0
    time_to_first_token: float = 0.0
    decode_tokens_per_second: float = 0.0
    completion_tokens: int = 0
    image_prompt_tokens: int = 0
    image_time_to_first_token: float = 0.0
    image_encode_seconds: float = 0.0  # of the image prompt's time to first token: the vision tower
    peak_memory_mb: float = 0.0  # GPU: torch.cuda.max_memory_allocated; CPU: peak RSS of the process
    weight_bytes_per_token: int = 0
    kernel: str = ""
    dtype: str = ""
    # the figures above are steady state (the request measured a second time in the process); these are the
    # process's first request, and the same steady state at a prompt length not seen before
    first_time_to_first_token: float = 0.0
    first_decode_tokens_per_second: float = 0.0
    other_length_prompt_tokens: int = 0
    other_length_decode_tokens_per_second: float = 0.0
    load_seconds: float = 0.0  # on CUDA including the warm-up and the decode graphs' capture
    cuda_graphs: bool = False


# --- one side, in a child process -------------------------------------------------------------------------------
def _side(spec: AWQBenchSpec, side: str) -> dict[str, Any]:
    import torch

    from r1v.runtime.api import LoadOptions, load

    options = LoadOptions(n_ctx=spec.n_ctx, n_batch=spec.n_batch, n_threads=spec.n_threads, device=spec.device,
                          kernel=spec.kernel if side == "awq" else "dense")
    out: dict[str, Any] = {}
    start = time.perf_counter()
    with load(spec.model, options) as model:
        out["load_seconds"] = time.perf_counter() - start  # on CUDA with the warm-up and graph capture
        backend = model._backend
        backend._end_ids = frozenset()  # both sides decode exactly max_tokens
        greedy = dict(temperature=0, repetition_penalty=1.0, seed=0)
        cuda = backend.device.type == "cuda"
        if cuda:
            torch.cuda.reset_peak_memory_stats(backend.device)

        def request(text: str) -> dict[str, Any]:
            model.reset()  # no prefix reuse: each request evaluates its whole prompt
            result = model.generate(text, max_tokens=spec.max_tokens, **greedy)
            return dict(prompt_tokens=result.prompt_tokens, completion_tokens=result.completion_tokens,
                        time_to_first_token=result.time_to_first_token, decode_seconds=result.decode_seconds)

        text = PROMPT_PARAGRAPH * spec.prompt_repeats
        out["first"] = request(text)  # the process's first request: any first-time cost lands here
        out["text"] = request(text)  # the same request again: steady state
        out["other_length"] = request(PROMPT_PARAGRAPH * (spec.prompt_repeats + 1))  # a length not seen before
        if spec.image:
            model.reset()
            image = model.generate(IMAGE_QUESTION, images=[spec.image], max_tokens=1, **greedy)
            out["image"] = dict(prompt_tokens=image.prompt_tokens, time_to_first_token=image.time_to_first_token,
                                image_seconds=image.image_seconds)
        info = backend.describe()
        out["peak_gpu_mb"] = torch.cuda.max_memory_allocated(backend.device) / 2**20 if cuda else 0.0
        out["weight_bytes_per_token"] = backend.decode_weight_bytes()
        out["info"] = info
        out["gpu"] = torch.cuda.get_device_name(backend.device) if cuda else None
        out["gpu_bandwidth_gbps"] = gpu_copy_bandwidth_gbps(backend.device) if cuda else None
    return out


def _worker_main(argv: list[str]) -> None:
    side, spec_file, out_file = argv
    spec = AWQBenchSpec(**json.loads(Path(spec_file).read_text()))
    Path(out_file).write_text(json.dumps(_side(spec, side)))


# --- the parent --------------------------------------------------------------------------------------------------
def _run_side(side: str, spec: AWQBenchSpec, workdir: Path) -> tuple[dict[str, Any], float]:
    return run_side("r1v.bench.generate_awq", side, asdict(spec), workdir)


def _figures(runs: list[tuple[dict[str, Any], float]]) -> AWQSideFigures:
    first = runs[0][0]
    cuda = first["gpu"] is not None
    first_request = timing_figures([({"text": r["first"]}, rss) for r, rss in runs])
    other = timing_figures([({"text": r["other_length"]}, rss) for r, rss in runs])
    fig = AWQSideFigures(
        **timing_figures(runs),
        peak_memory_mb=round(statistics.median(r["peak_gpu_mb"] if cuda else rss for r, rss in runs), 1),
        weight_bytes_per_token=first["weight_bytes_per_token"], kernel=first["info"]["kernel"],
        dtype=first["info"]["dtype"],
        first_time_to_first_token=first_request["time_to_first_token"],
        first_decode_tokens_per_second=first_request["decode_tokens_per_second"],
        other_length_prompt_tokens=other["prompt_tokens"],
        other_length_decode_tokens_per_second=other["decode_tokens_per_second"],
        load_seconds=round(statistics.median(r["load_seconds"] for r, _ in runs), 2),
        cuda_graphs=bool(first["info"]["decode"]["cuda_graphs"]),
    )
    if "image" in first:
        fig.image_encode_seconds = round(statistics.median(r["image"]["image_seconds"] for r, _ in runs), 4)
    return fig


def bench_generate_awq(model: str, *, image: str | None = None, prompt_repeats: int = 12, max_tokens: int = 64,
                       n_ctx: int = 4096, n_batch: int = 512, n_threads: int | None = None,
                       device: str | None = None, kernel: str = "auto", rounds: int = 3) -> dict[str, Any]:
    """Measure the AWQ side and the fp16 side `rounds` times, alternating; figures, ratios, bandwidth bound."""
    from r1v.runtime.files.resolve import resolve_model

    resolved = resolve_model(model)
    if resolved.format != "awq":
        raise ValueError(f"{model}: not an AWQ checkpoint (got {resolved.format})")
    spec = AWQBenchSpec(str(resolved.path), image, prompt_repeats, max_tokens, n_ctx, n_batch, n_threads, device,
                        kernel)
    runs: dict[str, list[tuple[dict[str, Any], float]]] = {side: [] for side in SIDES}
    with tempfile.TemporaryDirectory(prefix="r1v-bench-awq-") as tmp:
        for _ in range(rounds):
            for side in SIDES:
                runs[side].append(_run_side(side, spec, Path(tmp)))
    figures = {side: _figures(runs[side]) for side in SIDES}
    awq, dense = figures["awq"], figures["fp16"]
    first = runs["awq"][0][0]
    on_gpu = first["gpu"] is not None
    if on_gpu:
        bandwidth = statistics.median(r["gpu_bandwidth_gbps"] for side in SIDES for r, _ in runs[side])
    else:
        bandwidth = memory_bandwidth_gbps(threads=n_threads)

    def bound(fig: AWQSideFigures) -> float:
        return bandwidth * 1e9 / fig.weight_bytes_per_token

    return {
        "model": spec.model, "rounds": rounds, "device": first["info"]["device"].split(":")[0], "gpu": first["gpu"],
        "placement": first["info"]["placement"], "n_ctx": n_ctx, "n_batch": n_batch,
        "awq": asdict(awq), "fp16": asdict(dense),
        "ratios": {
            "decode_speedup": ratio(awq.decode_tokens_per_second, dense.decode_tokens_per_second),
            "first_request_decode_speedup": ratio(awq.first_decode_tokens_per_second,
                                                  dense.first_decode_tokens_per_second),
            "prefill_ratio": ratio(awq.prefill_tokens_per_second, dense.prefill_tokens_per_second),
            "time_to_first_token_ratio": ratio(awq.time_to_first_token, dense.time_to_first_token),
            "peak_memory_ratio": ratio(awq.peak_memory_mb, dense.peak_memory_mb),
        },
        "bandwidth": {
            "memory_bandwidth_gbps": round(bandwidth, 2), "measured": "device copy" if on_gpu else "host read",
            "awq_weight_bytes_per_token": awq.weight_bytes_per_token,
            "fp16_weight_bytes_per_token": dense.weight_bytes_per_token,
            "awq_decode_bound_tokens_per_second": round(bound(awq), 1),
            "fp16_decode_bound_tokens_per_second": round(bound(dense), 1),
            "awq_decode_fraction_of_bound": ratio(awq.decode_tokens_per_second, bound(awq)),
            "fp16_decode_fraction_of_bound": ratio(dense.decode_tokens_per_second, bound(dense)),
        },
    }


# --- batched decode: one forward advancing M sequences ---------------------------------------------------------
BATCH_SIZES = (1, 2, 4, 8)


def bench_batched_decode(model: str, *, sizes: tuple[int, ...] = BATCH_SIZES, steps: int = 32, warm_up: int = 3,
                         prompt_repeats: int = 4, n_ctx: int = 1024, device: str | None = None,
                         kernel: str = "auto") -> dict[str, Any]:
    """Decode rate of the AWQ engine advancing M sequences per forward (`_step_batch`, what the scheduler calls
    each token), for M in `sizes`: one model copy loaded with parallel = max(sizes), every sequence holding the
    same text prompt; `warm_up` untimed steps, then `steps` timed ones per M. Aggregate tokens/s is M tokens per
    step; `speedup` is against M = 1 (memory-bound decode: close to M while the weights dominate a step)."""
    import torch

    from r1v.runtime.api import LoadOptions, load
    from r1v.runtime.backends.prompt import spans

    options = LoadOptions(n_ctx=n_ctx, parallel=max(sizes), device=device, kernel=kernel)
    rows = []
    with load(model, options) as loaded, torch.inference_mode():
        backend = loaded._backend
        prompt = backend.prepare(loaded.render(PROMPT_PARAGRAPH * prompt_repeats).fragments, [])
        if prompt.n_positions + warm_up + steps > n_ctx:
            raise ValueError(f"bench_batched_decode: a {prompt.n_positions}-token prompt and {warm_up + steps} steps "
                             f"do not fit n_ctx {n_ctx}")
        token = prompt.items[-1]  # any token will do: the rate does not depend on it
        for sequence in backend.sequences:
            backend._truncate(sequence, 0)
            for span in spans(prompt, 0, backend.n_batch, across_segments=backend.across_segments):
                backend._evaluate_span(sequence, prompt, span, {})
        for m in sizes:
            batch = [(sequence, token) for sequence in backend.sequences[:m]]
            for sequence, _ in batch:
                backend._truncate(sequence, prompt.n_positions)
            for _ in range(warm_up):
                backend._step_batch(batch)
            backend._sync()
            start = time.perf_counter()
            for _ in range(steps):
                backend._step_batch(batch)
            backend._sync()
            seconds = time.perf_counter() - start
            rows.append({"sequences": m, "step_ms": round(1e3 * seconds / steps, 3),
                         "tokens_per_second": round(m * steps / seconds, 2)})
        info = backend.describe()
    for row in rows:
        row["speedup"] = ratio(row["tokens_per_second"], rows[0]["tokens_per_second"])
    return {"model": str(model), "device": info["device"], "kernel": info["kernel"], "dtype": info["dtype"],
            "cuda_graphs": info["decode"]["cuda_graphs"], "batch_buckets": info["decode"]["batch_buckets"],
            "prompt_tokens": prompt.n_positions, "steps": steps, "rows": rows}


def format_batched(results: dict[str, Any]) -> str:
    lines = [f"batched decode: {results['model']} on {results['device']} ({results['kernel']}, {results['dtype']}, "
             f"CUDA graphs {results['cuda_graphs']}, buckets {results['batch_buckets']}; "
             f"{results['prompt_tokens']}-token prompts, {results['steps']} steps)",
             f"{'sequences':>10}{'step ms':>10}{'tok/s':>12}{'vs 1':>8}"]
    lines += [f"{r['sequences']:>10}{r['step_ms']:>10.2f}{r['tokens_per_second']:>12.1f}{r['speedup']:>8.2f}"
              for r in results["rows"]]
    return "\n".join(lines)


# Generated models for the benchmark (`make_bench_model`): "7b" is Qwen2-7B's width (3584 / 18944, 28 / 4 heads,
# 32k vocabulary) over 6 layers with a 1024-wide 4-layer ViT, the GPU model; "cpu" a 2048 / 5632, 4-layer
# model that is memory-bound on a CPU (its linears are most of what a decode step reads).
BENCH_MODELS: dict[str, dict[str, int]] = {
    "7b": dict(llm_hidden=3584, llm_intermediate=18944, llm_heads=28, llm_kv_heads=4, llm_layers=6,
               padded_vocab=32000, vit_hidden=1024, vit_intermediate=4096, vit_heads=16, vit_layers=4),
    "cpu": dict(llm_hidden=2048, llm_intermediate=5632, llm_heads=16, llm_kv_heads=4, llm_layers=4,
                vit_hidden=256, vit_intermediate=1024, vit_heads=4, vit_layers=4),
}


def make_bench_model(outdir: str | Path, preset: str = "7b", *, device: str = "cpu", method: str = "rtn",
                     n_samples: int = 16, seq_len: int = 256) -> Path:
    """A random R1V-layout checkpoint of `preset`'s sizes (BENCH_MODELS), converted as `r1v convert awq --method
    METHOD --device DEVICE` converts; the AWQ directory `outdir` (the fp16 source beside it, `outdir`-src)."""
    from r1v.quant.driver import quantize_checkpoint_awq
    from r1v.testing import make_tiny_checkpoint

    if preset not in BENCH_MODELS:
        raise ValueError(f"preset {preset!r}: expected one of {', '.join(BENCH_MODELS)}")
    out = Path(outdir)
    source = out.with_name(out.name + "-src")
    if not (source / "config.json").is_file():
        make_tiny_checkpoint(source, vit="6b", seed=0, dtype="f16", max_shard_bytes=1 << 30, **BENCH_MODELS[preset])
    if not (out / "config.json").is_file():
        quantize_checkpoint_awq(source, out, method=method, device=device, n_samples=n_samples, seq_len=seq_len,
                                progress=False)
    return out


def format_results(results: dict[str, Any]) -> str:
    awq, dense = results["awq"], results["fp16"]
    where = results["gpu"] or "CPU"
    rows = [
        ("kernel", "kernel", "{}"), ("compute dtype", "dtype", "{}"), ("CUDA graphs", "cuda_graphs", "{}"),
        ("load s", "load_seconds", "{:.2f}"),
        *TIMING_ROWS,
        ("first request: time to first token s", "first_time_to_first_token", "{:.3f}"),
        ("first request: decode tok/s", "first_decode_tokens_per_second", "{:.2f}"),
        ("new prompt length: prompt tokens", "other_length_prompt_tokens", "{:.0f}"),
        ("new prompt length: decode tok/s", "other_length_decode_tokens_per_second", "{:.2f}"),
        ("  of which vision tower s", "image_encode_seconds", "{:.3f}"),
        ("peak memory MB" + (" (GPU)" if results["gpu"] else " (RSS)"), "peak_memory_mb", "{:.0f}"),
        ("weights read per token MB", "weight_bytes_per_token", "{:.1f}"),
    ]
    lines = [f"{results['model']} on {where}, {results['placement']}  ({results['rounds']} alternating rounds, "
             "medians; steady state unless marked: the request measured a second time in its process)", "",
             f"{'':<40}{'AWQ 4-bit':>14}{'fp16 (dense)':>14}"]
    for title, key, fmt in rows:
        a, b = awq[key], dense[key]
        if key == "weight_bytes_per_token":
            a, b = a / 1e6, b / 1e6
        lines.append(f"{title:<40}{fmt.format(a):>14}{fmt.format(b):>14}")
    lines.append("")
    lines += [f"{key:<40}{value:>14.3f}" for key, value in results["ratios"].items()]
    bw = results["bandwidth"]
    lines.append("")
    lines.append(f"memory bandwidth {bw['memory_bandwidth_gbps']:.1f} GB/s ({bw['measured']}): decode bound "
                 f"{bw['awq_decode_bound_tokens_per_second']:.1f} tok/s (AWQ) / "
                 f"{bw['fp16_decode_bound_tokens_per_second']:.1f} tok/s (fp16); decode reaches "
                 f"{bw['awq_decode_fraction_of_bound']:.2f} / {bw['fp16_decode_fraction_of_bound']:.2f} of it")
    return "\n".join(lines)


if __name__ == "__main__":
    _worker_main(sys.argv[1:])
