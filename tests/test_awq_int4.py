"""torch's own int4 kernels (kernel "int4", `runtime/backends/awq/int4.py`) on AutoAWQ checkpoints.

Numerics, per layer: the product through the repacked weight against x @ W^T with W from AutoAWQ's own
`dequantize_gemm` (tests/autoawq_oracle.py), in float64. The int4 kernels multiply bf16 inputs by weights rebuilt
from bf16 scales and zeros, so the stated tolerance, element by element, is

    |y - y_ref| <= 2^-7 (|x| @ |W|^T) + 2^-5 (|x| @ S^T) + 2^-8 |y_ref|

(inputs and the rebuilt weight each within 2^-9 of their values, the weight's bf16 scale and zero within 2^-9 of
s and (8 - z) s, so within |s| / 32 of the weight; the output rounded to bf16; S is the per-element scale), with a
factor of two to spare; and it must stay well under the error 4-bit rounding itself made (the product with the
unquantized weight). Whole model: the tiny checkpoint's log-probabilities and greedy tokens next to kernel="dense"
(the same weights dequantized exactly), and micro-r1v's mean KL to kernel="dense" on held-out items (`r1v eval`'s
measure). The CUDA tile layout is written in torch ops from int4mm.cu and checked against torch's own packing on
a GPU; the Triton pass that reads it runs interpreted on CPU tensors here.
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable

import pytest

torch = pytest.importorskip("torch")

from autoawq_oracle import autoawq_packing_utils  # noqa: E402

from r1v.quant.pack import dequantize_awq, pack_awq  # noqa: E402
from r1v.quant.rtn import quantize_rtn  # noqa: E402
from r1v.runtime.backends.awq import int4, kernels  # noqa: E402
from r1v.runtime.backends.awq.qlinear import AWQLinear, Int4Linear, awq_linear_for  # noqa: E402

CUDA = torch.cuda.is_available()
needs_cuda = pytest.mark.skipif(not CUDA, reason="needs CUDA")

# (K, N, G): the tiny checkpoints' LLM (hidden 64, intermediate 160) and ViT; micro-r1v's linears (256 / 512,
# group 128); a 7B-class slice (1024 -> 2816 and back); group 256.
SHAPES = [(64, 160, 32), (160, 64, 32), (32, 96, 32), (256, 512, 128), (512, 256, 128), (1024, 2816, 128),
          (2816, 1024, 128), (512, 128, 256)]


def _layer(k: int, n: int, g: int, seed: int = 0, device: str = "cpu"):
    """A random fp16 weight [N, K] and its RTN AutoAWQ tensors, made on `device` (38B shapes: on the GPU)."""
    gen = torch.Generator(device).manual_seed(seed)
    w = (torch.randn(n, k, generator=gen, device=device) / k**0.5).to(torch.float16)
    p = pack_awq(*quantize_rtn(w, g))
    return w, p.qweight, p.qzeros, p.scales


def _x(m: int, k: int, seed: int = 1) -> torch.Tensor:
    return torch.randn(m, k, generator=torch.Generator().manual_seed(seed))


def _check_against_autoawq(y: torch.Tensor, x: torch.Tensor, w: torch.Tensor, qweight, qzeros, scales, g: int,
                           oracle: bool = True):
    """The stated tolerance (module doc) against AutoAWQ's dequantize_gemm (`oracle`; else the project's
    dequantize_awq, bit-identical to it per tests/test_quant_pack.py, for GPU images without AutoAWQ); returns
    (worst fraction of the tolerance used, kernel error / 4-bit rounding error)."""
    if oracle:
        weight = autoawq_packing_utils().dequantize_gemm(qweight, qzeros, scales, 4, g).t().double()  # [N, K]
    else:
        weight = dequantize_awq(qweight, qzeros, scales, g).double()
    xd = x.double()
    ref = xd @ weight.t()
    s = scales.double().repeat_interleave(g, dim=0).t()  # [N, K]
    allowed = 2.0**-7 * (xd.abs() @ weight.abs().t()) + 2.0**-5 * (xd.abs() @ s.abs().t()) + 2.0**-8 * ref.abs()
    err = (y.double() - ref).abs()
    used = (err / allowed).max().item()
    assert used <= 0.5, f"error up to {used:.2f} of the stated tolerance (at most half allowed)"
    rounding = (xd @ w.to(xd.device).double().t() - ref).abs().max().item()  # what 4-bit rounding changed
    return used, err.max().item() / rounding


@pytest.mark.parametrize("m", [1, 5, 64])
@pytest.mark.parametrize("k,n,g", SHAPES)
def test_int4_products_match_autoawq_dequantize_gemm(k, n, g, m):
    w, qweight, qzeros, scales = _layer(k, n, g)
    x = _x(m, k)
    linear = Int4Linear.from_awq(qweight, qzeros, scales)
    y = linear(x)
    assert y.dtype == torch.float32 and y.shape == (m, n)
    used, versus_rounding = _check_against_autoawq(y, x, w, qweight, qzeros, scales, g)
    print(f"\n[int4] {k}->{n} g{g} M={m}: {used:.3f} of the tolerance, {versus_rounding:.3f} of 4-bit rounding's error")
    assert versus_rounding < 0.15, f"the kernel's error is {versus_rounding:.2f} of 4-bit rounding's"


def test_bias_and_leading_dims():
    _, qweight, qzeros, scales = _layer(256, 512, 128)
    bias = torch.randn(512)
    linear = Int4Linear.from_awq(qweight, qzeros, scales, bias)
    x = _x(6, 256).view(2, 3, 256)
    dense = AWQLinear(qweight, qzeros, scales, bias, kernel="torch")
    y, ref = linear(x), dense(x)
    assert y.shape == (2, 3, 512)
    assert (y - ref).abs().max().item() < 2e-2 * ref.abs().max().item()


def test_repacking_keeps_the_weight():
    """The weight the CPU kernel multiplies by, read back (identity input), is AutoAWQ's to bf16 precision."""
    awq = autoawq_packing_utils()
    _, qweight, qzeros, scales = _layer(512, 256, 128, seed=4)
    weight = awq.dequantize_gemm(qweight, qzeros, scales, 4, 128).t().double()
    got = Int4Linear.from_awq(qweight, qzeros, scales).dequantized_weight().double()
    step = scales.double().repeat_interleave(128, dim=0).t()  # one step of the 4-bit grid
    assert ((got - weight).abs() <= step / 16 + 2.0**-8 * weight.abs()).all()


