"""The R1V / InternVL-chat model in torch (InternViT + mlp1 + Qwen2): the model the AWQ backend runs (with
quantized linears swapped in), the one AWQ calibration and micro-r1v training run, and the oracle the GGUF
path is held to.

Plain, readable torch with the checkpoint's own tensor names. Never imports transformers.
- `vision`: InternViT; `projector`: pixel shuffle + mlp1; `qwen2`: the language model and its KV cache;
  `multimodal`: the three joined (`R1VModel`), weights loaded by name; `decode`: fixed-shape decode (CUDA graphs).
"""
from .multimodal import IMG_CONTEXT, R1VModel, load_weights
from .projector import Projector, extract_feature, pixel_shuffle
from .qwen2 import (KVCache, LinearFactory, Qwen2ForCausalLM, Qwen2Model, RMSNorm, RotaryEmbedding, StaticStep,
                    apply_rope)
from .vision import InternViT

__all__ = [
    "IMG_CONTEXT",
    "InternViT",
    "KVCache",
    "LinearFactory",
    "Projector",
    "Qwen2ForCausalLM",
    "Qwen2Model",
    "R1VModel",
    "RMSNorm",
    "RotaryEmbedding",
    "StaticStep",
    "apply_rope",
    "extract_feature",
    "load_weights",
    "pixel_shuffle",
]
