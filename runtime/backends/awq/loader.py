"""Build the torch reference model (`r1v.runtime.model.R1VModel`) from an AutoAWQ GEMM checkpoint.

Every `<prefix>.qweight/.qzeros/.scales` triple becomes an `Int4Linear` (kernel "int4": repacked once for torch's
int4 kernels) or an `AWQLinear` reading the stored tensors as they are (kernels "triton" / "torch", and the shapes
torch's int4 kernel cannot take); `<prefix>.int8_weight/.int8_scale` an `Int8Linear`; every other tensor is loaded
by its name, as `model.load_weights` does. Tensors are read one at a time from the memory-mapped shards and copied
straight to their device.

Placement (what goes where, at what precision) is `awq[vision=fp16|int8|int4,embed=gpu|cpu]`, the keys of
`r1v plan` (`runtime/files/plan.py`): the vision tower's linears are quantized at load when the placement asks for
fewer bits than stored (never more: an int4 tower stays int4), and `embed=cpu` keeps the token embedding table
in host memory (each step copies its rows to the device). It comes from, in order: an explicit `placement`; a
`device_memory` budget (`best_placement` for the context size); the CUDA device's total memory; on CPU, the
checkpoint as stored.
"""
from __future__ import annotations

import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from r1v.converters.checkpoint import Checkpoint, open_checkpoint
from r1v.converters.errors import CheckpointError

from ...files.plan import EMBED_PLACES, GiB, VISION_FORMATS, PlanEntry, awq_key, best_placement, plan_memory
from ...model import IMG_CONTEXT, R1VModel
from ...model.multimodal import stored_to_torch
from . import int4, kernels
from .qlinear import AWQLinear, Int4Linear, Int8Linear, awq_group_size_for, awq_linear_for, dense_linear

KERNELS = ("int4", "triton", "torch", "dense")

__all__ = ["KERNELS", "LoadedAWQ", "Placement", "choose_placement", "load_awq", "parse_memory", "parse_placement",
           "weight_bytes"]

_VISION_BITS = {"fp16": 16, "int8": 8, "int4": 4}
_PLACEMENT = re.compile(r"^(?:awq\[)?\s*(.*?)\s*\]?$")
_MEMORY = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]i?b?|b)?\s*$", re.IGNORECASE)
_UNITS = {"": 1, "b": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}


@dataclass(frozen=True)
class Placement:
    """Where the parts of an AWQ model go. `source` says how it was chosen."""

    vision: str = "fp16"
    embed: str = "gpu"
    source: str = "as stored"

    @property
    def key(self) -> str:
        return awq_key(self.vision, self.embed)

    def __post_init__(self) -> None:
        if self.vision not in VISION_FORMATS:
            raise ValueError(f"placement vision={self.vision!r}: expected one of {', '.join(VISION_FORMATS)}")
        if self.embed not in EMBED_PLACES:
            raise ValueError(f"placement embed={self.embed!r}: expected one of {', '.join(EMBED_PLACES)}")


def parse_placement(text: str) -> Placement:
    """`awq[vision=int4,embed=cpu]` (a key of `r1v plan`) or just `vision=int4,embed=cpu`; missing keys keep
    their defaults (fp16, gpu)."""
    body = _PLACEMENT.match(text.strip())
    fields: dict[str, str] = {}
    for part in filter(None, (p.strip() for p in (body.group(1) if body else text).split(","))):
        key, sep, value = part.partition("=")
        if not sep or key.strip() not in ("vision", "embed"):
            raise ValueError(f"placement {text!r}: expected e.g. 'awq[vision=int4,embed=cpu]' (keys vision, embed)")
        fields[key.strip()] = value.strip().lower()
    return Placement(**fields, source=f"placement={text!r}")


