"""mmproj GGUF (vision tower + mlp1) in stock llama.cpp through libmtmd (runtime.mtmd), against the torch
reference, on tiny "300m"-variant checkpoints (LayerNorm, qkv bias, no qk norm: what llama.cpp runs at any
size). Also: libmtmd's tiling vs InternVL's, metadata round trip, refusals, and atomic writes."""
from __future__ import annotations

import dataclasses
from pathlib import Path

import gguf
import numpy as np
import pytest
from PIL import Image

from r1v.converters import load_config, open_checkpoint
from r1v.converters.gguf_common import ConversionError
from r1v.converters.gguf_llm import write_llm_gguf
from r1v.converters.gguf_mmproj import POSITION_ORDER, POSITION_ORDER_KEY, check_mmproj_supported, write_mmproj_gguf
from r1v.runtime.image import IMAGENET_MEAN, IMAGENET_STD, TilingConfig, choose_grid, normalize, prepare_image
from r1v.runtime.backends.llamacpp.llama_params import open_llama
from r1v.runtime.backends.llamacpp.mtmd import MtmdContext, MtmdError, TextModel
from r1v.testing.images import pattern_pixels

torch = pytest.importorskip("torch")
from r1v.runtime.model import R1VModel  # noqa: E402

QType = gguf.GGMLQuantizationType


@pytest.fixture(scope="module")
def ckpt_path(mmproj_source: Path) -> Path:
    """The shared mmproj tests' checkpoint (tests/tiny_models.py: ViT 64 wide, so Q8_0 blocks apply to every ViT
    and projector matrix)."""
    return mmproj_source


