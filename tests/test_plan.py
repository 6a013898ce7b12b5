"""Memory planner: R1V3-38B figures inside known bounds, and exact byte counts on small configs worked out
by hand (so the formulas are proven, not just bounded)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from r1v.converters.config import load_config, parse_config
from r1v.runtime.files.plan import (
    AWQ_LLM,
    COMMON_MEMORY_GIB,
    GiB,
    VISION_FORMATS,
    awq_bytes,
    best_placement,
    count_params,
    format_plan,
    gguf_llm_bytes,
    gguf_mmproj_bytes,
    kv_bytes_per_token,
    plan_memory,
    smallest_fit,
    use_more_bits,
)

R1V3 = Path(__file__).parent / "data" / "r1v3-38b-config.json"
GB = 10**9


@pytest.fixture(scope="module")
def r1v3():
    return load_config(R1V3)


@pytest.fixture(scope="module")
def r1v3_plan(r1v3):
    return plan_memory(r1v3, context=8192)


def _config(llm: dict, vision: dict) -> dict:
    return {
        "architectures": ["SkyworkR1VChatModel"], "model_type": "skywork_chat",
        "downsample_ratio": 0.5, "llm_config": llm, "vision_config": vision,
    }


# Config A: LayerNorm ViT with qkv bias (the llama.cpp-parity variant), tiny dims.
TINY = _config(
    {"hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4,
     "num_key_value_heads": 2, "vocab_size": 100, "tie_word_embeddings": False},
    {"hidden_size": 8, "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 16,
     "image_size": 28, "patch_size": 14, "norm_type": "layer_norm", "qk_normalization": False, "qkv_bias": True},
)
# Config B: dims divisible by 256 / 128 so every k-quant and AWQ rule applies without fallbacks; 8 layers so
# use_more_bits picks a known subset; 6B-style ViT (rms_norm, qk norm, no qkv bias).
KQ = _config(
    {"hidden_size": 256, "intermediate_size": 512, "num_hidden_layers": 8, "num_attention_heads": 4,
     "num_key_value_heads": 2, "vocab_size": 1000, "tie_word_embeddings": False},
    {"hidden_size": 128, "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 256,
     "image_size": 28, "patch_size": 14, "norm_type": "rms_norm", "qk_normalization": True, "qkv_bias": False},
)


def _tied(cfg: dict) -> dict:
    return {**cfg, "llm_config": {**cfg["llm_config"], "tie_word_embeddings": True}}


# --- the R1V3 fixture --------------------------------------------------------------------------------------
def test_r1v3_config_parses_with_real_shapes(r1v3):
    raw = json.loads(R1V3.read_text())
    assert parse_config(raw).llm == r1v3.llm
    t, v = r1v3.llm, r1v3.vision
    assert (t.hidden_size, t.intermediate_size, t.num_hidden_layers) == (5120, 27648, 64)
    assert (t.num_attention_heads, t.num_key_value_heads, t.head_dim, t.vocab_size) == (40, 8, 128, 151674)
    assert t.max_position_embeddings == 131072 and not t.tie_word_embeddings
    assert (v.hidden_size, v.num_hidden_layers, v.num_attention_heads, v.intermediate_size) == (3200, 45, 25, 12800)
    assert v.norm_type == "rms_norm" and v.qk_normalization and not v.qkv_bias
    assert r1v3.tokens_per_tile == 256 and r1v3.projector_input_size == 12800
    assert (r1v3.min_dynamic_patch, r1v3.max_dynamic_patch, r1v3.use_thumbnail) == (1, 12, True)


def test_r1v3_param_counts(r1v3):
    p = count_params(r1v3)
    # Exact, from the shapes.
    per_layer = 2 * 5120 * 5120 + 2 * 1024 * 5120 + 3 * 27648 * 5120
    assert p.llm_linear == 64 * per_layer
    assert p.embeddings == p.lm_head == 151674 * 5120
    vit_layer = (4 * 3200 * 3200 + 2 * 12800 * 3200  # qkv, proj, fc1, fc2
                 + 3200 + 12800 + 3200  # proj, fc1, fc2 biases
                 + 4 * 3200 + 2 * 3200)  # norm1, norm2, q_norm, k_norm (RMS: no bias); ls1, ls2
    vit_embed = 3200 + (3200 * 3 * 14 * 14 + 3200) + 1025 * 3200
    assert p.vision == 45 * vit_layer + vit_embed
    assert p.projector == 2 * 12800 + (12800 * 5120 + 5120) + (5120 * 5120 + 5120)
    # Close to DESIGN's figures. The ViT is checked against OpenGVLab's published 5,540 M for the 45-block
    # InternViT-6B-448px: DESIGN's "5.9 B" is the original 48-block tower.
    assert p.llm_linear == pytest.approx(31.2e9, rel=0.02)
    assert p.embeddings == pytest.approx(0.78e9, rel=0.02)
    assert p.lm_head == pytest.approx(0.78e9, rel=0.02)
    assert p.vision == pytest.approx(5.54e9, rel=0.02)
    assert p.total == pytest.approx(38.4e9, rel=0.01)


def test_r1v3_awq_fp16_vision_weights(r1v3_plan):
    e = r1v3_plan.entry("awq[vision=fp16,embed=gpu]")
    assert 29 * GB <= e.weights_bytes <= 33 * GB
    assert e.device == "cuda" and e.host_bytes == 0
    # DESIGN: AWQ LLM ~16.2 GB, embeddings + head fp16 ~3.1 GB.
    assert e.breakdown["llm"] == pytest.approx(16.2e9, rel=0.01)
    assert e.breakdown["embeddings"] + e.breakdown["lm_head"] == pytest.approx(3.1e9, rel=0.01)
    cpu = r1v3_plan.entry("awq[vision=fp16,embed=cpu]")
    assert cpu.weights_bytes == e.weights_bytes - e.breakdown["embeddings"]
    assert cpu.host_bytes == e.breakdown["embeddings"] == 151674 * 5120 * 2


def test_r1v3_gguf_sizes(r1v3, r1v3_plan):
    q4 = r1v3_plan.entry("gguf.llm.Q4_K_M")
    assert 18 * GB <= q4.weights_bytes <= 21 * GB
    assert set(q4.breakdown) == {"Q4_K", "Q6_K", "F32"}
    # Q8_0 and F16 are uniform: every 2-D weight (token_embd, output included) in the type, 1-D in F32.
    p = count_params(r1v3)
    one_d = p.llm_bias + p.llm_norm
    two_d = p.llm_linear + p.embeddings + p.lm_head
    assert r1v3_plan.entry("gguf.llm.Q8_0").weights_bytes == two_d // 32 * 34 + one_d * 4
    assert r1v3_plan.entry("gguf.llm.F16").weights_bytes == two_d * 2 + one_d * 4
    assert (r1v3_plan.entry("gguf.llm.Q4_K_M").weights_bytes < r1v3_plan.entry("gguf.llm.Q5_K_M").weights_bytes
            < r1v3_plan.entry("gguf.llm.Q6_K").weights_bytes < r1v3_plan.entry("gguf.llm.Q8_0").weights_bytes)
    assert r1v3_plan.entry("gguf.mmproj.F16").weights_bytes == pytest.approx(11.27e9, rel=0.01)
    assert r1v3_plan.entry("gguf.mmproj.Q8_0").weights_bytes == pytest.approx(6.0e9, rel=0.01)


def test_kv_cache_bytes(r1v3, r1v3_plan):
    per_token = 64 * 8 * 128 * 2 * 2
    assert kv_bytes_per_token(r1v3) == per_token == 256 * 1024
    assert r1v3_plan.kv_bytes == per_token * 8192 == 2 * GiB
    assert r1v3_plan.to_json()["kv_cache"] == {"bytes": per_token * 8192, "bytes_per_token": per_token}
    for e in r1v3_plan.entries:
        assert e.kv_bytes == (0 if e.key.startswith("gguf.mmproj") else per_token * 8192)
        assert e.total_bytes == e.weights_bytes + e.kv_bytes + e.overhead_bytes
    assert plan_memory(r1v3, context=0).entry("gguf.llm.Q4_K_M").kv_bytes == 0


def test_best_placement_24gib(r1v3):
    entry = best_placement(r1v3, 24 * GiB, context=8192)
    assert entry is not None and entry.format == "awq"
    assert entry.total_bytes <= 24 * GiB
    assert entry.fits is not None and entry.fits <= 24
    # Nothing of higher quality fits: every placement ahead of it in the preference order is too big.
    plan = plan_memory(r1v3, context=8192)
    awq = [e for e in plan.entries if e.format == "awq"]
    assert [(e.vision, e.embed) for e in awq] == [
        (v, p) for v in ("fp16", "int8", "int4") for p in ("gpu", "cpu")]
    ahead = awq[: [e.key for e in awq].index(entry.key)]
    assert ahead and all(e.total_bytes > 24 * GiB for e in ahead)
    # Plenty of memory: the best placement; too little: none.
    assert best_placement(r1v3, 80 * GiB, 8192).key == "awq[vision=fp16,embed=gpu]"
    assert best_placement(r1v3, 16 * GiB, 8192) is None


def test_json_keys(r1v3_plan):
    data = r1v3_plan.to_json()
    expected = {f"gguf.llm.{q}" for q in ("F16", "Q8_0", "Q6_K", "Q5_K_M", "Q4_K_M")}
    expected |= {"gguf.mmproj.F16", "gguf.mmproj.Q8_0", "kv_cache", "context", "params"}
    expected |= {f"awq[vision={v},embed={p}]" for v in ("fp16", "int8", "int4") for p in ("gpu", "cpu")}
    assert set(data) == expected
    assert data["context"] == 8192
    for key in expected - {"kv_cache", "context", "params"}:
        for field in ("weights_bytes", "kv_bytes", "overhead_bytes", "total_bytes", "host_bytes"):
            assert type(data[key][field]) is int
    assert all(type(v) is int for v in data["params"].values())
    json.dumps(data)  # serializable as is


def test_format_plan(r1v3_plan):
    text = format_plan(r1v3_plan)
    for e in r1v3_plan.entries:
        assert e.key in text
    q4 = r1v3_plan.entry("gguf.llm.Q4_K_M")
    assert f"{q4.weights_bytes / GB:.1f}" in text
    assert "24 GB" in text


def test_smallest_fit_counts_gib():
    assert COMMON_MEMORY_GIB == (16, 24, 32, 48, 80)
    assert smallest_fit(24 * GiB) == 24
    assert smallest_fit(24 * GiB + 1) == 32
    assert smallest_fit(24 * GB) == 24  # 24e9 bytes < 24 GiB
    assert smallest_fit(80 * GiB + 1) is None


def test_ggml_block_sizes_are_gguf_py_s():
    from r1v.runtime.files.plan import ggml_block

    names = ("F32", "F16", "BF16", "Q8_0", "Q5_1", "Q5_0", "Q4_1", "Q4_0", "Q6_K", "Q5_K", "Q4_K")
    bpw = {name: ggml_block(name)[1] * 8 / ggml_block(name)[0] for name in names}
    assert bpw == {"F32": 32, "F16": 16, "BF16": 16, "Q8_0": 8.5, "Q5_1": 6, "Q5_0": 5.5, "Q4_1": 5, "Q4_0": 4.5,
                   "Q6_K": 6.5625, "Q5_K": 5.5, "Q4_K": 4.5}


# --- exact counts on small configs -------------------------------------------------------------------------
def test_tiny_param_counts_exact():
    p = count_params(parse_config(TINY))
    # ViT (hidden 8, 2 layers, mlp 16, LayerNorm, qkv bias), per layer:
    #   norm1 w+b 16, norm2 w+b 16, qkv 24*8 + 24, proj 8*8 + 8, fc1 16*8 + 16, fc2 8*16 + 8, ls1 8, ls2 8 = 616
    #   of which linear weights 192 + 64 + 128 + 128 = 512
    # embeddings: class 8, patch 8*3*14*14 + 8 = 4712, position (2*2 + 1) * 8 = 40
    assert p.vision_linear == 2 * 512
    assert p.vision == 2 * 616 + 8 + 4712 + 40 == 5992
    # mlp1: LayerNorm(32) w+b 64, Linear(32->16) 512 + 16, Linear(16->16) 256 + 16
    assert p.projector == 864
    # LLM (hidden 16, 4 heads of 4, 2 KV heads -> kv dim 8, mlp 32), per layer:
    #   q 256, k 128, v 128, o 256, gate 512, up 512, down 512 = 2304; biases 16 + 8 + 8; norms 16 + 16
    assert p.llm_linear == 2 * 2304
    assert p.llm_bias == 2 * 32
    assert p.llm_norm == 2 * 32 + 16
    assert p.embeddings == p.lm_head == 100 * 16
    assert p.total == 5992 + 864 + 4608 + 64 + 80 + 3200
    assert count_params(parse_config(_tied(TINY))).lm_head == 0


def test_tiny_mmproj_bytes_exact():
    cfg = parse_config(TINY)
    # F16 file: 2-D weights F16; class, position, norms, biases, ls F32; patch embedding F16.
    f16_layer = (4 * 8 * 4  # norm1/norm2 weight+bias, F32
                 + 3 * 64 * 2 + 24 * 4  # q, k, v weights F16 (qkv split), qkv bias F32
                 + 64 * 2 + 8 * 4  # proj
                 + 128 * 2 + 16 * 4  # fc1
                 + 128 * 2 + 8 * 4  # fc2
                 + 2 * 8 * 4)  # ls1, ls2
    f16_proj = 64 * 4 + (512 * 2 + 16 * 4) + (256 * 2 + 16 * 4)
    f16 = 8 * 4 + (4704 * 2 + 8 * 4) + 40 * 4 + 2 * f16_layer + f16_proj
    assert sum(gguf_mmproj_bytes(cfg, "F16").values()) == f16 == 14432
    # Q8_0 file: patch embedding F32; rows of 8 or 16 are not multiples of 32 -> F16; only mlp1.1 (rows of
    # 32) becomes Q8_0: 16 rows x 1 block x 34 bytes.
    q8_proj = 64 * 4 + (16 * 34 + 16 * 4) + (256 * 2 + 16 * 4)
    q8 = 8 * 4 + (4704 * 4 + 8 * 4) + 40 * 4 + 2 * f16_layer + q8_proj
    f32_layer = 4 * 8 * 4 + 24 * 4 + (8 + 16 + 8) * 4 + 2 * 8 * 4  # norms, qkv/proj/fc1/fc2 biases, ls
    assert gguf_mmproj_bytes(cfg, "Q8_0") == {
        "F32": 8 * 4 + 4704 * 4 + 8 * 4 + 40 * 4 + 2 * f32_layer + 64 * 4 + 2 * 16 * 4,
        "F16": 2 * (f16_layer - f32_layer) + 256 * 2,  # ViT layer weights, mlp1.3 (rows of 16)
        "Q8_0": 16 * 34,
    }
    assert sum(gguf_mmproj_bytes(cfg, "Q8_0").values()) == q8 == 23360


def test_use_more_bits_layers():
    assert [i for i in range(8) if use_more_bits(i, 8)] == [0, 3, 6, 7]
    picked = [i for i in range(64) if use_more_bits(i, 64)]
    assert picked == list(range(8)) + list(range(10, 56, 3)) + list(range(56, 64))
    assert len(picked) == 32


def test_kq_gguf_q4_k_m_exact():
    cfg = parse_config(KQ)
    q4k, q6k = 144, 210  # bytes per 256-element block
    more = {0, 3, 6, 7}  # use_more_bits(i, 8)
    total = 0
    for i in range(8):
        total += 256 * q4k  # attn_q: 256 rows x 1 block
        total += 128 * q4k  # attn_k
        total += 128 * (q6k if i in more else q4k)  # attn_v: Q6_K on use_more_bits layers
        total += 256 * q4k  # attn_output
        total += 2 * 512 * q4k  # ffn_gate, ffn_up
        total += 256 * 2 * (q6k if i in more else q4k)  # ffn_down: 256 rows x 2 blocks
        total += (256 + 128 + 128) * 4 + 2 * 256 * 4  # q/k/v biases, attn_norm, ffn_norm: F32
    total += 1000 * q4k  # token_embd keeps the default type
    total += 1000 * q6k  # output.weight -> Q6_K
    total += 256 * 4  # output_norm
    assert sum(gguf_llm_bytes(cfg, "Q4_K_M").values()) == total == 3210960
    # Tied embeddings: no output.weight, token_embd takes the output rule (Q6_K).
    tied = parse_config(_tied(KQ))
    assert sum(gguf_llm_bytes(tied, "Q4_K_M").values()) == total - 1000 * q4k - 1000 * q6k + 1000 * q6k


def test_kq_awq_bytes_exact():
    cfg = parse_config(KQ)

    def gemm(in_f: int, out_f: int) -> int:  # qweight int32 [in, out/8], qzeros int32 [in/128, out/8], scales fp16
        return in_f * (out_f // 8) * 4 + (in_f // 128) * (out_f // 8) * 4 + (in_f // 128) * out_f * 2

    assert AWQ_LLM.nbytes(256, 256) == gemm(256, 256) == 32768 + 256 + 1024
    assert AWQ_LLM.nbytes(5120, 5120) == 5120 * 640 * 4 + 40 * 640 * 4 + 40 * 5120 * 2
    layer = (gemm(256, 256) + 2 * gemm(256, 128) + gemm(256, 256)  # q, k, v, o
             + 2 * gemm(256, 512) + gemm(512, 256)  # gate, up, down
             + (256 + 128 + 128) * 2 + 2 * 256 * 2)  # fp16 biases and norms
    b = awq_bytes(cfg, "int8")
    assert b["llm"] == 8 * layer + 256 * 2 == 2468352
    assert b["embeddings"] == b["lm_head"] == 1000 * 256 * 2
    # ViT int8, per output channel: int8 weight [out, in] + fp16 scale per output row; the rest fp16.
    int8_linears = (384 * 128 + 384 * 2) + (128 * 128 + 128 * 2) + (256 * 128 + 256 * 2) + (128 * 256 + 128 * 2)
    rest_params = 2 * (4 * 128 + 128 + 256 + 128 + 2 * 128) + 128 + (128 * 588 + 128) + 5 * 128
    assert b["vision"] == 2 * int8_linears + 2 * rest_params == 423168
    assert VISION_FORMATS["fp16"] is None
    assert awq_bytes(cfg, "fp16")["vision"] == 2 * count_params(cfg).vision
    assert b["projector"] == 2 * count_params(cfg).projector


# --- oracle: llama.cpp's own quantizer ---------------------------------------------------------------------
def _write_qwen2_f16_gguf(cfg, path) -> None:
    """A random-weight qwen2 GGUF (F16 weights, F32 1-D tensors) with cfg's LLM shapes."""
    gguf = pytest.importorskip("gguf")
    np = pytest.importorskip("numpy")
    from r1v.runtime.files.plan import checkpoint_tensors, llm_gguf_name

    t = cfg.llm
    w = gguf.GGUFWriter(str(path), "qwen2")
    w.add_context_length(4096)
    w.add_embedding_length(t.hidden_size)
    w.add_block_count(t.num_hidden_layers)
    w.add_feed_forward_length(t.intermediate_size)
    w.add_head_count(t.num_attention_heads)
    w.add_head_count_kv(t.num_key_value_heads)
    w.add_layer_norm_rms_eps(1e-6)
    w.add_rope_freq_base(1e6)
    w.add_file_type(gguf.LlamaFileType.MOSTLY_F16)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("qwen2")
    w.add_token_list([f"t{i}".encode() for i in range(t.vocab_size)])
    w.add_token_types([1] * t.vocab_size)
    w.add_token_merges([])
    rng = np.random.default_rng(0)
    for tensor in checkpoint_tensors(cfg):
        if tensor.component in ("llm", "embeddings", "lm_head"):
            dtype = np.float16 if len(tensor.shape) == 2 else np.float32
            w.add_tensor(llm_gguf_name(tensor.name)[0], rng.standard_normal(tensor.shape).astype(dtype))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


