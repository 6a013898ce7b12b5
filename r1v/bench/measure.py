"""Measurement helpers shared by the benchmarks: a command's own peak RSS, a benchmark side run in its own child
process, the timing figures of its runs, this machine's memory bandwidth and a GPU's copy bandwidth."""
from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

# Linux carries a parent's peak RSS into a forked child's ru_maxrss (it survives exec), so the measured
# command is forked from this small launcher rather than from the benchmark process itself.
_LAUNCHER = """
import os, sys
pid = os.fork()
if pid == 0:
    os.execvp(sys.argv[2], sys.argv[2:])
_, status, usage = os.wait4(pid, 0)
with open(sys.argv[1], "w") as f:
    f.write(str(usage.ru_maxrss))
sys.exit(os.waitstatus_to_exitcode(status))
"""


def run_measured(cmd: list[str], env: dict[str, str] | None = None) -> tuple[float, float]:
    """Run `cmd`, return (wall seconds, peak RSS in MB) of that command alone."""
    with tempfile.NamedTemporaryFile("r", suffix=".maxrss") as report:
        start = time.perf_counter()
        proc = subprocess.run([sys.executable, "-c", _LAUNCHER, report.name, *cmd], env=env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        seconds = time.perf_counter() - start
        if proc.returncode != 0:
            stderr = proc.stderr.decode(errors="replace")
            raise RuntimeError(f"{' '.join(cmd[:4])} ... failed ({proc.returncode}):\n{stderr[-2000:]}")
        return seconds, int(report.read()) / 1024  # Linux reports KiB


def run_side(module: str, side: str, job: dict[str, Any], workdir: Path) -> tuple[dict[str, Any], float]:
    """Run the benchmark worker `python -m module SIDE JOB.json OUT.json` with `job`; its JSON result and the
    child's peak RSS in MB."""
    job_file, out_file = workdir / f"{side}-job.json", workdir / f"{side}-out.json"
    job_file.write_text(json.dumps(job))
    _, rss = run_measured([sys.executable, "-m", module, side, str(job_file), str(out_file)])
    return json.loads(out_file.read_text()), rss


# (title, figure, format) of the rows every generate benchmark prints, in order
TIMING_ROWS = (
    ("prompt tokens", "prompt_tokens", "{:.0f}"),
    ("prefill tok/s (to first token)", "prefill_tokens_per_second", "{:.1f}"),
    ("time to first token s", "time_to_first_token", "{:.3f}"),
    ("decode tok/s", "decode_tokens_per_second", "{:.2f}"),
    ("decoded tokens", "completion_tokens", "{:.0f}"),
    ("image prompt tokens", "image_prompt_tokens", "{:.0f}"),
    ("image time to first token s", "image_time_to_first_token", "{:.3f}"),
)


def ratio(a: float, b: float) -> float:
    """a / b to three decimals; 0 when b is 0 (a figure not measured)."""
    return round(a / b, 3) if b else 0.0


def timing_figures(runs: list[tuple[dict[str, Any], float]]) -> dict[str, Any]:
    """Medians over a side's runs (each a worker result with a "text" part and, for an image prompt, an "image"
    part): prompt and completion tokens, time to first token, prefill and decode tokens/s, image figures."""
    def median(key: str, part: str = "text") -> float:
        return statistics.median(r[part][key] for r, _ in runs)

    first = runs[0][0]
    fig: dict[str, Any] = {"prompt_tokens": first["text"]["prompt_tokens"],
                           "completion_tokens": first["text"]["completion_tokens"],
                           "time_to_first_token": round(median("time_to_first_token"), 4)}
    fig["prefill_tokens_per_second"] = round(fig["prompt_tokens"] / fig["time_to_first_token"], 1)
    decode = median("decode_seconds")
    fig["decode_tokens_per_second"] = round((fig["completion_tokens"] - 1) / decode, 2) if decode > 0 else 0.0
    if "image" in first:
        fig["image_prompt_tokens"] = first["image"]["prompt_tokens"]
        fig["image_time_to_first_token"] = round(median("time_to_first_token", "image"), 4)
    return fig



def memory_bandwidth_gbps(size_mb: int = 512, repeats: int = 5, threads: int | None = None) -> float:
    """Sustained read bandwidth in GB/s: the best of `repeats` parallel sums (numpy releases the GIL)
    over an array far larger than the caches, one slice per thread, as decoding reads weights."""
    threads = threads or os.cpu_count() or 1
    data = np.ones(size_mb * (1 << 20) // 8, dtype=np.float64)
    slices = np.array_split(data, threads)
    data.sum()  # fault the pages in
    best = float("inf")
    with ThreadPoolExecutor(threads) as pool:
        for _ in range(repeats):
            start = time.perf_counter()
            list(pool.map(np.sum, slices))
            best = min(best, time.perf_counter() - start)
    return data.nbytes / best / 1e9


def gpu_copy_bandwidth_gbps(device: Any, size_mb: int = 1024, repeats: int = 10) -> float:
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
