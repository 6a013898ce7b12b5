"""Memory planning from config.json alone: how big each GGUF file and each AWQ GPU placement is.

No weights are read and torch is never imported. Every tensor the checkpoint holds comes from the model
family's shape table (`cfg.family.expected_shapes`), so the planner and the converters agree on what exists.

Units: byte counts are exact ints. For people, `format_plan` prints GB = 10**9 bytes, while the common memory
sizes a device is sold as (16/24/32/48/80 "GB") are treated as GiB: a "24 GB" RTX 4090 holds 24 * 2**30 bytes.

    plan = plan_memory(load_config("config.json"), context=8192)
    print(format_plan(plan))
    entry = best_placement(cfg, 24 * GiB, context=8192)   # the AWQ backend's choice
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Iterator

import gguf

from r1v.converters.config import R1VConfig
from r1v.converters.gguf_common import QType, storage_type
from r1v.converters.gguf_llm import gguf_tensor_name
from r1v.converters.gguf_mmproj import MMPROJ_TYPES, gguf_names
from r1v.converters.gguf_mmproj import tensor_type as mmproj_tensor_type

GiB = 1 << 30
MiB = 1 << 20
GB = 10**9

# Device / RAM sizes people buy, in GiB; each plan entry names the smallest one it fits into.
COMMON_MEMORY_GIB: tuple[int, ...] = (16, 24, 32, 48, 80)

# --- Runtime overheads (assumptions, not measurements of this code) ---------------------------------------
# GPU (AWQ backend, torch): the CUDA context plus cuBLAS/Triton workspaces take ~0.3-0.5 GiB of device memory
# that torch does not report; peak activations for a 2048-token prefill chunk of the 32B LLM are ~0.7 GiB
# (gate+up outputs 2 x 2048 x 27648 fp16 = 216 MiB, their product 108 MiB, one linear's weight dequantized to
# fp16 for the large-M GEMM path <= 270 MiB, attention through SDPA without a materialized score matrix), and
# the ViT run on a few 448 tiles at a time stays under that. Allocator fragmentation is inside the margin.
CUDA_CONTEXT_BYTES = 512 * MiB
GPU_ACTIVATION_BYTES = 768 * MiB
GPU_RUNTIME_OVERHEAD_BYTES = CUDA_CONTEXT_BYTES + GPU_ACTIVATION_BYTES  # 1.25 GiB
# CPU (llama.cpp): the LLM's compute buffer for a 512-token micro-batch plus the logits buffer, and libmtmd's
# clip compute buffer for one 448 tile of InternViT-6B (F32 activations, 25 heads x 1025^2 scores).
LLAMACPP_COMPUTE_BYTES = 512 * MiB
CLIP_COMPUTE_BYTES = 256 * MiB

KV_BYTES_PER_ELEMENT = 2  # fp16 K and V, the default of both backends (llama.cpp type_k/type_v = f16)


# --- ggml tensor types -------------------------------------------------------------------------------------
def ggml_block(ggml_type: str) -> tuple[int, int]:
    """(elements per block, bytes per block) of a ggml type, from gguf-py's GGML_QUANT_SIZES (ggml's type
    traits). Bits per weight: F16 16, Q8_0 8.5, Q6_K 6.5625, Q5_K 5.5, Q5_1 6, Q5_0 5.5, Q4_K 4.5, Q4_0 4.5."""
    return gguf.GGML_QUANT_SIZES[QType[ggml_type]]


# llama.cpp src/llama-quant.cpp, tensor_type_fallback(): a row length not divisible by the block size moves
# a k-quant to a 32-block type; if that does not divide either, the tensor is stored F16.
KQUANT_FALLBACK: dict[str, str] = {"Q4_K": "Q5_0", "Q5_K": "Q5_1", "Q6_K": "Q8_0"}


def ggml_nbytes(ggml_type: str, shape: tuple[int, ...]) -> int:
    """Bytes of one tensor stored as `ggml_type`; `shape` in PyTorch order (rows are the last dimension)."""
    block, size = ggml_block(ggml_type)
    ncols = shape[-1]
    if ncols % block:
        raise ValueError(f"row length {ncols} is not a multiple of the {ggml_type} block size {block}")
    return math.prod(shape[:-1]) * (ncols // block) * size


def _fits_blocks(ggml_type: str, ncols: int) -> bool:
    return ncols % ggml_block(ggml_type)[0] == 0


# --- GGUF mixtures of the LLM file -------------------------------------------------------------------------
@dataclass(frozen=True)
class GGUFMix:
    """One llama.cpp file type. Rules from llama.cpp src/llama-quant.cpp (llama_ftype_get_default_type,
    llama_tensor_get_type_impl, tensor_type_fallback), only the branches these file types reach for a
    dense (non-MoE, non-Falcon, non-70B) qwen2 model."""

    default: str  # type of every quantizable 2-D weight (llama_ftype_get_default_type)
    # attn_v and ffn_down of the layers where use_more_bits(i, n) holds get this type (the "_M" mixes):
    # `(Q4_K_M || Q5_K_M) && use_more_bits(i_attention_wv, n_attention_wv)` -> Q6_K, and the same for ffn_down.
    more_bits: str | None = None
    # Written by convert_hf_to_gguf / gguf-py directly (F16, Q8_0: every 2-D weight, token_embd and output
    # included, in `default`; a Q8_0 row not divisible by 32 falls back to F16), rather than by the quantizer.
    direct: bool = False


LLM_GGUF_MIXES: dict[str, GGUFMix] = {
    "F16": GGUFMix("F16", direct=True),
    "Q8_0": GGUFMix("Q8_0", direct=True),
    "Q6_K": GGUFMix("Q6_K"),
    "Q5_K_M": GGUFMix("Q5_K", more_bits="Q6_K"),
    "Q4_K_M": GGUFMix("Q4_K", more_bits="Q6_K"),
}
# The converter's mmproj types the plan lists (an F32 projector is for debugging, not for shipping).
MMPROJ_GGUF_TYPES: tuple[str, ...] = tuple(t.upper() for t in MMPROJ_TYPES if t != "f32")


def use_more_bits(i_layer: int, n_layers: int) -> bool:
    """llama.cpp's layer pick for the _M mixes: the first and last eighth of the layers, and every third one
    in between (C integer division and modulo; the operands are never negative here)."""
    return i_layer < n_layers // 8 or i_layer >= 7 * n_layers // 8 or (i_layer - n_layers // 8) % 3 == 2


_LAYER = re.compile(r"^blk\.(\d+)\.")


def llm_gguf_name(hf_name: str) -> tuple[str, int | None]:
    """('blk.3.attn_v.weight', 3) for an LLM tensor of the checkpoint: the converter's name table."""
    name = gguf_tensor_name(hf_name)
    if name is None:
        raise KeyError(f"{hf_name}: no qwen2 GGUF name")
    m = _LAYER.match(name)
    return name, int(m.group(1)) if m else None