# KQ (8 layers); tied embeddings with 16 layers; rows of 320 (not a multiple of 256: k-quant fallbacks).
_ORACLE_CONFIGS = {
    "kq": KQ,
    "kq-tied-16": _tied({**KQ, "llm_config": {**KQ["llm_config"], "num_hidden_layers": 16}}),
    "rows-320": {**KQ, "llm_config": {**KQ["llm_config"], "hidden_size": 320, "intermediate_size": 640,
                                      "num_attention_heads": 5, "num_key_value_heads": 1}},
}


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(_ORACLE_CONFIGS))
def test_llm_mixes_match_llama_cpp_quantizer(name, tmp_path):
    """Per tensor, the type and byte count we predict equal what llama_model_quantize writes."""
    llama_cpp = pytest.importorskip("llama_cpp")
    gguf = pytest.importorskip("gguf")
    import ctypes

    from r1v.runtime.files.plan import LLM_GGUF_MIXES, checkpoint_tensors, ggml_nbytes, llm_gguf_name, \
        llm_gguf_tensor_type

    cfg = parse_config(_ORACLE_CONFIGS[name])
    src = tmp_path / "f16.gguf"
    _write_qwen2_f16_gguf(cfg, src)
    ftypes = {"Q4_K_M": 15, "Q5_K_M": 17, "Q6_K": 18, "Q8_0": 7}  # llama_ftype values
    for mix, ftype in ftypes.items():
        dst = tmp_path / f"{mix}.gguf"
        params = llama_cpp.llama_model_quantize_default_params()
        params.ftype = ftype
        params.nthread = 2
        assert llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), ctypes.byref(params)) == 0
        real = {t.name: (t.tensor_type.name, int(t.n_bytes)) for t in gguf.GGUFReader(dst).tensors}
        ours = {}
        for tensor in checkpoint_tensors(cfg):
            if tensor.component in ("llm", "embeddings", "lm_head"):
                gguf_name, layer = llm_gguf_name(tensor.name)
                ggml_type = llm_gguf_tensor_type(LLM_GGUF_MIXES[mix], gguf_name, tensor.shape, layer,
                                                 cfg.llm.num_hidden_layers, cfg.llm.tie_word_embeddings)
                ours[gguf_name] = (ggml_type, ggml_nbytes(ggml_type, tensor.shape))
        assert ours == real, mix
        assert sum(gguf_llm_bytes(cfg, mix).values()) == sum(size for _, size in real.values())


