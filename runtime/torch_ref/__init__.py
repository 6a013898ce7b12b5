"""Reference torch implementation of the R1V / InternVL-chat model (InternViT + mlp1 + Qwen2).

Plain, readable torch with the checkpoint's own tensor names; the oracle the GGUF and AWQ paths are
held to, and the base the AWQ backend swaps quantized linears into. Never imports transformers.
"""
from .model import IMG_CONTEXT, R1VModel, load_weights
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
