"""`r1v batch`: Skywork's r1v4 JSONL format in and out, resumable, and crash-safe line by line.

A scripted model checks the output fields (Skywork's `response: {full_response, raw_response}` plus the parsed
reasoning / answer / rounds), resuming, a half-written last line, failed items and --retry-errors. The tiny
converted GGUF checks the real thing: `r1v batch` killed with SIGKILL halfway and started again ends with exactly
one output line per input line, the lines written before the kill untouched.
"""
from __future__ import annotations

import io
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from r1v.converters.gguf import GGUFConversion
from r1v.runtime.api import LoadOptions, Model
from r1v.apps.batch import BatchBusyError, BatchConfig, plan_batch, run_batch

R1V4_OUTPUT = ('I should zoom in.</think>\n<tool_call>{"name": "code", "arguments": {"code": "crop()"}}</tool_call>\n'
               '<observation>{"result": "3 circles"}</observation>\n<think>Three.</think>\n<answer>3</answer>')


class _ScriptedBackend:
    """Stands in for llama.cpp: every request yields `text` split in a few pieces, then the end token."""

    path, mmproj_path, n_ctx, chat_template = Path("scripted.gguf"), Path("mmproj.gguf"), 4096, None
    special_texts = {"bos_token": "", "eos_token": ""}

    def __init__(self, text: str):
        data = text.encode()
        self.pieces = [data[i:i + 7] for i in range(0, len(data), 7)] + [b""]
        self.images: list[list] = []

    def prepare(self, pieces, images):
        self.images.append(list(images))
        return None

    def start(self, prompt, params):
        from r1v.runtime.backends.prompt import RunStats

        pieces = self.pieces

        class Run:
            stats = RunStats(prompt_tokens=12)

            def __iter__(self):
                for i, piece in enumerate(pieces):
                    yield 100 + i, piece, i == len(pieces) - 1

            def close(self):
                pass

        return Run()

    def close(self):
        pass


