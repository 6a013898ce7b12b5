"""The tiny models several test files share: what each one is (flavour, sizes, seed, quants) and its builder.

tests/conftest.py builds each once per session, on first use, as a fixture; the files read them and copy one to
tmp_path before editing it. A file that needs a variant (another seed, a mutated copy) calls the builder itself.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from r1v.testing import make_tiny_checkpoint

# The runtime tests' model (llama.cpp and torch backends, server, batch, prefix cache, tile budget, faults): the
# 300M-flavour ViT (what stock llama.cpp runs) and a 3-layer LLM 256 wide; f32, so the torch reference is exact.
# Seed 8: the reference's greedy paths for tests/test_runtime_llamacpp.py's prompts have no near-ties (smallest
# top-1/top-2 logit margins over 32 steps: text 0.030, 448x448 0.011, 896x448 0.051; F16 logit errors are ~0.004).
# Seeds 0, 5 and 10 have margins of 0.001-0.003 on one of them and do flip a token.
R1V_SIZES: dict[str, Any] = dict(llm_hidden=256, llm_intermediate=512, llm_layers=3, llm_heads=4, llm_kv_heads=2,
                                 vit_hidden=64, vit_intermediate=128, vit_heads=4, vit_layers=2)
R1V_SEED = 8
# Its GGUF files: F16 for the runtime tests, Q8_0 as another model file beside the same projector (prefix cache).
R1V_QUANTS = ("f16", "q8_0")

# The same model converted by `r1v convert awq` (RTN, group 32, default fp16 vision tower): the AWQ backend beside
# llama.cpp's on one checkpoint.
R1V_AWQ_RUN: dict[str, Any] = dict(group_size=32, n_samples=2, seq_len=320, method="rtn", progress=False)

# The AWQ tests' source: the InternViT-6B flavour with 224-pixel tiles (64 image tokens per tile), 2 LLM layers;
# converted by RTN with group 32 (the tiny rows are 64 and 160 wide).
AWQ_SOURCE: dict[str, Any] = dict(vit="6b", seed=3, image_size=224, llm_layers=2)
AWQ_RUN: dict[str, Any] = dict(group_size=32, n_samples=4, seq_len=160, method="rtn", progress=False)

# Rows of 256 and 512, so llama.cpp's k-quants (256-wide super-blocks) apply to the LLM; the 300M-flavour ViT so
# `convert gguf` writes an mmproj too.
K_QUANT_SIZES: dict[str, Any] = dict(llm_hidden=256, llm_intermediate=512, llm_layers=2, vit_hidden=64,
                                     vit_intermediate=128)

# The mmproj tests' model: 300M-flavour ViT 64 wide (multiples of 32: Q8_0 blocks apply to every ViT and projector
# matrix), 4 heads, 2 layers; the default tiny LLM; seed 3, f32.
MMPROJ_SOURCE: dict[str, Any] = dict(vit="300m", seed=3, dtype="f32", vit_hidden=64, vit_intermediate=128,
                                     vit_heads=4, vit_layers=2)

# Tied input/output embeddings: no lm_head tensor in the checkpoint, no output tensor in the GGUF.
TIED: dict[str, Any] = dict(vit="300m", seed=5, dtype="f32", tie_word_embeddings=True)


def tiny_r1v_checkpoint(path: Path, seed: int = R1V_SEED) -> Path:
    """The runtime tests' checkpoint at `path` (another seed: the same shapes with other weights)."""
    return make_tiny_checkpoint(path, vit="300m", seed=seed, dtype="f32", **R1V_SIZES)
