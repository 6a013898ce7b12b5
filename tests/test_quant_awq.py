"""AWQ on a tiny Qwen2 decoder layer (runtime/model/qwen2.py): exact scale folding, the searches, and
AWQ's error against RTN's at the same bits and group size."""
from __future__ import annotations

import copy
import time

import pytest
import torch
from torch import nn

from r1v.converters.config import Qwen2Config
from r1v.quant.awq import (
    QWEN2_TABLE,
    ScalingGroup,
    apply_clip,
    apply_scale,
    capture_inputs,
    quantize_layer_awq,
    scaling_groups,
    search_clip,
    search_scale,
)
from r1v.quant.pack import dequantize_awq, pack_awq
from r1v.quant.rtn import dequantize_rtn, fake_quantize
from r1v.runtime.model.qwen2 import DecoderLayer, RotaryEmbedding

HIDDEN, INTER, T = 256, 512, 64
OUTLIERS = [3, 77, 150, 201]


def _layer(kv_heads: int = 2, seed: int = 0, intermediate: int = INTER) -> DecoderLayer:
    cfg = Qwen2Config(hidden_size=HIDDEN, intermediate_size=intermediate, num_hidden_layers=1,
                      num_attention_heads=4, num_key_value_heads=kv_heads, vocab_size=32)
    torch.manual_seed(seed)
    layer = DecoderLayer(cfg, 0, nn.Linear).eval()
    with torch.no_grad():
        for p in layer.parameters():
            p.normal_(0, 0.02) if p.dim() == 2 else p.uniform_(-0.05, 0.05)
        layer.input_layernorm.weight.uniform_(0.5, 1.5)
        layer.post_attention_layernorm.weight.uniform_(0.5, 1.5)
    return layer


