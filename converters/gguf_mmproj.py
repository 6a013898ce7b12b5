"""The vision tower (InternViT) and its `mlp1` projector as an mmproj GGUF for stock llama.cpp (libmtmd).

The file holds what llama.cpp's own converter (`conversion/internvl.py`) writes for InternVL: architecture
`clip`, projector type `internvl`, the ViT hyper-parameters under `clip.vision.*`, the fused qkv split into
q/k/v, the position embedding kept F32, the same storage types. It is planned from the checkpoint's tensor
list and written one tensor at a time through `gguf_common.write_gguf`, so memory holds one source tensor
(a fused qkv is read once for its three parts) however large the ViT is.

Where it differs from llama.cpp's converter:
* it needs no `preprocessor_config.json` (InternVL's ImageNet mean/std are the default) and maps `mlp1.*`
  at any ViT depth;
* it stores the position embedding's CLS row last, because llama.cpp's InternVL graph appends the CLS token
  after the patches (see POSITION_ORDER); with the checkpoint's order every patch gets its neighbour's
  position there;
* it refuses a ViT that the InternVL graph (`tools/mtmd/models/internvl.cpp`) would run wrongly, instead of
  writing a file that loads and gives wrong embeddings: that graph picks RMS norm or LayerNorm by shape alone.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import gguf
import numpy as np

from .checkpoint import Checkpoint, read_json
from .config import IMAGENET_MEAN, IMAGENET_STD, R1VConfig, VisionConfig
from .errors import CheckpointError
from .gguf_common import (
    DIRECT_TYPES, FILE_TYPES, ConversionError, PlannedTensor, QType, add_provenance, storage_type, write_gguf,
)

ARCH = gguf.MODEL_ARCH_NAMES[gguf.MODEL_ARCH.MMPROJ]  # "clip"
PROJECTOR_TYPE = gguf.VisionProjectorType.INTERNVL  # "internvl"
MMPROJ_TYPES = ("f32", "f16", "q8_0")

# llama.cpp's InternVL graph: `norm_t = (n_embd == 3200 && n_layer == 45) ? RMS : NORMAL`, used for the block
# norms and, through build_vit, for attn q/k norms too.
RMS_NORM_SHAPE = (3200, 45)  # (vision hidden_size, num_hidden_layers) of InternViT-6B

# --- tensor names (data): checkpoint name -> GGUF name ----------------------------------------------------
# Block names are relative to vision_model.encoder.layers.{bid}.; {bid} is the ViT layer.
EMBEDDING_NAMES: dict[str, str] = {
    "vision_model.embeddings.patch_embedding.weight": "v.patch_embd.weight",
    "vision_model.embeddings.patch_embedding.bias": "v.patch_embd.bias",
    "vision_model.embeddings.class_embedding": "v.class_embd",
    "vision_model.embeddings.position_embedding": "v.position_embd.weight",
}
BLOCK_NAMES: dict[str, str] = {
    "norm1.weight": "v.blk.{bid}.ln1.weight",
    "norm1.bias": "v.blk.{bid}.ln1.bias",
    "attn.q_norm.weight": "v.blk.{bid}.attn_q_norm.weight",
    "attn.k_norm.weight": "v.blk.{bid}.attn_k_norm.weight",
    "attn.proj.weight": "v.blk.{bid}.attn_out.weight",
    "attn.proj.bias": "v.blk.{bid}.attn_out.bias",
    "ls1": "v.blk.{bid}.ls1.weight",
    "norm2.weight": "v.blk.{bid}.ln2.weight",
    "norm2.bias": "v.blk.{bid}.ln2.bias",
    "mlp.fc1.weight": "v.blk.{bid}.ffn_up.weight",
    "mlp.fc1.bias": "v.blk.{bid}.ffn_up.bias",
    "mlp.fc2.weight": "v.blk.{bid}.ffn_down.weight",
    "mlp.fc2.bias": "v.blk.{bid}.ffn_down.bias",
    "ls2": "v.blk.{bid}.ls2.weight",
}
# The fused qkv is stored as three tensors: rows [0, h) are q, [h, 2h) k, [2h, 3h) v.
QKV_SPLIT: dict[str, tuple[str, str, str]] = {
    "attn.qkv.weight": ("v.blk.{bid}.attn_q.weight", "v.blk.{bid}.attn_k.weight", "v.blk.{bid}.attn_v.weight"),
    "attn.qkv.bias": ("v.blk.{bid}.attn_q.bias", "v.blk.{bid}.attn_k.bias", "v.blk.{bid}.attn_v.bias"),
}
PROJECTOR_NAMES: dict[str, str] = {  # clip.cpp reads mm.model.mlp.{0,1,3}.{weight,bias} for internvl
    "mlp1.0.weight": "mm.model.mlp.0.weight",
    "mlp1.0.bias": "mm.model.mlp.0.bias",
    "mlp1.1.weight": "mm.model.mlp.1.weight",
    "mlp1.1.bias": "mm.model.mlp.1.bias",
    "mlp1.3.weight": "mm.model.mlp.3.weight",
    "mlp1.3.bias": "mm.model.mlp.3.bias",
}
# Storage rules beyond gguf_common.storage_type, as llama.cpp's converter applies them.
POSITION_EMBD = "v.position_embd.weight"
ALWAYS_F32 = (POSITION_EMBD, "v.class_embd")
PATCH_EMBD = "v.patch_embd.weight"  # a conv kernel: F16 in an F16 file, else F32 (llama.cpp's im2col)

_BLOCK_RE = re.compile(r"^vision_model\.encoder\.layers\.(\d+)\.(.+)$")

# llama.cpp's InternVL graph appends the CLS token *after* the patches (ggml_concat(patches, cls)) but adds
# the position embedding row by row, so with the checkpoint's [cls, patch 0..N-1] rows every patch would get
# its left neighbour's position and the CLS token the last patch's (the defect llama.cpp PR #25844 fixes for
# the llava graph; the internvl graph has the same concat). The attention itself does not care where the CLS
# token sits, so storing the rows as [patch 0..N-1, cls] makes llama.cpp compute exactly InternViT. A llama.cpp
# with the fix puts the CLS token first and wants the checkpoint's order: the runtime probes which one the
# library wants and opens a reordered copy where they differ (runtime/backends/llamacpp/position_order.py).
POSITION_ORDER_KEY = "r1v.vision.position_embd_order"
POSITION_ORDER = "patches,cls"  # what we write: right for llama.cpp's graph as it is (class token appended)
CHECKPOINT_POSITION_ORDER = "cls,patches"  # the checkpoint's (and llama.cpp's own converter's) order
POSITION_ORDERS = (POSITION_ORDER, CHECKPOINT_POSITION_ORDER)
# Which llama.cpp builds a file in POSITION_ORDER is exact for; `r1v convert gguf` prints it.
POSITION_ORDER_NOTE = (
    "position rows patches,cls: exact for llama.cpp builds without PR #25844 (class token after the patches, "
    "llama.cpp #25814; all up to at least the one in llama-cpp-python 0.3.36). With the fix r1v.load adapts by "
    "itself; for llama.cpp's own tools: python -m r1v.runtime.backends.llamacpp.position_order MMPROJ OUT "
    "--order cls,patches")


# --- what stock llama.cpp can run ---------------------------------------------------------------------------

def check_mmproj_supported(config: R1VConfig, source: str = "config.json") -> None:
    """Raise ConversionError unless stock llama.cpp's InternVL mmproj path runs this vision tower correctly.

    Every problem is listed, each naming its config field and llama.cpp's rule, so one run tells the user
    everything that stands in the way.
    """
    problems = mmproj_problems(config)
    if problems:
        lines = "\n".join(f"  - {p}" for p in problems)
        raise ConversionError(
            f"{source}: cannot write an mmproj that stock llama.cpp would run correctly:\n{lines}\n"
            "Use the torch/AWQ backend for this checkpoint, or convert only the language model (mmproj_quant=None)."
        )


def mmproj_problems(config: R1VConfig) -> list[str]:
    """Why llama.cpp would run this ViT wrongly (empty when it runs it as the checkpoint means)."""
    v = config.vision
    shape = (v.hidden_size, v.num_hidden_layers)
    rms_by_shape = shape == RMS_NORM_SHAPE
    size = f"hidden_size {v.hidden_size} x {v.num_hidden_layers} layers"
    rule = ("llama.cpp's InternVL graph (tools/mtmd/models/internvl.cpp) chooses the norm by shape alone: "
            "RMS norm only when the ViT has hidden_size 3200 and 45 layers (InternViT-6B), LayerNorm otherwise")
    problems: list[str] = []
    if v.norm_type == "rms_norm" and not rms_by_shape:
        problems.append(f"vision_config.norm_type is 'rms_norm' at {size}; {rule}, so it would run this ViT "
                        "with LayerNorm")
    if v.norm_type == "layer_norm" and rms_by_shape:
        problems.append(f"vision_config.norm_type is 'layer_norm' at {size}; {rule}, so it would run this ViT "
                        "with RMS norm")
    if v.qk_normalization and not rms_by_shape:
        problems.append(f"vision_config.qk_normalization is true at {size}; llama.cpp applies the q/k norms "
                        f"with the block norm type and no bias ({rule}), which is right only for InternViT-6B's "
                        "RMS q/k norms")
    if v.hidden_act not in ("gelu", "silu"):
        problems.append(f"vision_config.hidden_act is {v.hidden_act!r}; llama.cpp's clip loader knows only "
                        "clip.use_gelu and clip.use_silu (anything else would run as quick-GELU)")
    if config.ps_version != "v2":
        problems.append(f"ps_version is {config.ps_version!r}; llama.cpp's InternVL pixel shuffle is InternVL's v2 "
                        "(v1 leaves the token grid transposed)")
    if config.select_layer != -1:
        problems.append(f"select_layer is {config.select_layer}; llama.cpp's InternVL graph always uses the last "
                        "ViT layer (select_layer -1)")
    if v.num_channels != 3:
        problems.append(f"vision_config.num_channels is {v.num_channels}; libmtmd feeds RGB (3 channels)")
    if config.image_size != v.image_size:
        problems.append(f"force_image_size {config.image_size} differs from vision_config.image_size "
                        f"{v.image_size}; llama.cpp does not interpolate InternVL's position embedding")
    ratio = config.downsample_ratio
    scale = round(1 / ratio) if ratio > 0 else 0
    side = v.image_size // v.patch_size
    if scale < 1 or abs(1 / ratio - scale) > 1e-6 or side % scale:
        problems.append(f"downsample_ratio {ratio} is not 1/n with n dividing the {side}x{side} patch grid; "
                        "llama.cpp's clip.vision.projector.scale_factor is an integer n")
    return problems


# --- planning -----------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class _Source:
    """Where one output tensor comes from: a checkpoint tensor, optionally a row range of it."""

    name: str
    rows: tuple[int, int] | None = None


def gguf_names(config: R1VConfig, tensor_name: str) -> list[tuple[str, _Source]]:
    """The GGUF tensor(s) that checkpoint tensor `tensor_name` becomes (three for a fused qkv)."""
    if tensor_name in EMBEDDING_NAMES:
        return [(EMBEDDING_NAMES[tensor_name], _Source(tensor_name))]
    if tensor_name in PROJECTOR_NAMES:
        return [(PROJECTOR_NAMES[tensor_name], _Source(tensor_name))]
    match = _BLOCK_RE.match(tensor_name)
    if match:
        bid, suffix = match.group(1), match.group(2)
        if suffix in BLOCK_NAMES:
            return [(BLOCK_NAMES[suffix].format(bid=bid), _Source(tensor_name))]
        if suffix in QKV_SPLIT:
            h = config.vision.hidden_size
            return [(out.format(bid=bid), _Source(tensor_name, (i * h, (i + 1) * h)))
                    for i, out in enumerate(QKV_SPLIT[suffix])]
    raise ConversionError(f"tensor {tensor_name!r} has no place in an InternVL mmproj (unknown vision tensor)")


def tensor_type(gguf_name: str, shape: tuple[int, ...], out_type: str) -> QType:
    """The storage type of one mmproj tensor, following llama.cpp's converter."""
    if gguf_name in ALWAYS_F32:
        return QType.F32
    if gguf_name == PATCH_EMBD:
        return QType.F16 if out_type == "f16" else QType.F32
    return storage_type(DIRECT_TYPES[out_type], shape)


