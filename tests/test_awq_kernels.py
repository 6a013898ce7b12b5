"""The AWQ Triton kernels (GEMV for decode, fused GEMM, dequantize) against the pure-torch path.

On CPU the kernels run under Triton's interpreter (TRITON_INTERPRET=1, set by tests/conftest.py before triton is
imported; numpy does the arithmetic, so shapes stay tiny). Reference: x @ W^T in float64 with W the fp16 weight the packed
tensors stand for (`r1v.quant.pack.dequantize_awq`, bit-identical to AutoAWQ's dequantize_gemm); a kernel's fp16
output may differ from it by its own rounding: one fp16 unit in the last place of the result (plus fp32
summation-order effects, 2^-16 of sum |x w|, far below that).
Shapes: the tiny checkpoints' and the micro-r1v model's linears, batch sizes 1/3/5/8 (GEMV) and 9-40 (GEMM),
K not a multiple of 64, and a group size that no power-of-two K tile divides (the per-element group path).
"""
from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
triton = pytest.importorskip("triton", reason="triton is not installed (pip install triton; Linux only)")

from r1v.quant.pack import dequantize_awq, pack_awq  # noqa: E402
from r1v.quant.rtn import quantize_rtn  # noqa: E402
from r1v.runtime.backends.awq import kernels  # noqa: E402
from r1v.runtime.backends.awq.qlinear import AWQLinear  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

# tests/conftest.py sets TRITON_INTERPRET=1 on machines without a GPU, before triton is imported
assert DEVICE == "cuda" or kernels._interpreting(), "no GPU and Triton is not interpreting: the kernels cannot run"

# (K, N, G): a K that is not a multiple of 64; the tiny checkpoints' LLM (hidden 64, intermediate 160) and ViT
# (32 wide); micro-r1v's q/gate and down projections; G=40, which no power-of-two tile divides.
SHAPES = [(96, 64, 32), (64, 160, 32), (160, 64, 32), (32, 96, 32), (256, 512, 128), (512, 256, 128), (80, 64, 40)]


def _packed(k: int, n: int, g: int, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    w = (torch.randn(n, k, generator=gen) / k**0.5).to(torch.float16)
    packed = pack_awq(*quantize_rtn(w, g))
    weight = dequantize_awq(packed.qweight, packed.qzeros, packed.scales, g)  # fp16 [N, K]
    return packed.qweight.to(DEVICE), packed.qzeros.to(DEVICE), packed.scales.to(DEVICE), weight


def _x(m: int, k: int, seed: int = 1) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(m, k, generator=gen).to(torch.float16).to(DEVICE)


def _assert_fp16_close(out: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None):
    ref = x.double().cpu() @ weight.double().t()
    magnitude = x.double().cpu().abs() @ weight.double().abs().t()  # what fp32 accumulation errors scale with
    if bias is not None:
        ref = ref + bias.double().cpu()
    assert out.dtype == torch.float16 and out.shape == ref.shape
    err = (out.double().cpu() - ref).abs()
    # One fp16 unit in the last place of the result, plus fp32 summation-order effects far below it.
    allowed = torch.finfo(torch.float16).eps * ref.abs() + 2.0**-16 * magnitude + 2.0**-24
    assert bool((err <= allowed).all()), f"max abs diff {err.max().item():.3g}, allowed {allowed.max().item():.3g}"
    return err.max().item()


@pytest.mark.parametrize("k,n,g", SHAPES)
def test_dequantize_kernel_is_bit_identical_to_the_torch_path(k, n, g):
    qweight, qzeros, scales, weight = _packed(k, n, g)
    triton_w = kernels.awq_dequantize(qweight, qzeros, scales, g)
    torch_w = kernels.dequantize_torch(qweight, qzeros, scales, g)
    assert torch.equal(triton_w.t().cpu(), weight) and torch.equal(torch_w.cpu(), weight)


@pytest.mark.parametrize("m", [1, 3, 5, 8])
@pytest.mark.parametrize("k,n,g", SHAPES)
def test_gemv_odd_batches(m, k, n, g):
    qweight, qzeros, scales, weight = _packed(k, n, g)
    x = _x(m, k)
    _assert_fp16_close(kernels.awq_gemv(x, qweight, qzeros, scales, g), x, weight)


@pytest.mark.parametrize("split_k", [1, 2, 3])
def test_gemv_split_k_and_bias(split_k):
    qweight, qzeros, scales, weight = _packed(256, 64, 32)
    bias = torch.randn(64, generator=torch.Generator().manual_seed(2)).to(torch.float16).to(DEVICE)
    x = _x(3, 256)
    _assert_fp16_close(kernels.awq_gemv(x, qweight, qzeros, scales, 32, bias, split_k=split_k), x, weight, bias)


@pytest.mark.parametrize("m", [9, 17, 40])
@pytest.mark.parametrize("k,n,g", [(96, 64, 32), (160, 64, 32), (256, 512, 128), (80, 64, 40)])
def test_fused_gemm(m, k, n, g):
    qweight, qzeros, scales, weight = _packed(k, n, g)
    x = _x(m, k)
    _assert_fp16_close(kernels.awq_gemm(x, qweight, qzeros, scales, g), x, weight)


@pytest.mark.parametrize("m", [1, 5, 24])
def test_awq_linear_dispatch_matches_the_torch_path(m, monkeypatch):
    """`awq_linear` with kernel="triton" (GEMV / GEMM / dequantize + matmul by rows) against kernel="torch",
    3-D input and a bias, through AWQLinear as the model uses it."""
    monkeypatch.setattr(kernels, "GEMM_MAX_M", 16)  # so 24 rows take the dequantize + matmul branch
    qweight, qzeros, scales, weight = _packed(96, 64, 32)
    bias = torch.randn(64, generator=torch.Generator().manual_seed(3)).to(torch.float16).to(DEVICE)
    x = _x(m * 2, 96).view(2, m, 96)
    fast = AWQLinear(qweight, qzeros, scales, bias, kernel="triton")(x)
    assert fast.shape == (2, m, 64)
    _assert_fp16_close(fast.reshape(-1, 64), x.reshape(-1, 96), weight, bias)
    slow = AWQLinear(qweight, qzeros, scales, bias.float(), kernel="torch")(x.float())
    assert (fast.float() - slow).abs().max().item() < 2e-2 * slow.abs().max().item()


def test_refusals():
    qweight, qzeros, scales, _ = _packed(96, 64, 32)
    with pytest.raises(ValueError, match="at most 8 rows"):
        kernels.awq_gemv(_x(9, 96), qweight, qzeros, scales, 32)
    with pytest.raises(ValueError, match="do not fit"):
        kernels.awq_gemm(_x(16, 64), qweight, qzeros, scales, 32)
    with pytest.raises(ValueError, match="kernel must be"):
        kernels.awq_linear(_x(1, 96), qweight, qzeros, scales, 32, kernel="cuda")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA: compiled kernels at 7B-class shapes")
@pytest.mark.parametrize("m", [1, 4, 8, 100, 1000])
@pytest.mark.parametrize("k,n", [(4096, 4096), (4096, 11008), (11008, 4096)])
def test_cuda_kernels_at_7b_shapes(m, k, n):
    qweight, qzeros, scales, weight = _packed(k, n, 128)
    x = _x(m, k)
    out = kernels.awq_linear(x, qweight, qzeros, scales, 128, kernel="triton")
    ref = (x.float() @ weight.to(DEVICE).float().t())
    rel = ((out.float() - ref).abs().max() / ref.abs().max()).item()
    assert rel < 2e-3, rel
