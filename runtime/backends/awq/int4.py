"""torch's own int4 weight-only kernels (tinygemm, what gpt-fast and torchao use), fed from AutoAWQ's GEMM layout.

The checkpoint keeps AutoAWQ's layout (vLLM and transformers read it); the weights are repacked once, at load:

    AutoAWQ:  W[n, k] = (q[k, n] - z[g, n]) * s[g, n]                 g = k // G
    torch:    W[n, k] = (q[n, k] - 8) * scale[g, n] + zero[g, n]      scales_and_zeros [K/G, N, 2]

so scale = s and zero = (8 - z) * s, computed exactly in fp32 and stored in bf16 (torch's kernels read bf16 scales
with bf16 activations; a bf16 scale is within 2^-9 of the fp16 one, far inside the 4-bit grid's own error).

- CPU: `aten._weight_int4pack_mm_for_cpu(x_bf16, packed, G, scales_and_zeros)` for any number of rows (its bf16
  path is vectorized; fp32 and fp16 inputs take a scalar path ~50x slower, so inputs are cast to bf16);
  packed = `_convert_weight_to_int4pack_for_cpu(q int32 [N, K], 1)`, uint8 [N, K/2].
- CUDA: `aten._weight_int4pack_mm(x_bf16, packed, G, scales_and_zeros)` for up to `CUDA_MAX_M` rows (decode: it
  reads the 4-bit weight once); for more rows the weight is dequantized into a bf16 scratch matrix by one Triton
  pass over the packed words (`dequantize`) and multiplied by cuBLAS (prefill is compute-bound, and there the
  extra pass over the weight is cheap next to the product). packed = `_convert_weight_to_int4pack(uint8 [N, K/2],
  inner_k_tiles)`, int32 [N/8, K/(16 ikt), 32, ikt/2]: m16n8k16 tensor-core tiles (`cuda_pack_reference` writes the
  same layout in torch ops, from aten/src/ATen/native/cuda/int4mm.cu; the CUDA tests compare the two).

Shapes the kernels take (`unsupported` says why not): G in 32/64/128/256; CPU: N a multiple of 16; CUDA: N a
multiple of 8, K a multiple of 32, an NVIDIA GPU of compute capability 8.0 or newer. Other linears keep the
AutoAWQ layout and the Triton / torch path (the loader counts them).
"""
from __future__ import annotations

import functools
import os
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from . import kernels

__all__ = ["CUDA_MAX_M", "GROUP_SIZES", "Int4Weight", "available", "cuda_pack_reference", "cuda_unpack",
           "dequantize", "dequantize_reference", "int4_linear", "pack_awq_as_int4", "unsupported"]

GROUP_SIZES = (32, 64, 128, 256)
# Rows up to which the CUDA tinygemm kernel runs; above, dequantize + cuBLAS. The H200 figures
# (R1V-38B gate/up: 44.5 us at 1 row, 165.5 us at 16, 4.9 ms at 512; fp16 cuBLAS 82-195 us) put the crossover
# between 16 and 64 rows; `python -m r1v.bench.kernels` measures both sides. R1V_INT4_CUDA_MAX_M overrides it.
CUDA_MAX_M = int(os.environ.get("R1V_INT4_CUDA_MAX_M", "16"))
_SHIFTS = tuple(range(0, 32, 4))


def available(device: torch.device | str) -> bool:
    """True when this torch build has the int4 kernel for `device` (CPU, or an NVIDIA GPU of sm80+)."""
    device = torch.device(device)
    if device.type == "cpu":
        return hasattr(torch.ops.aten, "_weight_int4pack_mm_for_cpu")
    if device.type == "cuda":
        return _cuda_capable(device.index if device.index is not None else torch.cuda.current_device())
    return False


@functools.lru_cache(maxsize=8)
def _cuda_capable(index: int) -> bool:
    if torch.version.hip is not None or not hasattr(torch.ops.aten, "_weight_int4pack_mm"):
        return False  # ROCm lays the tiles out differently; the dequantize pass reads NVIDIA's layout
    return torch.cuda.get_device_capability(index) >= (8, 0)