def llm_gguf_tensor_type(
    mix: GGUFMix, gguf_name: str, shape: tuple[int, ...], layer: int | None, n_layers: int, tied: bool
) -> str:
    """The ggml type llama.cpp gives one LLM tensor in a file of mixture `mix`."""
    ncols = shape[-1]
    # 1-D tensors (norms, biases) are written F32 by the converter and never quantized (n_dims < 2).
    if len(shape) < 2 or gguf_name.endswith("_norm.weight"):
        return "F32"
    if mix.direct:  # written by our converter: its storage rule
        return storage_type(QType[mix.default], shape).name
    new_type = mix.default
    # output.weight, or token_embd when the embeddings are tied: Q8_0 if the row does not fit the default
    # type's blocks, else Q6_K unless the default is Q8_0.
    if gguf_name == "output.weight" or (tied and gguf_name == "token_embd.weight"):
        if not _fits_blocks(mix.default, ncols):
            new_type = "Q8_0"
        elif mix.default != "Q8_0":
            new_type = "Q6_K"
    elif gguf_name == "token_embd.weight":
        pass  # only the IQ*/TQ* mixes change token_embd; the k-quant mixes keep the default type
    elif mix.more_bits and (".attn_v." in gguf_name or ".ffn_down." in gguf_name):
        # i_attention_wv / i_ffn_down count tensors in file order, one per layer for qwen2: the layer index.
        if use_more_bits(layer or 0, n_layers):
            new_type = mix.more_bits
    if not _fits_blocks(new_type, ncols):
        new_type = KQUANT_FALLBACK.get(new_type, "F16")
        if not _fits_blocks(new_type, ncols):
            new_type = "F16"
    return new_type


