"""config.json of a Skywork-R1V / InternVL-chat checkpoint, parsed into dataclasses.

Only the fields the product uses are kept; the original dict stays in `raw` so nothing is lost when a
converter copies the config onward. Every error names the file and the field.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from ..schema import from_dict
from .errors import CheckpointError
from .families import Family, family_for


@dataclass(frozen=True)
class Qwen2Config:
    """`llm_config`: a Qwen2ForCausalLM config."""

    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    vocab_size: int
    rope_theta: float = 1_000_000.0
    rms_norm_eps: float = 1e-6
    max_position_embeddings: int = 32768
    tie_word_embeddings: bool = False
    hidden_act: str = "silu"
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None
    rope_scaling: dict[str, Any] | None = None

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads


@dataclass(frozen=True)
class VisionConfig:
    """`vision_config`: an InternVisionModel config (InternViT-300M or -6B)."""

    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    intermediate_size: int
    image_size: int = 448
    patch_size: int = 14
    num_channels: int = 3
    norm_type: str = "layer_norm"  # "rms_norm" for InternViT-6B
    qk_normalization: bool = False
    qkv_bias: bool = True
    layer_norm_eps: float = 1e-6
    hidden_act: str = "gelu"
    initializer_factor: float = 1.0  # layer-scale init; ls1/ls2 always exist in InternViT

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2


@dataclass(frozen=True)
class R1VConfig:
    """The whole multimodal checkpoint config (top level of config.json)."""

    architecture: str
    model_type: str
    family: Family
    llm: Qwen2Config
    vision: VisionConfig
    downsample_ratio: float = 0.5
    ps_version: str = "v2"
    select_layer: int = -1
    template: str | None = None
    min_dynamic_patch: int = 1
    max_dynamic_patch: int = 12
    use_thumbnail: bool = True
    force_image_size: int | None = None
    raw: dict[str, Any] = field(default_factory=dict, repr=False, compare=False)
    sha256: str = field(default="", compare=False)

    @property
    def image_size(self) -> int:
        return self.force_image_size or self.vision.image_size

    @property
    def tokens_per_tile(self) -> int:
        """LLM tokens one 448 tile becomes after pixel shuffle (256 for R1V)."""
        side = self.image_size // self.vision.patch_size
        return int(side * self.downsample_ratio) ** 2

    @property
    def projector_input_size(self) -> int:
        return int(self.vision.hidden_size / (self.downsample_ratio**2))


def _build(cls: type, data: Any, where: str, **given: Any) -> Any:
    return from_dict(cls, data, where, error=CheckpointError, **given)


def parse_config(data: dict[str, Any], source: str = "config.json") -> R1VConfig:
    """Parse a config.json dict; `source` names the file in errors."""
    archs = data.get("architectures")
    arch = archs[0] if isinstance(archs, list) and archs else None
    model_type = data.get("model_type")
    family = family_for(arch, model_type)
    if family is None:
        raise CheckpointError(
            f"{source}: unknown architecture {arch!r} / model_type {model_type!r}; "
            "expected SkyworkR1VChatModel or InternVLChatModel (skywork_chat / internvl_chat)"
        )
    for key in ("llm_config", "vision_config"):
        if key not in data:
            raise CheckpointError(f"{source}: missing required field {key!r}")
    llm = _build(Qwen2Config, data["llm_config"], f"{source}: llm_config")
    vision = _build(VisionConfig, data["vision_config"], f"{source}: vision_config")
    if vision.norm_type not in ("rms_norm", "layer_norm"):
        raise CheckpointError(
            f"{source}: vision_config.norm_type {vision.norm_type!r} is neither rms_norm nor layer_norm"
        )
    for name, sub in (("llm_config", llm), ("vision_config", vision)):
        if sub.hidden_size % sub.num_attention_heads:
            raise CheckpointError(
                f"{source}: {name}.hidden_size {sub.hidden_size} is not a multiple of "
                f"num_attention_heads {sub.num_attention_heads}"
            )
    return _build(
        R1VConfig, data, source,
        architecture=arch, model_type=model_type, family=family, llm=llm, vision=vision, raw=data,
    )


def load_config(path: str | Path) -> R1VConfig:
    """Read and parse `path` (a config.json file or a directory holding one)."""
    path = Path(path)
    if path.is_dir():
        path = path / "config.json"
    if not path.is_file():
        raise CheckpointError(f"{path}: config.json not found")
    text = path.read_bytes()
    try:
        data = json.loads(text)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{path}: expected a JSON object at the top level")
    return replace(parse_config(data, str(path)), sha256=hashlib.sha256(text).hexdigest())
