"""`r1v bench generate AWQ_DIR`: the AWQ backend next to the same model dequantized to fp16 (every quantized linear
dequantized once at load into a plain linear, `kernel="dense"`), in the same run, on the same device: prefill and
decode tokens/s, time to first token (text, and an image prompt with --image), peak memory (GPU: torch's peak
allocation; CPU: peak RSS), and decode as a fraction of the memory-bandwidth bound (bandwidth / bytes of weights one
decode step reads).

Each side runs in its own child process (clean peak memory) after a short warm-up (Triton compiles on first use);
the sides alternate `rounds` times and medians are reported. Both decode exactly `max_tokens` tokens: the end token
is ignored while measuring. On CPU the compute dtype is fp32, so the "fp16" side holds the fp16 values in fp32
(4 bytes per weight): the figures say which dtype ran.
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
from .measure import TIMING_ROWS, memory_bandwidth_gbps, ratio, run_side, timing_figures

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


# --- one side, in a child process -------------------------------------------------------------------------------
def _side(spec: AWQBenchSpec, side: str) -> dict[str, Any]:
    import torch

    from r1v.runtime.api import LoadOptions, load

    options = LoadOptions(n_ctx=spec.n_ctx, n_batch=spec.n_batch, n_threads=spec.n_threads, device=spec.device,
                          kernel=spec.kernel if side == "awq" else "dense")
    out: dict[str, Any] = {}
    with load(spec.model, options) as model:
        backend = model._backend
        backend._end_ids = frozenset()  # both sides decode exactly max_tokens
        greedy = dict(temperature=0, repetition_penalty=1.0, seed=0)
        model.generate("Hello", max_tokens=4, **greedy)  # warm-up: Triton compiles, allocator settles
        model.reset()
        cuda = backend.device.type == "cuda"
        if cuda:
            torch.cuda.reset_peak_memory_stats(backend.device)
        result = model.generate(PROMPT_PARAGRAPH * spec.prompt_repeats, max_tokens=spec.max_tokens, **greedy)
        out["text"] = dict(prompt_tokens=result.prompt_tokens, completion_tokens=result.completion_tokens,
                           time_to_first_token=result.time_to_first_token, decode_seconds=result.decode_seconds)
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
        out["gpu_bandwidth_gbps"] = _gpu_bandwidth_gbps(backend.device) if cuda else None
    return out


def _gpu_bandwidth_gbps(device: Any, size_mb: int = 1024, repeats: int = 10) -> float:
    """Device-to-device copy bandwidth (read + write bytes per second), best of `repeats`."""
    import torch

    src = torch.empty(size_mb << 20, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    dst.copy_(src)
    best = float("inf")
    for _ in range(repeats):
        torch.cuda.synchronize(device)
        start = time.perf_counter()
        dst.copy_(src)
        torch.cuda.synchronize(device)
        best = min(best, time.perf_counter() - start)
    return 2 * src.numel() / best / 1e9


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
    fig = AWQSideFigures(
        **timing_figures(runs),
        peak_memory_mb=round(statistics.median(r["peak_gpu_mb"] if cuda else rss for r, rss in runs), 1),
        weight_bytes_per_token=first["weight_bytes_per_token"], kernel=first["info"]["kernel"],
        dtype=first["info"]["dtype"],
    )
    if "image" in first:
        fig.image_encode_seconds = round(statistics.median(r["image"]["image_seconds"] for r, _ in runs), 4)
    return fig


def bench_generate_awq(model: str, *, image: str | None = None, prompt_repeats: int = 12, max_tokens: int = 64,
                       n_ctx: int = 4096, n_batch: int = 512, n_threads: int | None = None,
                       device: str | None = None, kernel: str = "auto", rounds: int = 3) -> dict[str, Any]:
    """Measure the AWQ side and the fp16 side `rounds` times, alternating; figures, ratios, bandwidth bound."""
    from r1v.runtime.resolve import resolve_model

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


def format_results(results: dict[str, Any]) -> str:
    awq, dense = results["awq"], results["fp16"]
    where = results["gpu"] or "CPU"
    rows = [
        ("kernel", "kernel", "{}"), ("compute dtype", "dtype", "{}"),
        *TIMING_ROWS,
        ("  of which vision tower s", "image_encode_seconds", "{:.3f}"),
        ("peak memory MB" + (" (GPU)" if results["gpu"] else " (RSS)"), "peak_memory_mb", "{:.0f}"),
        ("weights read per token MB", "weight_bytes_per_token", "{:.1f}"),
    ]
    lines = [f"{results['model']} on {where}, {results['placement']}  ({results['rounds']} alternating rounds, "
             "medians)", "", f"{'':<34}{'AWQ 4-bit':>14}{'fp16 (dense)':>14}"]
    for title, key, fmt in rows:
        a, b = awq[key], dense[key]
        if key == "weight_bytes_per_token":
            a, b = a / 1e6, b / 1e6
        lines.append(f"{title:<34}{fmt.format(a):>14}{fmt.format(b):>14}")
    lines.append("")
    lines += [f"{key:<34}{value:>14.3f}" for key, value in results["ratios"].items()]
    bw = results["bandwidth"]
    lines.append("")
    lines.append(f"memory bandwidth {bw['memory_bandwidth_gbps']:.1f} GB/s ({bw['measured']}): decode bound "
                 f"{bw['awq_decode_bound_tokens_per_second']:.1f} tok/s (AWQ) / "
                 f"{bw['fp16_decode_bound_tokens_per_second']:.1f} tok/s (fp16); decode reaches "
                 f"{bw['awq_decode_fraction_of_bound']:.2f} / {bw['fp16_decode_fraction_of_bound']:.2f} of it")
    return "\n".join(lines)


if __name__ == "__main__":
    _worker_main(sys.argv[1:])
