"""Importance matrix: statistics as llama.cpp's imatrix tool keeps them, GGUF names, the file round trip, and
llama.cpp's quantizer actually using it."""
from __future__ import annotations

import functools
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from torch import nn

from r1v.converters.config import Qwen2Config
from r1v.quant.imatrix import Imatrix, gguf_weight_name
from r1v.runtime.model.qwen2 import Qwen2ForCausalLM

LINEARS = {
    "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
}


def test_names_are_gguf_names():
    for hf, short in LINEARS.items():
        assert gguf_weight_name(f"model.layers.7.{hf}", 8) == f"blk.7.{short}.weight"
        assert gguf_weight_name(f"language_model.model.layers.0.{hf}.weight", 8) == f"blk.0.{short}.weight"
    assert gguf_weight_name("lm_head", 8) == "output.weight"
    with pytest.raises(KeyError, match="mlp1.1"):
        gguf_weight_name("mlp1.1", 8)


def test_names_agree_with_the_gguf_converter():
    from r1v.converters.gguf_llm import gguf_tensor_name

    for hf in LINEARS:
        name = f"language_model.model.layers.3.{hf}.weight"
        assert gguf_weight_name(name, 4) == gguf_tensor_name(name)


def _tiny_llm() -> Qwen2ForCausalLM:
    cfg = Qwen2Config(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=50)
    torch.manual_seed(0)
    return Qwen2ForCausalLM(cfg).eval()


def test_recording_sums_squares_per_input_column_and_counts_tokens():
    model = _tiny_llm()
    ids = torch.randint(0, 50, (3, 20), generator=torch.Generator().manual_seed(1))
    seen: dict[str, list[torch.Tensor]] = {}

    def keep(name, module, args, output):
        seen.setdefault(name, []).append(args[0].detach().reshape(-1, args[0].shape[-1]))

    handles = [m.register_forward_hook(functools.partial(keep, n)) for n, m in model.named_modules()
               if isinstance(m, nn.Linear)]
    imatrix = Imatrix()
    with torch.no_grad(), imatrix.recording(model, n_blocks=2):
        model(ids)
        model(ids[:, :7])
    for h in handles:
        h.remove()
    assert len(imatrix.sums) == 2 * 7 + 1  # every block linear and the output head
    for hf_name, xs in seen.items():
        x = torch.cat(xs).double().numpy()
        name = gguf_weight_name(hf_name, 2)
        assert imatrix.counts[name] == 3 * 20 + 3 * 7
        np.testing.assert_allclose(imatrix.sums[name], (x**2).sum(0), rtol=1e-12)
        np.testing.assert_allclose(imatrix.mean(name), ((x**2).sum(0) / x.shape[0]).astype(np.float32), rtol=1e-6)
    with torch.no_grad():  # hooks are gone afterwards
        model(ids)
    assert imatrix.counts["blk.0.attn_q.weight"] == 81


def test_file_round_trip_in_llama_cpp_format(tmp_path):
    rng = np.random.default_rng(0)
    imatrix = Imatrix(datasets=["calib.jsonl"], chunk_size=32)
    for name, width in [("blk.0.attn_q.weight", 64), ("blk.0.ffn_down.weight", 128), ("output.weight", 64)]:
        imatrix.add(name, rng.standard_normal((100, width)))
        imatrix.add(name, torch.randn(2, 14, width))
    path = imatrix.save(tmp_path / "imatrix.gguf")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["imatrix.gguf"]

    back = Imatrix.load(path)
    assert back.counts == imatrix.counts == {n: 128 for n in imatrix.sums}
    for name in imatrix.sums:
        np.testing.assert_array_equal(back.sums[name], imatrix.sums[name].astype(np.float32))
    assert back.datasets == ["calib.jsonl"] and back.chunk_size == 32 and back.chunk_count == 4

    # The layout llama.cpp's tool writes: no architecture, general.type, three imatrix.* keys, and per entry
    # F32 tensors <name>.in_sum2 [n_in] x 1 and <name>.counts 1 x 1 (ggml order), sorted by name.
    reader = gguf.GGUFReader(path)
    assert "general.architecture" not in reader.fields
    assert reader.fields["general.type"].contents() == "imatrix"
    assert reader.fields["imatrix.chunk_count"].contents() == 4
    assert [(t.name, t.tensor_type.name, list(t.shape)) for t in reader.tensors] == [
        ("blk.0.attn_q.weight.in_sum2", "F32", [64, 1]), ("blk.0.attn_q.weight.counts", "F32", [1, 1]),
        ("blk.0.ffn_down.weight.in_sum2", "F32", [128, 1]), ("blk.0.ffn_down.weight.counts", "F32", [1, 1]),
        ("output.weight.in_sum2", "F32", [64, 1]), ("output.weight.counts", "F32", [1, 1]),
    ]
    # The project's llama.cpp quantize path reads the same means (Σx² / count).
    from r1v.converters.gguf_quantize import read_imatrix

    entries, info = read_imatrix(path)
    for name in imatrix.sums:
        np.testing.assert_allclose(entries[name], imatrix.mean(name), rtol=1e-6)
    assert info["quantize.imatrix.entries_count"] == 3 and info["quantize.imatrix.dataset"] == "calib.jsonl"