def mmproj_gguf_tensors(cfg: R1VConfig, hf_name: str, shape: tuple[int, ...], file_type: str
                        ) -> list[tuple[str, str, tuple[int, ...]]]:
    """(GGUF name, ggml type, shape) of what one ViT / projector tensor becomes in an mmproj of `file_type`:
    the converter's own name table (a fused qkv is three tensors) and storage rule (llama.cpp's converter's)."""
    out = []
    for name, src in gguf_names(cfg, hf_name):
        part = shape if src.rows is None else (src.rows[1] - src.rows[0], *shape[1:])
        out.append((name, mmproj_tensor_type(name, part, file_type.lower()).name, part))
    return out


# --- AWQ / weight-only integer layouts ---------------------------------------------------------------------
@dataclass(frozen=True)
class LinearQuant:
    """Weight-only integer storage of one nn.Linear [out, in].

    Packed like AutoAWQ GEMM: qweight int32 [in, out*bits/32], scales fp16 [groups, out],
    qzeros int32 [groups, out*bits/32] when asymmetric; groups = in/group_size, or 1 (per output channel)
    when group_size is None.
    """

    bits: int
    group_size: int | None
    zero_point: bool

    def nbytes(self, in_features: int, out_features: int) -> int:
        packed_cols = math.ceil(out_features * self.bits / 32)
        groups = math.ceil(in_features / self.group_size) if self.group_size else 1
        qweight = in_features * packed_cols * 4
        scales = groups * out_features * 2
        qzeros = groups * packed_cols * 4 if self.zero_point else 0
        return qweight + scales + qzeros


# The LLM's decoder linears: AutoAWQ GEMM, 4 bit, group 128, zero point (DESIGN section 4).
AWQ_LLM = LinearQuant(bits=4, group_size=128, zero_point=True)
# The vision tower's linears (qkv, proj, fc1, fc2) by choice; everything else in the tower stays fp16.
# int8 is per output channel, symmetric; int4 reuses the LLM's GEMM layout (and kernels).
VISION_FORMATS: dict[str, LinearQuant | None] = {
    "fp16": None,
    "int8": LinearQuant(bits=8, group_size=None, zero_point=False),
    "int4": LinearQuant(bits=4, group_size=128, zero_point=True),
}
EMBED_PLACES: tuple[str, ...] = ("gpu", "cpu")
# Highest quality first: vision precision decides, then embeddings on the GPU (same numbers either way, the
# CPU table only costs a host-to-device copy of each step's input rows).
AWQ_PLACEMENTS: tuple[tuple[str, str], ...] = tuple((v, e) for v in VISION_FORMATS for e in EMBED_PLACES)


def awq_key(vision: str, embed: str) -> str:
    return f"awq[vision={vision},embed={embed}]"


# --- parameter counts --------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Tensor:
    name: str  # checkpoint (HF) name
    shape: tuple[int, ...]
    component: str  # vision | projector | embeddings | lm_head | llm

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def is_linear(self) -> bool:
        """A 2-D Linear weight of the ViT or of an LLM decoder layer (what AWQ / int8 / int4 quantize)."""
        return (
            self.component in ("vision", "llm") and len(self.shape) == 2 and self.name.endswith(".weight")
        )


