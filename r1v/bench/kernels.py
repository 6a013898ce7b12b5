"""`python -m r1v.bench.kernels`: the AWQ linear's kernels against the plain dense product, at a model's shapes.

Per linear shape (K -> N, group 128, random AutoAWQ GEMM tensors) and number of rows M, microseconds per call:

- `dense`: the dequantized weight through cuBLAS (fp16 on CUDA; fp32 on CPU, the CPU backend's compute dtype);
- `ours`: `Int4Linear`, what kernel "auto" runs (torch's int4 kernel up to `int4.CUDA_MAX_M` rows on CUDA, one
  dequantize pass + cuBLAS above; torch's CPU int4 kernel at every M on CPU);
- `int4_tinygemm`: torch's int4 kernel at every M; `dequant_cublas`: the dequantize pass + cuBLAS at every M, and
  `dequant`: that pass alone (the two sides of the threshold, to set `CUDA_MAX_M` by);
- `triton`: our Triton kernels (kernel "triton"; CUDA only);
- `bound`: the 4-bit weight's bytes over the device's copy bandwidth (read + write, measured here).

CUDA timings are `triton.testing.do_bench` medians (it clears the L2 between calls), CPU ones medians of wall
time. `--json FILE` writes the rows; the printed table is the issue's.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

from .measure import gpu_copy_bandwidth_gbps, memory_bandwidth_gbps

# (name, K, N): Skywork-R1V-38B's decoder linears (hidden 5120, intermediate 27648); a 7B-class model's
# (Qwen2-7B: 3584 / 18944); the CPU benchmark model's (2048 / 5632).
SHAPES: dict[str, list[tuple[str, int, int]]] = {
    "38b": [("gate/up", 5120, 27648), ("down", 27648, 5120), ("q/o", 5120, 5120)],
    "7b": [("gate/up", 3584, 18944), ("down", 18944, 3584), ("q/o", 3584, 3584)],
    "cpu": [("gate/up", 2048, 5632), ("down", 5632, 2048), ("q/o", 2048, 2048)],
}
ROWS = (1, 4, 16, 32, 64, 512)
GROUP = 128
COLUMNS = ("dense", "ours", "int4_tinygemm", "dequant_cublas", "dequant", "triton")


@dataclass
class KernelRow:
    shape: str
    k: int
    n: int
    m: int
    dense_us: float | None = None
    ours_us: float | None = None
    int4_tinygemm_us: float | None = None
    dequant_cublas_us: float | None = None
    dequant_us: float | None = None
    triton_us: float | None = None
    bound_us: float | None = None
    ours_rel_error: float | None = None  # max |ours - dense| / max |dense| (dense: the exact dequantized weight)
    errors: dict[str, str] | None = None  # column: why it was not measured


def _timer(device: Any) -> Callable[[Callable[[], Any]], float]:
    """Microseconds per call of a function."""
    if device.type == "cuda":
        from triton.testing import do_bench

        return lambda fn: do_bench(fn, warmup=10, rep=50, return_mode="median") * 1e3

    def cpu(fn: Callable[[], Any]) -> float:
        fn()
        times = []
        budget = time.perf_counter() + 2.0
        while len(times) < 5 or (time.perf_counter() < budget and len(times) < 50):
            start = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start)
        return statistics.median(times) * 1e6
    return cpu


def _layer(k: int, n: int, device: Any) -> tuple[Any, Any, Any]:
    """Random AutoAWQ GEMM tensors (any codes, zeros; scales of a real layer's size)."""
    import torch

    gen = torch.Generator(device).manual_seed(k * 7 + n)
    qweight = torch.randint(-2**31, 2**31 - 1, (k, n // 8), dtype=torch.int32, device=device, generator=gen)
    qzeros = torch.randint(-2**31, 2**31 - 1, (k // GROUP, n // 8), dtype=torch.int32, device=device, generator=gen)
    scales = (torch.rand(k // GROUP, n, device=device, generator=gen) * 2e-3 + 1e-3).to(torch.float16)
    return qweight, qzeros, scales


def bench_shape(name: str, k: int, n: int, rows: tuple[int, ...], device: Any, bandwidth: float) -> list[KernelRow]:
    import torch
    import torch.nn.functional as F

    from r1v.runtime.backends.awq import int4, kernels
    from r1v.runtime.backends.awq.qlinear import Int4Linear

    cuda = device.type == "cuda"
    timer = _timer(device)
    qweight, qzeros, scales = _layer(k, n, device)
    dense_dtype = torch.float16 if cuda else torch.float32
    weight = kernels.dequantize_torch(qweight, qzeros, scales, GROUP, dense_dtype)  # [N, K]
    linear = Int4Linear.from_awq(qweight, qzeros, scales)
    w4 = linear.weight4
    out: list[KernelRow] = []
    for m in rows:
        row = KernelRow(name, k, n, m, errors={})
        row.bound_us = round(k * n / 2 / (bandwidth * 1e9) * 1e6, 1)
        x = torch.randn(m, k, device=device, dtype=dense_dtype) * 0.1
        xb = x.to(torch.bfloat16) if cuda else x
        calls: dict[str, Callable[[], Any]] = {
            "dense": lambda: F.linear(x, weight),
            "ours": lambda: linear(xb),
        }
        if cuda:
            xb2 = xb.contiguous()
            calls["int4_tinygemm"] = lambda: torch.ops.aten._weight_int4pack_mm(xb2, w4.packed, GROUP,
                                                                               w4.scales_and_zeros)
            calls["dequant_cublas"] = lambda: F.linear(xb, int4.dequantize(w4, torch.bfloat16))
            calls["dequant"] = lambda: int4.dequantize(w4, torch.bfloat16)
            calls["triton"] = lambda: kernels.awq_linear(x, qweight, qzeros, scales, GROUP, kernel="triton")
        for column, fn in calls.items():
            try:
                setattr(row, f"{column}_us", round(timer(fn), 1))
            except Exception as exc:  # a kernel that cannot run here: recorded, the table goes on
                row.errors[column] = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"[:300]
        try:
            ref = F.linear(x.float(), weight.float())
            row.ours_rel_error = float((linear(xb).float() - ref).abs().max() / ref.abs().max())
        except Exception as exc:
            row.errors["ours_rel_error"] = f"{type(exc).__name__}: {exc}"[:300]
        out.append(row)
        print(format_row(row), file=sys.stderr, flush=True)
    del weight, linear, qweight, qzeros, scales
    if cuda:
        torch.cuda.empty_cache()
    return out


def bench_kernels(shapes: str = "38b", rows: tuple[int, ...] = ROWS, device: str | None = None) -> dict[str, Any]:
    import torch

    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if dev.type == "cuda" and dev.index is None:
        dev = torch.device("cuda", torch.cuda.current_device())
    bandwidth = gpu_copy_bandwidth_gbps(dev) if dev.type == "cuda" else memory_bandwidth_gbps()
    results: list[KernelRow] = []
    with torch.inference_mode():
        for name, k, n in SHAPES[shapes]:
            try:
                results += bench_shape(name, k, n, rows, dev, bandwidth)
            except Exception as exc:  # e.g. no int4 kernel on this GPU: recorded, the next shape runs
                why = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"[:300]
                results += [KernelRow(name, k, n, m, errors={"shape": why}) for m in rows]
    from r1v.runtime.backends.awq import int4

    return {
        "device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else "CPU",
        "torch": torch.__version__, "shapes": shapes, "group_size": GROUP, "bandwidth_gbps": round(bandwidth, 1),
        "cuda_max_m": int4.CUDA_MAX_M, "crossover": crossovers(results), "rows": [asdict(r) for r in results],
    }


def crossovers(rows: list[KernelRow]) -> dict[str, int | None]:
    """Per shape, the smallest M at which dequantize + cuBLAS beats torch's int4 kernel (None: never measured)."""
    found: dict[str, int | None] = {}
    for row in rows:
        found.setdefault(row.shape, None)
        if found[row.shape] is None and row.dequant_cublas_us and row.int4_tinygemm_us \
                and row.dequant_cublas_us < row.int4_tinygemm_us:
            found[row.shape] = row.m
    return found


def _fmt(value: float | None) -> str:
    return "—" if value is None else f"{value:.1f}"


HEADER = (f"{'linear':<22}{'M':>5}{'dense':>10}{'ours':>10}{'int4 tg':>10}{'deq+mm':>10}{'deq':>9}"
          f"{'triton':>10}{'bound':>8}{'ours/dense':>12}")


def format_row(row: KernelRow) -> str:
    speed = f"{row.dense_us / row.ours_us:.2f}x" if row.dense_us and row.ours_us else "—"
    return (f"{f'{row.shape} {row.k}->{row.n}':<22}{row.m:>5}{_fmt(row.dense_us):>10}{_fmt(row.ours_us):>10}"
            f"{_fmt(row.int4_tinygemm_us):>10}{_fmt(row.dequant_cublas_us):>10}{_fmt(row.dequant_us):>9}"
            f"{_fmt(row.triton_us):>10}{_fmt(row.bound_us):>8}{speed:>12}")


def format_results(results: dict[str, Any]) -> str:
    lines = [f"AWQ linear kernels on {results['device']} (torch {results['torch']}, group {results['group_size']}, "
             f"bandwidth {results['bandwidth_gbps']} GB/s), microseconds per call; 'ours' = kernel auto "
             f"(torch int4 up to {results['cuda_max_m']} rows on CUDA)", "", HEADER]
    lines += [format_row(KernelRow(**{k: v for k, v in r.items()})) for r in results["rows"]]
    lines.append("")
    if any(r["int4_tinygemm_us"] for r in results["rows"]):  # both sides of the CUDA threshold were measured
        lines.append("dequantize + cuBLAS first beats torch's int4 kernel at M = " +
                     ", ".join(f"{shape}: {m or 'never'}" for shape, m in results["crossover"].items()))
    errors = [(r["shape"], r["m"], c, e) for r in results["rows"] for c, e in (r["errors"] or {}).items()]
    lines += [f"not measured: {s} M={m} {c}: {e}" for s, m, c, e in errors]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m r1v.bench.kernels", description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", choices=sorted(SHAPES), default="38b", help="whose linears (default 38b)")
    parser.add_argument("--rows", default=",".join(map(str, ROWS)), help="numbers of rows M, comma-separated")
    parser.add_argument("--device", default=None, help="cuda, cuda:N or cpu (default: CUDA when present)")
    parser.add_argument("--json", type=Path, default=None, metavar="FILE", help="also write the results here")
    args = parser.parse_args(argv)
    rows = tuple(int(r) for r in args.rows.split(",") if r.strip())
    results = bench_kernels(args.shapes, rows, args.device)
    if args.json:
        tmp = args.json.with_name(args.json.name + ".tmp")
        tmp.write_text(json.dumps(results, indent=2))
        tmp.replace(args.json)
    print(format_results(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