@pytest.fixture(scope="module")
def files(ckpt_path: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    out = tmp_path_factory.mktemp("gguf")
    with open_checkpoint(ckpt_path) as ckpt:
        made = {q: write_mmproj_gguf(ckpt, out / f"mmproj-{q}.gguf", q, progress=False) for q in ("f32", "f16", "q8_0")}
        made["llm"] = write_llm_gguf(ckpt, out / "llm-f16.gguf", "f16", progress=False)
    return made


@pytest.fixture(scope="module")
def text_model(files: dict[str, Path]):
    with TextModel(files["llm"]) as model:
        yield model


@pytest.fixture(scope="module")
def ctx_f16(files: dict[str, Path], text_model: TextModel):
    with MtmdContext(files["f16"], text_model, n_threads=2) as ctx:
        yield ctx


@pytest.fixture(scope="module")
def reference(ckpt_path: Path) -> R1VModel:
    return R1VModel.from_checkpoint(ckpt_path, dtype=torch.float32)


def _image(width: int, height: int, seed: int = 0) -> np.ndarray:
    """A smooth pattern plus noise: structure for attention to see, every pixel value used."""
    return pattern_pixels(width, height, seed)


def _cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a, b = a.reshape(len(a), -1), b.reshape(len(b), -1)
    return (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)


def _torch_embeddings(model: R1VModel, pixel_values: np.ndarray) -> np.ndarray:
    with torch.inference_mode():
        return model.embed_images(torch.from_numpy(pixel_values)).numpy()


# --- parity with the torch reference ------------------------------------------------------------------------

def test_f16_image_embeddings_match_torch_reference(ctx_f16: MtmdContext, reference: R1VModel):
    img = _image(448, 448)
    prepared = prepare_image(Image.fromarray(img))
    assert prepared.num_tiles == 1  # 448x448: one tile, no resize, no thumbnail
    np.testing.assert_array_equal(prepared.pixel_values, normalize([Image.fromarray(img)]))
    ref = _torch_embeddings(reference, prepared.pixel_values)
    got = ctx_f16.embed_image(img)
    assert got.layout.n_tiles == 1 and got.embeddings.shape == ref.shape == (1, 256, 64)
    cos = _cosines(got.embeddings, ref)
    print(f"\nF16 mmproj vs torch, 448x448: cosine {cos.min():.7f}, max abs diff "
          f"{np.abs(got.embeddings - ref).max():.2e} (|ref| max {np.abs(ref).max():.2f})")
    assert cos.min() >= 0.999


@pytest.mark.slow
def test_tiles_resize_and_overview_match_internvl_where_grids_agree(ctx_f16: MtmdContext, reference: R1VModel):
    """1000x1000: both choose 3x3 (+ thumbnail last) and the aspect ratio matches, so libmtmd's bicubic resize
    (a port of Pillow's) gives the same tiles as InternVL's: per-tile embeddings agree."""
    img = _image(1000, 1000, seed=1)
    prepared = prepare_image(Image.fromarray(img))
    ref = _torch_embeddings(reference, prepared.pixel_values)
    got = ctx_f16.embed_image(img)
    assert got.layout.grid == prepared.grid == (3, 3) and got.layout.thumbnail
    cos = _cosines(got.embeddings, ref)
    print(f"\n1000x1000, 3x3 + overview, per-tile cosine min {cos.min():.7f}")
    assert cos.min() >= 0.999


@pytest.mark.slow
def test_q8_0_close_to_f16(files: dict[str, Path], text_model: TextModel, ctx_f16: MtmdContext):
    img = _image(448, 448, seed=2)
    f16 = ctx_f16.embed_image(img).embeddings
    with MtmdContext(files["q8_0"], text_model, n_threads=2) as ctx:
        q8 = ctx.embed_image(img).embeddings
    cos = _cosines(q8, f16)
    print(f"\nQ8_0 vs F16 mmproj: cosine {cos.min():.7f}, max abs diff {np.abs(q8 - f16).max():.2e}")
    assert cos.min() >= 0.999


# --- tiling: libmtmd vs InternVL's dynamic_preprocess -------------------------------------------------------

# (width, height): (InternVL grid (cols, rows), libmtmd grid). Tiles = cols*rows, + 1 thumbnail/overview when
# more than one. libmtmd (llama.cpp in llama-cpp-python 0.3.36) does not slice an image that fits in 448x448
# (InternVL upscales it into its closest-ratio grid), and otherwise picks the candidate grid that keeps the most
# resolution, then wastes the least area (llava-1.6 style), not the closest aspect ratio.
TILING = {
    (448, 448): ((1, 1), (1, 1)),
    (100, 100): ((1, 1), (1, 1)),
    (300, 200): ((3, 2), (1, 1)),
    (200, 300): ((2, 3), (1, 1)),
    (449, 449): ((1, 1), (2, 2)),
    (500, 500): ((1, 1), (2, 2)),
    (896, 896): ((2, 2), (2, 2)),
    (1000, 1000): ((3, 3), (3, 3)),
    (2000, 2000): ((3, 3), (3, 3)),
    (5376, 448): ((12, 1), (12, 1)),
    (448, 5376): ((1, 12), (1, 12)),
    (2688, 448): ((6, 1), (6, 1)),
    (12000, 1000): ((12, 1), (12, 1)),
    (37, 1001): ((1, 12), (1, 3)),
    (900, 100): ((9, 1), (3, 1)),
    (100, 900): ((1, 9), (1, 3)),
    (640, 480): ((4, 3), (2, 2)),
    (800, 600): ((4, 3), (2, 2)),
    (1024, 768): ((4, 3), (3, 2)),
    (4000, 3000): ((4, 3), (4, 3)),
    (1280, 720): ((4, 2), (3, 2)),
    (1920, 1080): ((4, 2), (4, 3)),
    (1080, 1920): ((2, 4), (3, 4)),
    (1000, 500): ((2, 1), (3, 2)),
    (500, 1000): ((1, 2), (2, 3)),
    (1234, 567): ((2, 1), (3, 2)),
    (333, 777): ((2, 5), (1, 2)),
    (3001, 999): ((6, 2), (6, 2)),
}


def _tiles(grid: tuple[int, int]) -> int:
    return grid[0] * grid[1] + (grid[0] * grid[1] > 1)


def test_tiling_table(ctx_f16: MtmdContext):
    cfg = TilingConfig()
    mismatches = []
    for (w, h), (ours, theirs) in TILING.items():
        assert choose_grid(w, h, cfg) == ours, (w, h)
        layout = ctx_f16.layout_for_size(w, h)
        assert (layout.grid, layout.n_tiles, layout.thumbnail) == (theirs, _tiles(theirs), _tiles(theirs) > 1), (w, h)
        assert layout.tokens_per_tile == (256,) * layout.n_tiles
        if ours != theirs:
            mismatches.append(f"{w}x{h}: InternVL {ours[0]}x{ours[1]} ({_tiles(ours)} tiles), "
                              f"libmtmd {theirs[0]}x{theirs[1]} ({_tiles(theirs)} tiles)")
    print(f"\n{len(mismatches)} of {len(TILING)} sizes tile differently:\n" + "\n".join(mismatches))


def test_libmtmd_wraps_each_image_in_img_tags(ctx_f16: MtmdContext, ckpt_path: Path):
    with open_checkpoint(ckpt_path) as ckpt:
        special = ckpt.special_tokens()
    with ctx_f16.tokenize(f"Look: {ctx_f16.marker}\nWhat?", [_image(1000, 500)]) as prompt:
        kinds = [c.kind for c in prompt.chunks]
        assert kinds == ["text"] + ["image"] * 7 + ["text"]  # 3x2 tiles, then the overview
        assert prompt.chunks[0].tokens[-1] == special["<img>"]
        assert prompt.chunks[-1].tokens[0] == special["</img>"]
        assert special["<IMG_CONTEXT>"] not in prompt.chunks[0].tokens + prompt.chunks[-1].tokens
        assert prompt.images[0].chunks == tuple(range(1, 8))
        assert prompt.n_tokens == sum(c.n_tokens for c in prompt.chunks)
    with pytest.raises(MtmdError, match="media markers"):
        ctx_f16.tokenize("no marker here", [_image(10, 10)])


# --- the file itself ----------------------------------------------------------------------------------------

def _expected_tensors(layers: int) -> list[str]:
    names = ["v.patch_embd.weight", "v.patch_embd.bias", "v.class_embd", "v.position_embd.weight"]
    for i in range(layers):
        names += [f"v.blk.{i}.{n}" for n in (
            "ln1.weight", "ln1.bias", "attn_q.weight", "attn_k.weight", "attn_v.weight", "attn_q.bias",
            "attn_k.bias", "attn_v.bias", "attn_out.weight", "attn_out.bias", "ls1.weight", "ln2.weight",
            "ln2.bias", "ffn_up.weight", "ffn_up.bias", "ffn_down.weight", "ffn_down.bias", "ls2.weight")]
    return names + [f"mm.model.mlp.{i}.{k}" for i in (0, 1, 3) for k in ("weight", "bias")]


@pytest.mark.parametrize("quant", ["f16", "q8_0"])
def test_metadata_round_trip(files: dict[str, Path], ckpt_path: Path, quant: str):
    reader = gguf.GGUFReader(files[quant])
    kv = {name: field.contents() for name, field in reader.fields.items() if not name.startswith("GGUF.")}
    with open_checkpoint(ckpt_path) as ckpt:
        sha = ckpt.config.sha256
    expected = {
        "general.architecture": "clip", "general.type": "mmproj", "clip.has_vision_encoder": True,
        "clip.projector_type": "internvl", "clip.use_gelu": True, "clip.vision.image_size": 448,
        "clip.vision.patch_size": 14, "clip.vision.embedding_length": 64, "clip.vision.feed_forward_length": 128,
        "clip.vision.block_count": 2, "clip.vision.attention.head_count": 4, "clip.vision.projection_dim": 64,
        "clip.vision.projector.scale_factor": 2, "clip.vision.preproc_min_tiles": 1,
        "clip.vision.preproc_max_tiles": 12, "r1v.quant": quant, "r1v.source.config_sha256": sha,
        POSITION_ORDER_KEY: POSITION_ORDER,
        "general.file_type": {"f16": 1, "q8_0": 7}[quant],
    }
    assert {k: kv.get(k) for k in expected} == expected
    assert kv["clip.vision.attention.layer_norm_epsilon"] == pytest.approx(1e-6)
    assert kv["clip.vision.image_mean"] == pytest.approx(IMAGENET_MEAN)
    assert kv["clip.vision.image_std"] == pytest.approx(IMAGENET_STD)

    types = {t.name: t.tensor_type for t in reader.tensors}
    assert list(types) == _expected_tensors(2)
    matrix = {"f16": QType.F16, "q8_0": QType.Q8_0}[quant]
    for name, qtype in types.items():
        if name == "v.patch_embd.weight":
            assert qtype == (QType.F16 if quant == "f16" else QType.F32)
        elif name.endswith(".weight") and name not in ("v.position_embd.weight",) and "ln" not in name \
                and "ls" not in name and name != "mm.model.mlp.0.weight":
            assert qtype == matrix, name
        else:
            assert qtype == QType.F32, name  # position/class embedding, norms, layer scales, biases


def test_f32_values_split_qkv_and_move_cls_position_last(files: dict[str, Path], ckpt_path: Path):
    tensors = {t.name: np.asarray(t.data) for t in gguf.GGUFReader(files["f32"]).tensors}
    with open_checkpoint(ckpt_path) as ckpt:
        qkv_w = ckpt.read("vision_model.encoder.layers.1.attn.qkv.weight")
        qkv_b = ckpt.read("vision_model.encoder.layers.1.attn.qkv.bias")
        pos = ckpt.read("vision_model.embeddings.position_embedding")
        fc1 = ckpt.read("mlp1.1.weight")
    for i, part in enumerate("qkv"):
        np.testing.assert_array_equal(tensors[f"v.blk.1.attn_{part}.weight"], qkv_w[64 * i:64 * (i + 1)])
        np.testing.assert_array_equal(tensors[f"v.blk.1.attn_{part}.bias"], qkv_b[64 * i:64 * (i + 1)])
    np.testing.assert_array_equal(tensors["v.position_embd.weight"], np.concatenate([pos[:, 1:], pos[:, :1]], 1))
    np.testing.assert_array_equal(tensors["mm.model.mlp.1.weight"], fc1)


# --- refusals and atomic writes -----------------------------------------------------------------------------

def test_refuses_tiny_6b_vit_and_leaves_nothing(tiny_6b: Path, tmp_path: Path):
    with open_checkpoint(tiny_6b) as ckpt, pytest.raises(ConversionError) as err:
        write_mmproj_gguf(ckpt, tmp_path / "mmproj.gguf", "f16", progress=False)
    message = str(err.value)
    assert "vision_config.norm_type is 'rms_norm'" in message
    assert "vision_config.qk_normalization is true" in message
    assert "hidden_size 3200 and 45 layers" in message and "by shape alone" in message
    assert list(tmp_path.iterdir()) == []


def _variant(cfg, vision=None, **top):
    return dataclasses.replace(cfg, vision=dataclasses.replace(cfg.vision, **(vision or {})), **top)


@pytest.mark.parametrize("vision, top, field", [
    ({"hidden_size": 3200, "num_hidden_layers": 45, "num_attention_heads": 25}, {}, "vision_config.norm_type"),
    ({"qk_normalization": True}, {}, "vision_config.qk_normalization"),
    ({"hidden_act": "quick_gelu"}, {}, "vision_config.hidden_act"),
    ({}, {"ps_version": "v1"}, "ps_version"),
])
def test_refuses_what_llama_cpp_would_run_wrongly(ckpt_path: Path, vision, top, field):
    cfg = load_config(ckpt_path)  # 300m variant: layer_norm, no qk norm
    with pytest.raises(ConversionError, match=field.replace(".", r"\.")):
        check_mmproj_supported(_variant(cfg, vision, **top))


def test_accepts_internvit_6b_shape(ckpt_path: Path):
    cfg = load_config(ckpt_path)
    six_b = {"hidden_size": 3200, "num_hidden_layers": 45, "num_attention_heads": 25, "norm_type": "rms_norm",
             "qk_normalization": True, "qkv_bias": False}
    check_mmproj_supported(_variant(cfg, six_b))
    check_mmproj_supported(cfg)


def test_failure_mid_write_leaves_no_file(ckpt_path: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    with open_checkpoint(ckpt_path) as ckpt:
        real_read, calls = ckpt.read, []

        def failing_read(name: str, *args, **kwargs):
            calls.append(name)
            if len(calls) == 6:
                raise KeyboardInterrupt  # as Ctrl-C would, in the middle of the tensor data
            return real_read(name, *args, **kwargs)

        monkeypatch.setattr(ckpt, "read", failing_read)
        with pytest.raises(KeyboardInterrupt):
            write_mmproj_gguf(ckpt, tmp_path / "mmproj.gguf", "q8_0", progress=False)
        with pytest.raises(ConversionError, match="unknown mmproj type"):
            write_mmproj_gguf(ckpt, tmp_path / "mmproj.gguf", "q4_k_m", progress=False)
    assert len(calls) == 6
    assert list(tmp_path.iterdir()) == []


# --- the whole model: image + question through llama.cpp vs the torch reference ---------------------------

@pytest.mark.slow
def test_image_question_greedy_tokens_match_torch_reference(files: dict[str, Path], ckpt_path: Path,
                                                            reference: R1VModel):
    """A 448×448 image (one tile, no resize, so both sides tile alike) and a question in the chat template:
    libmtmd tokenizes and encodes, llama.cpp decodes greedily; the torch reference runs the same prompt."""
    import llama_cpp
    from tokenizers import Tokenizer

    image = _image(448, 448, seed=5)
    prefix, suffix = "<|im_start|>user\n", "\nHow many shapes?<|im_end|>\n<|im_start|>assistant\n<think>\n"
    steps = 24
    llama = open_llama(files["llm"], n_ctx=1024, n_threads=2, logits_all=True, verbose=False)
    with MtmdContext(files["f16"], llama, n_threads=2) as ctx, \
            ctx.tokenize(prefix + ctx.marker + suffix, [image]) as prompt:
        llama.reset()
        ctx.eval_into_llama(llama, prompt)
        assert prompt.chunks[-1].kind == "text"  # so the last eval left the logits of the last position
        ours: list[int] = []
        for _ in range(steps):
            ours.append(int(np.argmax(llama.scores[llama.n_tokens - 1])))
            llama.eval([ours[-1]])
        llama_prompt = [t for c in prompt.chunks if c.kind == "text" for t in c.tokens]
    llama.close()

    with open_checkpoint(ckpt_path) as ckpt:
        tokenizer = Tokenizer.from_file(str(ckpt.tokenizer.tokenizer_json))
    image_tokens = "<img>" + "<IMG_CONTEXT>" * reference.config.tokens_per_tile + "</img>"
    ids = tokenizer.encode(prefix + image_tokens + suffix, add_special_tokens=False).ids
    assert [t for t in ids if t != reference.image_token_id] == llama_prompt  # the same text tokens around it
    pixel_values = torch.from_numpy(prepare_image(Image.fromarray(image)).pixel_values)
    theirs = reference.greedy(ids, pixel_values, max_new_tokens=steps, stop_ids=()).tolist()
    assert ours == theirs