def plan_mmproj(ckpt: Checkpoint, out_type: str = "f16") -> list[PlannedTensor]:
    """Every tensor of the mmproj file - embeddings, then the blocks layer by layer, then the projector - each
    with a producer that reads its own data only when called."""
    planned: list[PlannedTensor] = []
    names = [n for n in ckpt.tensors if n.startswith(("vision_model.", "mlp1."))]
    for name in sorted(names, key=_order):
        info = ckpt.tensors[name]
        outputs = gguf_names(ckpt.config, name)
        shared = _SharedRead(ckpt, name, uses=len(outputs))
        for out_name, src in outputs:
            shape = info.shape if src.rows is None else (src.rows[1] - src.rows[0], *info.shape[1:])
            planned.append(PlannedTensor(out_name, tuple(shape), tensor_type(out_name, shape, out_type),
                                         _producer(shared, src, cls_last=out_name == POSITION_EMBD)))
    return planned


_EMBEDDING_ORDER = {name: i for i, name in enumerate(EMBEDDING_NAMES)}
_BLOCK_ORDER = {suffix: i for i, suffix in enumerate(dict.fromkeys(["norm1.weight", "norm1.bias", *QKV_SPLIT,
                                                                       *BLOCK_NAMES]))}
_PROJECTOR_ORDER = {name: i for i, name in enumerate(PROJECTOR_NAMES)}