# --- the CUDA tile layout ------------------------------------------------------------------------------------
def test_cuda_layout_places_each_code_where_int4mm_cu_reads_it():
    """One code at (n=9, k=37) with 2 inner k-tiles: n-tile 1 (row a=1), k super-tile 1 (k 32..63), offset 5:
    inner pair i=0, c=0, b=2, e=1, so lane t = 4a + b = 6, nibble j = 4e + c = 4 (bits 16..19)."""
    codes = torch.zeros(16, 64, dtype=torch.uint8)
    codes[9, 37] = 5
    packed = int4.cuda_pack_reference(codes, 2)
    assert packed.shape == (2, 2, 32, 1)
    assert packed.nonzero().tolist() == [[1, 1, 6, 0]] and packed[1, 1, 6, 0].item() == 5 << 16
    gen = torch.Generator().manual_seed(0)
    for tiles in (2, 4, 8):
        codes = torch.randint(0, 16, (24, 256), generator=gen, dtype=torch.uint8)
        assert torch.equal(int4.cuda_unpack(int4.cuda_pack_reference(codes, tiles)), codes)


@pytest.mark.parametrize("k,n,g", [(256, 96, 64), (512, 64, 128), (96, 32, 32), (512, 128, 256)])
def test_dequantize_pass_reads_the_cuda_layout(k, n, g):
    """The Triton pass over the tinygemm words (interpreted on CPU tensors without a GPU) gives the weight the
    torch-ops reference gives, to one rounding in the output dtype (the interpreter rounds bf16 ties differently,
    and fp32 may fuse the multiply-add)."""
    pytest.importorskip("triton")
    device = "cuda" if CUDA else "cpu"
    assert CUDA or kernels._interpreting()
    _, qweight, qzeros, scales = _layer(k, n, g, seed=2)
    if CUDA:
        weight = int4.pack_awq_as_int4(qweight.cuda(), qzeros.cuda(), scales.cuda())
    else:  # the CUDA layout, written by the reference packer
        cpu = int4.pack_awq_as_int4(qweight, qzeros, scales)
        codes = kernels.unpack_codes(qweight).t()
        tiles = int4.inner_k_tiles(k)
        weight = int4.Int4Weight(int4.cuda_pack_reference(codes, tiles), cpu.scales_and_zeros, g, k, n)
    ref = int4.dequantize_reference(weight, torch.float32)
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        got = int4.dequantize(weight, dtype).float()
        assert got.device.type == device and got.shape == (n, k)
        assert ((got - ref).abs() <= torch.finfo(dtype).eps * ref.abs()).all()  # within one unit of dtype


