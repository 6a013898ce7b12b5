"""`r1v convert gguf` end to end: files, shared intermediate, and bad input leaving OUTDIR untouched."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from r1v.converters import CheckpointError
from r1v.converters.gguf import convert_gguf
from r1v.converters.safetensors_io import write_safetensors

@pytest.fixture(scope="module")
def ckpt(tiny_k_quant: Path) -> Path:
    """The shared 300M-ViT checkpoint with k-quant rows (tests/tiny_models.py), directory `tiny`."""
    return tiny_k_quant


def _types(path: Path) -> set[str]:
    return {t.tensor_type.name for t in gguf.GGUFReader(path).tensors}


@pytest.mark.slow
def test_cli_writes_every_quant_and_the_mmproj(ckpt, tmp_path):
    out = tmp_path / "out"
    result = subprocess.run(
        [sys.executable, "-m", "r1v", "convert", "gguf", str(ckpt), "-o", str(out),
         "--quant", "q8_0", "q4_k_m", "q4_0", "--mmproj-quant", "q8_0", "--no-progress"],
        capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    names = sorted(p.name for p in out.iterdir())
    # the BF16 intermediate for llama.cpp's quantizer was temporary: no hidden file remains
    assert names == ["mmproj-tiny-q8_0.gguf", "tiny-q4_0.gguf", "tiny-q4_k_m.gguf", "tiny-q8_0.gguf"]
    assert "Q4_K" in _types(out / "tiny-q4_k_m.gguf") and "Q4_0" in _types(out / "tiny-q4_0.gguf")
    assert "Q8_0" in _types(out / "tiny-q8_0.gguf") and "Q8_0" in _types(out / "mmproj-tiny-q8_0.gguf")


def test_requested_f16_is_reused_as_the_intermediate(ckpt, tmp_path):
    result = convert_gguf(ckpt, tmp_path, ["f16", "q4_k_m"], None, progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tiny-f16.gguf", "tiny-q4_k_m.gguf"]
    assert set(result.llm) == {"f16", "q4_k_m"} and result.mmproj is None
    kv = gguf.GGUFReader(result.llm["q4_k_m"]).fields
    assert "r1v.source.config_sha256" in kv


def _broken_copy(ckpt: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(ckpt, tmp_path / "broken"))


def _retype_tensor(copy: Path, name: str) -> None:
    index = json.loads((copy / "model.safetensors.index.json").read_text())
    shard = copy / index["weight_map"][name]
    tensors = {n: ("BF16", t.view(torch.int16).numpy().view(np.uint16)) for n, t in load_file(str(shard)).items()}
    tensors[name] = ("I32", np.zeros(tensors[name][1].shape, np.int32))
    write_safetensors(shard, tensors)


def _truncate_shard(copy: Path) -> None:
    shard = sorted(copy.glob("model-*.safetensors"))[-1]
    shard.write_bytes(shard.read_bytes()[:-64])


def _vit_6b(copy: Path) -> None:
    config = json.loads((copy / "config.json").read_text())
    config["vision_config"].update(norm_type="rms_norm")
    (copy / "config.json").write_text(json.dumps(config))
    # keep the tensors consistent with the new config: rms_norm has no norm biases
    index = json.loads((copy / "model.safetensors.index.json").read_text())
    for shard_name in sorted(set(index["weight_map"].values())):
        shard = copy / shard_name
        tensors = {n: ("BF16", t.view(torch.int16).numpy().view(np.uint16)) for n, t in load_file(str(shard)).items()
                   if not (n.endswith(("norm1.bias", "norm2.bias")))}
        write_safetensors(shard, tensors)
    index["weight_map"] = {n: f for n, f in index["weight_map"].items() if not n.endswith(("norm1.bias", "norm2.bias"))}
    (copy / "model.safetensors.index.json").write_text(json.dumps(index))


@pytest.mark.parametrize(
    "breaker, message",
    [
        (_truncate_shard, "truncated"),
        (lambda c: _retype_tensor(c, "mlp1.1.weight"), r"tensor 'mlp1.1.weight' has dtype I32"),
        (lambda c: (c / "tokenizer.json").unlink(), "missing tokenizer"),
        (_vit_6b, "norm_type"),
    ],
    ids=["truncated-shard", "wrong-dtype", "missing-tokenizer", "unsupported-vit"],
)
def test_bad_input_is_a_clear_error_and_leaves_outdir_empty(ckpt, tmp_path, breaker, message):
    copy = _broken_copy(ckpt, tmp_path)
    breaker(copy)
    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(CheckpointError, match=message):
        convert_gguf(copy, out, ["q8_0", "q4_k_m"], "f16", progress=False)
    assert list(out.iterdir()) == []


def test_unwritable_outdir(ckpt, tmp_path):
    with pytest.raises(CheckpointError, match="output directory is not writable"):
        convert_gguf(ckpt, "/proc/self", ["q8_0"], "f16", progress=False)  # refuses new files even to root
    (tmp_path / "a-file").write_text("")
    with pytest.raises(CheckpointError, match="cannot create output directory"):
        convert_gguf(ckpt, tmp_path / "a-file" / "out", ["q8_0"], "f16", progress=False)
    assert [p.name for p in tmp_path.iterdir()] == ["a-file"]


def test_failure_midway_removes_files_already_finished(ckpt, tmp_path, monkeypatch):
    import r1v.converters.gguf_quantize as quantize

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(quantize, "quantize_gguf", interrupted)
    with pytest.raises(KeyboardInterrupt):
        convert_gguf(ckpt, tmp_path, ["q8_0", "q4_k_m"], "f16", progress=False)
    assert list(tmp_path.iterdir()) == []