def checkpoint_tensors(cfg: R1VConfig) -> list[Tensor]:
    """Every tensor of a complete checkpoint, from the family's shape table."""
    out = []
    for name, shape in cfg.family.expected_shapes(cfg).items():
        component = cfg.family.component_of(name)
        if component == "other":
            raise ValueError(f"{name}: tensor belongs to no known component")
        out.append(Tensor(name, tuple(shape), component))
    return out


@dataclass(frozen=True)
class ParamCounts:
    vision_linear: int  # qkv, proj, fc1, fc2 weights
    vision_other: int  # embeddings (class, patch, position), norms, q/k norms, biases, layer scales
    projector: int  # mlp1: LayerNorm + two Linear with biases
    llm_linear: int  # q, k, v, o, gate, up, down weights
    llm_bias: int  # q, k, v biases
    llm_norm: int  # input/post-attention RMSNorms and the final norm
    embeddings: int
    lm_head: int  # 0 when tie_word_embeddings

    @property
    def vision(self) -> int:
        return self.vision_linear + self.vision_other

    @property
    def llm(self) -> int:
        """The decoder without embeddings / lm_head."""
        return self.llm_linear + self.llm_bias + self.llm_norm

    @property
    def total(self) -> int:
        return self.vision + self.projector + self.llm + self.embeddings + self.lm_head

    def to_json(self) -> dict[str, int]:
        return {
            "vision": self.vision, "vision_linear": self.vision_linear, "vision_other": self.vision_other,
            "projector": self.projector,
            "llm": self.llm, "llm_linear": self.llm_linear, "llm_bias": self.llm_bias, "llm_norm": self.llm_norm,
            "embeddings": self.embeddings, "lm_head": self.lm_head, "total": self.total,
        }


def count_params(cfg: R1VConfig) -> ParamCounts:
    n = dict.fromkeys(
        ("vision_linear", "vision_other", "projector", "llm_linear", "llm_bias", "llm_norm", "embeddings",
         "lm_head"), 0,
    )
    for t in checkpoint_tensors(cfg):
        if t.component == "vision":
            n["vision_linear" if t.is_linear else "vision_other"] += t.numel
        elif t.component == "llm":
            kind = "llm_linear" if t.is_linear else "llm_bias" if t.name.endswith(".bias") else "llm_norm"
            n[kind] += t.numel
        else:
            n[t.component] += t.numel
    return ParamCounts(**n)


def kv_bytes_per_token(cfg: R1VConfig) -> int:
    """K and V of every layer for one token: layers x kv_heads x head_dim x 2 (K, V) x 2 bytes."""
    t = cfg.llm
    return t.num_hidden_layers * t.num_key_value_heads * t.head_dim * 2 * KV_BYTES_PER_ELEMENT


# --- per-format weight bytes -------------------------------------------------------------------------------
def gguf_llm_tensors(cfg: R1VConfig, mix_name: str) -> dict[str, tuple[str, int]]:
    """GGUF tensor name -> (ggml type, data bytes) of every tensor of the LLM file of mixture `mix_name`."""
    mix = LLM_GGUF_MIXES[mix_name]
    n_layers, tied = cfg.llm.num_hidden_layers, cfg.llm.tie_word_embeddings
    out: dict[str, tuple[str, int]] = {}
    for t in checkpoint_tensors(cfg):
        if t.component in ("llm", "embeddings", "lm_head"):
            gguf_name, layer = llm_gguf_name(t.name)
            ggml_type = llm_gguf_tensor_type(mix, gguf_name, t.shape, layer, n_layers, tied)
            out[gguf_name] = (ggml_type, ggml_nbytes(ggml_type, t.shape))
    return out


def gguf_mmproj_tensors(cfg: R1VConfig, file_type: str) -> dict[str, tuple[str, int]]:
    """GGUF tensor name -> (ggml type, data bytes) of every tensor of the mmproj (ViT + mlp1) of `file_type`."""
    out: dict[str, tuple[str, int]] = {}
    for t in checkpoint_tensors(cfg):
        if t.component in ("vision", "projector"):
            for gguf_name, ggml_type, shape in mmproj_gguf_tensors(cfg, t.name, t.shape, file_type):
                out[gguf_name] = (ggml_type, ggml_nbytes(ggml_type, shape))
    return out


