"""RTN group quantization and AutoAWQ GEMM packing: exact arithmetic, exact layout, AutoAWQ's own decoder."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from autoawq_oracle import autoawq_packing_utils
from r1v.quant.pack import AWQ_ORDER, pack_awq, unpack_awq, dequantize_awq
from r1v.quant.rtn import dequantize_rtn, fake_quantize, quantize_rtn


def _weight(out: int, n_in: int, seed: int = 0, dtype: torch.dtype = torch.float16) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(out, n_in, generator=g) * 0.05
    w[:, 5] *= 30  # an outlier column, and one all-positive group so the zero point clamps at 0
    w[:3] = w[:3].abs() + 0.01
    return w.to(dtype)


def _autoawq_pseudo_quantize(w: torch.Tensor, group_size: int, bits: int):
    """awq/quantize/quantizer.py AwqQuantizer.pseudo_quantize_tensor (zero_point=True), transcribed."""
    org_w_shape = w.shape
    w = w.reshape(-1, group_size)
    max_val = w.amax(dim=1, keepdim=True)
    min_val = w.amin(dim=1, keepdim=True)
    max_int = 2**bits - 1
    min_int = 0
    scales = (max_val - min_val).clamp(min=1e-5) / max_int
    zeros = (-torch.round(min_val / scales)).clamp_(min_int, max_int)
    w = (torch.clamp(torch.round(w / scales) + zeros, min_int, max_int) - zeros) * scales
    zeros = zeros.view(org_w_shape[0], -1)
    scales = scales.view(org_w_shape[0], -1)
    return w.reshape(org_w_shape), scales, zeros


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
@pytest.mark.parametrize("bits,group_size", [(4, 128), (4, 64), (3, 32), (8, 128)])
def test_rtn_equals_autoawq_pseudo_quantize(dtype, bits, group_size):
    w = _weight(40, 256, seed=bits, dtype=dtype)
    ref_w, ref_scales, ref_zeros = _autoawq_pseudo_quantize(w, group_size, bits)
    q = quantize_rtn(w, group_size, bits)
    assert q.int_weight.dtype == torch.uint8 and q.int_weight.shape == (40, 256)
    assert q.zeros.shape == q.scales.shape == (40, 256 // group_size)
    assert torch.equal(q.scales, ref_scales)
    assert torch.equal(q.zeros, ref_zeros.to(torch.uint8))
    assert int(q.int_weight.max()) <= 2**bits - 1
    assert torch.equal(fake_quantize(w, group_size, bits), ref_w)
    assert torch.equal(dequantize_rtn(q), ref_w)
    assert (q.zeros == 0).any()  # the all-positive group exercised the clamp


def test_rtn_clip_max_clamps_each_group_first():
    w = _weight(16, 128, dtype=torch.float32)
    clip = w.reshape(16, 2, 64).abs().amax(-1) * 0.7
    clamped = torch.clamp(w.reshape(16, 2, 64), -clip[..., None], clip[..., None]).reshape(16, 128)
    assert torch.equal(fake_quantize(w, 64, clip_max=clip), _autoawq_pseudo_quantize(clamped, 64, 4)[0])


@pytest.mark.parametrize("shape", [(8, 100), (8,)])
def test_rtn_refuses_ungroupable_shapes_naming_them(shape):
    with pytest.raises(ValueError, match=r"\(8, 100\).*not divisible by group_size 64|\(8,\).*2-D"):
        quantize_rtn(torch.zeros(shape), group_size=64)


def test_rtn_refuses_non_finite_weights():
    w = torch.zeros(8, 64)
    w[2, 3] = float("nan")
    with pytest.raises(ValueError, match=r"\(8, 64\).*non-finite"):
        quantize_rtn(w, 64)


# --- packing -------------------------------------------------------------------------------------------------
def test_pack_layout_by_hand():
    """Column 8c + AWQ_ORDER[i] lands in nibble i of qweight[:, c]: check one int32 bit by bit."""
    out, n_in, g = 16, 4, 2
    codes = torch.zeros(out, n_in, dtype=torch.uint8)
    codes[:8, 1] = torch.arange(1, 9, dtype=torch.uint8)  # row 1 of the packed [in, out/8], block 0: 1..8
    zeros = torch.full((out, n_in // g), 15, dtype=torch.uint8)
    scales = torch.ones(out, n_in // g, dtype=torch.float16)
    packed = pack_awq(codes, zeros, scales)
    assert packed.qweight.shape == (4, 2) and packed.qzeros.shape == (2, 2) and packed.scales.shape == (2, 16)
    word = int(packed.qweight[1, 0]) & 0xFFFFFFFF
    assert [(word >> (4 * i)) & 15 for i in range(8)] == [AWQ_ORDER[i] + 1 for i in range(8)]
    assert int(packed.qweight[0, 0]) == 0 and int(packed.qzeros[0, 0]) == -1  # 0xFFFFFFFF as int32
    assert packed.group_size == 2 and packed.in_features == 4 and packed.out_features == 16


def test_pack_unpack_round_trip_is_exact():
    g = torch.Generator().manual_seed(3)
    codes = torch.randint(0, 16, (64, 256), dtype=torch.uint8, generator=g)
    zeros = torch.randint(0, 16, (64, 2), dtype=torch.uint8, generator=g)
    scales = torch.rand(64, 2, generator=g).to(torch.float16)
    packed = pack_awq(codes, zeros, scales)
    assert packed.qweight.dtype == packed.qzeros.dtype == torch.int32 and packed.scales.dtype == torch.float16
    assert (packed.qweight < 0).any()  # high nibbles >= 8 wrap to negative int32 and must survive
    back = unpack_awq(packed.qweight, packed.qzeros, packed.scales)
    for got, want in zip(back, (codes, zeros, scales)):
        assert got.dtype == want.dtype and torch.equal(got, want)


def test_pack_refuses_bad_input():
    ok = (torch.zeros(8, 64, dtype=torch.uint8), torch.zeros(8, 1, dtype=torch.uint8), torch.ones(8, 1))
    with pytest.raises(ValueError, match="outside 0..15"):
        pack_awq(ok[0] + 16, ok[1], ok[2])
    with pytest.raises(ValueError, match="multiple of 8"):
        pack_awq(ok[0][:6], ok[1][:6], ok[2][:6])
    with pytest.raises(ValueError, match="scales"):
        pack_awq(ok[0], ok[1], torch.ones(8, 2))


@pytest.mark.parametrize("group_size", [128, 64])
def test_autoawq_decodes_our_packing_to_our_quantized_weight(group_size):
    awq = autoawq_packing_utils()
    assert list(awq.AWQ_ORDER) == list(AWQ_ORDER)
    w = _weight(96, 384, seed=group_size)
    q = quantize_rtn(w, group_size)
    packed = pack_awq(*q)
    # AutoAWQ's unpack + reverse order give back our integer codes and zeros ([in, out] layout) ...
    iweight, izeros = awq.unpack_awq(packed.qweight, packed.qzeros, 4)
    iweight, izeros = awq.reverse_awq_order(iweight, izeros, 4)
    assert torch.equal(torch.bitwise_and(iweight, 15).to(torch.uint8), q.int_weight.t())
    assert torch.equal(torch.bitwise_and(izeros, 15).to(torch.uint8), q.zeros.t())
    # ... and its fp16 dequantization is, bit for bit, our fake-quantized weight and our dequantize_awq.
    theirs = awq.dequantize_gemm(packed.qweight, packed.qzeros, packed.scales, 4, group_size)
    assert theirs.dtype == torch.float16
    assert torch.equal(theirs.t(), fake_quantize(w, group_size))
    assert torch.equal(theirs.t(), dequantize_awq(packed.qweight, packed.qzeros, packed.scales, group_size))


def test_dequantize_awq_checks_group_size():
    q = quantize_rtn(_weight(16, 256), 64)
    packed = pack_awq(*q)
    assert dequantize_awq(packed.qweight, packed.qzeros, packed.scales, 64, dtype=torch.float32).dtype == torch.float32
    with pytest.raises(ValueError, match="group_size 128"):
        dequantize_awq(packed.qweight, packed.qzeros, packed.scales, 128)