def parse_memory(value: int | float | str) -> int:
    """Bytes from 24 * 2**30, "24GB", "24 GiB", "24000MB": as in `r1v plan`, the sizes memory is sold as count
    in binary units (a "24 GB" card holds 24 GiB)."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        if value <= 0:
            raise ValueError(f"device_memory must be positive, got {value}")
        return int(value)
    match = _MEMORY.match(str(value))
    if not match:
        raise ValueError(f"device_memory={value!r}: expected a size such as '24GB' or a number of bytes")
    unit = (match.group(2) or "").lower()[:1]
    return int(float(match.group(1)) * _UNITS[unit])


def choose_placement(ckpt: Checkpoint, device: torch.device, n_ctx: int, placement: str | None,
                     device_memory: int | str | None) -> tuple[Placement, PlanEntry | None]:
    """The placement to load with (see the module doc) and, when a budget decided it, the plan entry."""
    if placement is not None:
        return parse_placement(placement), None
    budget, what = None, ""
    if device_memory is not None:
        budget, what = parse_memory(device_memory), f"device_memory={device_memory}"
    elif device.type == "cuda":
        budget = torch.cuda.get_device_properties(device).total_memory
        what = f"{torch.cuda.get_device_name(device)} ({budget / GiB:.1f} GiB)"
    if budget is None:
        return Placement(vision=stored_vision(ckpt), source="as stored"), None
    entry = best_placement(ckpt.config, budget, context=n_ctx)
    if entry is None:
        smallest = min((e for e in plan_memory(ckpt.config, n_ctx).entries if e.format == "awq"),
                       key=lambda e: e.total_bytes)
        raise ValueError(f"{ckpt.path.name} does not fit {what} with a {n_ctx}-token context: the smallest "
                         f"placement, {smallest.key}, needs {smallest.total_bytes / GiB:.1f} GiB (see `r1v plan "
                         f"{ckpt.path} --context {n_ctx}`); lower n_ctx or give a larger device_memory")
    return Placement(entry.vision or "fp16", entry.embed or "gpu", source=f"r1v plan for {what}, n_ctx {n_ctx}"), entry


def stored_vision(ckpt: Checkpoint) -> str:
    names = ckpt.tensors
    if any(n.startswith("vision_model.") and n.endswith(".qweight") for n in names):
        return "int4"
    if any(n.startswith("vision_model.") and n.endswith(".int8_weight") for n in names):
        return "int8"
    return "fp16"


@dataclass
class LoadedAWQ:
    """The model and how it was laid out."""

    model: R1VModel
    placement: Placement  # as applied (vision never above what the checkpoint stores)
    requested: Placement  # as chosen (by the option, the plan, or the checkpoint)
    plan_entry: PlanEntry | None
    group_size: int
    kernel: str  # "int4" | "triton" | "torch" | "dense"
    device: torch.device
    dtype: torch.dtype
    embed_device: torch.device
    # with kernel "int4": the linears torch's int4 kernel cannot take (name: why), run by `fallback_kernel`
    fallbacks: dict[str, str] = field(default_factory=dict)
    fallback_kernel: str | None = None


def _check_quantization(ckpt: Checkpoint) -> int:
    q = ckpt.config.raw.get("quantization_config")
    if not q:  # an unquantized checkpoint: every linear stays a plain one (the pure-torch reference path)
        return 128
    problems = []
    if str(q.get("quant_method", "")).lower() != "awq":
        problems.append(f"quant_method {q.get('quant_method')!r}")
    if int(q.get("bits", 4)) != 4:
        problems.append(f"bits {q.get('bits')}")
    if not q.get("zero_point", True):
        problems.append("zero_point false")
    if str(q.get("version", "gemm")).lower() != "gemm":
        problems.append(f"version {q.get('version')!r} (only AutoAWQ's GEMM layout is read)")
    if problems:
        raise CheckpointError(f"{ckpt.path / 'config.json'}: quantization_config {', '.join(problems)}: "
                              "this backend runs 4-bit AWQ GEMM checkpoints with zero points")
    return int(q.get("group_size", 128))


def load_awq(path: str | Path, *, device: torch.device | str = "cpu", dtype: torch.dtype | None = None,
             kernel: str = "torch", placement: str | None = None, device_memory: int | str | None = None,
             n_ctx: int = 8192) -> LoadedAWQ:
    """Build the R1VModel of AWQ checkpoint `path` with quantized linears (see the module doc).

    dtype: compute dtype (default on CUDA bf16 with kernel "int4", the dtype its kernel multiplies in, else fp16;
    fp32 elsewhere). kernel: "int4" (torch's int4 kernels; linears they cannot take run the Triton kernels on
    CUDA, the torch path elsewhere), "triton" / "torch" for the AWQ linears, or "dense" to dequantize every
    quantized linear once into a plain fp linear (the baseline)."""
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:  # "cuda" -> "cuda:N", as tensors report it
        device = torch.device("cuda", torch.cuda.current_device())
    if kernel not in KERNELS:
        raise ValueError(f"kernel must be one of {', '.join(map(repr, KERNELS))}, got {kernel!r}")
    if kernel == "int4" and not int4.available(device):
        raise ValueError(f"kernel='int4': {int4.unsupported(128, 128, 128, device)}")
    if dtype is None:
        cuda = device.type == "cuda"
        dtype = (torch.bfloat16 if kernel == "int4" else torch.float16) if cuda else torch.float32
    with open_checkpoint(path, check_shapes=False) as ckpt:
        group_size = _check_quantization(ckpt)
        requested, entry = choose_placement(ckpt, device, n_ctx, placement, device_memory)
        stored = stored_vision(ckpt)
        vision = min(requested.vision, stored, key=_VISION_BITS.__getitem__)
        applied = Placement(vision, requested.embed, requested.source)
        embed_device = torch.device("cpu") if applied.embed == "cpu" else device
        special = ckpt.special_tokens()
        if IMG_CONTEXT not in special:
            raise CheckpointError(f"{ckpt.path}: the tokenizer has no {IMG_CONTEXT} token")
        with torch.device("meta"):
            model = R1VModel(ckpt.config, special[IMG_CONTEXT], ckpt.eos_token_ids)
        loader = _Loader(ckpt, model, device, dtype, kernel, group_size, vision, embed_device)
        loader.run()
    if loader.fallbacks:
        name, why = next(iter(loader.fallbacks.items()))
        warnings.warn(f"{Path(path).name}: {len(loader.fallbacks)} linear(s) run the {loader.fallback} kernel, "
                      f"torch's int4 kernel cannot take them (first: {name}: {why})", stacklevel=2)
    return LoadedAWQ(model.eval(), applied, requested, entry, group_size, kernel, device, dtype, embed_device,
                     loader.fallbacks, loader.fallback if kernel == "int4" else None)


class _Loader:
    def __init__(self, ckpt: Checkpoint, model: R1VModel, device: torch.device, dtype: torch.dtype, kernel: str,
                 group_size: int, vision: str, embed_device: torch.device):
        self.ckpt, self.model, self.device, self.dtype = ckpt, model, device, dtype
        self.kernel, self.group_size, self.vision, self.embed_device = kernel, group_size, vision, embed_device
        self.used: set[str] = set()
        self.fallbacks: dict[str, str] = {}
        # the kernel for the linears torch's int4 kernel cannot take
        self.fallback = "triton" if kernels.triton_usable_on(device) and device.type == "cuda" else "torch"

    def tensor(self, name: str, dtype: torch.dtype | None = None, device: torch.device | None = None) -> torch.Tensor:
        info = self.ckpt.tensors.get(name)
        if info is None:
            raise CheckpointError(f"{self.ckpt.path}: tensor {name!r} needed by the model is missing")
        self.used.add(name)
        value = stored_to_torch(self.ckpt.raw(name), info.dtype)
        return value.to(device=device or self.device, dtype=dtype or value.dtype, copy=True)

    def run(self) -> None:
        names = self.ckpt.tensors
        linears = [(n, m) for n, m in self.model.named_modules()
                   if isinstance(m, nn.Linear) and n != "language_model.lm_head"]
        for name, module in linears:
            self._set(name, self._linear(name, module, names))
        head = self.model.language_model
        for name, param in list(self.model.named_parameters()):
            if not param.is_meta:
                continue
            if name == "language_model.lm_head.weight" and head.config.tie_word_embeddings:
                continue  # shared with the embedding table, placed below
            on = self.embed_device if name == "language_model.model.embed_tokens.weight" else self.device
            owner_name, _, leaf = name.rpartition(".")
            value = self.tensor(name, self.dtype, on)
            self.model.get_submodule(owner_name)._parameters[leaf] = nn.Parameter(value, requires_grad=False)
        if head.config.tie_word_embeddings:
            table = head.model.embed_tokens.weight
            head.lm_head.weight = table if table.device == self.device else nn.Parameter(
                table.detach().to(self.device), requires_grad=False)
        unused = sorted(set(names) - self.used)
        if unused:
            more = f" (and {len(unused) - 1} more)" if len(unused) > 1 else ""
            raise CheckpointError(f"{names[unused[0]].file}: tensor {unused[0]!r} is not used by the model{more}")
        left = [n for n, t in [*self.model.named_parameters(), *self.model.named_buffers()] if t.is_meta]
        if left:
            raise CheckpointError(f"{self.ckpt.path}: {left[0]!r} was not loaded")

    def _set(self, name: str, module: nn.Module) -> None:
        owner_name, _, leaf = name.rpartition(".")
        setattr(self.model.get_submodule(owner_name), leaf, module)

    def _linear(self, prefix: str, module: nn.Linear, names: Any) -> nn.Module:
        bias = self.tensor(f"{prefix}.bias", self.dtype) if module.bias is not None else None
        vision = prefix.startswith("vision_model.")
        if f"{prefix}.qweight" in names:
            qweight, qzeros = self.tensor(f"{prefix}.qweight"), self.tensor(f"{prefix}.qzeros")
            scales = self.tensor(f"{prefix}.scales", torch.float16)
            if qweight.dtype != torch.int32 or qzeros.dtype != torch.int32:
                raise CheckpointError(f"{self.ckpt.path}: {prefix}.qweight/.qzeros must be int32 (AutoAWQ GEMM)")
            if tuple(qweight.shape) != (module.in_features, module.out_features // 8):
                raise CheckpointError(f"{self.ckpt.path}: {prefix}.qweight has shape {list(qweight.shape)}, the "
                                      f"model expects {[module.in_features, module.out_features // 8]}")
            out: nn.Module = self._awq(prefix, qweight, qzeros, scales, bias)
        elif f"{prefix}.int8_weight" in names:
            weight, scale = self.tensor(f"{prefix}.int8_weight"), self.tensor(f"{prefix}.int8_scale", torch.float16)
            out = Int8Linear(weight, scale, bias)
            if vision and self.vision == "int4":
                w = out.int8_weight.to(torch.float32) * out.int8_scale.to(torch.float32)[:, None]
                out = self._int4(prefix, w, bias, module.in_features)
        else:
            weight = self.tensor(f"{prefix}.weight", self.dtype)
            if tuple(weight.shape) != (module.out_features, module.in_features):
                raise CheckpointError(f"{self.ckpt.path}: {prefix}.weight has shape {list(weight.shape)}, the model "
                                      f"expects {[module.out_features, module.in_features]}")
            if vision and self.vision == "int8":
                out = Int8Linear.quantize(weight, bias)
            elif vision and self.vision == "int4":
                out = self._int4(prefix, weight, bias, module.in_features)
            else:
                out = _plain_linear(weight, bias)
        if self.kernel == "dense" and isinstance(out, (AWQLinear, Int8Linear)):
            out = dense_linear(out, self.dtype)
        return out

    def _int4(self, prefix: str, weight: torch.Tensor, bias: torch.Tensor | None,
              in_features: int) -> AWQLinear | Int4Linear:
        packed = AWQLinear.quantize(weight, bias, awq_group_size_for(in_features, self.group_size), "torch")
        return self._awq(prefix, packed.qweight, packed.qzeros, packed.scales, packed.bias)

    def _awq(self, prefix: str, qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor,
             bias: torch.Tensor | None) -> AWQLinear | Int4Linear:
        kernel = "torch" if self.kernel == "dense" else self.kernel
        out = awq_linear_for(qweight, qzeros, scales, bias, kernel, self.fallback)
        if kernel == "int4" and isinstance(out, AWQLinear):
            k, n, g = out.in_features, out.out_features, out.group_size
            self.fallbacks[prefix] = str(int4.unsupported(k, n, g, self.device))
        return out


def _plain_linear(weight: torch.Tensor, bias: torch.Tensor | None) -> nn.Linear:
    with torch.device("meta"):
        linear = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None)
    linear.weight = nn.Parameter(weight, requires_grad=False)
    if bias is not None:
        linear.bias = nn.Parameter(bias, requires_grad=False)
    return linear


def weight_bytes(module: nn.Module) -> int:
    """Bytes of the parameters and buffers of `module` (each storage once)."""
    seen: set[int] = set()
    total = 0
    for t in [*module.parameters(), *module.buffers()]:
        if t.data_ptr() in seen or t.is_meta:
            continue
        seen.add(t.data_ptr())
        total += t.numel() * t.element_size()
    return total
