"""AutoAWQ's GEMM layout for 4-bit weights (what vLLM's and transformers' AWQ loaders read).

Per linear with weight [out, in] and group size G:

    qweight  int32 [in, out/8]     eight 4-bit codes of one input row, output columns 8c..8c+7
    qzeros   int32 [in/G, out/8]   the zero points, packed the same way
    scales   fp16  [in/G, out]

Inside each int32, nibble i (bits 4i..4i+3) holds output column 8c + AWQ_ORDER[i]. Dequantized:
W[o, i] = (q[i, o] - z[i // G, o]) * s[i // G, o].
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

BITS = 4
PACK = 32 // BITS  # codes per int32
AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)  # nibble i holds column AWQ_ORDER[i] of its block of 8


@dataclass(frozen=True)
class AWQTensors:
    """One linear in AutoAWQ GEMM layout (the tensors `<prefix>.qweight/.qzeros/.scales` of a checkpoint)."""

    qweight: torch.Tensor  # int32 [in, out/8]
    qzeros: torch.Tensor  # int32 [in/G, out/8]
    scales: torch.Tensor  # fp16 [in/G, out]

    @property
    def in_features(self) -> int:
        return self.qweight.shape[0]

    @property
    def out_features(self) -> int:
        return self.scales.shape[1]

    @property
    def group_size(self) -> int:
        return self.qweight.shape[0] // self.scales.shape[0]


def pack_awq(int_weight: torch.Tensor, zeros: torch.Tensor, scales: torch.Tensor) -> AWQTensors:
    """Pack RTN output (int_weight uint8 [out, in] in 0..15, zeros uint8 [out, in/G], scales [out, in/G])
    into the GEMM layout. Scales are stored fp16: quantize an fp16 weight (as quantize_layer_awq does) so the
    codes were computed with exactly the scales stored."""
    out, n_in = _check_codes("int_weight", int_weight)
    zo, n_groups = _check_codes("zeros", zeros)
    if zo != out or n_groups == 0 or n_in % n_groups != 0:
        raise ValueError(f"zeros of shape {tuple(zeros.shape)} do not fit int_weight of shape {(out, n_in)}")
    if tuple(scales.shape) != (out, n_groups) or not scales.is_floating_point():
        raise ValueError(f"scales of shape {tuple(scales.shape)} ({scales.dtype}): expected float [{out}, {n_groups}]")
    if out % PACK != 0:
        raise ValueError(f"int_weight of shape {(out, n_in)}: out_features {out} is not a multiple of {PACK}")
    return AWQTensors(
        qweight=_pack_columns(int_weight.t()),
        qzeros=_pack_columns(zeros.t()),
        scales=scales.t().to(torch.float16).contiguous(),
    )


def unpack_awq(
    qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The exact inverse of pack_awq: (int_weight uint8 [out, in], zeros uint8 [out, in/G], scales fp16 [out, in/G])."""
    _check_packed(qweight, qzeros, scales)
    return _unpack_columns(qweight).t().contiguous(), _unpack_columns(qzeros).t().contiguous(), scales.t().contiguous()


def dequantize_awq(
    qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor, group_size: int,
    dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """The weight [out, in] (nn.Linear layout) the packed tensors stand for, in `dtype` (default the scales'
    dtype, fp16). In fp16 this is bit-identical to AutoAWQ's `dequantize_gemm(...).T`."""
    _check_packed(qweight, qzeros, scales)
    if qweight.shape[0] != scales.shape[0] * group_size:
        raise ValueError(
            f"group_size {group_size} does not fit qweight {tuple(qweight.shape)} and scales {tuple(scales.shape)}"
        )
    q = _unpack_columns(qweight).to(torch.float32)  # [in, out]
    z = _unpack_columns(qzeros).to(torch.float32).repeat_interleave(group_size, dim=0)
    s = scales.to(torch.float32).repeat_interleave(group_size, dim=0)
    # (q - z) is a small integer and s an fp16 value: their product is exact in fp32, so the one rounding
    # to fp16 below is the same rounding AutoAWQ's fp16 multiply does.
    return ((q - z) * s).to(dtype or scales.dtype).t().contiguous()


# --- nibble packing along the last dimension ---------------------------------------------------------------
_SHIFTS = torch.arange(0, 32, BITS, dtype=torch.int64)  # nibble i at bits 4i
_ORDER = torch.tensor(AWQ_ORDER)


def _pack_columns(codes: torch.Tensor) -> torch.Tensor:
    """[rows, cols] codes 0..15 -> int32 [rows, cols/8], nibble i = column 8c + AWQ_ORDER[i]."""
    rows, cols = codes.shape
    blocks = codes.to(torch.int64).reshape(rows, cols // PACK, PACK)[:, :, _ORDER.to(codes.device)]
    words = (blocks << _SHIFTS.to(codes.device)).sum(dim=-1)  # 0 .. 2^32-1, exact in int64
    words = torch.where(words >= 2**31, words - 2**32, words)  # reinterpret as two's-complement int32
    return words.to(torch.int32).contiguous()


def _unpack_columns(words: torch.Tensor) -> torch.Tensor:
    """int32 [rows, n] -> uint8 [rows, 8n], undoing _pack_columns."""
    rows, n = words.shape
    nibbles = (words.to(torch.int64)[:, :, None] >> _SHIFTS.to(words.device)) & (2**BITS - 1)  # [rows, n, 8]
    codes = torch.empty_like(nibbles)
    codes[:, :, _ORDER.to(words.device)] = nibbles
    return codes.reshape(rows, n * PACK).to(torch.uint8)


def _check_codes(what: str, codes: torch.Tensor) -> tuple[int, int]:
    if codes.dim() != 2:
        raise ValueError(f"{what} of shape {tuple(codes.shape)}: expected 2-D")
    if codes.is_floating_point() or codes.is_complex():
        raise ValueError(f"{what} has dtype {codes.dtype}; expected integer codes")
    if codes.numel() and (int(codes.min()) < 0 or int(codes.max()) > 2**BITS - 1):
        raise ValueError(f"{what} holds values outside 0..{2**BITS - 1} (range {int(codes.min())}..{int(codes.max())})")
    return codes.shape[0], codes.shape[1]


def _check_packed(qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor) -> None:
    if qweight.dtype != torch.int32 or qzeros.dtype != torch.int32:
        raise ValueError(f"qweight/qzeros must be int32, got {qweight.dtype}/{qzeros.dtype}")
    if qweight.dim() != 2 or qzeros.dim() != 2 or scales.dim() != 2:
        raise ValueError("qweight, qzeros and scales must be 2-D")
    n_groups, out = scales.shape
    if qweight.shape[1] * PACK != out or tuple(qzeros.shape) != (n_groups, out // PACK):
        raise ValueError(
            f"AWQ tensors do not fit together: qweight {tuple(qweight.shape)}, qzeros {tuple(qzeros.shape)}, "
            f"scales {tuple(scales.shape)}"
        )
    if n_groups == 0 or qweight.shape[0] % n_groups != 0:
        raise ValueError(f"qweight rows {qweight.shape[0]} are not a multiple of the {n_groups} scale groups")
