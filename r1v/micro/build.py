"""What the micro-r1v model is made of: its tokenizer, its config.json, its prompts, and the writer of a
standard R1V checkpoint directory from trained weights.

The config is the tiny-checkpoint factory's (`r1v.testing.tiny.tiny_config`) at the micro sizes, with the
InternViT-300M flavour (LayerNorm, qkv bias, no qk norm): the one stock llama.cpp runs at a small size.
"""
from __future__ import annotations

import json
import shutil
from dataclasses import asdict
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from r1v.testing.tiny import TinySizes, _write_tokenizer_config, tiny_config, write_shards
from r1v.testing.tokenizer import _CORPUS, build_tokenizer

from . import task
from .settings import MicroSizes

VIT = "300m"
VOCAB_SIZE = 512  # BPE size before the added tokens; the config's table is padded to a multiple of 64
MAX_SHARD_BYTES = 4 * 1024 * 1024
TOKENIZER_CORPUS_ITEMS = 3000
TOKENS_PER_TILE = (task.SIZE // 14) ** 2 // 4  # 14-pixel patches, pixel shuffle 0.5


def tiny_sizes(sizes: MicroSizes) -> TinySizes:
    return TinySizes(**asdict(sizes), vocab_size=VOCAB_SIZE, image_size=task.SIZE, patch_size=14,
                     max_dynamic_patch=12)


def build_micro_tokenizer():  # -> tokenizers.Tokenizer
    """Byte-level BPE (Qwen2 pre-tokenizer) trained on the task's own text, so its words are few tokens,
    plus the generic corpus of the test tokenizer; with the R1V special tokens. Deterministic."""
    texts = task.corpus(TOKENIZER_CORPUS_ITEMS, seed=task.SPLITS["train"][0]) + ["user\nassistant\n"] * 50
    return build_tokenizer(VOCAB_SIZE, corpus=texts + _CORPUS * 4)


def special_ids(tokenizer: Any) -> dict[str, int]:
    return {t: tokenizer.token_to_id(t) for t in ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<IMG_CONTEXT>",
                                                   "<img>", "</img>", "<think>", "</think>")}


def micro_config(tokenizer: Any, sizes: MicroSizes = MicroSizes()) -> dict[str, Any]:
    """config.json of micro-r1v (an R1V3-shaped config at the micro sizes)."""
    n_tokens = tokenizer.get_vocab_size(with_added_tokens=True)
    vocab_size = -(-n_tokens // 64) * 64
    config = tiny_config(tiny_sizes(sizes), VIT, vocab_size, special_ids(tokenizer))
    config["llm_config"]["max_position_embeddings"] = 32768  # as Qwen2; r1v loads with an 8k context by default
    return config


# ------------------------------------------------------------------------------------------------
# Prompts
# ------------------------------------------------------------------------------------------------

def prompt_text(question: str, has_image: bool, tokens_per_tile: int = TOKENS_PER_TILE, tiles: int = 1) -> str:
    """The chatml-think prompt of one question, `<image>` already expanded to `<img>`+context+`</img>`."""
    from r1v.converters.gguf_vocab import render_chat_template
    from r1v.converters.resources import chat_template

    content = f"<image>\n{question}" if has_image else question
    text = render_chat_template(chat_template("chatml-think"), [{"role": "user", "content": content}])
    return text.replace("<image>", "<img>" + "<IMG_CONTEXT>" * (tokens_per_tile * tiles) + "</img>", 1)


def encode(tokenizer: Any, text: str) -> list[int]:
    return tokenizer.encode(text, add_special_tokens=False).ids


# ------------------------------------------------------------------------------------------------
# Writing the checkpoint
# ------------------------------------------------------------------------------------------------

def write_checkpoint(
    out: str | Path,
    tensors: Mapping[str, np.ndarray],
    config: dict[str, Any],
    tokenizer: Any,
    info: dict[str, Any] | None = None,
    max_shard_bytes: int = MAX_SHARD_BYTES,
) -> Path:
    """Write a standard R1V checkpoint directory: config.json, bf16 safetensors shards + index,
    tokenizer.json, tokenizer_config.json (chatml-think template), generation_config.json,
    preprocessor_config.json (what stock llama.cpp's converter reads) and `micro_r1v.json` (`info`).

    Built under a temporary name and renamed when complete. `tensors` are float32 arrays by name."""
    from r1v.converters.config import parse_config
    from r1v.runtime.image import IMAGENET_MEAN, IMAGENET_STD

    out = Path(out)
    tmp = out.with_name(out.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        cfg = parse_config(config)
        expected = cfg.family.expected_shapes(cfg)
        missing = sorted(set(expected) - set(tensors))  # (a tied lm_head is not expected: not written)
        if missing:
            raise ValueError(f"tensors the config needs are missing: {missing[:4]}")
        for name, shape in expected.items():
            if tuple(tensors[name].shape) != tuple(shape):
                raise ValueError(f"{name}: shape {tuple(tensors[name].shape)}, config wants {tuple(shape)}")
        write_shards(tmp, expected, lambda n: tensors[n], "BF16", max_shard_bytes)
        (tmp / "config.json").write_text(json.dumps(config, indent=2))
        tokenizer.save(str(tmp / "tokenizer.json"))
        _write_tokenizer_config(tmp, tokenizer)
        special = special_ids(tokenizer)
        generation = {
            "bos_token_id": special["<|endoftext|>"],
            "eos_token_id": [special["<|im_end|>"], special["<|endoftext|>"]],
            "do_sample": False,  # the task has one right answer: greedy
            "max_new_tokens": 64,
        }
        (tmp / "generation_config.json").write_text(json.dumps(generation, indent=2))
        pre = {"image_mean": list(IMAGENET_MEAN), "image_std": list(IMAGENET_STD), "crop_size": task.SIZE,
               "size": task.SIZE}
        (tmp / "preprocessor_config.json").write_text(json.dumps(pre, indent=2))
        if info is not None:
            (tmp / "micro_r1v.json").write_text(json.dumps(info, indent=2))
        if out.exists():
            shutil.rmtree(out)
        tmp.rename(out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out