def _png(path: Path, seed: int = 0) -> Path:
    pixels = np.random.default_rng(seed).integers(0, 255, (64, 96, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path)
    return path


def _write_jsonl(path: Path, items: list[dict]) -> Path:
    path.write_text("".join(json.dumps(item) + "\n" for item in items))
    return path


def _lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _stable(record: dict) -> dict:
    """A record without what differs from run to run (completion id, time)."""
    raw = {k: v for k, v in record["response"]["raw_response"].items() if k not in ("id", "created")}
    return {**record, "r1v": {**record["r1v"], "seconds": None},
            "response": {**record["response"], "raw_response": raw}}


@pytest.fixture()
def inputs(tmp_path: Path) -> Path:
    (tmp_path / "images").mkdir()
    _png(tmp_path / "images" / "a.png", 1)
    _png(tmp_path / "images" / "b.png", 2)
    return _write_jsonl(tmp_path / "cases.jsonl", [
        {"image": "./images/a.png", "question": "How many circles?"},
        {"image": "", "question": "A text-only question", "tag": "kept"},
        {"image": "images/b.png", "question": "And here?"},
    ])


def _run(model: Model, config: BatchConfig):
    return run_batch(model, config, out=io.StringIO())


def test_output_is_skyworks_format_plus_parsed_fields(inputs: Path, tmp_path: Path):
    backend = _ScriptedBackend(R1V4_OUTPUT)
    out = tmp_path / "results" / "out.jsonl"
    summary = _run(Model(backend, None, LoadOptions()), BatchConfig(inputs, out, model_name="tiny", progress=False))
    assert (summary.total, summary.answered, summary.failed, summary.skipped) == (3, 3, 0, 0)
    records = _lines(out)
    assert [r["r1v"]["index"] for r in records] == [0, 1, 2]
    first, text_only = records[0], records[1]
    ours = first["r1v"]
    assert first["image"] == "./images/a.png" and first["question"] == "How many circles?"
    assert text_only["tag"] == "kept" and "image_path" not in text_only["r1v"]
    assert (out.parent / ours["image_path"]).resolve() == (inputs.parent / "images" / "a.png").resolve()
    assert [len(images) for images in backend.images] == [1, 0, 1]  # the image went to the model
    full = first["response"]["full_response"]
    assert full == "<think>\n" + R1V4_OUTPUT  # the <think> the prompt opened is part of the reading
    # Skywork's parse_full_response reads it: its regexes find both thinks, the tool call and the answer
    assert [t.strip() for t in re.findall(r"<think>(.*?)</think>", full, re.DOTALL)] == ["I should zoom in.", "Three."]
    assert json.loads(re.findall(r"<tool_call>(.*?)</tool_call>", full, re.DOTALL)[0])["name"] == "code"
    raw = first["response"]["raw_response"]
    assert raw["object"] == "chat.completion" and raw["model"] == "tiny"
    assert raw["choices"][0]["message"]["reasoning_content"] == ours["reasoning"]  # both think blocks
    assert ours["reasoning"].startswith("I should zoom in.") and ours["reasoning"].endswith("Three.")
    assert ours["answer"] == "3"
    assert [r["kind"] for r in ours["rounds"]] == ["think", "tool_call", "observation", "think", "answer"]
    assert ours["rounds"][1]["tool_call"] == {"name": "code", "arguments": {"code": "crop()"}}
    assert ours["usage"]["prompt_tokens"] == 12 and ours["finish_reason"] == "stop"


def test_resume_skips_done_items_and_cuts_a_half_written_line(inputs: Path, tmp_path: Path):
    out = tmp_path / "out.jsonl"
    model = Model(_ScriptedBackend("thinking</think>42"), None, LoadOptions())
    _run(model, BatchConfig(inputs, out, progress=False))
    lines = out.read_text().splitlines(keepends=True)
    out.write_text(lines[0] + lines[1][: len(lines[1]) // 2])  # killed while writing the second line
    with plan_batch(BatchConfig(inputs, out)) as plan:
        assert [index for _, index, _ in plan.todo] == [1, 2]
    assert out.read_text() == lines[0]  # the half line is gone
    summary = _run(model, BatchConfig(inputs, out, progress=False))
    assert (summary.skipped, summary.answered) == (1, 2)
    assert out.read_text().startswith(lines[0])
    assert [_stable(r) for r in _lines(out)] == [_stable(json.loads(line)) for line in lines]
    assert _run(model, BatchConfig(inputs, out, progress=False)).answered == 0  # nothing left to do


def test_failed_items_are_recorded_and_retried_on_request(inputs: Path, tmp_path: Path):
    (inputs.parent / "images" / "b.png").rename(inputs.parent / "images" / "moved.png")
    out = tmp_path / "out.jsonl"
    model = Model(_ScriptedBackend("thinking</think>42"), None, LoadOptions())
    summary = _run(model, BatchConfig(inputs, out, progress=False))
    assert (summary.answered, summary.failed) == (2, 1)
    error = _lines(out)[2]["response"]["error"]
    assert "image not found" in error and "b.png" in error
    assert _run(model, BatchConfig(inputs, out, progress=False)).answered == 0  # errors count as done...
    (inputs.parent / "images" / "moved.png").rename(inputs.parent / "images" / "b.png")
    summary = _run(model, BatchConfig(inputs, out, retry_errors=True, progress=False))  # ...unless retried
    assert (summary.answered, summary.failed, summary.skipped) == (1, 0, 2)
    records = _lines(out)
    assert sorted(r["r1v"]["index"] for r in records) == [0, 1, 2] and all("answer" in r["r1v"] for r in records)


def test_items_with_ids_are_keyed_by_id(tmp_path: Path):
    items = [{"id": f"q{i}", "image": "", "question": f"question {i}"} for i in range(3)]
    inputs = _write_jsonl(tmp_path / "in.jsonl", items)
    out = tmp_path / "out.jsonl"
    model = Model(_ScriptedBackend("t</think>a"), None, LoadOptions())
    _run(model, BatchConfig(inputs, out, progress=False))
    _write_jsonl(inputs, [items[2], items[0], {"id": "q3", "image": "", "question": "new"}, items[1]])  # reordered
    summary = _run(model, BatchConfig(inputs, out, progress=False))
    assert (summary.answered, summary.skipped) == (1, 3)
    assert [r["id"] for r in _lines(out)] == ["q0", "q1", "q2", "q3"]
    _write_jsonl(inputs, [items[0], items[0]])
    with pytest.raises(ValueError, match="repeats id:q0"):
        plan_batch(BatchConfig(inputs, out))


def test_bad_input_lines_are_named(tmp_path: Path):
    bad = tmp_path / "in.jsonl"
    bad.write_text('{"image": "", "question": "ok"}\n\n{"image": 3, "question": "x"}\n')
    with pytest.raises(ValueError, match=r"in.jsonl:3: 'image'"):
        plan_batch(BatchConfig(bad, tmp_path / "out.jsonl"))
    bad.write_text('{"image": ""}\n')
    with pytest.raises(ValueError, match=r"in.jsonl:1: 'question'"):
        plan_batch(BatchConfig(bad, tmp_path / "out.jsonl"))
    with pytest.raises(ValueError, match="must not be the input"):
        BatchConfig(bad, bad)


def test_input_fields_are_kept_and_the_output_has_its_own_keys(tmp_path: Path):
    # The input's ground truth (`answer`, `reasoning`) was overwritten by the model's: 13 of 20 lines lost it.
    items = [{"id": f"q{i}", "image": "", "question": f"What is {i} + {i}?", "answer": str(2 * i),
              "reasoning": f"{i} doubled", "rounds": 7, "usage": "gold", "index": "theirs"} for i in range(3)]
    inputs = _write_jsonl(tmp_path / "in.jsonl", items)
    out = tmp_path / "out.jsonl"
    model = Model(_ScriptedBackend("add them</think>2"), None, LoadOptions())
    _run(model, BatchConfig(inputs, out, progress=False))
    records = _lines(out)
    assert [{k: r[k] for k in items[0]} for r in records] == items  # every input field, unchanged
    assert set(records[0]) == set(items[0]) | {"response", "r1v"}
    ours = records[1]["r1v"]
    assert (ours["index"], ours["answer"], ours["reasoning"]) == (1, "2", "add them")
    assert [r["kind"] for r in ours["rounds"]] == ["think", "text"]
    assert ours["usage"]["prompt_tokens"] == 12 and ours["finish_reason"] == "stop"
    assert records[1]["response"]["full_response"] == "<think>\nadd them</think>2"
    # resuming reads the new keys: a cut last line is redone, the rest skipped
    lines = out.read_text().splitlines(keepends=True)
    out.write_text("".join(lines[:2]))
    summary = _run(model, BatchConfig(inputs, out, progress=False))
    assert (summary.skipped, summary.answered) == (2, 1)
    records = _lines(out)
    assert [r["r1v"]["index"] for r in records] == [0, 1, 2] and [r["id"] for r in records] == ["q0", "q1", "q2"]


@pytest.mark.parametrize("field", ["response", "r1v"])
def test_input_holding_an_output_key_is_refused(tmp_path: Path, field: str):
    inputs = _write_jsonl(tmp_path / "in.jsonl", [{"image": "", "question": "q"},
                                                  {"image": "", "question": "q", field: {"full_response": "x"}}])
    with pytest.raises(ValueError, match=rf"in.jsonl:2: field '{field}' is where r1v batch writes"):
        plan_batch(BatchConfig(inputs, tmp_path / "out.jsonl"))
    assert not (tmp_path / "out.jsonl").exists()


def test_invalid_utf8_is_named_with_file_and_line(tmp_path: Path):
    inputs = tmp_path / "in.jsonl"
    inputs.write_bytes(b'{"image": "", "question": "ok"}\n{"image": "", "question": "caf\xe9"}\n')
    with pytest.raises(ValueError, match=r"in.jsonl:2: not UTF-8 text \(byte 0xe9 at column 31\)"):
        plan_batch(BatchConfig(inputs, tmp_path / "out.jsonl"))
    inputs.write_text('{"image": "", "question": "ok"}\n')
    out = tmp_path / "out.jsonl"
    out.write_bytes(b'{"r1v": {"index": 0}, "question": "\xff"}\n')
    with pytest.raises(ValueError, match=r"out.jsonl:1: not UTF-8 text \(byte 0xff at column 36\)"):
        plan_batch(BatchConfig(inputs, out))


def test_a_second_run_on_the_same_output_is_refused(inputs: Path, tmp_path: Path):
    out = tmp_path / "out.jsonl"
    model = Model(_ScriptedBackend("t</think>a"), None, LoadOptions())
    busy = rf"out.jsonl is being written by another r1v batch \(pid {os.getpid()}\)"
    with plan_batch(BatchConfig(inputs, out)) as plan:
        with pytest.raises(BatchBusyError, match=busy):
            plan_batch(BatchConfig(inputs, out))
        with pytest.raises(BatchBusyError, match=busy):
            _run(model, BatchConfig(inputs, out, progress=False))
        assert not out.exists() or out.read_text() == ""  # the refused runs wrote nothing
        run_batch(model, BatchConfig(inputs, out, progress=False), plan, out=io.StringIO())
    assert len(_lines(out)) == 3
    assert not (tmp_path / ".out.jsonl.lock").exists()  # released and removed
    with pytest.raises(ValueError, match="closed"):
        run_batch(model, BatchConfig(inputs, out, progress=False), plan, out=io.StringIO())
    assert _run(model, BatchConfig(inputs, out, progress=False)).skipped == 3  # free again
    # the command says so in one line, before loading any model
    with plan_batch(BatchConfig(inputs, out)):
        run = subprocess.run([sys.executable, "-m", "r1v", "batch", str(tmp_path / "no-model.gguf"), str(inputs),
                              str(out)], capture_output=True, text=True)
    assert run.returncode == 2 and "Traceback" not in run.stderr
    assert run.stderr.strip() == f"r1v batch: error: {out} is being written by another r1v batch (pid {os.getpid()})"


# --- the command, on a real (tiny) model ---------------------------------------------------------------

@pytest.fixture(scope="module")
def gguf(tiny_r1v_gguf: GGUFConversion) -> Path:
    return tiny_r1v_gguf.llm["f16"]


def _batch_cmd(gguf: Path, inputs: Path, out: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "r1v", "batch", str(gguf), str(inputs), str(out), "--n-ctx", "2048",
            "--n-threads", "1", "--n-threads-batch", "1", "--temperature", "0", "--repetition-penalty", "1.0",
            *extra]


@pytest.mark.slow
def test_killed_halfway_and_restarted_gives_one_line_per_input(gguf: Path, tmp_path: Path):
    (tmp_path / "img").mkdir()
    items = []
    for i in range(10):
        image = f"img/{i}.png" if i % 2 == 0 else ""
        if image:
            _png(tmp_path / image, i)
        items.append({"image": image, "question": f"How many shapes are in picture {i}?"})
    inputs = _write_jsonl(tmp_path / "cases.jsonl", items)
    out = tmp_path / "out.jsonl"
    # ~0.3 s per item: the kill lands while items are still to do
    proc = subprocess.Popen(_batch_cmd(gguf, inputs, out, "--max-tokens", "300", "--no-progress"),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    while not (out.exists() and out.read_bytes().count(b"\n") >= 3):
        assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
        assert time.monotonic() < deadline, "no output lines after 120 s"
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    before = out.read_bytes()
    done_before = before.count(b"\n")
    assert 3 <= done_before < len(items), f"the kill came too late to test anything ({done_before} lines)"

    rerun = subprocess.run(_batch_cmd(gguf, inputs, out, "--max-tokens", "300"), capture_output=True, text=True)
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    assert f"{done_before} already done" in rerun.stderr
    assert out.read_bytes().startswith(before.rsplit(b"\n", 1)[0])  # what was written stays as it was
    records = _lines(out)
    assert sorted(r["r1v"]["index"] for r in records) == list(range(len(items)))  # exactly one line per input
    assert all(r["response"]["full_response"].startswith("<think>\n") for r in records)
    assert all(r["r1v"]["usage"]["completion_tokens"] <= 300 for r in records)
    with_image = [r for r in records if r["image"]]
    assert all(r["r1v"]["usage"]["prompt_tokens"] > 256 for r in with_image)  # the image was in the prompt

    again = subprocess.run(_batch_cmd(gguf, inputs, out), capture_output=True, text=True)
    assert again.returncode == 0 and "already in" in again.stderr


@pytest.mark.slow
def test_stream_mode_prints_answers_and_keeps_events(gguf: Path, tmp_path: Path):
    inputs = _write_jsonl(tmp_path / "in.jsonl", [{"image": "", "question": "What is two plus two?"}])
    out = tmp_path / "out.jsonl"
    run = subprocess.run(_batch_cmd(gguf, inputs, out, "--stream", "--max-tokens", "8", "--no-progress"),
                         capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-2000:]
    record = _lines(out)[0]
    assert "[0] What is two plus two?" in run.stdout and "<think>" in run.stdout
    events = record["response"]["raw_events"].splitlines()
    assert events[-1] == "data: [DONE]"
    streamed = "".join(json.loads(e[6:])["choices"][0]["delta"].get("reasoning_content", "") for e in events[:-1])
    assert streamed == record["r1v"]["reasoning"] and record["r1v"]["usage"]["completion_tokens"] == 8