# --- shapes the kernels cannot take -----------------------------------------------------------------------------
def test_unsupported_shapes_say_why_and_fall_back():
    assert int4.unsupported(256, 512, 128, "cpu") is None
    assert int4.unsupported(80, 64, 40, "cpu") == "group size 40 (the int4 kernels take 32, 64, 128, 256)"
    assert int4.unsupported(64, 24, 32, "cpu") == "24 output features are not a multiple of 16"
    _, qweight, qzeros, scales = _layer(80, 64, 40)
    linear = awq_linear_for(qweight, qzeros, scales, None, "int4", "torch")
    assert isinstance(linear, AWQLinear) and linear.kernel == "torch"
    with pytest.raises(ValueError, match="group 40: group size 40"):
        int4.pack_awq_as_int4(qweight, qzeros, scales)
    _, qweight, qzeros, scales = _layer(64, 160, 32)
    assert isinstance(awq_linear_for(qweight, qzeros, scales, None, "int4", "torch"), Int4Linear)


# --- GPU ------------------------------------------------------------------------------------------------------
@needs_cuda
def test_cuda_packing_is_the_reference_layout():
    gen = torch.Generator().manual_seed(1)
    for tiles in (2, 4, 8):
        codes = torch.randint(0, 16, (40, 512), generator=gen, dtype=torch.uint8)
        got = torch.ops.aten._convert_weight_to_int4pack(int4._nibble_pairs(codes).cuda(), tiles)
        assert torch.equal(got.cpu(), int4.cuda_pack_reference(codes, tiles))
    assert int4.dequantize_ok(torch.device("cuda"))


@needs_cuda
@pytest.mark.parametrize("m", [1, 16, 17, 64, 512])
@pytest.mark.parametrize("k,n", [(5120, 27648), (27648, 5120), (5120, 5120)])
def test_cuda_int4_products_at_38b_shapes(k, n, m):
    """tinygemm up to CUDA_MAX_M rows, dequantize + cuBLAS above: both within the stated tolerance."""
    w, qweight, qzeros, scales = _layer(k, n, 128, device="cuda")
    x = _x(m, k).cuda().to(torch.bfloat16)
    assert qweight.device.type == "cuda"
    y = Int4Linear.from_awq(qweight, qzeros, scales)(x)
    assert y.dtype == torch.bfloat16
    used, versus_rounding = _check_against_autoawq(y, x, w, qweight, qzeros, scales, 128, oracle=False)
    print(f"\n[int4] CUDA {k}->{n} M={m}: {used:.3f} of the tolerance, {versus_rounding:.3f} of 4-bit rounding's")
    assert versus_rounding < 0.15


# --- whole models ---------------------------------------------------------------------------------------------
GREEDY = dict(temperature=0, repetition_penalty=1.0)
QUESTION = "How many red circles are in the image?"


@pytest.fixture(scope="module")
def awq_dir(tiny_awq: Callable[[str], Path]) -> Path:
    """The tiny R1V model (2 layers, 224-pixel tiles), RTN group 32, vision tower stored int4 (building it, like
    `r1v convert awq`, records a llama.cpp imatrix on the way, which needs gguf)."""
    pytest.importorskip("gguf", reason="r1v convert awq (its imatrix names) needs gguf")
    return tiny_awq("int4")


def _kl(p_log: torch.Tensor, q_log: torch.Tensor) -> float:
    """Mean over rows of KL(p || q), from log-probabilities."""
    p_log, q_log = torch.as_tensor(p_log).double(), torch.as_tensor(q_log).double()
    return float((p_log.exp() * (p_log - q_log)).sum(-1).mean())