def _by_type(tensors: dict[str, tuple[str, int]]) -> dict[str, int]:
    by_type: dict[str, int] = {}
    for ggml_type, nbytes in tensors.values():
        by_type[ggml_type] = by_type.get(ggml_type, 0) + nbytes
    return by_type


def gguf_llm_bytes(cfg: R1VConfig, mix_name: str) -> dict[str, int]:
    """Tensor-data bytes of the LLM GGUF file of mixture `mix_name`, by ggml type (the GGUF header,
    tokenizer metadata and 32-byte alignment padding, a few MB, are not counted)."""
    return _by_type(gguf_llm_tensors(cfg, mix_name))


def gguf_mmproj_bytes(cfg: R1VConfig, file_type: str) -> dict[str, int]:
    """Tensor-data bytes of the mmproj GGUF (ViT + mlp1) of `file_type`, by ggml type."""
    return _by_type(gguf_mmproj_tensors(cfg, file_type))


def awq_bytes(cfg: R1VConfig, vision: str) -> dict[str, int]:
    """Bytes of an AWQ placement by component: llm (AWQ linears + fp16 biases/norms), embeddings, lm_head
    (fp16, not quantized), vision (per `vision`), projector (fp16)."""
    vision_quant = VISION_FORMATS[vision]
    out = dict.fromkeys(("llm", "embeddings", "lm_head", "vision", "projector"), 0)
    for t in checkpoint_tensors(cfg):
        quant = AWQ_LLM if t.component == "llm" else vision_quant if t.component == "vision" else None
        if quant is not None and t.is_linear:
            out_features, in_features = t.shape
            out[t.component] += quant.nbytes(in_features, out_features)
        else:
            out[t.component] += t.numel * 2
    return out


# --- the plan ----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class PlanEntry:
    key: str  # "gguf.llm.Q4_K_M", "gguf.mmproj.F16", "awq[vision=int4,embed=cpu]"
    format: str  # "gguf" | "awq"
    device: str  # where weights_bytes live: "cpu" (RAM) | "cuda"
    weights_bytes: int
    kv_bytes: int
    overhead_bytes: int
    total_bytes: int  # weights + kv + overhead, all on `device`
    fits: int | None  # smallest of COMMON_MEMORY_GIB (GiB) holding total_bytes; None if none does
    host_bytes: int = 0  # kept in host RAM besides (the embedding table for embed=cpu)
    vision: str | None = None  # AWQ: fp16 | int8 | int4
    embed: str | None = None  # AWQ: gpu | cpu
    # bytes by ggml type (gguf) or by component (awq)
    breakdown: dict[str, int] = field(default_factory=dict, compare=False, hash=False)

    def to_json(self) -> dict[str, object]:
        out: dict[str, object] = {
            "format": self.format, "device": self.device, "weights_bytes": self.weights_bytes,
            "kv_bytes": self.kv_bytes, "overhead_bytes": self.overhead_bytes, "total_bytes": self.total_bytes,
            "host_bytes": self.host_bytes, "fits_gib": self.fits, "breakdown": dict(self.breakdown),
        }
        if self.format == "awq":
            out.update(vision=self.vision, embed=self.embed)
        return out


