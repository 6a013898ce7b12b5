"""Measurement helpers shared by the benchmarks: a command's own peak RSS, this machine's memory bandwidth."""
from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor

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