def _order(name: str) -> tuple[int, int, int, str]:
    """Embeddings, then blocks by layer (each in table order), then the projector; unknown names last
    within their group (gguf_names refuses them)."""
    match = _BLOCK_RE.match(name)
    if match:
        return (1, int(match.group(1)), _BLOCK_ORDER.get(match.group(2), 99), name)
    if name in _PROJECTOR_ORDER or name.startswith("mlp1."):
        return (2, 0, _PROJECTOR_ORDER.get(name, 99), name)
    return (0, 0, _EMBEDDING_ORDER.get(name, 99), name)


class _SharedRead:
    """One checkpoint tensor read (as float32) once for the `uses` outputs made from it - the three parts of
    a fused qkv - and dropped after the last, so memory holds at most one source tensor."""

    def __init__(self, ckpt: Checkpoint, name: str, uses: int):
        self.ckpt, self.name, self.left = ckpt, name, uses
        self.values: np.ndarray | None = None

    def take(self) -> np.ndarray:
        values = self.values if self.values is not None else self.ckpt.read(self.name, np.float32)
        self.left -= 1
        self.values = values if self.left > 0 else None
        return values


def _producer(shared: _SharedRead, src: _Source, cls_last: bool = False) -> Callable[[], np.ndarray]:
    def produce() -> np.ndarray:
        values = shared.take()
        if src.rows is not None:
            return np.ascontiguousarray(values[src.rows[0]:src.rows[1]])
        if cls_last:  # [1, 1 + N, h]: move the CLS row behind the patch rows (see POSITION_ORDER)
            return np.concatenate([values[:, 1:], values[:, :1]], axis=1)
        return values

    return produce