@pytest.mark.slow
def test_auto_is_int4_on_cpu_and_agrees_with_the_exact_weights(awq_dir):
    """kernel="auto" on CPU: every LLM and (stored int4) vision linear repacked, none left over; log-probabilities
    and greedy tokens next to the same weights dequantized exactly (kernel="dense")."""
    from r1v.runtime.api import load

    options = dict(n_ctx=512, n_batch=48, device="cpu")
    with load(awq_dir, **options) as fast, load(awq_dir, kernel="dense", **options) as dense:
        backend = fast._backend
        assert backend.kernel == "int4" and backend.dtype == torch.float32
        layer = backend.model.language_model.model.layers[0]
        assert isinstance(layer.mlp.down_proj, Int4Linear) and isinstance(layer.self_attn.k_proj, Int4Linear)
        assert isinstance(backend.model.vision_model.encoder.layers[0].attn.qkv, Int4Linear)
        info = backend.describe()
        assert info["int4_fallbacks"] == {} and info["decode"]["cuda_graphs"] is False
        answer = fast.tokenize("Three red circles.</think>3")
        got, ref = fast.logprobs(QUESTION, answer), dense.logprobs(QUESTION, answer)
        kl, worst = _kl(ref, got), float(abs(got - ref).max())
        print(f"\n[int4] tiny model: KL(dense || int4) {kl:.2e}, max |logprob diff| {worst:.2e}")
        assert kl < 1e-4 and worst < 0.05
        a = fast.generate(QUESTION, max_tokens=16, **GREEDY).tokens
        b = dense.generate(QUESTION, max_tokens=16, **GREEDY).tokens
        assert a[:8] == b[:8]


@pytest.mark.slow
def test_micro_r1v_kl_through_int4_is_far_below_the_quantizations(tmp_path):
    """micro-r1v AWQ (the bundled model's 4-bit checkpoint) through kernel="int4" against kernel="dense", scored as
    `r1v eval` scores (teacher-forced mean KL, top-1 agreement) on held-out items: the kernel's share must be far
    below the 4-bit checkpoint's own KL to F16 (4.1e-5 on 1,000 test items, README): under a quarter of it. Measured
    4.6e-6 on these 40 items (1.7e-6 on 200 with full answers); per-item KL is heavy-tailed (the first 8 alone give
    2.0e-5), so fewer items would test the tail, not the kernel."""
    pytest.importorskip("gguf", reason="building micro-r1v's AWQ checkpoint records an imatrix (gguf)")
    from r1v.micro import task
    from r1v.micro.files import micro_awq
    from r1v.runtime.api import load
    from r1v.apps.evaluation import evaluate, read_items

    items = read_items(task.write_items(task.SPLITS["test"][0], 40, tmp_path / "items.jsonl"))
    options = dict(n_ctx=1024, device="cpu", n_threads=1)
    with load(micro_awq(), **options) as fast, load(micro_awq(), kernel="dense", **options) as dense:
        assert fast._backend.kernel == "int4"
        report = evaluate(fast, items, reference=dense, max_tokens=64, progress=False)
    print(f"\n[int4] micro-r1v, {len(items)} items: KL(dense || int4) {report.mean_kl:.2e}, "
          f"top-1 agreement {report.top1_agreement:.4f}")
    assert report.mean_kl < 1e-5 and report.top1_agreement > 0.99


@needs_cuda
def test_cuda_graph_decode_equals_eager_decode(awq_dir, monkeypatch):
    """On a GPU, kernel "auto" is int4 in bf16 and decode replays captured graphs; the greedy tokens equal those of
    eager steps (R1V_CUDA_GRAPHS=0), across an attention-span boundary (a ~250-token prompt, spans 256 / 512); and
    one graphed step's logits equal the dynamic path's for the same token."""
    from r1v.runtime.api import load

    prompt = "word " * 240 + QUESTION
    options = dict(n_ctx=512, n_batch=48)
    with load(awq_dir, **options) as m:
        backend = m._backend
        assert backend.kernel == "int4" and backend.dtype == torch.bfloat16 and backend.device.type == "cuda"
        info = backend.describe()
        assert info["decode"]["cuda_graphs"] is True and info["decode"]["spans"] == [256, 512], info["decode"]
        graphed = m.generate(prompt, max_tokens=24, **GREEDY).tokens
        first = backend.prepare([m.render(QUESTION).text], [])
        backend.reset()
        token = int(backend._evaluate(first, {}, 0).argmax())
        step = backend._step(backend.sequence, token)
        backend._truncate(backend.sequence, len(first.items))
        dynamic = backend._forward(backend._embed_tokens((token,)), (token,), True)
        assert torch.nn.functional.cosine_similarity(step, dynamic, dim=0).item() > 0.999
        assert int(step.argmax()) == int(dynamic.argmax())
    monkeypatch.setenv("R1V_CUDA_GRAPHS", "0")
    with load(awq_dir, **options) as m:
        assert m._backend.describe()["decode"]["cuda_graphs"] is False
        eager = m.generate(prompt, max_tokens=24, **GREEDY).tokens
    assert graphed == eager


