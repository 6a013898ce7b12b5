"""Tiny checkpoints with the exact Skywork-R1V layout: config, sharded safetensors + index, tokenizer,
generation config. A few MB, seeded, so tests and benchmarks never need a download."""
from __future__ import annotations

import json
import shutil
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Any, Callable, Literal

import numpy as np

from r1v.converters.config import parse_config
from r1v.converters.safetensors_io import write_safetensors
from r1v.converters.resources import chat_template

from .tokenizer import build_tokenizer


@dataclass(frozen=True)
class TinySizes:
    """Model sizes of a generated checkpoint; defaults give a ~2 MB model that runs in milliseconds."""

    llm_hidden: int = 64
    llm_intermediate: int = 160
    llm_layers: int = 2
    llm_heads: int = 4
    llm_kv_heads: int = 2
    vocab_size: int = 512  # BPE merges trained up to this; config vocab is padded above the added tokens
    padded_vocab: int = 0  # config vocab (embedding rows) at least this: a real model's table size for benchmarks
    vit_hidden: int = 32
    vit_intermediate: int = 96
    vit_layers: int = 2
    vit_heads: int = 2
    image_size: int = 448
    patch_size: int = 14
    max_dynamic_patch: int = 12
    tie_word_embeddings: bool = False
    max_shard_bytes: int = 256 * 1024  # small, so even the default checkpoint is sharded


# The two InternViT flavours: the 6B (R1V) and the 300M (smaller InternVL-chat models; what stock
# llama.cpp can run at any size).
VIT_VARIANTS: dict[str, dict[str, Any]] = {
    "6b": {"norm_type": "rms_norm", "qk_normalization": True, "qkv_bias": False, "model_type": "intern_vit_6b"},
    "300m": {"norm_type": "layer_norm", "qk_normalization": False, "qkv_bias": True, "model_type": "intern_vit_300m"},
}
DTYPES = {"bf16": "BF16", "f16": "F16", "f32": "F32"}


def tiny_config(sizes: TinySizes, vit: str, vocab_size: int, special: dict[str, int]) -> dict[str, Any]:
    """config.json for the given sizes, shaped like Skywork-R1V3-38B's."""
    variant = VIT_VARIANTS[vit]
    return {
        "architectures": ["SkyworkR1VChatModel"],
        "model_type": "skywork_chat",
        "downsample_ratio": 0.5,
        "ps_version": "v2",
        "select_layer": -1,
        "template": "chatml-think",
        "min_dynamic_patch": 1,
        "max_dynamic_patch": sizes.max_dynamic_patch,
        "dynamic_image_size": True,
        "use_thumbnail": True,
        "force_image_size": sizes.image_size,
        "torch_dtype": "bfloat16",
        "llm_config": {
            "architectures": ["Qwen2ForCausalLM"],
            "model_type": "qwen2",
            "hidden_size": sizes.llm_hidden,
            "intermediate_size": sizes.llm_intermediate,
            "num_hidden_layers": sizes.llm_layers,
            "num_attention_heads": sizes.llm_heads,
            "num_key_value_heads": sizes.llm_kv_heads,
            "vocab_size": vocab_size,
            "rope_theta": 1000000.0,
            "rms_norm_eps": 1e-6,
            "max_position_embeddings": 8192,
            "tie_word_embeddings": sizes.tie_word_embeddings,
            "hidden_act": "silu",
            "use_sliding_window": False,
            "bos_token_id": special["<|endoftext|>"],
            "eos_token_id": special["<|im_end|>"],
            "torch_dtype": "bfloat16",
        },
        "vision_config": {
            "architectures": ["InternVisionModel"],
            "model_type": variant["model_type"],
            "hidden_size": sizes.vit_hidden,
            "intermediate_size": sizes.vit_intermediate,
            "num_hidden_layers": sizes.vit_layers,
            "num_attention_heads": sizes.vit_heads,
            "image_size": sizes.image_size,
            "patch_size": sizes.patch_size,
            "num_channels": 3,
            "norm_type": variant["norm_type"],
            "qk_normalization": variant["qk_normalization"],
            "qkv_bias": variant["qkv_bias"],
            "layer_norm_eps": 1e-6,
            "hidden_act": "gelu",
            "initializer_factor": 0.1,
            "drop_path_rate": 0.0,
            "use_flash_attn": False,
            "torch_dtype": "bfloat16",
        },
    }


