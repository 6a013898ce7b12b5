"""The Skywork-R1V / InternVL-chat layout: InternViT + mlp1 projector + Qwen2 under one config.

`internvl_chat` is an alias: Skywork's AWQ releases and InternVL's own checkpoints use the same tensor names.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Protocol


class FamilyConfig(Protocol):
    """What a family reads of a parsed config: converters/config.py's `R1VConfig`, which holds its family, so
    the family sees it through this protocol and config.py alone imports the other."""

    llm: Any  # Qwen2Config
    vision: Any  # VisionConfig

    @property
    def projector_input_size(self) -> int: ...


# Which component a tensor belongs to, by name prefix (checked in order).
COMPONENT_PREFIXES: tuple[tuple[str, str], ...] = (
    ("vision_model.", "vision"),
    ("mlp1.", "projector"),
    ("language_model.model.embed_tokens.", "embeddings"),
    ("language_model.lm_head.", "lm_head"),
    ("language_model.", "llm"),
)


def _vision_layer(cfg: FamilyConfig) -> dict[str, tuple[int, ...]]:
    v = cfg.vision
    h, i = v.hidden_size, v.intermediate_size
    shapes: dict[str, tuple[int, ...]] = {
        "norm1.weight": (h,), "norm2.weight": (h,),
        "attn.qkv.weight": (3 * h, h), "attn.proj.weight": (h, h), "attn.proj.bias": (h,),
        "mlp.fc1.weight": (i, h), "mlp.fc1.bias": (i,), "mlp.fc2.weight": (h, i), "mlp.fc2.bias": (h,),
        "ls1": (h,), "ls2": (h,),
    }
    if v.norm_type == "layer_norm":
        shapes.update({"norm1.bias": (h,), "norm2.bias": (h,)})
    if v.qkv_bias:
        shapes["attn.qkv.bias"] = (3 * h,)
    if v.qk_normalization:
        shapes.update({"attn.q_norm.weight": (h,), "attn.k_norm.weight": (h,)})
        if v.norm_type == "layer_norm":
            shapes.update({"attn.q_norm.bias": (h,), "attn.k_norm.bias": (h,)})
    return shapes


def _llm_layer(cfg: FamilyConfig) -> dict[str, tuple[int, ...]]:
    t = cfg.llm
    h, i, d = t.hidden_size, t.intermediate_size, t.head_dim
    q, kv = t.num_attention_heads * d, t.num_key_value_heads * d
    return {
        "input_layernorm.weight": (h,), "post_attention_layernorm.weight": (h,),
        "self_attn.q_proj.weight": (q, h), "self_attn.q_proj.bias": (q,),
        "self_attn.k_proj.weight": (kv, h), "self_attn.k_proj.bias": (kv,),
        "self_attn.v_proj.weight": (kv, h), "self_attn.v_proj.bias": (kv,),
        "self_attn.o_proj.weight": (h, q),
        "mlp.gate_proj.weight": (i, h), "mlp.up_proj.weight": (i, h), "mlp.down_proj.weight": (h, i),
    }


def expected_shapes(cfg: FamilyConfig) -> dict[str, tuple[int, ...]]:
    """Every tensor a complete checkpoint of this config holds, with its shape."""
    v, t = cfg.vision, cfg.llm
    h, p = v.hidden_size, v.patch_size
    shapes: dict[str, tuple[int, ...]] = {
        "vision_model.embeddings.class_embedding": (1, 1, h),
        "vision_model.embeddings.patch_embedding.weight": (h, v.num_channels, p, p),
        "vision_model.embeddings.patch_embedding.bias": (h,),
        "vision_model.embeddings.position_embedding": (1, v.num_patches + 1, h),
        "mlp1.0.weight": (cfg.projector_input_size,), "mlp1.0.bias": (cfg.projector_input_size,),
        "mlp1.1.weight": (t.hidden_size, cfg.projector_input_size), "mlp1.1.bias": (t.hidden_size,),
        "mlp1.3.weight": (t.hidden_size, t.hidden_size), "mlp1.3.bias": (t.hidden_size,),
        "language_model.model.embed_tokens.weight": (t.vocab_size, t.hidden_size),
        "language_model.model.norm.weight": (t.hidden_size,),
    }
    if not t.tie_word_embeddings:
        shapes["language_model.lm_head.weight"] = (t.vocab_size, t.hidden_size)
    for layer in range(v.num_hidden_layers):
        for name, shape in _vision_layer(cfg).items():
            shapes[f"vision_model.encoder.layers.{layer}.{name}"] = shape
    for layer in range(t.num_hidden_layers):
        for name, shape in _llm_layer(cfg).items():
            shapes[f"language_model.model.layers.{layer}.{name}"] = shape
    return shapes


def layer_stacks(cfg: FamilyConfig) -> tuple[LayerStack, ...]:
    """The stacks of numbered layers and the depth config.json gives each."""
    return (
        LayerStack("llm_config.num_hidden_layers", "language_model.model.layers.", cfg.llm.num_hidden_layers),
        LayerStack("vision_config.num_hidden_layers", "vision_model.encoder.layers.", cfg.vision.num_hidden_layers),
    )


def component_of(tensor_name: str) -> str:
    """'vision', 'projector', 'embeddings', 'lm_head' or 'llm' (decoder layers + final norm)."""
    for prefix, component in COMPONENT_PREFIXES:
        if tensor_name.startswith(prefix):
            return component
    return "other"


@dataclass(frozen=True)
class LayerStack:
    """Layers `{prefix}{i}.*` for i in range(depth); `field` is the config.json field giving the depth."""

    field: str
    prefix: str
    depth: int


@dataclass(frozen=True)
class Family:
    name: str
    architectures: tuple[str, ...]
    model_types: tuple[str, ...]
    expected_shapes: Callable[[FamilyConfig], dict[str, tuple[int, ...]]]
    component_of: Callable[[str], str]
    layer_stacks: Callable[[FamilyConfig], tuple[LayerStack, ...]]


SKYWORK_CHAT = Family(
    name="skywork_chat",
    architectures=("SkyworkR1VChatModel", "InternVLChatModel"),
    model_types=("skywork_chat", "internvl_chat"),
    expected_shapes=expected_shapes,
    component_of=component_of,
    layer_stacks=layer_stacks,
)