# --- metadata -----------------------------------------------------------------------------------------------

def image_mean_std(ckpt: Checkpoint) -> tuple[list[float], list[float]]:
    """preprocessor_config.json's image_mean/std when the checkpoint ships one, else InternVL's ImageNet values."""
    path = ckpt.path / "preprocessor_config.json"
    data = read_json(path, optional=True)
    mean, std = data.get("image_mean"), data.get("image_std")
    if mean is not None or std is not None:
        for key, value in (("image_mean", mean), ("image_std", std)):
            numbers = isinstance(value, list) and all(
                isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) for x in value)
            if not (numbers and len(value) == 3) or (key == "image_std" and min(value) <= 0):
                raise CheckpointError(f"{path}: {key} must be a list of 3 finite numbers (std > 0), got {value!r}")
        return [float(x) for x in mean], [float(x) for x in std]
    return list(IMAGENET_MEAN), list(IMAGENET_STD)


def _kv_writer(ckpt: Checkpoint, out_type: str, block_count: int) -> Callable[[gguf.GGUFWriter], None]:
    cfg = ckpt.config
    mean, std = image_mean_std(ckpt)

    def add_kv(w: gguf.GGUFWriter) -> None:
        w.add_type(gguf.GGUFType.MMPROJ)
        w.add_name(ckpt.name)
        w.add_file_type(FILE_TYPES[out_type])
        add_vision_kv(w, cfg.vision, block_count=block_count, projection_dim=cfg.llm.hidden_size,
                      scale_factor=round(1 / cfg.downsample_ratio), tiles=(cfg.min_dynamic_patch, cfg.max_dynamic_patch),
                      mean=mean, std=std)
        add_provenance(w, ckpt.name, cfg.sha256, out_type)

    return add_kv