def _kwargs() -> dict:
    cos, sin = RotaryEmbedding(HIDDEN // 4, 1e6)(torch.arange(T), torch.float32)
    return {"cos": cos, "sin": sin, "cache": None}


def _activations(batch: int, seed: int) -> torch.Tensor:
    """Hidden states with a few outlier channels (x20), as real LLM activations have."""
    x = torch.randn(batch, T, HIDDEN, generator=torch.Generator().manual_seed(seed))
    x[..., OUTLIERS] *= 20
    return x


# --- scale folding ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("group", ["attn_in", "attn_out", "mlp_in", "mlp_out"])
def test_apply_scale_keeps_the_layer_function(group):
    layer, kw, x = _layer(kv_heads=4), _kwargs(), _activations(2, 1)  # kv == heads: v -> o applies
    with torch.no_grad():
        before = layer(x, **kw)
    (g,) = [g for g in scaling_groups(layer, kw) if g.name == group]
    weights = [lin.weight.clone() for lin in g.linears]
    scales = torch.exp(torch.randn(g.linears[0].in_features, generator=torch.Generator().manual_seed(2)))
    apply_scale(g, scales)
    with torch.no_grad():
        after = layer(x, **kw)
    assert all(not torch.allclose(w, lin.weight) for w, lin in zip(weights, g.linears))
    assert (after - before).abs().max().item() <= 1e-5


def test_apply_scale_into_layernorm_with_bias():
    """The ViT / projector case: LayerNorm (weight and bias) -> linear."""
    torch.manual_seed(0)
    ln, fc = nn.LayerNorm(64), nn.Linear(64, 32)
    with torch.no_grad():
        ln.weight.uniform_(0.5, 1.5)
        ln.bias.uniform_(-0.5, 0.5)
    x = torch.randn(10, 64)
    with torch.no_grad():
        before = fc(ln(x))
        apply_scale(ScalingGroup(ln, [fc], fc, "ln"), torch.rand(64) * 4 + 0.1)
        assert (fc(ln(x)) - before).abs().max().item() <= 1e-5


def test_groups_follow_the_table_and_skip_v_to_o_under_gqa():
    names = [g.name for g in scaling_groups(_layer(kv_heads=4), _kwargs())]
    assert names == ["attn_in", "attn_out", "mlp_in", "mlp_out"]
    assert [g.name for g in scaling_groups(_layer(kv_heads=2), _kwargs())] == ["attn_in", "mlp_in", "mlp_out"]
    with pytest.raises(TypeError, match="cannot fold scales into SiLU"):
        apply_scale(ScalingGroup(nn.SiLU(), [nn.Linear(8, 8)], nn.Identity(), "act"), torch.ones(8))


# --- the searches ----------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_search_scale_favours_outlier_channels_and_restores_weights():
    layer, kw = _layer(), _kwargs()
    (g,) = [g for g in scaling_groups(layer, kw) if g.name == "attn_in"]
    inputs, _ = capture_inputs(layer, [layer.self_attn.q_proj], _activations(2, 1), kw)
    weights = [lin.weight.clone() for lin in g.linears]
    s = search_scale(g, inputs[layer.self_attn.q_proj], group_size=64)
    assert all(torch.equal(w, lin.weight) for w, lin in zip(weights, g.linears))
    assert s.shape == (HIDDEN,) and torch.isfinite(s).all() and (s > 0).all()
    others = torch.ones(HIDDEN, dtype=torch.bool)
    others[OUTLIERS] = False
    assert s[OUTLIERS].min() > 2 * s[others].median()


def _autoawq_best_clip(w, input_feat, group_size, n_grid=20, max_shrink=0.5):
    """awq/quantize/quantizer.py _compute_best_clip (one output batch), transcribed with broadcasting."""
    org_w_shape = w.shape
    input_feat = input_feat.reshape(1, input_feat.shape[0], -1, group_size)
    w = w.reshape(org_w_shape[0], 1, -1, group_size)
    org_max_val = w.abs().amax(dim=-1, keepdim=True)
    best_max_val = org_max_val.clone()
    min_errs = torch.ones_like(org_max_val) * 1e9
    org_out = (input_feat * w).sum(dim=-1)
    for i_s in range(int(max_shrink * n_grid)):
        max_val = org_max_val * (1 - i_s / n_grid)
        cur_w = torch.clamp(w, -max_val, max_val)
        q_w = fake_quantize(cur_w.reshape(org_w_shape[0], -1), group_size).reshape(w.shape)
        cur_out = (input_feat * q_w).sum(dim=-1)
        err = (cur_out - org_out).pow(2).mean(dim=1).view(min_errs.shape)
        better = err < min_errs
        min_errs[better] = err[better]
        best_max_val[better] = max_val[better]
    return best_max_val.squeeze(1).squeeze(-1)


@pytest.mark.slow
def test_search_clip_matches_autoawq_and_reduces_the_error():
    layer = _layer()
    linear = layer.mlp.gate_proj
    x = torch.randn(300, HIDDEN, generator=torch.Generator().manual_seed(4))
    x[:, OUTLIERS] *= 20
    max_val = search_clip(linear, x, group_size=64)
    org_max = linear.weight.abs().reshape(INTER, -1, 64).amax(-1)
    assert max_val.shape == (INTER, HIDDEN // 64)
    assert (max_val <= org_max).all() and (max_val >= 0.5 * org_max * (1 - 1e-6)).all() and (max_val < org_max).any()
    ref = _autoawq_best_clip(linear.weight.detach(), x, 64)
    assert (torch.isclose(max_val, ref, rtol=1e-6, atol=0).float().mean() >= 0.99).item()

    def err(w):
        return (x @ w.t() - x @ linear.weight.t()).pow(2).mean().item()

    clipped = copy.deepcopy(linear)
    apply_clip(clipped, max_val)
    assert err(fake_quantize(clipped.weight.detach(), 64)) < err(fake_quantize(linear.weight.detach(), 64))


# --- the whole layer -------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_awq_beats_rtn_on_a_decoder_layer_with_outlier_channels():
    layer, kw = _layer(), _kwargs()
    calib, held_out = _activations(4, 10), _activations(4, 11)
    with torch.no_grad():
        reference = layer(held_out, **kw)
        rtn = copy.deepcopy(layer)  # the baseline, independently: fp16 RTN of every linear
        for name in QWEN2_TABLE.linears:
            lin = rtn.get_submodule(name)
            lin.weight.data = fake_quantize(lin.weight.detach().half(), 64).float()
        mse_rtn = (rtn(held_out, **kw) - reference).pow(2).mean().item()

    def mse_after(quantized: DecoderLayer) -> float:
        with torch.no_grad():
            return (quantized(held_out, **kw) - reference).pow(2).mean().item()

    ablations = {}
    for scale, clip in [(True, False), (False, True)]:
        copy_ = copy.deepcopy(layer)
        quantize_layer_awq(copy_, calib, kw, group_size=64, bits=4, scale=scale, clip=clip)
        ablations[scale, clip] = mse_after(copy_)
    start = time.perf_counter()
    result = quantize_layer_awq(layer, calib, kw, group_size=64, bits=4)
    seconds = time.perf_counter() - start
    mse_awq = mse_after(layer)
    print(f"\nlayer output MSE on held-out activations: RTN {mse_rtn:.3e}; AWQ {mse_awq:.3e} "
          f"(ratio {mse_awq / mse_rtn:.3f}); scale only {ablations[True, False] / mse_rtn:.3f}, "
          f"clip only {ablations[False, True] / mse_rtn:.3f} of RTN (quantize_layer_awq {seconds:.2f} s)")
    assert mse_awq <= 0.7 * mse_rtn
    assert ablations[True, False] <= 0.8 * mse_rtn  # the scale search alone earns its keep ...
    assert mse_awq < ablations[False, True]  # ... and adds to what clipping alone gives

    # The result is what the layer now computes with, and packs to a matrix AutoAWQ's layout decodes to.
    assert list(result) == list(QWEN2_TABLE.linears)
    for name, q in result.items():
        linear = layer.get_submodule(name)
        assert q.scales.dtype == torch.float16 and q.int_weight.shape == linear.weight.shape
        assert torch.equal(linear.weight, dequantize_rtn(q, torch.float32))
        packed = pack_awq(*q)
        assert torch.equal(dequantize_awq(packed.qweight, packed.qzeros, packed.scales, 64).float(), linear.weight)


def test_quantize_layer_refuses_ungroupable_shapes_naming_them():
    layer = _layer(intermediate=192)
    with pytest.raises(ValueError, match=r"mlp.down_proj.weight of shape \(256, 192\).*group_size 128"):
        quantize_layer_awq(layer, _activations(1, 0), _kwargs(), group_size=128)
    with pytest.raises(ValueError, match=r"rounding must be one of rtn, gptq, got 'nearest'"):
        quantize_layer_awq(_layer(), _activations(1, 0), _kwargs(), group_size=64, rounding="nearest")