# --- oracle: what `r1v convert gguf` writes ----------------------------------------------------------------
@pytest.mark.parametrize("sizes", [
    {},  # the default tiny sizes: rows of 64/160 (k-quant and Q8_0 fallbacks)
    {"llm_hidden": 256, "llm_intermediate": 512, "vit_hidden": 64, "vit_intermediate": 128},  # k-quant rows
], ids=["tiny", "rows-256"])
def test_plan_per_tensor_equals_what_the_converter_writes(sizes, tmp_path):
    """Per tensor, the name, ggml type and bytes `r1v plan` predicts are those of the files `r1v convert gguf`
    writes (F16, Q8_0, Q4_K_M LLM files; F16 and Q8_0 mmproj), so the planner cannot drift from the converter."""
    gguf = pytest.importorskip("gguf")
    pytest.importorskip("llama_cpp")
    from r1v.converters.gguf import convert_gguf
    from r1v.runtime.files.plan import gguf_llm_tensors, gguf_mmproj_tensors
    from r1v.testing import make_tiny_checkpoint

    ckpt = make_tiny_checkpoint(tmp_path / "tiny", vit="300m", seed=3, **sizes)
    cfg = parse_config(json.loads((ckpt / "config.json").read_text()))
    quants = {"f16": "F16", "q8_0": "Q8_0", "q4_k_m": "Q4_K_M"}
    checked = []
    for mmproj in ("f16", "q8_0"):
        done = convert_gguf(ckpt, tmp_path / mmproj, list(quants) if mmproj == "f16" else [], mmproj, progress=False)
        files = {quants[q]: (path, gguf_llm_tensors(cfg, quants[q])) for q, path in done.llm.items()}
        files[f"mmproj {mmproj}"] = (done.mmproj, gguf_mmproj_tensors(cfg, mmproj.upper()))
        for what, (path, planned) in files.items():
            real = {t.name: (t.tensor_type.name, int(t.n_bytes)) for t in gguf.GGUFReader(path).tensors}
            assert planned == real, what
            checked.append(what)
    assert checked == ["F16", "Q8_0", "Q4_K_M", "mmproj f16", "mmproj q8_0"]