@dataclass(frozen=True)
class MemoryPlan:
    context: int
    params: ParamCounts
    kv_bytes_per_token: int
    entries: tuple[PlanEntry, ...]
    offload: tuple[OffloadSplit, ...] = ()  # with n_gpu_layers: each LLM GGUF mix's GPU / CPU split

    @property
    def kv_bytes(self) -> int:
        return self.kv_bytes_per_token * self.context

    def entry(self, key: str) -> PlanEntry:
        for e in self.entries:
            if e.key == key:
                return e
        raise KeyError(key)

    def to_json(self) -> dict[str, object]:
        out: dict[str, object] = {e.key: e.to_json() for e in self.entries}
        out["kv_cache"] = {"bytes": self.kv_bytes, "bytes_per_token": self.kv_bytes_per_token}
        out["context"] = self.context
        out["params"] = self.params.to_json()
        if self.offload:
            out["gguf_offload"] = {f"gguf.llm.{o.mix}": o.to_json() for o in self.offload}
        return out


def smallest_fit(total_bytes: int, sizes_gib: tuple[int, ...] = COMMON_MEMORY_GIB) -> int | None:
    return next((size for size in sorted(sizes_gib) if total_bytes <= size * GiB), None)


def _entry(key: str, fmt: str, device: str, breakdown: dict[str, int], kv: int, overhead: int,
           exclude: tuple[str, ...] = (), **extra: object) -> PlanEntry:
    weights = sum(v for k, v in breakdown.items() if k not in exclude)
    host = sum(v for k, v in breakdown.items() if k in exclude)
    total = weights + kv + overhead
    return PlanEntry(key, fmt, device, weights, kv, overhead, total, smallest_fit(total),
                     host_bytes=host, breakdown=breakdown, **extra)  # type: ignore[arg-type]


def _awq_entries(cfg: R1VConfig, context: int, gpu_overhead_bytes: int) -> Iterator[PlanEntry]:
    kv = kv_bytes_per_token(cfg) * context
    for vision, embed in AWQ_PLACEMENTS:
        yield _entry(
            awq_key(vision, embed), "awq", "cuda", awq_bytes(cfg, vision), kv, gpu_overhead_bytes,
            exclude=("embeddings",) if embed == "cpu" else (), vision=vision, embed=embed,
        )


def plan_memory(cfg: R1VConfig, context: int = 8192, *,
                gpu_overhead_bytes: int = GPU_RUNTIME_OVERHEAD_BYTES, n_gpu_layers: int | None = None) -> MemoryPlan:
    """Sizes of every GGUF file type and AWQ placement for `cfg` at `context` tokens of KV cache; with
    `n_gpu_layers`, also each LLM GGUF's split between GPU and CPU (llama.cpp's -ngl)."""
    if context < 0:
        raise ValueError(f"context must be >= 0, got {context}")
    kv = kv_bytes_per_token(cfg) * context
    entries = [
        _entry(f"gguf.llm.{name}", "gguf", "cpu", gguf_llm_bytes(cfg, name), kv, LLAMACPP_COMPUTE_BYTES)
        for name in LLM_GGUF_MIXES
    ]
    entries += [
        _entry(f"gguf.mmproj.{name}", "gguf", "cpu", gguf_mmproj_bytes(cfg, name), 0, CLIP_COMPUTE_BYTES)
        for name in MMPROJ_GGUF_TYPES
    ]
    entries += _awq_entries(cfg, context, gpu_overhead_bytes)
    offload = () if n_gpu_layers is None else tuple(
        gguf_offload_split(cfg, name, n_gpu_layers, context) for name in LLM_GGUF_MIXES)
    return MemoryPlan(context, count_params(cfg), kv_bytes_per_token(cfg), tuple(entries), offload)


