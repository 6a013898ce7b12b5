"""`r1v serve` in a subprocess, as a user runs it: shared by the server tests (imported by module name, like the
oracles here). The log goes to a file the tests read; the process is stopped with SIGINT, as Ctrl-C stops it."""
from __future__ import annotations

import signal
import subprocess
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import httpx
import pytest


@dataclass(frozen=True)
class Served:
    url: str
    proc: subprocess.Popen
    log: Path

    def peak_rss_mb(self) -> float:
        """The server process's peak resident memory so far (VmHWM), in MiB."""
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
        raise RuntimeError("no VmHWM in /proc/PID/status")


@contextmanager
def serve_process(model: str, port: int, log: Path, *args: str, startup_s: float = 300) -> Iterator[Served]:
    """Start `r1v serve MODEL --port PORT ARGS...`, wait until /health answers, yield; stop it with SIGINT and
    check it exits cleanly (rc 0)."""
    cmd = [sys.executable, "-m", "r1v", "serve", model, "--port", str(port), *args]
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + startup_s
    while True:
        try:
            if httpx.get(url + "/health", timeout=1).status_code == 200:
                break
        except httpx.HTTPError:
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"r1v serve did not start:\n{log.read_text()[-3000:]}")
        time.sleep(0.1)
    try:
        yield Served(url, proc, log)
    finally:
        proc.send_signal(signal.SIGINT)  # as Ctrl-C: uvicorn shuts down, the models are closed
        try:
            assert proc.wait(timeout=30) == 0, log.read_text()[-3000:]
        finally:
            if proc.poll() is None:
                proc.kill()