def unsupported(in_features: int, out_features: int, group_size: int, device: torch.device | str) -> str | None:
    """Why torch's int4 kernel cannot take this linear on `device`, or None when it can."""
    device = torch.device(device)
    if not available(device):
        return f"this torch build has no int4 kernel for {device.type}" + (
            " (needs an NVIDIA GPU of compute capability 8.0+)" if device.type == "cuda" else "")
    if group_size not in GROUP_SIZES:
        return f"group size {group_size} (the int4 kernels take {', '.join(map(str, GROUP_SIZES))})"
    if in_features % group_size:
        return f"{in_features} input features are not a multiple of the group size {group_size}"
    multiple = 16 if device.type == "cpu" else 8
    if out_features % multiple:
        return f"{out_features} output features are not a multiple of {multiple}"
    if device.type == "cuda" and in_features % 32:
        return f"{in_features} input features are not a multiple of 32"
    return None


def inner_k_tiles(in_features: int) -> int:
    """The widest tinygemm k-tiling that divides K (8 x 16 columns: 16-byte loads)."""
    return next(t for t in (8, 4, 2) if in_features % (16 * t) == 0)


@dataclass
class Int4Weight:
    """One linear repacked for torch's int4 kernels (see the module doc)."""

    packed: torch.Tensor
    scales_and_zeros: torch.Tensor  # bf16 [K/G, N, 2]
    group_size: int
    in_features: int
    out_features: int


def pack_awq_as_int4(qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor) -> Int4Weight:
    """Repack AutoAWQ GEMM tensors (on their device) for torch's int4 kernel on that device."""
    k, n = qweight.shape[0], scales.shape[1]
    if scales.shape[0] == 0 or k % scales.shape[0]:
        raise ValueError(f"qweight {tuple(qweight.shape)} and scales {tuple(scales.shape)} do not fit together")
    group = k // scales.shape[0]
    why = unsupported(k, n, group, qweight.device)
    if why:
        raise ValueError(f"torch's int4 kernel cannot take a {k}->{n} linear with group {group}: {why}")
    codes = kernels.unpack_codes(qweight).t()  # uint8 [N, K]
    s = scales.to(torch.float32)
    zero = (8.0 - kernels.unpack_codes(qzeros).to(torch.float32)) * s  # exact in fp32: small integer x fp16
    scales_and_zeros = torch.stack((s, zero), dim=-1).to(torch.bfloat16).contiguous()
    if qweight.device.type == "cpu":
        packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes.to(torch.int32).contiguous(), 1)
    else:
        packed = torch.ops.aten._convert_weight_to_int4pack(_nibble_pairs(codes), inner_k_tiles(k))
    return Int4Weight(packed, scales_and_zeros, group, k, n)


def _nibble_pairs(codes: torch.Tensor) -> torch.Tensor:
    """uint8 [N, K] codes -> uint8 [N, K/2], column 2j in the high nibble and 2j + 1 in the low one (what
    `_convert_weight_to_int4pack` reads)."""
    return ((codes[:, ::2] << 4) | codes[:, 1::2]).contiguous()


# --- the product ---------------------------------------------------------------------------------------------
def int4_linear(x: torch.Tensor, weight: Int4Weight, bias: torch.Tensor | None = None) -> torch.Tensor:
    """y = x W^T + bias for x [..., K], in x's dtype (bf16 inside the int4 kernel)."""
    shape = x.shape
    x2 = x.reshape(-1, shape[-1])
    m = x2.shape[0]
    if x2.device.type == "cpu":
        y = torch.ops.aten._weight_int4pack_mm_for_cpu(x2.to(torch.bfloat16).contiguous(), weight.packed,
                                                       weight.group_size, weight.scales_and_zeros)
    elif m <= CUDA_MAX_M or not dequantize_ok(x2.device):
        y = torch.ops.aten._weight_int4pack_mm(x2.to(torch.bfloat16).contiguous(), weight.packed,
                                               weight.group_size, weight.scales_and_zeros)
    else:  # prefill: one pass to a dense scratch weight, then cuBLAS in x's dtype
        return F.linear(x, dequantize(weight, x.dtype), None if bias is None else bias.to(x.dtype))
    if bias is not None:
        y = y + bias.to(y.dtype)
    return y.to(x.dtype).reshape(*shape[:-1], weight.out_features)


