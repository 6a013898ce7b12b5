"""The checkpoint reader: layout, lazy reads, and a clear error for each kind of bad input."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from r1v.converters import CheckpointError, load_config, open_checkpoint
from r1v.converters.safetensors_io import write_safetensors
from r1v.testing import make_tiny_checkpoint


@pytest.fixture
def ckpt_copy(tiny_6b, tmp_path) -> Path:
    return Path(shutil.copytree(tiny_6b, tmp_path / "copy"))


def _load_bits(file: Path) -> dict[str, np.ndarray]:
    """A bf16 shard read by the safetensors library, as uint16 bit patterns."""
    return {n: t.view(torch.int16).numpy().view(np.uint16) for n, t in load_file(str(file)).items()}


def _index(path: Path) -> dict:
    return json.loads((path / "model.safetensors.index.json").read_text())


def test_reads_every_tensor_like_the_reference(tiny_6b):
    with open_checkpoint(tiny_6b) as ckpt:
        shards = sorted({i.file for i in ckpt.tensors.values()})
        assert len(shards) >= 2, "the default tiny checkpoint is sharded"
        reference = {}
        for shard in shards:
            reference.update(_load_bits(shard))
    with open_checkpoint(tiny_6b) as ckpt:
        names = [info.name for info in ckpt.iter_tensors()]
        assert sorted(names) == sorted(ckpt.config.family.expected_shapes(ckpt.config))
        for name in names:
            raw = ckpt.raw(name)
            assert not raw.flags.writeable  # a view of the mapped file, not a copy
            assert raw.dtype == np.uint16
            np.testing.assert_array_equal(raw, reference[name])


def test_bf16_widening_matches_torch(tiny_6b):
    with open_checkpoint(tiny_6b) as ckpt:
        name = "language_model.model.layers.0.self_attn.q_proj.weight"
        ref = load_file(str(ckpt.tensors[name].file))[name]
        assert ref.dtype == torch.bfloat16
        np.testing.assert_array_equal(ckpt.read(name), ref.float().numpy())


def test_config_and_tokens(tiny_6b):
    with open_checkpoint(tiny_6b) as ckpt:
        cfg = ckpt.config
        assert cfg.family.name == "skywork_chat" and cfg.architecture == "SkyworkR1VChatModel"
        assert cfg.vision.norm_type == "rms_norm" and cfg.vision.qk_normalization and not cfg.vision.qkv_bias
        assert cfg.tokens_per_tile == 256 and cfg.projector_input_size == 4 * cfg.vision.hidden_size
        special = ckpt.special_tokens()
        for token in ("<img>", "</img>", "<IMG_CONTEXT>", "<|im_start|>", "<|im_end|>", "<think>", "</think>"):
            assert token in special
        assert ckpt.eos_token_ids == [special["<|im_end|>"], special["<|endoftext|>"]]
        assert "<think>" in ckpt.tokenizer.chat_template
        assert len(cfg.sha256) == 64


def test_internvl_chat_alias(ckpt_copy):
    config = json.loads((ckpt_copy / "config.json").read_text())
    config.update(architectures=["InternVLChatModel"], model_type="internvl_chat")
    (ckpt_copy / "config.json").write_text(json.dumps(config))
    assert open_checkpoint(ckpt_copy).config.family.name == "skywork_chat"


def test_unsharded_fp16_and_fp32(tmp_path):
    for dtype, np_dtype in (("f16", np.float16), ("f32", np.float32)):
        path = make_tiny_checkpoint(tmp_path / dtype, dtype=dtype, max_shard_bytes=1 << 30)
        with open_checkpoint(path) as ckpt:
            name = "mlp1.1.weight"
            assert ckpt.raw(name).dtype == np_dtype
            assert ckpt.read(name).dtype == np.float32


def test_missing_shard(ckpt_copy):
    shard = sorted(ckpt_copy.glob("model-*.safetensors"))[1]
    shard.unlink()
    with pytest.raises(CheckpointError, match=rf"lists shard '{shard.name}', which is missing"):
        open_checkpoint(ckpt_copy)


def test_index_that_lies_about_a_tensor(ckpt_copy):
    index = _index(ckpt_copy)
    name = "language_model.model.norm.weight"
    files = sorted(set(index["weight_map"].values()))
    index["weight_map"][name] = next(f for f in files if f != index["weight_map"][name])
    (ckpt_copy / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match=rf"tensor '{name}' is listed in"):
        open_checkpoint(ckpt_copy)


def test_truncated_shard(ckpt_copy):
    shard = sorted(ckpt_copy.glob("model-*.safetensors"))[0]
    shard.write_bytes(shard.read_bytes()[:-100])
    with pytest.raises(CheckpointError, match="truncated") as e:
        open_checkpoint(ckpt_copy)
    assert shard.name in str(e.value)


def test_shape_that_disagrees_with_config(ckpt_copy):
    config = json.loads((ckpt_copy / "config.json").read_text())
    config["llm_config"]["intermediate_size"] += 8
    (ckpt_copy / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match=r"mlp\.gate_proj\.weight' has shape \[160, 64\] but config.json implies \[168, 64\]"):
        open_checkpoint(ckpt_copy)


def test_tensor_missing_from_checkpoint(ckpt_copy):
    index = _index(ckpt_copy)
    name = "vision_model.encoder.layers.1.ls2"
    shard = ckpt_copy / index["weight_map"].pop(name)
    kept = {n: a for n, a in _load_bits(shard).items() if n != name}
    write_safetensors(shard, {n: ("BF16", a) for n, a in kept.items()})
    (ckpt_copy / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match=rf"tensor '{name}' required by config.json is missing"):
        open_checkpoint(ckpt_copy)


@pytest.mark.parametrize(
    "change, message",
    [
        ({"architectures": ["LlavaForConditionalGeneration"], "model_type": "llava"}, "unknown architecture 'Llava"),
        ({"architectures": None, "model_type": "mystery"}, "unknown architecture None / model_type 'mystery'"),
        ({"llm_config": None}, r"llm_config: expected a mapping"),
        ({"downsample_ratio": "half"}, r"field 'downsample_ratio' should be float"),
    ],
)
def test_bad_config_fields(ckpt_copy, change, message):
    config = json.loads((ckpt_copy / "config.json").read_text())
    config.update(change)
    (ckpt_copy / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match=message) as e:
        load_config(ckpt_copy)
    assert "config.json" in str(e.value)


def test_missing_and_mistyped_nested_fields(ckpt_copy):
    config = json.loads((ckpt_copy / "config.json").read_text())
    del config["vision_config"]["num_attention_heads"]
    config["llm_config"]["num_hidden_layers"] = True
    (ckpt_copy / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match=r"llm_config: field 'num_hidden_layers' should be int, got bool"):
        load_config(ckpt_copy)
    config["llm_config"]["num_hidden_layers"] = 2
    (ckpt_copy / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match=r"vision_config: missing required field 'num_attention_heads'"):
        load_config(ckpt_copy)


def test_missing_tokenizer(ckpt_copy):
    (ckpt_copy / "tokenizer.json").unlink()
    with pytest.raises(CheckpointError, match="missing tokenizer: neither tokenizer.json nor vocab.json"):
        open_checkpoint(ckpt_copy)


def test_missing_config_and_broken_json(ckpt_copy, tmp_path):
    (ckpt_copy / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match=r"config.json: not valid JSON"):
        open_checkpoint(ckpt_copy)
    with pytest.raises(CheckpointError, match="config.json not found"):
        load_config(tmp_path)
    with pytest.raises(CheckpointError, match="not a checkpoint directory"):
        open_checkpoint(tmp_path / "nowhere")


def test_unknown_tensor_name_is_an_error(tiny_6b):
    with open_checkpoint(tiny_6b) as ckpt, pytest.raises(CheckpointError, match="no tensor named 'nope'"):
        ckpt.raw("nope")


def test_tiny_factory_is_deterministic_and_validates_sizes(tmp_path):
    a = make_tiny_checkpoint(tmp_path / "a", seed=3)
    b = make_tiny_checkpoint(tmp_path / "b", seed=3)
    for file in sorted(p.name for p in a.iterdir()):
        assert (a / file).read_bytes() == (b / file).read_bytes(), file
    with pytest.raises(TypeError, match="unknown size"):
        make_tiny_checkpoint(tmp_path / "c", hidden=3)
    assert not (tmp_path / "c").exists() and not (tmp_path / "c.partial").exists()
    big = make_tiny_checkpoint(tmp_path / "d", vit="300m", llm_layers=3, vit_layers=1, llm_hidden=96)
    cfg = load_config(big)
    assert (cfg.llm.num_hidden_layers, cfg.vision.num_hidden_layers, cfg.llm.hidden_size) == (3, 1, 96)
    assert cfg.vision.norm_type == "layer_norm" and cfg.vision.qkv_bias and not cfg.vision.qk_normalization
