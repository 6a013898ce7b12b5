"""The torch reference model (r1v.runtime.model) against transformers' own implementations.

Oracles: transformers' Qwen2ForCausalLM for the LLM, InternVLForConditionalGeneration for the image
embeddings and the full multimodal logits; both built from the same fp32 tiny checkpoint through the
renaming table tests/data/internvl_chat_to_hf.yaml. Both ViT flavours: "6b" (rms_norm, qk norm, no qkv
bias) and "300m" (layer_norm, qkv bias). transformers runs with eager attention, ours with SDPA.
"""
from __future__ import annotations

import re
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import yaml

from r1v.converters import CheckpointError, load_config, open_checkpoint
from r1v.converters.checkpoint import Checkpoint
from r1v.converters.config import R1VConfig
from r1v.converters.safetensors_io import write_safetensors
from r1v.runtime.model import IMG_CONTEXT, KVCache, Qwen2ForCausalLM, R1VModel, load_weights
from r1v.testing import make_tiny_checkpoint

transformers = pytest.importorskip("transformers")

TOL = 1e-4
MAP = yaml.safe_load((Path(__file__).parent / "data" / "internvl_chat_to_hf.yaml").read_text())
R1V3_CONFIG = Path(__file__).parent / "data" / "r1v3-38b-config.json"
SEEDS = {"6b": 10, "300m": 11}


# --- the renaming table, applied ------------------------------------------------------------------
def _rename(name: str, rules: list[list[str]]) -> str | None:
    """First matching rule wins; None when no rule matches."""
    for pattern, target in rules:
        m = re.match(pattern, name)
        if m:
            return m.expand(target)
    return None


def hf_state_dict(ckpt: Checkpoint, section: str) -> dict[str, torch.Tensor]:
    """The checkpoint's tensors (as float32) under transformers' names, per table `section`."""
    table = MAP[section]
    select = table.get("select")
    out: dict[str, torch.Tensor] = {}
    for info in ckpt.iter_tensors():
        if select and not re.match(select, info.name):
            continue
        value = torch.from_numpy(ckpt.read(info.name, np.float32))
        for split in table.get("splits", []):
            m = re.match(split["pattern"], info.name)
            if m:
                parts = value.chunk(len(split["targets"]), dim=split["dim"])
                out.update({m.expand(t): p.contiguous() for t, p in zip(split["targets"], parts)})
                break
        else:
            target = _rename(info.name, table["renames"])
            assert target is not None, f"no rule in the table maps {info.name!r}"
            out[target] = value
    return out


def _get(data: dict[str, Any], dotted: str) -> Any:
    for key in dotted.split("."):
        if key not in data:
            raise KeyError(f"config field {dotted!r} is missing")
        data = data[key]
    return data


def _put(data: dict[str, Any], dotted: str, value: Any) -> None:
    *parents, leaf = dotted.split(".")
    for key in parents:
        data = data.setdefault(key, {})
    data[leaf] = value


def _section(table: dict[str, Any], source: dict[str, Any]) -> dict[str, Any]:
    kwargs: dict[str, Any] = {}
    for target, field in table.get("fields", {}).items():
        _put(kwargs, target, _get(source, field))
    for target, value in table.get("fixed", {}).items():
        _put(kwargs, target, value)
    return kwargs


def hf_configs(cfg: R1VConfig, image_token_id: int, attn: str = "eager") -> tuple[Any, Any]:
    """(InternVLConfig, Qwen2Config) from the checkpoint config, per the table's config section."""
    table = MAP["config"]
    for field, value in table["top"]["requires"].items():
        assert getattr(cfg, field) == value, f"transformers' InternVL needs {field} = {value!r}"
    text = transformers.Qwen2Config(**_section(table["text"], cfg.raw["llm_config"]), attn_implementation=attn)
    vision = transformers.InternVLVisionConfig(**_section(table["vision"], cfg.raw["vision_config"]))
    top = _section(table["top"], cfg.raw)
    top.update({k: image_token_id for k in table["top"]["from_tokenizer"]})
    top.update({k: getattr(cfg, attr) for k, attr in table["top"]["derived"].items()})
    internvl = transformers.InternVLConfig(vision_config=vision, text_config=text, attn_implementation=attn, **top)
    return internvl, text