def _random_tensor(rng: np.random.Generator, name: str, shape: tuple[int, ...]) -> np.ndarray:
    """Weights of a plausible scale: norms near 1, layer scales near 0.5, linears ~ 1/sqrt(fan_in)."""
    if name.endswith(("norm1.weight", "norm2.weight", "_norm.weight", "layernorm.weight", "norm.weight",
                      "mlp1.0.weight")):
        return 1.0 + 0.1 * rng.standard_normal(shape)
    if name.endswith(("ls1", "ls2")):
        return 0.5 + 0.1 * rng.standard_normal(shape)
    if name.endswith(".bias") or len(shape) == 1:
        return 0.02 * rng.standard_normal(shape)
    fan_in = int(np.prod(shape[1:])) if len(shape) > 1 else shape[0]
    if name.endswith(("class_embedding", "position_embedding", "embed_tokens.weight")):
        fan_in = 1
    return rng.standard_normal(shape) / np.sqrt(fan_in)


def write_shards(
    out: Path, shapes: dict[str, tuple[int, ...]], produce: Callable[[str], np.ndarray], dtype: str,
    max_shard_bytes: int,
) -> None:
    """Write `model-0000i-of-0000n.safetensors` shards + index in the order of `shapes`, asking `produce`
    for each tensor as its shard is written, so a multi-GB benchmark checkpoint needs one shard in memory."""
    itemsize = 4 if dtype == "F32" else 2
    shards: list[list[str]] = [[]]
    size = 0
    for name, shape in shapes.items():
        nbytes = int(np.prod(shape)) * itemsize
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += nbytes
    weight_map: dict[str, str] = {}
    for i, names in enumerate(shards, 1):
        file = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        tensors = {n: (dtype, np.asarray(produce(n), np.float32)) for n in names}
        write_safetensors(out / file, tensors, {"format": "pt"})
        weight_map.update(dict.fromkeys(names, file))
    total = sum(int(np.prod(shape)) * itemsize for shape in shapes.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))


def make_tiny_checkpoint(
    path: str | Path,
    vit: Literal["6b", "300m"] = "6b",
    seed: int = 0,
    dtype: Literal["bf16", "f16", "f32"] = "bf16",
    **sizes: Any,
) -> Path:
    """Write a complete R1V-layout checkpoint to directory `path` and return it.

    `sizes` override TinySizes fields (unknown names are a TypeError). The directory is built under a
    temporary name and renamed when complete.
    """
    if vit not in VIT_VARIANTS:
        raise ValueError(f"vit must be one of {sorted(VIT_VARIANTS)}, got {vit!r}")
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    known = {f.name for f in fields(TinySizes)}
    unknown = sorted(set(sizes) - known)
    if unknown:
        raise TypeError(f"make_tiny_checkpoint: unknown size(s) {unknown}; known: {sorted(known)}")
    spec = replace(TinySizes(), **sizes)

    out = Path(path)
    tmp = out.with_name(out.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        tokenizer = build_tokenizer(spec.vocab_size)
        special = {t: tokenizer.token_to_id(t) for t in ("<|endoftext|>", "<|im_start|>", "<|im_end|>")}
        n_tokens = tokenizer.get_vocab_size(with_added_tokens=True)
        vocab_size = max(-(-n_tokens // 64) * 64, spec.padded_vocab)  # padded like Qwen's embedding table
        config = tiny_config(spec, vit, vocab_size, special)
        cfg = parse_config(config, str(tmp / "config.json"))
        rng = np.random.default_rng(seed)  # tensors drawn in name order: the content depends only on the seed
        shapes = cfg.family.expected_shapes(cfg)
        write_shards(tmp, shapes, lambda n: _random_tensor(rng, n, shapes[n]), DTYPES[dtype], spec.max_shard_bytes)
        (tmp / "config.json").write_text(json.dumps(config, indent=2))
        tokenizer.save(str(tmp / "tokenizer.json"))
        _write_tokenizer_config(tmp, tokenizer)
        generation = {
            "bos_token_id": special["<|endoftext|>"],
            "eos_token_id": [special["<|im_end|>"], special["<|endoftext|>"]],
            "do_sample": True, "temperature": 0.6, "top_p": 0.95, "repetition_penalty": 1.05,
        }
        (tmp / "generation_config.json").write_text(json.dumps(generation, indent=2))
        (tmp / "r1v_tiny.json").write_text(json.dumps({"vit": vit, "seed": seed, "dtype": dtype, **asdict(spec)}))
        if out.exists():
            shutil.rmtree(out)
        tmp.rename(out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def _write_tokenizer_config(out: Path, tokenizer: Any) -> None:
    decoder = {
        str(token_id): {"content": token.content, "special": token.special, "normalized": False,
                        "lstrip": False, "rstrip": False, "single_word": False}
        for token_id, token in sorted(tokenizer.get_added_tokens_decoder().items())
    }
    config = {
        "tokenizer_class": "Qwen2Tokenizer",
        "model_max_length": 8192,
        "bos_token": None,
        "eos_token": "<|im_end|>",
        "pad_token": "<|endoftext|>",
        "unk_token": None,
        "add_bos_token": False,
        "clean_up_tokenization_spaces": False,
        "added_tokens_decoder": decoder,
        "chat_template": chat_template("chatml-think"),
    }
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False))