# --- GGUF layers split between GPU and CPU (llama.cpp's -ngl) ---------------------------------------------------
@dataclass(frozen=True)
class OffloadSplit:
    """Where llama.cpp puts an LLM GGUF's weights and KV cache for `n_gpu_layers` (llama-model.cpp,
    load_tensors: the last `n_gpu_layers` of the n_layer + 1 "layers" go to the GPU, the output layer (final
    norm + output.weight) counting as the last one; token_embd (the input layer) always stays on the CPU; each
    layer's KV cache lives with its layer). Compute buffers are not counted."""

    mix: str
    n_gpu_layers: int  # as asked (-1: all)
    gpu_layers: int  # decoder layers on the GPU
    cpu_layers: int
    output_on_gpu: bool
    gpu_weights_bytes: int
    cpu_weights_bytes: int
    gpu_kv_bytes: int
    cpu_kv_bytes: int

    @property
    def gpu_bytes(self) -> int:
        return self.gpu_weights_bytes + self.gpu_kv_bytes

    @property
    def cpu_bytes(self) -> int:
        return self.cpu_weights_bytes + self.cpu_kv_bytes

    def to_json(self) -> dict[str, object]:
        return {"n_gpu_layers": self.n_gpu_layers, "gpu_layers": self.gpu_layers, "cpu_layers": self.cpu_layers,
                "output_on_gpu": self.output_on_gpu, "gpu_weights_bytes": self.gpu_weights_bytes,
                "cpu_weights_bytes": self.cpu_weights_bytes, "gpu_kv_bytes": self.gpu_kv_bytes,
                "cpu_kv_bytes": self.cpu_kv_bytes, "gpu_bytes": self.gpu_bytes, "cpu_bytes": self.cpu_bytes}


def gguf_offload_split(cfg: R1VConfig, mix_name: str, n_gpu_layers: int, context: int = 8192) -> OffloadSplit:
    """The GPU / CPU split of the LLM GGUF of mixture `mix_name` with llama.cpp's `n_gpu_layers` (-1: all)."""
    if n_gpu_layers < -1:
        raise ValueError(f"n_gpu_layers must be >= -1 (-1: all layers), got {n_gpu_layers}")
    n_layers = cfg.llm.num_hidden_layers
    asked = n_layers + 1 if n_gpu_layers < 0 else min(n_gpu_layers, n_layers + 1)
    first_gpu = n_layers + 1 - asked  # llama.cpp's i_gpu_start; the output layer is index n_layers
    output_on_gpu = asked >= 1
    gpu = cpu = 0
    for name, (_, nbytes) in gguf_llm_tensors(cfg, mix_name).items():
        m = _LAYER.match(name)
        if m:
            on_gpu = int(m.group(1)) >= first_gpu
        elif name == "token_embd.weight":
            on_gpu = False
            if cfg.llm.tie_word_embeddings and output_on_gpu:  # llama.cpp duplicates it as the output matrix
                gpu += nbytes
        else:  # output.weight, output_norm.weight
            on_gpu = output_on_gpu
        gpu, cpu = (gpu + nbytes, cpu) if on_gpu else (gpu, cpu + nbytes)
    gpu_layers = n_layers - min(first_gpu, n_layers)
    kv_layer = kv_bytes_per_token(cfg) // n_layers * context
    return OffloadSplit(mix_name, n_gpu_layers, gpu_layers, n_layers - gpu_layers, output_on_gpu, gpu, cpu,
                        kv_layer * gpu_layers, kv_layer * (n_layers - gpu_layers))


def best_placement(cfg: R1VConfig, device_memory_bytes: int, context: int = 8192, *,
                   gpu_overhead_bytes: int = GPU_RUNTIME_OVERHEAD_BYTES) -> PlanEntry | None:
    """The highest-quality AWQ placement whose weights + KV + overhead fit `device_memory_bytes`:
    fp16 vision over int8 over int4, and for each the embedding table on the GPU before the CPU.
    None when not even int4 vision with embeddings on the CPU fits."""
    for entry in _awq_entries(cfg, context, gpu_overhead_bytes):
        if entry.total_bytes <= device_memory_bytes:
            return entry
    return None


