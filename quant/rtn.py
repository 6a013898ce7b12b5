"""Round-to-nearest (RTN) group quantization with an asymmetric zero point: AWQ's inner quantizer and its baseline.

The arithmetic is AutoAWQ's `pseudo_quantize_tensor` (zero_point=True), op for op and in the input's dtype, so
an fp16 weight gives the very integers, zeros and scales AutoAWQ would write. Per group of `group_size` input
columns of one output row:

    scales = (max - min).clamp(min=1e-5) / (2^bits - 1)
    zeros  = clamp(-round(min / scales), 0, 2^bits - 1)
    q      = clamp(round(w / scales) + zeros, 0, 2^bits - 1)        dequantized: (q - zeros) * scales

`clip_max` (from the AWQ clip search) first clamps each group to [-clip_max, clip_max].
"""
from __future__ import annotations

from typing import NamedTuple

import torch


class QuantizedWeight(NamedTuple):
    """One linear's weight, RTN-quantized. `int_weight` uint8 [out, in] in 0..2^bits-1, `zeros` uint8
    [out, in/G], `scales` [out, in/G] in the weight's dtype. `pack.pack_awq` turns it into AutoAWQ's GEMM layout."""

    int_weight: torch.Tensor
    zeros: torch.Tensor
    scales: torch.Tensor


def quantize_rtn(
    w: torch.Tensor, group_size: int = 128, bits: int = 4, clip_max: torch.Tensor | None = None
) -> QuantizedWeight:
    """Quantize a weight [out, in] (nn.Linear layout) group-wise along `in`; see the module docstring."""
    q, zeros, scales = _rtn(w, group_size, bits, clip_max)
    out = w.shape[0]
    return QuantizedWeight(
        q.to(torch.uint8).reshape(w.shape), zeros.to(torch.uint8).reshape(out, -1), scales.reshape(out, -1)
    )


def fake_quantize(
    w: torch.Tensor, group_size: int = 128, bits: int = 4, clip_max: torch.Tensor | None = None
) -> torch.Tensor:
    """quantize_rtn then dequantize: the weight the quantized linear computes with, same shape and dtype."""
    q, zeros, scales = _rtn(w, group_size, bits, clip_max)
    return ((q - zeros) * scales).reshape(w.shape)


def dequantize_rtn(qw: QuantizedWeight, dtype: torch.dtype | None = None) -> torch.Tensor:
    """(int_weight - zeros) * scales [out, in] in `dtype` (default the scales' dtype)."""
    out, n_in = qw.int_weight.shape
    group_size = n_in // qw.scales.shape[1]
    scales = qw.scales.reshape(out, -1, 1)
    w = (qw.int_weight.reshape(out, -1, group_size).to(scales.dtype) - qw.zeros.reshape(out, -1, 1).to(scales.dtype))
    return (w * scales).reshape(out, n_in).to(dtype or scales.dtype)


def check_groupable(shape: tuple[int, ...] | torch.Size, group_size: int, what: str = "weight") -> None:
    """Refuse a weight that cannot be cut into groups of `group_size` input columns, naming its shape."""
    if len(shape) != 2:
        raise ValueError(f"{what} of shape {tuple(shape)}: expected a 2-D [out, in] matrix")
    if group_size <= 0 or shape[1] % group_size != 0:
        raise ValueError(
            f"{what} of shape {tuple(shape)}: in_features {shape[1]} is not divisible by group_size {group_size}"
        )


def _rtn(
    w: torch.Tensor, group_size: int, bits: int, clip_max: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """q, zeros, scales, all in w's dtype, shaped [out * in/G, G], [out * in/G, 1], [out * in/G, 1]."""
    check_groupable(w.shape, group_size)
    if not 1 <= bits <= 8:
        raise ValueError(f"bits must be in 1..8, got {bits}")
    if not w.is_floating_point():
        raise ValueError(f"weight of shape {tuple(w.shape)} has dtype {w.dtype}; expected a floating-point tensor")
    g = w.reshape(-1, group_size)
    if clip_max is not None:
        if clip_max.numel() != g.shape[0]:
            raise ValueError(
                f"clip_max of shape {tuple(clip_max.shape)} does not match weight {tuple(w.shape)} "
                f"with group_size {group_size} (expected {w.shape[0]} x {w.shape[1] // group_size})"
            )
        m = clip_max.reshape(-1, 1).to(g.dtype)
        g = torch.clamp(g, -m, m)
    max_int = 2**bits - 1
    max_val = g.amax(dim=1, keepdim=True)
    min_val = g.amin(dim=1, keepdim=True)
    if not (torch.isfinite(max_val).all() and torch.isfinite(min_val).all()):
        raise ValueError(f"weight of shape {tuple(w.shape)} holds non-finite values")
    scales = (max_val - min_val).clamp(min=1e-5) / max_int
    zeros = (-torch.round(min_val / scales)).clamp_(0, max_int)
    q = torch.clamp(torch.round(g / scales) + zeros, 0, max_int)
    return q, zeros, scales
