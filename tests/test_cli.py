"""The `r1v` command line: inspect, plan and demo, run as a user would (a subprocess)."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

DATA = Path(__file__).parent / "data"


def r1v(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "r1v", *args], capture_output=True, text=True)


def test_inspect_table_and_json(tiny_300m):
    table = r1v("inspect", str(tiny_300m))
    assert table.returncode == 0, table.stderr
    assert "vision tower" in table.stdout and "<IMG_CONTEXT>=" in table.stdout
    data = json.loads(r1v("inspect", str(tiny_300m), "--json").stdout)
    by_name = {c["name"]: c for c in data["components"]}
    assert set(by_name) == {"vision", "projector", "llm", "embeddings", "lm_head"}
    assert sum(c["params"] for c in data["components"]) == data["total_params"]
    # embeddings: vocab × hidden, exactly
    assert by_name["embeddings"]["params"] == data["llm"]["vocab_size"] * data["llm"]["hidden_size"]
    assert by_name["vision"]["dtypes"] == {"BF16": by_name["vision"]["dtypes"]["BF16"]}
    assert data["chat_template_source"] == "tokenizer_config.json"


def test_inspect_falls_back_to_the_family_template(tiny_6b, tmp_path):
    import shutil

    copy = Path(shutil.copytree(tiny_6b, tmp_path / "copy"))
    config = json.loads((copy / "tokenizer_config.json").read_text())
    del config["chat_template"]
    (copy / "tokenizer_config.json").write_text(json.dumps(config))
    data = json.loads(r1v("inspect", str(copy), "--json").stdout)
    assert data["chat_template_source"] == "converters/chat_templates/chatml-think.jinja"
    assert "<think>" in data["chat_template"]


def test_inspect_error_is_clear(tmp_path):
    result = r1v("inspect", str(tmp_path))
    assert result.returncode == 2
    assert "config.json not found" in result.stderr and "Traceback" not in result.stderr


@pytest.mark.slow
def test_plan_works_on_a_directory_with_only_config(tmp_path):
    (tmp_path / "config.json").write_text((DATA / "r1v3-38b-config.json").read_text())
    result = r1v("plan", str(tmp_path), "--context", "8192", "--json")
    assert result.returncode == 0, result.stderr
    data = json.loads(result.stdout)
    assert 18e9 <= data["gguf.llm.Q4_K_M"]["weights_bytes"] <= 21e9
    assert 29e9 <= data["awq[vision=fp16,embed=gpu]"]["weights_bytes"] <= 33e9
    table = r1v("plan", str(tmp_path))
    assert table.returncode == 0 and "Q4_K_M" in table.stdout


@pytest.mark.slow
def test_demo_answers_the_bundled_question(tmp_path):
    """As a new user: the bundled micro-r1v, its GGUF files built into an empty cache, the bundled image and
    question; the reasoning is shown and the answer is the right one."""
    import os

    from r1v.micro import demo_question

    env = {**os.environ, "XDG_CACHE_HOME": str(tmp_path / "cache")}
    result = subprocess.run([sys.executable, "-m", "r1v", "demo"], capture_output=True, text=True, env=env)
    assert result.returncode == 0, result.stderr
    expected = demo_question()["answer"]
    assert f"expected answer: {expected} (the model said {expected!r}: correct)" in result.stdout, result.stdout
    assert "</think>" in result.stdout  # the reasoning is shown (piped: between <think> tags)
    assert "tok/s" in result.stderr  # timings