def test_bad_input_is_refused(tmp_path):
    with pytest.raises(ValueError, match="no activations"):
        Imatrix().save(tmp_path / "empty.gguf")
    imatrix = Imatrix()
    imatrix.add("blk.0.attn_q.weight", np.ones((4, 8)))
    with pytest.raises(ValueError, match="width 16, earlier 8"):
        imatrix.add("blk.0.attn_q.weight", np.ones((4, 16)))
    with pytest.raises(ValueError, match="non-finite"):
        imatrix.add("blk.0.attn_k.weight", np.full((2, 8), np.inf))
    assert not (tmp_path / "empty.gguf").exists()


@pytest.mark.parametrize("quant", ["q4_k_m", "q3_k_s"])
def test_llama_cpp_quantizer_follows_our_imatrix(tiny_k_quant_f16: Path, tmp_path, quant):
    """Q4_K_M / Q3_K_S through llama_model_quantize with an imatrix that marks 8 columns per matrix 1000x
    important: the importance-weighted rounding error of every block matrix must drop."""
    pytest.importorskip("llama_cpp")
    from gguf.quants import dequantize

    from r1v.converters.gguf_quantize import quantize_gguf

    f16 = tiny_k_quant_f16
    source = {t.name: np.array(t.data, dtype=np.float32) for t in gguf.GGUFReader(f16).tensors}
    rng = np.random.default_rng(0)
    imatrix, importance = Imatrix(datasets=["synthetic"], chunk_size=10), {}
    for name, w in source.items():
        if name.startswith("blk.") and w.ndim == 2:
            importance[name] = np.ones(w.shape[1])
            importance[name][rng.choice(w.shape[1], 8, replace=False)] = 1000.0
            imatrix.sums[name], imatrix.counts[name] = importance[name] * 10, 10
    assert len(importance) == 14
    imatrix.save(tmp_path / "imatrix.gguf")
    plain = quantize_gguf(f16, tmp_path / "plain.gguf", quant, progress=False)
    guided = quantize_gguf(f16, tmp_path / "guided.gguf", quant, imatrix=tmp_path / "imatrix.gguf", progress=False)
    assert quant[:2].upper() + "_K" in {t.tensor_type.name for t in gguf.GGUFReader(guided).tensors}

    def weighted_errors(path: Path) -> dict[str, float]:
        out = {}
        for t in gguf.GGUFReader(path).tensors:
            if t.name in importance:
                w = dequantize(np.array(t.data), t.tensor_type).reshape(source[t.name].shape)
                out[t.name] = float((((w - source[t.name]) ** 2) * importance[t.name]).sum())
        return out

    before, after = weighted_errors(plain), weighted_errors(guided)
    ratios = {name: after[name] / before[name] for name in importance}
    assert max(ratios.values()) < 0.5, ratios
    fields = gguf.GGUFReader(guided).fields
    assert fields["quantize.imatrix.entries_count"].contents() == 14