# --- the benchmark and the GPU check's summary -------------------------------------------------------------------
def test_kernel_table_rows_and_gpu_check_summary(tmp_path):
    """`python -m r1v.bench.kernels`' rows on CPU (the CUDA-only columns left empty), and the summary
    `scripts/gpu-check.sh` ends with: each stage's outcome, the tables, and what is missing named."""
    import json

    from r1v.bench import gpu_check
    from r1v.bench.kernels import KernelRow, bench_shape, format_results

    rows = bench_shape("test", 256, 512, (1, 20), torch.device("cpu"), bandwidth=10.0)
    assert [r.m for r in rows] == [1, 20]
    for row in rows:
        assert row.dense_us > 0 and row.ours_us > 0 and row.errors == {}
        assert row.int4_tinygemm_us is None and row.triton_us is None  # CUDA only
        assert row.bound_us == round(256 * 512 / 2 / 10e9 * 1e6, 1) and row.ours_rel_error < 1e-2
    results = {"device": "CPU", "torch": torch.__version__, "group_size": 128, "bandwidth_gbps": 10.0,
               "cuda_max_m": 16, "crossover": {"test": None}, "rows": [vars(r) for r in rows]}
    assert "test 256->512" in format_results(results)
    (tmp_path / "kernels.json").write_text(json.dumps(results))
    (tmp_path / "stages.tsv").write_text("install\t0\t3.5\ntests\t124\t110.0\n")
    assert gpu_check.main([str(tmp_path)]) == 0
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert [(s["stage"], s["ok"]) for s in summary["stages"]] == [("install", True), ("tests", False)]
    assert summary["missing"] == ["bench.json was not written"] and summary["kernels"]["rows"][0]["m"] == 1
    assert KernelRow(**summary["kernels"]["rows"][1]).m == 20


def test_a_model_with_shapes_int4_cannot_take_loads_with_the_fallback_named(tmp_path):
    """A checkpoint whose group size (40) torch's int4 kernel does not take: every LLM linear falls back to the
    torch path, with a warning naming the count, the kernel and the first one, and `describe()` listing them."""
    pytest.importorskip("gguf", reason="r1v convert awq (its imatrix names) needs gguf")
    from r1v.quant.driver import quantize_checkpoint_awq
    from r1v.runtime.api import load
    from r1v.testing import make_tiny_checkpoint

    ckpt = make_tiny_checkpoint(tmp_path / "tiny", vit="6b", seed=4, image_size=224, llm_hidden=80,
                                llm_intermediate=160, llm_heads=4, llm_kv_heads=2, llm_layers=1)
    quantize_checkpoint_awq(ckpt, tmp_path / "awq", group_size=40, n_samples=2, seq_len=160, method="rtn",
                            progress=False)
    with pytest.warns(UserWarning, match=r"awq: 7 linear\(s\) run the torch kernel, torch's int4 kernel cannot take "
                                         r"them \(first: language_model\.model\.layers\.0\.self_attn\.q_proj: group "
                                         r"size 40"):
        model = load(tmp_path / "awq", n_ctx=256, device="cpu")
    with model:
        backend = model._backend
        assert backend.kernel == "int4" and len(backend.describe()["int4_fallbacks"]) == 7
        assert isinstance(backend.model.language_model.model.layers[0].mlp.up_proj, AWQLinear)
        assert model.generate(QUESTION, max_tokens=4, **GREEDY).completion_tokens == 4