def add_vision_kv(w: gguf.GGUFWriter, v: VisionConfig, *, block_count: int, projection_dim: int, scale_factor: int,
                  tiles: tuple[int, int], mean: list[float], std: list[float],
                  position_order: str = POSITION_ORDER) -> None:
    """The clip.* keys libmtmd reads for an InternVL ViT + projector, and the position rows' order."""
    w.add_clip_has_vision_encoder(True)
    w.add_clip_projector_type(PROJECTOR_TYPE)
    w.add_vision_projection_dim(projection_dim)
    w.add_vision_image_size(v.image_size)
    w.add_vision_patch_size(v.patch_size)
    w.add_vision_embedding_length(v.hidden_size)
    w.add_vision_feed_forward_length(v.intermediate_size)
    w.add_vision_block_count(block_count)
    w.add_vision_head_count(v.num_attention_heads)
    w.add_vision_attention_layernorm_eps(v.layer_norm_eps)
    w.add_vision_image_mean(mean)
    w.add_vision_image_std(std)
    if v.hidden_act == "silu":
        w.add_vision_use_silu(True)
    else:
        w.add_vision_use_gelu(True)
    w.add_vision_projector_scale_factor(scale_factor)
    w.add_vision_preproc_min_tiles(tiles[0])
    w.add_vision_preproc_max_tiles(tiles[1])
    w.add_string(POSITION_ORDER_KEY, position_order)


# --- the file -----------------------------------------------------------------------------------------------

def write_mmproj_gguf(ckpt: Checkpoint, path: Path, out_type: str = "f16", *, progress: bool = True) -> Path:
    """Write the vision tower + projector of `ckpt` to `path` as an mmproj GGUF (f32, f16 or q8_0).

    Raises ConversionError, before anything is written, for a ViT stock llama.cpp would run wrongly (see
    `check_mmproj_supported`). The file appears only when complete.
    """
    out_type = out_type.lower()
    if out_type not in MMPROJ_TYPES:
        raise ConversionError(f"unknown mmproj type {out_type!r}; choose from {', '.join(MMPROJ_TYPES)}")
    check_mmproj_supported(ckpt.config, str(ckpt.path / "config.json"))
    tensors = plan_mmproj(ckpt, out_type)
    block_count = ckpt.config.vision.num_hidden_layers
    return write_gguf(Path(path), ARCH, _kv_writer(ckpt, out_type, block_count), tensors, progress=progress)