# --- the CUDA layout in torch ops: reference packing and unpacking -------------------------------------------
# Tile of one int32 word (NVIDIA, int4mm.cu `matrix_to_m16n8k16_Bint4_layout`): word [nt, ko, t, i] with lane
# t = 4a + b holds row n = 8 nt + a and, in nibble j = 4e + c, column k = 16 ikt ko + 32 i + 8 c + 2 b + e.
def cuda_pack_reference(codes: torch.Tensor, tiles: int) -> torch.Tensor:
    """uint8 codes [N, K] -> int32 [N/8, K/(16 tiles), 32, tiles/2], the layout `_convert_weight_to_int4pack`
    writes on NVIDIA GPUs (for tests on any device; the CUDA tests compare it with torch's own)."""
    n, k = codes.shape
    c = codes.to(torch.int64).view(n // 8, 8, k // (16 * tiles), tiles // 2, 4, 4, 2)  # nt a ko i c b e
    c = c.permute(0, 2, 1, 5, 3, 6, 4).reshape(n // 8, k // (16 * tiles), 32, tiles // 2, 8)  # nt ko (a b) i (e c)
    words = (c << torch.tensor(_SHIFTS, device=codes.device)).sum(-1)
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)


def cuda_unpack(packed: torch.Tensor) -> torch.Tensor:
    """The inverse of `cuda_pack_reference`: uint8 codes [N, K]."""
    nt, ko, _, half = packed.shape
    nibbles = (packed[..., None] >> torch.tensor(_SHIFTS, dtype=torch.int32, device=packed.device)) & 0xF
    nibbles = nibbles.view(nt, ko, 8, 4, half, 2, 4)  # nt ko a b i e c
    return nibbles.permute(0, 2, 1, 4, 6, 3, 5).reshape(nt * 8, ko * 32 * half).to(torch.uint8)


def _apply_scales(codes: torch.Tensor, weight: Int4Weight, dtype: torch.dtype) -> torch.Tensor:
    """W [N, K] = (codes - 8) * scale + zero in fp32, rounded once to `dtype`."""
    n, k, g = weight.out_features, weight.in_features, weight.group_size
    sz = weight.scales_and_zeros.to(torch.float32)  # [K/G, N, 2]
    w = (codes.to(torch.float32) - 8).view(n, k // g, g)
    w = w * sz[..., 0].t()[:, :, None] + sz[..., 1].t()[:, :, None]
    return w.view(n, k).to(dtype)


def dequantize_reference(weight: Int4Weight, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The weight [N, K] the int4 kernels multiply by, in torch ops (any device; slow: for tests and checks)."""
    if weight.packed.dim() == 4:
        codes = cuda_unpack(weight.packed)
    else:  # CPU layout: whatever it is, the CPU kernel times the identity gives the weight back, exactly
        eye = torch.eye(weight.in_features, dtype=torch.bfloat16)
        wt = torch.ops.aten._weight_int4pack_mm_for_cpu(eye, weight.packed, weight.group_size,
                                                        weight.scales_and_zeros)
        return wt.t().to(dtype).contiguous()
    return _apply_scales(codes, weight, dtype)


# --- the CUDA dequantize pass (Triton) -----------------------------------------------------------------------
triton, tl = kernels.triton, kernels.tl

if triton is not None:

    @triton.jit
    def _dequant_tiles_kernel(p_ptr, sz_ptr, out_ptr, N, K, G, KO,
                              TILES: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                              GROUP_ALIGNED: tl.constexpr):
        """W[n, k] (row-major [N, K], out's dtype) from the tinygemm words: each output element finds its word
        and nibble (see `cuda_pack_reference`); a word serves 8 neighbouring elements from the cache."""
        offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        k0 = tl.program_id(1) * BLOCK_K
        offs_k = k0 + tl.arange(0, BLOCK_K)
        mask_n, mask_k = offs_n < N, offs_k < K
        mask = mask_n[:, None] & mask_k[None, :]
        ko = offs_k // (16 * TILES)
        r = offs_k % (16 * TILES)
        i, c, b, e = r // 32, (r % 32) // 8, (r % 8) // 2, r % 2
        lane = (offs_n % 8)[:, None] * 4 + b[None, :]
        word = (((offs_n // 8)[:, None] * KO + ko[None, :]) * 32 + lane) * (TILES // 2) + i[None, :]
        words = tl.load(p_ptr + word, mask=mask, other=0)
        q = (words >> ((e * 4 + c) * 4)[None, :]) & 0xF
        if GROUP_ALIGNED:  # the K tile lies inside one group: one row of scales and zeros
            g = k0 // G
            s = tl.load(sz_ptr + (g * N + offs_n) * 2, mask=mask_n, other=0.0).to(tl.float32)[:, None]
            z = tl.load(sz_ptr + (g * N + offs_n) * 2 + 1, mask=mask_n, other=0.0).to(tl.float32)[:, None]
        else:
            g = offs_k // G
            at = (g[None, :] * N + offs_n[:, None]) * 2
            s = tl.load(sz_ptr + at, mask=mask, other=0.0).to(tl.float32)
            z = tl.load(sz_ptr + at + 1, mask=mask, other=0.0).to(tl.float32)
        w = (q - 8).to(tl.float32) * s + z
        tl.store(out_ptr + offs_n[:, None] * K + offs_k[None, :], w.to(out_ptr.dtype.element_ty), mask=mask)


def dequantize(weight: Int4Weight, dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """The dense weight [N, K] in `dtype` from the CUDA (tinygemm) layout, in one Triton pass (on CPU tensors
    under TRITON_INTERPRET=1, for tests)."""
    if weight.packed.dim() != 4:
        raise ValueError("dequantize reads the CUDA tile layout (a 4-D packed tensor)")
    kernels._require_triton(weight.packed)
    n, k, g = weight.out_features, weight.in_features, weight.group_size
    tiles = weight.packed.shape[3] * 2
    out = torch.empty((n, k), dtype=dtype, device=weight.packed.device)
    block_k = min(128, g)  # power-of-two group sizes only (GROUP_SIZES): a tile never straddles two groups
    block_n = 32
    grid = (triton.cdiv(n, block_n), triton.cdiv(k, block_k))
    _dequant_tiles_kernel[grid](weight.packed, weight.scales_and_zeros, out, n, k, g, weight.packed.shape[1],
                                TILES=tiles, BLOCK_N=block_n, BLOCK_K=block_k, GROUP_ALIGNED=g % block_k == 0)
    return out


def dequantize_ok(device: torch.device) -> bool:
    """Whether the prefill path (Triton dequantize + cuBLAS) may run on `device`: triton is installed and torch's
    packing on this GPU writes the layout `dequantize` reads (checked once per device on a small matrix; when it
    does not, every product stays on the tinygemm kernel, slower for long prompts but exact)."""
    return kernels.triton is not None and _layout_matches(device.index if device.index is not None
                                                          else torch.cuda.current_device())


@functools.lru_cache(maxsize=8)
def _layout_matches(index: int) -> bool:
    device = torch.device("cuda", index)
    codes = torch.randint(0, 16, (64, 256), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)
    packed = torch.ops.aten._convert_weight_to_int4pack(_nibble_pairs(codes).to(device), 8)
    return bool(torch.equal(packed.cpu(), cuda_pack_reference(codes, 8)))
