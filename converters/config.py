"""config.json of a Skywork-R1V / InternVL-chat checkpoint, parsed into dataclasses.

Only the fields the product uses are kept; the original dict stays in `raw` so nothing is lost when a
converter copies the config onward. Every error names the file and the field.
"""
from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from .schema import from_dict
from .errors import CheckpointError
from .families import Family, family_for

# The ViT's pixel normalization: torchvision / InternVL constants (``IMAGENET_MEAN``/``IMAGENET_STD`` in
# InternVL's chat scripts), used when preprocessor_config.json gives none. The converter writes them into the
# mmproj and runtime/image.py normalizes tiles with them.
IMAGENET_MEAN: tuple[float, float, float] = (0.485, 0.456, 0.406)
IMAGENET_STD: tuple[float, float, float] = (0.229, 0.224, 0.225)


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
    config = _build(
        R1VConfig, data, source,
        architecture=arch, model_type=model_type, family=family, llm=llm, vision=vision, raw=data,
    )
    check_values(config, source)
    return config


# Deeper stacks than any real model (the largest LLMs have ~130 layers): a bigger count is a typo, and
# planning it would build a tensor table of billions of entries before anything else could object.
MAX_LAYERS = 1024
GGUF_MAGIC = b"GGUF"
# Token-id fields of llm_config / generation_config.json that the converters and runtimes read.
TOKEN_ID_FIELDS = ("bos_token_id", "eos_token_id", "pad_token_id", "unk_token_id")


def check_values(config: R1VConfig, source: str = "config.json") -> None:
    """Refuse values that would divide by zero, allocate without bound or pass nonsense into an output file,
    naming the field: sizes and counts positive, epsilons finite and positive, heads dividing the width,
    token ids integers inside the vocabulary."""
    llm, vision = config.llm, config.vision
    positive = {
        "llm_config": ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                       "num_key_value_heads", "vocab_size", "max_position_embeddings"),
        "vision_config": ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                          "image_size", "patch_size", "num_channels"),
    }
    for name, sub in (("llm_config", llm), ("vision_config", vision)):
        for key in positive[name]:
            value = getattr(sub, key)
            if value < 1:
                raise CheckpointError(f"{source}: {name}.{key} must be a positive integer, got {value}")
        if sub.num_hidden_layers > MAX_LAYERS:
            raise CheckpointError(f"{source}: {name}.num_hidden_layers {sub.num_hidden_layers} is implausible "
                                  f"(more than {MAX_LAYERS} layers)")
        if sub.hidden_size % sub.num_attention_heads:
            raise CheckpointError(
                f"{source}: {name}.hidden_size {sub.hidden_size} is not a multiple of "
                f"num_attention_heads {sub.num_attention_heads}"
            )
    if llm.num_attention_heads % llm.num_key_value_heads:
        raise CheckpointError(f"{source}: llm_config.num_attention_heads {llm.num_attention_heads} is not a "
                              f"multiple of num_key_value_heads {llm.num_key_value_heads}")
    for where, value in (("llm_config.rms_norm_eps", llm.rms_norm_eps), ("llm_config.rope_theta", llm.rope_theta),
                         ("vision_config.layer_norm_eps", vision.layer_norm_eps)):
        if not (math.isfinite(value) and value > 0):
            raise CheckpointError(f"{source}: {where} must be a finite number > 0, got {value}")
    if config.force_image_size is not None and config.force_image_size < 1:
        raise CheckpointError(f"{source}: force_image_size must be a positive integer, got {config.force_image_size}")
    side = config.image_size // vision.patch_size
    if side < 1:
        raise CheckpointError(f"{source}: the image size {config.image_size} is smaller than "
                              f"vision_config.patch_size {vision.patch_size}")
    ratio = config.downsample_ratio
    if not (math.isfinite(ratio) and 0 < ratio <= 1) or int(side * ratio) < 1:
        raise CheckpointError(f"{source}: downsample_ratio must be in (0, 1] and leave at least one token of the "
                              f"{side}x{side} patch grid, got {ratio}")
    if not 1 <= config.min_dynamic_patch <= config.max_dynamic_patch:
        raise CheckpointError(f"{source}: need 1 <= min_dynamic_patch <= max_dynamic_patch, got "
                              f"{config.min_dynamic_patch} and {config.max_dynamic_patch}")
    depth = vision.num_hidden_layers
    if not -(depth + 1) <= config.select_layer <= depth:
        raise CheckpointError(f"{source}: select_layer {config.select_layer} names no output of the "
                              f"{depth}-layer vision tower")
    check_token_ids(config.raw.get("llm_config") or {}, f"{source}: llm_config", llm.vocab_size)


def check_token_ids(data: dict[str, Any], where: str, vocab_size: int) -> None:
    """bos/eos/pad/unk token ids of a config dict: absent, or an integer (or a list of them, as eos may be)
    in [0, vocab_size)."""
    for key in TOKEN_ID_FIELDS:
        value = data.get(key)
        if value is None:
            continue
        ids = value if isinstance(value, list) else [value]
        for token_id in ids:
            if isinstance(token_id, bool) or not isinstance(token_id, int):
                raise CheckpointError(f"{where}: {key} must be an integer token id or a list of them, "
                                      f"got {value!r}")
            if not 0 <= token_id < vocab_size:
                raise CheckpointError(f"{where}: {key} {token_id} is outside the vocabulary "
                                      f"(llm_config.vocab_size {vocab_size})")


def load_config(path: str | Path) -> R1VConfig:
    """Read and parse `path` (a config.json file or a directory holding one)."""
    path = Path(path)
    if path.is_dir():
        path = path / "config.json"
    if not path.is_file():
        raise CheckpointError(f"{path}: config.json not found")
    text = path.read_bytes()
    if text.startswith(GGUF_MAGIC):
        raise CheckpointError(f"{path}: is a GGUF file, not a config.json; give the checkpoint directory or "
                              "its config.json")
    try:
        data = json.loads(text.decode("utf-8-sig"))
    except UnicodeDecodeError:
        raise CheckpointError(f"{path}: not a config.json (binary, not UTF-8 text)") from None
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{path}: expected a JSON object at the top level")
    return replace(parse_config(data, str(path)), sha256=hashlib.sha256(text).hexdigest())
