"""AWQ 4-bit matmuls straight from AutoAWQ's GEMM layout: Triton kernels for CUDA (kernel "triton"; the default is
torch's own int4 kernels, `int4`, where the build has them), a pure-torch path for the rest (kernel "torch").

Layout (see `r1v.quant.pack`): qweight int32 [K, N/8], qzeros int32 [K/G, N/8], scales fp16 [K/G, N]; nibble i
of a word holds column 8c + AWQ_ORDER[i], so column j of a block of 8 sits at bits 4 * (j // 2 + 4 * (j % 2)).
The weight is W^T[k, n] = (q[k, n] - z[k // G, n]) * s[k // G, n], rounded to fp16 (what AutoAWQ computes).

    y = awq_linear(x, qweight, qzeros, scales, group_size, bias, kernel="triton" | "torch")

Kernels (all read the packed words directly; nothing is unpacked at load):
- `awq_gemv`: decode, M <= 8 rows. One program per BLOCK_N columns and K slice (split-K, partial sums in
  fp32, added by torch): each weight tile is dequantized once and used for every row, so the weight is read
  from memory once per step, which is what decoding is bound by.
- `awq_gemm`: fused dequantize + `tl.dot` for medium M (prefill chunks up to `GEMM_MAX_M` rows).
- `awq_dequantize` + torch.matmul (cuBLAS) for large M, where the fp16 GEMM is compute-bound and the one
  extra pass over the weight is cheap.
- `dequantize_torch` + `F.linear`: the pure-torch path (CPU, or any device without Triton) and the reference
  the kernels are tested against.

On CPU the Triton kernels run only under the interpreter: set TRITON_INTERPRET=1 before triton is imported.
"""
from __future__ import annotations

import functools
import os
import sys
from typing import Any

import torch
import torch.nn.functional as F

try:  # Triton is optional: Linux + CUDA builds of torch bring it; the torch path needs nothing else
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - depends on the platform
    triton = None
    tl = None

__all__ = [
    "GEMM_MAX_M", "GEMV_MAX_M", "KERNELS", "awq_dequantize", "awq_gemm", "awq_gemv", "awq_linear",
    "dequantize_torch", "triton_available", "triton_usable_on",
]

KERNELS = ("triton", "torch")
GEMV_MAX_M = 8  # rows up to which the GEMV kernel runs (decode of up to 8 sequences)
GEMM_MAX_M = 512  # rows up to which the fused GEMM runs; above, dequantize + cuBLAS (tuning guess, not measured)