# --- fixtures -------------------------------------------------------------------------------------
@pytest.fixture(scope="module", params=["6b", "300m"])
def f32_ckpt(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Path:
    vit = request.param
    return make_tiny_checkpoint(tmp_path_factory.mktemp("f32") / f"tiny-{vit}", vit=vit, seed=SEEDS[vit], dtype="f32")


@pytest.fixture(scope="module")
def ours(f32_ckpt: Path) -> R1VModel:
    return R1VModel.from_checkpoint(f32_ckpt, dtype=torch.float32)


@pytest.fixture(scope="module")
def hf_internvl(f32_ckpt: Path) -> Any:
    with open_checkpoint(f32_ckpt) as ckpt:
        config, _ = hf_configs(ckpt.config, ckpt.special_tokens()[IMG_CONTEXT])
        model = transformers.InternVLForConditionalGeneration(config)
        model.load_state_dict(hf_state_dict(ckpt, "internvl_for_conditional_generation"), strict=True)
    return model.eval()


def _hf_qwen2(path: Path) -> Any:
    with open_checkpoint(path) as ckpt:
        _, config = hf_configs(ckpt.config, ckpt.special_tokens()[IMG_CONTEXT])
        model = transformers.Qwen2ForCausalLM(config)
        result = model.load_state_dict(hf_state_dict(ckpt, "qwen2_for_causal_lm"), strict=False)
        # A tied head has no tensor of its own; it must share the embedding table.
        tied = {"lm_head.weight"} if config.tie_word_embeddings else set()
        assert not result.unexpected_keys and set(result.missing_keys) == tied, result
        if tied:
            assert model.lm_head.weight is model.model.embed_tokens.weight
    return model.eval()


def _max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape, (a.shape, b.shape)
    return float((a.float() - b.float()).abs().max())


def _report(what: str, diff: float) -> None:
    print(f"{what}: max abs diff {diff:.3g}")


def _text_ids(model: R1VModel, n: int, batch: int = 1) -> torch.Tensor:
    """Random ids of ordinary tokens (below the special ones, so never <IMG_CONTEXT>)."""
    return torch.randint(0, min(model.image_token_id, model.config.llm.vocab_size) - 8, (batch, n))


def _mm_prompt(model: R1VModel, special: dict[str, int], n_tiles: int) -> torch.Tensor:
    """text + <img> + <IMG_CONTEXT> x (256 * tiles) + </img> + text, as InternVL-chat builds it."""
    before, after = _text_ids(model, 7)[0].tolist(), _text_ids(model, 9)[0].tolist()
    image = [special["<img>"], *[model.image_token_id] * (model.config.tokens_per_tile * n_tiles), special["</img>"]]
    return torch.tensor([before + image + after])


# --- oracle tests ---------------------------------------------------------------------------------
@torch.inference_mode()
def test_llm_logits_match_transformers_qwen2(f32_ckpt: Path, ours: R1VModel) -> None:
    torch.manual_seed(0)
    ids = _text_ids(ours, 40, batch=2)
    expected = _hf_qwen2(f32_ckpt)(input_ids=ids).logits
    diff = _max_diff(ours.llm(ids), expected)
    _report(f"qwen2 logits [{f32_ckpt.name}]", diff)
    assert diff <= TOL


@torch.inference_mode()
def test_kv_cache_decoding_matches_full_sequence(ours: R1VModel) -> None:
    torch.manual_seed(1)
    ids = _text_ids(ours, 24)
    full = ours.llm(ids)
    cache = ours.llm.new_cache(capacity=32)
    # Prefill, a second multi-token chunk (a causal mask with an offset), then one token at a time.
    steps = [ours.llm(ids[:, :8], cache=cache), ours.llm(ids[:, 8:13], cache=cache)]
    steps += [ours.llm(ids[:, t : t + 1], cache=cache) for t in range(13, ids.shape[1])]
    assert cache.length == ids.shape[1]
    diff = _max_diff(torch.cat(steps, dim=1), full)
    _report("kv cache vs full sequence", diff)
    assert diff <= TOL


@torch.inference_mode()
def test_static_decode_steps_match_the_dynamic_ones(ours: R1VModel) -> None:
    """`StaticDecoder` (one token, fixed shapes: the step CUDA graphs capture, run eagerly here) against the dynamic
    cache path: the same logits at every step, across span boundaries (capacity 600: spans 256, 512, 600), and the
    same greedy tokens."""
    from r1v.runtime.model.decode import StaticDecoder, spans_for

    assert spans_for(600) == [256, 512, 600] and spans_for(256) == [256] and spans_for(100) == [100]
    torch.manual_seed(3)
    llm, ids = ours.llm, _text_ids(ours, 250)
    dynamic, static = llm.new_cache(600), llm.new_cache(600)
    logits = llm(ids, cache=dynamic)[0, -1]
    assert torch.equal(llm(ids, cache=static)[0, -1], logits)  # the same prefill for both
    decoder = StaticDecoder(llm, static)
    assert decoder.spans == [256, 512, 600] and not decoder.graphs  # CPU: eager steps
    tokens, worst = [], 0.0
    for _ in range(12):  # positions 250..261: spans 256, then 512
        tokens.append(int(logits.argmax()))
        embeds = llm.model.embed_tokens(torch.tensor([[tokens[-1]]]))
        logits = llm(inputs_embeds=embeds, cache=dynamic)[0, -1]
        stepped = decoder.step(embeds)
        worst = max(worst, _max_diff(stepped, logits))
        assert int(stepped.argmax()) == int(logits.argmax())
    assert static.length == dynamic.length == 262 and decoder.span_for(static.length) == 512
    _report("static decode steps vs dynamic", worst)
    assert worst <= 1e-5
    static.length = 600
    with pytest.raises(ValueError, match="KV cache full"):
        decoder.step(embeds)


@torch.inference_mode()
def test_image_embeddings_match_transformers_internvl(f32_ckpt: Path, ours: R1VModel, hf_internvl: Any) -> None:
    torch.manual_seed(2)
    pixel_values = torch.randn(2, 3, 448, 448)
    got = ours.embed_images(pixel_values)
    assert got.shape == (2, ours.config.tokens_per_tile, ours.config.llm.hidden_size)
    expected = hf_internvl.model.get_image_features(
        pixel_values=pixel_values, vision_feature_layer=-1, vision_feature_select_strategy="default"
    ).pooler_output
    diff = _max_diff(got, expected)
    _report(f"image embeddings [{f32_ckpt.name}]", diff)
    assert diff <= TOL


@torch.inference_mode()
def test_resized_position_embeddings_match_transformers(f32_ckpt: Path, ours: R1VModel, hf_internvl: Any) -> None:
    """A 224 image (16x16 patches) makes both sides bicubic-resize the 32x32 position embeddings."""
    torch.manual_seed(7)
    pixel_values = torch.randn(1, 3, 224, 224)
    got = ours.embed_images(pixel_values)
    assert got.shape[1] == 64
    expected = hf_internvl.model.get_image_features(pixel_values=pixel_values).pooler_output
    diff = _max_diff(got, expected)
    _report(f"image embeddings at 224 [{f32_ckpt.name}]", diff)
    assert diff <= TOL


@torch.inference_mode()
def test_select_layer_matches_transformers_feature_layer(f32_ckpt: Path) -> None:
    """select_layer -2 (the output of the next-to-last ViT layer) indexes hidden states as transformers'
    vision_feature_layer does: (embeddings, layer 1, ..., layer L)."""
    with open_checkpoint(f32_ckpt) as ckpt:
        cfg = replace(ckpt.config, select_layer=-2, raw={**ckpt.config.raw, "select_layer": -2})
        with torch.device("meta"):
            ours = R1VModel(cfg, image_token_id=0)
        load_weights(ours, ckpt)
        config, _ = hf_configs(cfg, image_token_id=0)
        hf = transformers.InternVLForConditionalGeneration(config)
        hf.load_state_dict(hf_state_dict(ckpt, "internvl_for_conditional_generation"), strict=True)
    torch.manual_seed(6)
    pixel_values = torch.randn(1, 3, 448, 448)
    expected = hf.eval().model.get_image_features(pixel_values=pixel_values).pooler_output
    diff = _max_diff(ours.embed_images(pixel_values), expected)
    _report(f"image embeddings, select_layer -2 [{f32_ckpt.name}]", diff)
    assert diff <= TOL


@torch.inference_mode()
def test_multimodal_logits_match_transformers_internvl(f32_ckpt: Path, ours: R1VModel, hf_internvl: Any) -> None:
    torch.manual_seed(3)
    with open_checkpoint(f32_ckpt) as ckpt:
        special = ckpt.special_tokens()
    pixel_values = torch.randn(2, 3, 448, 448)
    ids = _mm_prompt(ours, special, n_tiles=2)
    expected = hf_internvl(input_ids=ids, pixel_values=pixel_values).logits
    diff = _max_diff(ours(ids, pixel_values), expected)
    _report(f"multimodal logits [{f32_ckpt.name}]", diff)
    assert diff <= TOL


@torch.inference_mode()
def test_greedy_matches_transformers_generate(f32_ckpt: Path, ours: R1VModel, hf_internvl: Any) -> None:
    torch.manual_seed(4)
    with open_checkpoint(f32_ckpt) as ckpt:
        special = ckpt.special_tokens()
    pixel_values = torch.randn(1, 3, 448, 448)
    ids = _mm_prompt(ours, special, n_tiles=1)
    got = ours.greedy(ids, pixel_values, max_new_tokens=12, stop_ids=())
    expected = hf_internvl.generate(
        input_ids=ids, pixel_values=pixel_values, max_new_tokens=12, do_sample=False, eos_token_id=None, pad_token_id=0,
    )[0, ids.shape[1]:]
    assert len(got) == 12 and got.tolist() == expected.tolist()


@torch.inference_mode()
def test_tied_embeddings_match_transformers(tiny_tied: Path) -> None:
    path = tiny_tied
    with open_checkpoint(path) as ckpt:
        assert "language_model.lm_head.weight" not in ckpt.tensors
    model = R1VModel.from_checkpoint(path)
    assert model.llm.lm_head.weight is model.llm.model.embed_tokens.weight
    torch.manual_seed(5)
    ids = _text_ids(model, 16)
    diff = _max_diff(model.llm(ids), _hf_qwen2(path)(input_ids=ids).logits)
    _report("tied-embedding qwen2 logits", diff)
    assert diff <= TOL


def test_config_table_maps_the_r1v3_config() -> None:
    """The table covers every field the real R1V3-38B config needs (config objects only, no weights)."""
    cfg = load_config(R1V3_CONFIG)
    internvl, text = hf_configs(cfg, image_token_id=151667)
    v = internvl.vision_config
    assert (v.hidden_size, v.num_hidden_layers, v.num_attention_heads, v.intermediate_size) == (3200, 45, 25, 12800)
    assert (v.norm_type, v.use_qk_norm, v.attention_bias, v.use_mean_pooling) == ("rms_norm", True, False, True)
    assert (text.hidden_size, text.num_hidden_layers, text.num_key_value_heads) == (5120, 64, 8)
    assert text.rope_parameters["rope_theta"] == 1_000_000.0
    assert internvl.tie_word_embeddings is False and text.tie_word_embeddings is False
    assert (internvl.image_seq_length, internvl.downsample_ratio, internvl.vision_feature_layer) == (256, 0.5, -1)


# --- refusals -------------------------------------------------------------------------------------
def test_image_token_count_must_match_tiles(ours: R1VModel) -> None:
    ids = torch.tensor([[1, 2, *[ours.image_token_id] * (ours.config.tokens_per_tile - 1), 3]])
    with pytest.raises(ValueError, match="255 <IMG_CONTEXT> tokens but the images give 1 tiles x 256"):
        ours(ids, torch.zeros(1, 3, 448, 448))
    with pytest.raises(ValueError, match="no image was given"):
        ours(ids)


def test_unsupported_rope_scaling_is_refused() -> None:
    cfg = replace(load_config(R1V3_CONFIG).llm, rope_scaling={"rope_type": "yarn", "factor": 4.0})
    with pytest.raises(NotImplementedError, match="rope_scaling"):
        Qwen2ForCausalLM(cfg)


def _rewrite(src: Path, dst: Path, edit) -> Path:
    """Copy checkpoint `src` to `dst` as a single model.safetensors, with `edit(tensors)` applied."""
    dst.mkdir()
    with open_checkpoint(src) as ckpt:
        tensors = {i.name: ("F32", ckpt.read(i.name)) for i in ckpt.iter_tensors()}
    edit(tensors)
    write_safetensors(dst / "model.safetensors", tensors)
    for f in src.iterdir():
        if f.suffix == ".json" and f.name != "model.safetensors.index.json":
            (dst / f.name).write_bytes(f.read_bytes())
    return dst


@pytest.fixture(scope="module")
def tiny_f32(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_checkpoint(tmp_path_factory.mktemp("f32") / "tiny", vit="6b", seed=6, dtype="f32")


def test_missing_tensor_is_rejected_by_name(tiny_f32: Path, tmp_path: Path) -> None:
    name = "vision_model.encoder.layers.1.attn.k_norm.weight"
    path = _rewrite(tiny_f32, tmp_path / "missing", lambda t: t.pop(name))
    with pytest.raises(CheckpointError, match=re.escape(repr(name))):
        R1VModel.from_checkpoint(path)  # open_checkpoint's own shape check
    with open_checkpoint(path, check_shapes=False) as ckpt, pytest.raises(CheckpointError) as err:
        R1VModel.from_checkpoint(ckpt)  # the loader's strict matching
    assert repr(name) in str(err.value) and "missing" in str(err.value)


def test_extra_tensor_is_rejected_by_name(tiny_f32: Path, tmp_path: Path) -> None:
    name = "vision_model.encoder.layers.0.attn.qkv.bias"  # a 300M tensor in a 6B (no qkv bias) checkpoint
    path = _rewrite(tiny_f32, tmp_path / "extra", lambda t: t.update({name: ("F32", np.zeros(96, np.float32))}))
    with pytest.raises(CheckpointError, match=re.escape(repr(name)) + " is not used by the model"):
        R1VModel.from_checkpoint(path)


def test_wrong_shape_is_rejected_by_name(tiny_f32: Path, tmp_path: Path) -> None:
    name = "mlp1.1.bias"
    path = _rewrite(tiny_f32, tmp_path / "shape", lambda t: t.update({name: ("F32", np.zeros(7, np.float32))}))
    with open_checkpoint(path, check_shapes=False) as ckpt, pytest.raises(CheckpointError) as err:
        R1VModel.from_checkpoint(ckpt)
    assert repr(name) in str(err.value) and "shape [7]" in str(err.value)


def test_bf16_checkpoint_loads_exactly(tiny_6b: Path) -> None:
    """BF16 bit patterns become the same values in torch (compared with the numpy widening)."""
    model = R1VModel.from_checkpoint(tiny_6b, dtype=torch.bfloat16)
    with open_checkpoint(tiny_6b) as ckpt:
        for name in ("language_model.model.layers.0.self_attn.q_proj.weight", "vision_model.encoder.layers.1.ls2"):
            param = model.get_parameter(name)
            assert param.dtype == torch.bfloat16
            np.testing.assert_array_equal(param.float().numpy(), ckpt.read(name, np.float32))
    assert isinstance(model.llm.new_cache(4), KVCache)