def format_plan(plan: MemoryPlan) -> str:
    """A table for people: GB (10^9 bytes) with one decimal; `fits` names the smallest common size,
    counted as GiB (a "24 GB" card holds 24 GiB)."""
    p = plan.params
    lines = [
        f"Memory plan at {plan.context} tokens of context "
        f"(KV cache {plan.kv_bytes_per_token // 1024} KiB/token = {plan.kv_bytes / GB:.1f} GB)",
        f"Parameters: LLM linears {p.llm_linear / 1e9:.2f} B, embeddings {p.embeddings / 1e9:.2f} B, "
        f"lm_head {p.lm_head / 1e9:.2f} B, ViT {p.vision / 1e9:.2f} B, projector {p.projector / 1e9:.3f} B, "
        f"total {p.total / 1e9:.2f} B",
        "",
        f"{'option':<29} {'device':<6} {'weights':>8} {'KV':>6} {'overhead':>9} {'total':>7}  fits",
    ]
    for e in plan.entries:
        fits = f"{e.fits} GB" if e.fits is not None else f"> {max(COMMON_MEMORY_GIB)} GB"
        host = f"  (+{e.host_bytes / GB:.1f} GB in RAM)" if e.host_bytes else ""
        lines.append(
            f"{e.key:<29} {e.device:<6} {e.weights_bytes / GB:>8.1f} {e.kv_bytes / GB:>6.1f} "
            f"{e.overhead_bytes / GB:>9.1f} {e.total_bytes / GB:>7.1f}  {fits}{host}"
        )
    awq = [e for e in plan.entries if e.format == "awq"]  # in best_placement's order of preference
    if awq:
        lines += ["", f"AWQ placement r1v.load(..., device_memory=SIZE) picks at {plan.context} tokens:"]
        for size in COMMON_MEMORY_GIB:
            pick = next((e for e in awq if e.total_bytes <= size * GiB), None)
            lines.append(f"  {size:>2} GB: {pick.key if pick else 'none fits'}")
    if plan.offload:
        lines += ["", _offload_heading(plan), f"{'option':<29} {'GPU':>6} {'CPU':>6}  (weights + KV, GB)"]
        for o in plan.offload:
            lines.append(f"{'gguf.llm.' + o.mix:<29} {o.gpu_bytes / GB:>6.1f} {o.cpu_bytes / GB:>6.1f}")
    lines += [
        "",
        "GGUF on CPU loads one gguf.llm row and one gguf.mmproj row together; the fits column is per file.",
        'Sizes bought as "N GB" are counted as N GiB.',
    ]
    return "\n".join(lines)


def _offload_heading(plan: MemoryPlan) -> str:
    """llama.cpp's own count ("offloaded 40/65 layers to GPU": the output layer is one) and which ones."""
    o = plan.offload[0]
    n_layers = o.gpu_layers + o.cpu_layers
    on_gpu = o.gpu_layers + o.output_on_gpu
    parts = ([f"decoder layers {n_layers - o.gpu_layers}-{n_layers - 1}"] if o.gpu_layers else []) + \
        (["the output layer"] if o.output_on_gpu else [])
    where = " and ".join(parts) or "nothing"
    return (f"GGUF with -ngl {o.n_gpu_layers} (n_gpu_layers): {on_gpu}/{n_layers + 1} layers on the GPU ({where}); "
            f"{o.cpu_layers} decoder layers and token_embd on the CPU.\n"
            "A GPU build of llama.cpp puts the mmproj on the GPU as well (libmtmd use_gpu); compute buffers "
            "are not counted.")


__all__ = [
    "AWQ_LLM", "AWQ_PLACEMENTS", "COMMON_MEMORY_GIB", "GPU_RUNTIME_OVERHEAD_BYTES", "GiB",
    "LLM_GGUF_MIXES", "MMPROJ_GGUF_TYPES", "VISION_FORMATS", "GGUFMix", "LinearQuant", "MemoryPlan", "OffloadSplit",
    "ParamCounts", "PlanEntry", "awq_bytes", "awq_key", "best_placement", "count_params", "format_plan",
    "ggml_block", "ggml_nbytes", "gguf_llm_bytes", "gguf_offload_split", "gguf_llm_tensors", "gguf_mmproj_bytes",
    "gguf_mmproj_tensors", "kv_bytes_per_token", "llm_gguf_name", "llm_gguf_tensor_type",
    "mmproj_gguf_tensors", "plan_memory", "smallest_fit", "use_more_bits",
]