# Shift of column j (0..7) of a block of 8 inside its int32 word: nibble AWQ_ORDER.index(j) = j // 2 + 4 * (j % 2).
_COLUMN_SHIFTS = tuple(4 * (j // 2 + 4 * (j % 2)) for j in range(8))  # (0, 16, 4, 20, 8, 24, 12, 28)


def triton_available() -> bool:
    return triton is not None


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def triton_usable_on(device: torch.device | str) -> bool:
    """True when the Triton kernels can run on `device`: CUDA with triton installed, or any device when the
    interpreter is on (TRITON_INTERPRET=1, read by triton at import)."""
    if triton is None:
        return False
    return torch.device(device).type == "cuda" or _interpreting()


# --- the pure-torch path ---------------------------------------------------------------------------------------
@functools.lru_cache(maxsize=16)
def _constant(values: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A small constant tensor made once per device: no host-to-device copy per call (which a CUDA graph
    capture would refuse)."""
    return torch.tensor(values, dtype=dtype, device=device)


def _unpack(words: torch.Tensor) -> torch.Tensor:
    """int32 [rows, c] -> int32 [rows, 8c] codes 0..15 in natural column order."""
    shifts = _constant(_COLUMN_SHIFTS, torch.int32, words.device)
    return ((words[:, :, None] >> shifts) & 0xF).reshape(words.shape[0], -1)


_NIBBLE_OF_COLUMN = (0, 4, 1, 5, 2, 6, 3, 7)  # AWQ_ORDER inverted: column j of a block sits in this nibble


def _unpack_bytes(words: torch.Tensor) -> torch.Tensor:
    """The same as `_unpack`, one byte per code (uint8): byte b of a little-endian word holds nibbles 2b (low
    half) and 2b + 1 (high half)."""
    rows, c = words.shape
    b = words.contiguous().view(torch.uint8).view(rows, c, 4)
    nibbles = torch.stack((b & 0xF, b >> 4), dim=-1).view(rows, c, 8)  # in nibble order
    index = _constant(_NIBBLE_OF_COLUMN, torch.int64, words.device)
    return nibbles.index_select(2, index).view(rows, 8 * c)


_LITTLE_ENDIAN = sys.byteorder == "little"


def unpack_codes(words: torch.Tensor) -> torch.Tensor:
    """AutoAWQ-packed int32 [rows, c] -> its codes [rows, 8c] (0..15, natural column order), one byte each."""
    return _unpack_bytes(words) if _LITTLE_ENDIAN else _unpack(words).to(torch.uint8)


def dequantize_torch(qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor, group_size: int,
                     dtype: torch.dtype | None = None) -> torch.Tensor:
    """The weight [N, K] (nn.Linear layout) as fp16 values, returned in `dtype` (default fp16).

    Bit-identical to `r1v.quant.pack.dequantize_awq` (and AutoAWQ's dequantize_gemm): q - z is a small integer,
    exact in fp16, and its product with an fp16 scale is rounded to fp16 once; a wider `dtype` holds those fp16
    values exactly."""
    k, n = qweight.shape[0], scales.shape[1]
    half = dtype in (None, torch.float16)
    work = torch.float16 if half else torch.float32  # fp16 arithmetic is exact here too, but slow on CPUs
    q = unpack_codes(qweight).view(k // group_size, group_size, n).to(work)
    q -= unpack_codes(qzeros).to(work)[:, None, :]
    q *= scales.to(work)[:, None, :]
    w = q.view(k, n).t()
    return w if half else w.to(torch.float16).to(dtype)


# --- Triton kernels ------------------------------------------------------------------------------------------
if triton is not None:

    @triton.jit
    def _dequant_tile(qw_ptr, qz_ptr, s_ptr, k0, offs_k, offs_n, mask_k, mask_n, N, G,
                      GROUP_ALIGNED: tl.constexpr):
        """W^T[offs_k, offs_n] as fp16 (zero outside the masks); offs_k = k0 + arange(BLOCK_K)."""
        n8 = N // 8
        word_col = offs_n // 8
        shift = ((offs_n % 8) // 2 + (offs_n % 2) * 4) * 4
        mask = mask_k[:, None] & mask_n[None, :]
        words = tl.load(qw_ptr + offs_k[:, None] * n8 + word_col[None, :], mask=mask, other=0)
        q = (words >> shift[None, :]) & 0xF
        if GROUP_ALIGNED:  # the whole K tile is inside one group: one row of zeros and scales
            g = k0 // G
            zw = tl.load(qz_ptr + g * n8 + word_col, mask=mask_n, other=0)
            z = ((zw >> shift) & 0xF)[None, :]
            s = tl.load(s_ptr + g * N + offs_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]
        else:
            g = offs_k // G
            zw = tl.load(qz_ptr + g[:, None] * n8 + word_col[None, :], mask=mask, other=0)
            z = (zw >> shift[None, :]) & 0xF
            s = tl.load(s_ptr + g[:, None] * N + offs_n[None, :], mask=mask, other=0.0).to(tl.float32)
        return ((q - z).to(tl.float32) * s).to(tl.float16)

    @triton.jit
    def _gemv_kernel(x_ptr, qw_ptr, qz_ptr, s_ptr, b_ptr, out_ptr, M, N, K, G, stride_xm,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, SPLIT_K: tl.constexpr,
                     GROUP_ALIGNED: tl.constexpr, HAS_BIAS: tl.constexpr):
        """SPLIT_K == 1: out [M, N] = x W^T + b in out's dtype; else out [SPLIT_K, M, N] fp32 partial sums."""
        pid_n = tl.program_id(0)
        pid_k = tl.program_id(1)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        mask_n = offs_n < N
        rows = tl.arange(0, BLOCK_M)
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k0 in range(pid_k * BLOCK_K, K, SPLIT_K * BLOCK_K):
            offs_k = k0 + tl.arange(0, BLOCK_K)
            mask_k = offs_k < K
            w = _dequant_tile(qw_ptr, qz_ptr, s_ptr, k0, offs_k, offs_n, mask_k, mask_n, N, G, GROUP_ALIGNED)
            w = w.to(tl.float32)
            for m in tl.static_range(BLOCK_M):  # one dequantized tile serves every row
                row_ok = offs_k * 0 + m < M
                x = tl.load(x_ptr + m * stride_xm + offs_k, mask=mask_k & row_ok, other=0.0).to(tl.float32)
                part = tl.sum(x[:, None] * w, axis=0)
                acc = tl.where(rows[:, None] == m, acc + part[None, :], acc)
        if SPLIT_K == 1:
            if HAS_BIAS:
                acc += tl.load(b_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]
            acc = acc.to(out_ptr.dtype.element_ty)
        out = out_ptr + pid_k * M * N + rows[:, None] * N + offs_n[None, :]
        tl.store(out, acc, mask=(rows[:, None] < M) & mask_n[None, :])

    @triton.jit
    def _gemm_kernel(x_ptr, qw_ptr, qz_ptr, s_ptr, b_ptr, out_ptr, M, N, K, G, stride_xm, stride_om,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                     GROUP_ALIGNED: tl.constexpr, HAS_BIAS: tl.constexpr):
        pid_m = tl.program_id(0)
        pid_n = tl.program_id(1)
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        mask_m = offs_m < M
        mask_n = offs_n < N
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            offs_k = k0 + tl.arange(0, BLOCK_K)
            mask_k = offs_k < K
            x = tl.load(x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :],
                        mask=mask_m[:, None] & mask_k[None, :], other=0.0)
            w = _dequant_tile(qw_ptr, qz_ptr, s_ptr, k0, offs_k, offs_n, mask_k, mask_n, N, G, GROUP_ALIGNED)
            acc += tl.dot(x.to(tl.float16), w)
        if HAS_BIAS:  # added before the one rounding to the output dtype
            acc += tl.load(b_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]
        out = out_ptr + offs_m[:, None] * stride_om + offs_n[None, :]
        tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_n[None, :])

    @triton.jit
    def _dequant_kernel(qw_ptr, qz_ptr, s_ptr, out_ptr, N, K, G,
                        BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_ALIGNED: tl.constexpr):
        k0 = tl.program_id(0) * BLOCK_K
        offs_k = k0 + tl.arange(0, BLOCK_K)
        offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
        mask_k, mask_n = offs_k < K, offs_n < N
        w = _dequant_tile(qw_ptr, qz_ptr, s_ptr, k0, offs_k, offs_n, mask_k, mask_n, N, G, GROUP_ALIGNED)
        tl.store(out_ptr + offs_k[:, None] * N + offs_n[None, :], w, mask=mask_k[:, None] & mask_n[None, :])


def _require_triton(*tensors: torch.Tensor) -> None:
    if triton is None:
        raise RuntimeError("the Triton AWQ kernels need the `triton` package (pip install triton; Linux)")
    for t in tensors:
        if t.device.type != "cuda" and not _interpreting():
            raise RuntimeError(f"the Triton AWQ kernels run on CUDA tensors; got a {t.device.type} tensor. Use "
                               "kernel='torch', or set TRITON_INTERPRET=1 before importing triton to interpret them")


def _block_k(group_size: int, cap: int) -> tuple[int, bool]:
    """A power-of-two K tile and whether it lies inside one group (it divides the group size)."""
    for block in (128, 64, 32, 16):
        if block <= cap and group_size % block == 0:
            return block, True
    return 16, False


def _check(x: torch.Tensor, qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor,
           group_size: int) -> tuple[int, int, int]:
    if x.dim() != 2:
        raise ValueError(f"expected a 2-D input [M, K], got {tuple(x.shape)}")
    m, k = x.shape
    n = scales.shape[1]
    if qweight.shape != (k, n // 8) or qzeros.shape != (k // group_size, n // 8) or \
            scales.shape[0] * group_size != k:
        raise ValueError(f"AWQ tensors qweight {tuple(qweight.shape)}, qzeros {tuple(qzeros.shape)}, scales "
                         f"{tuple(scales.shape)} with group {group_size} do not fit an input of {k} features")
    return m, n, k


def awq_gemv(x: torch.Tensor, qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor, group_size: int,
             bias: torch.Tensor | None = None, split_k: int | None = None) -> torch.Tensor:
    """x [M <= 8, K] (fp16) -> x @ W^T + bias [M, N] in x's dtype (fp32 sums, one rounding at the end)."""
    _require_triton(x, qweight)
    m, n, k = _check(x, qweight, qzeros, scales, group_size)
    if m > GEMV_MAX_M:
        raise ValueError(f"awq_gemv takes at most {GEMV_MAX_M} rows, got {m}")
    x = x.contiguous()
    sms = _sm_count(x.device)
    block_k, aligned = _block_k(group_size, 128)
    block_n = 64 if n >= 64 * sms else 32  # narrower column blocks before splitting K
    n_blocks = triton.cdiv(n, block_n)
    k_blocks = triton.cdiv(k, block_k)
    if split_k is None:  # about two programs per SM, each slice at least 4 K tiles long (tuning guess)
        split_k = min(triton.cdiv(2 * sms, n_blocks), k_blocks // 4, 8)
    split_k = max(1, min(split_k, k_blocks))
    block_m = max(1, triton.next_power_of_2(m))
    shape = (m, n) if split_k == 1 else (split_k, m, n)
    out = torch.empty(shape, dtype=x.dtype if split_k == 1 else torch.float32, device=x.device)
    _gemv_kernel[(n_blocks, split_k)](x, qweight, qzeros, scales, scales if bias is None else bias.contiguous(), out,
                                      m, n, k, group_size, x.stride(0), BLOCK_M=block_m, BLOCK_N=block_n,
                                      BLOCK_K=block_k, SPLIT_K=split_k, GROUP_ALIGNED=aligned,
                                      HAS_BIAS=bias is not None)
    if split_k == 1:
        return out
    out = out.sum(0)
    if bias is not None:
        out += bias.to(torch.float32)
    return out.to(x.dtype)


@functools.lru_cache(maxsize=8)
def _sm_count_of(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def _sm_count(device: torch.device) -> int:
    return _sm_count_of(device.index if device.index is not None else torch.cuda.current_device()) \
        if device.type == "cuda" else 1


def awq_gemm(x: torch.Tensor, qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor,
             group_size: int, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x [M, K] (fp16) -> x @ W^T + bias [M, N]: each weight tile dequantized in registers, fp16 tensor-core
    dot with fp32 accumulation, the bias added before the one rounding."""
    _require_triton(x, qweight)
    m, n, k = _check(x, qweight, qzeros, scales, group_size)
    x = x.contiguous()
    out = torch.empty((m, n), dtype=x.dtype, device=x.device)
    block_m = 16 if m <= 16 else 32 if m <= 32 else 64
    block_n = 64 if n >= 64 else 32
    block_k, aligned = _block_k(group_size, 64)
    grid = (triton.cdiv(m, block_m), triton.cdiv(n, block_n))
    _gemm_kernel[grid](x, qweight, qzeros, scales, scales if bias is None else bias.contiguous(), out, m, n, k,
                       group_size, x.stride(0), out.stride(0), BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k,
                       GROUP_ALIGNED=aligned, HAS_BIAS=bias is not None)
    return out


def awq_dequantize(qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor,
                   group_size: int) -> torch.Tensor:
    """W^T [K, N] fp16 (the transposed nn.Linear weight), bit-identical to `dequantize_torch(...).t()`."""
    _require_triton(qweight)
    k, n = qweight.shape[0], scales.shape[1]
    out = torch.empty((k, n), dtype=torch.float16, device=qweight.device)
    block_k, aligned = _block_k(group_size, 64)
    block_n = 64 if n >= 64 else 32
    grid = (triton.cdiv(k, block_k), triton.cdiv(n, block_n))
    _dequant_kernel[grid](qweight, qzeros, scales, out, n, k, group_size,
                          BLOCK_N=block_n, BLOCK_K=block_k, GROUP_ALIGNED=aligned)
    return out


def awq_linear(x: torch.Tensor, qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor, group_size: int,
               bias: torch.Tensor | None = None, kernel: str = "torch") -> torch.Tensor:
    """y = x @ W^T + bias for x [..., K]; `kernel` "triton" picks GEMV / fused GEMM / dequantize + matmul by the
    number of rows, "torch" dequantizes with torch and calls F.linear (in x's dtype)."""
    shape = x.shape
    x2 = x.reshape(-1, shape[-1])
    if kernel == "triton":
        dtype = x2.dtype
        xh = x2 if dtype == torch.float16 else x2.to(torch.float16)  # the kernels multiply fp16 weights
        m = xh.shape[0]
        b = None if bias is None else bias.to(xh.dtype)
        if m <= GEMV_MAX_M:
            y = awq_gemv(xh, qweight, qzeros, scales, group_size, b)
        elif m <= GEMM_MAX_M:
            y = awq_gemm(xh, qweight, qzeros, scales, group_size, b)
        elif b is not None:
            y = torch.addmm(b, xh, awq_dequantize(qweight, qzeros, scales, group_size))
        else:
            y = xh @ awq_dequantize(qweight, qzeros, scales, group_size)
        y = y.to(dtype)
    elif kernel == "torch":
        y = F.linear(x2, dequantize_torch(qweight, qzeros, scales, group_size, x2.dtype),
                     None if bias is None else bias.to(x2.dtype))
    else:
        raise ValueError(f"kernel must be one of {KERNELS}, got {kernel!r}")
    return y.reshape(*shape[:-1], y.shape[-1])


def describe() -> dict[str, Any]:
    """What this process can run: for error messages and the benchmark's report."""
    return {"triton": getattr(triton, "__version__", None), "interpreter": _interpreting(),
            "cuda": torch.cuda.is_available()}
