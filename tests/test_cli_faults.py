"""The `r1v` command under careless use: a reader that stops early, a port that is taken. One clear line (or
none), never a traceback."""
from __future__ import annotations

import json
import socket
import subprocess
import sys
from pathlib import Path

import pytest


@pytest.mark.slow
def test_output_piped_into_a_reader_that_stops_early_exits_quietly(tmp_path: Path):
    # `r1v cache ls --json | head -0`: the reader is gone before the first write
    proc = subprocess.Popen([sys.executable, "-m", "r1v", "cache", "ls", "--json", "--dir", str(tmp_path)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    proc.stdout.close()
    stderr = proc.stderr.read().decode()
    assert proc.wait(timeout=60) == 141 and stderr == ""  # as a process killed by SIGPIPE, and silent
    listed = subprocess.run([sys.executable, "-m", "r1v", "cache", "ls", "--json", "--dir", str(tmp_path)],
                            capture_output=True, text=True)
    assert listed.returncode == 0 and json.loads(listed.stdout)["entries"] == []


def test_view_on_a_busy_port_says_so_in_one_line(tmp_path: Path):
    results = tmp_path / "results.jsonl"
    results.write_text(json.dumps({"question": "q", "response": {"full_response": "a"}}) + "\n")
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        run = subprocess.run([sys.executable, "-m", "r1v", "view", str(results), "--port", str(port)],
                             capture_output=True, text=True, timeout=60)
    assert run.returncode == 2 and run.stdout == ""
    assert run.stderr == (f"r1v view: error: cannot listen on 127.0.0.1:{port}: Address already in use "
                          "(--port 0 picks a free port)\n")
