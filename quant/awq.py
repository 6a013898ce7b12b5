"""Activation-aware weight quantization (AWQ, Lin et al. 2023), as AutoAWQ implements it
(awq/quantize/quantizer.py: `_search_best_scale`, `_compute_best_clip`; awq/quantize/scale.py: `apply_scale`,
`apply_clip`), for one decoder layer at a time.

Scales. A *scaling group* is an op `prev` whose output feeds some linears and nothing else (a norm feeding
q/k/v, a linear feeding another). Multiplying the linears' input columns by s and dividing prev's output by s
leaves the block unchanged in float, but changes what 4-bit rounding loses: input channels with large
activations get finer steps. For α on a grid in [0, 1):

    s = mean|x|^α / (w_mean^(1-α) + 1e-4),  clamped ≥ 1e-4, then s /= sqrt(max(s) · min(s))

(x_mean per input channel over the calibration tokens, w_mean the mean over output rows of |w| normalised by
its group's max) and the α whose fake-quantized scaled weights give the smallest MSE of `inspect(x)` (the
block the group feeds: attention, MLP, or the linear itself) wins.

Clipping. Then, per linear (not q/k: their error passes through q·kᵀ and softmax, where the per-linear output
MSE this search minimises says little; AutoAWQ skips them too), each group's max |w| is shrunk on a grid
(factors 1, 1 - 1/n_grid, ..., staying above 1 - max_shrink) to minimise the MSE of that group's partial dot
products on calibration inputs.

Finally every linear is RTN-quantized (in fp16, as AutoAWQ does), the form written to the checkpoint; or,
with `rounding="gptq"`, its integers on that same fp16 grid are chosen by GPTQ (quant/gptq.py).
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import nn

from .gptq import HessianRecorder, gptq_round
from .rtn import QuantizedWeight, check_groupable, dequantize_rtn, fake_quantize, quantize_rtn

ROUNDINGS = ("rtn", "gptq")
_CLIP_OUT_CHUNK = 256  # output rows per clip-search batch (bounds the [rows, tokens, groups] products)


# --- one scaling group ----------------------------------------------------------------------------------------
@dataclass
class ScalingGroup:
    """`prev` (a norm whose output is weight·x̂ (+ bias), e.g. RMSNorm/LayerNorm, or an nn.Linear) feeds exactly
    `linears`; `inspect(x)` is the output whose error the scale search measures, given the linears' input x."""

    prev: nn.Module
    linears: list[nn.Linear]
    inspect: Callable[[torch.Tensor], torch.Tensor]
    name: str


@torch.no_grad()
def search_scale(
    group: ScalingGroup, x: torch.Tensor, group_size: int = 128, bits: int = 4, n_grid: int = 20
) -> torch.Tensor:
    """The per-input-channel scales [in] that minimise the group's output error after `bits`-bit RTN.

    `x`: the linears' input [..., in] (leading dims as `group.inspect` wants them, e.g. [B, T, in] for an
    attention block). The linears' weights are restored before returning."""
    for lin in group.linears:
        check_groupable(lin.weight.shape, group_size, f"{group.name}: weight")
    n_in = x.shape[-1]
    weight = torch.cat([lin.weight for lin in group.linears], dim=0)
    if weight.shape[1] != n_in:
        raise ValueError(f"{group.name}: input of width {n_in} does not fit weights of shape {tuple(weight.shape)}")
    w = weight.abs().reshape(-1, group_size)
    w_mean = (w / (w.amax(dim=1, keepdim=True) + 1e-6)).reshape(weight.shape).mean(0)
    x_mean = x.reshape(-1, n_in).abs().to(torch.float32).mean(0).to(x.dtype)  # fp32 sum, as AutoAWQ

    reference = group.inspect(x)
    originals = [lin.weight.detach().clone() for lin in group.linears]
    best, best_loss = None, float("inf")
    try:
        for i in range(n_grid):
            scales = _awq_scales(x_mean, w_mean, i / n_grid)
            s = scales.view(1, -1).to(weight.dtype)
            for lin, w0 in zip(group.linears, originals):
                lin.weight.data = fake_quantize(w0 * s, group_size, bits) / s
            loss = (group.inspect(x) - reference).to(torch.float32).pow(2).mean().item()
            if loss < best_loss:
                best, best_loss = scales.clone(), loss
    finally:
        for lin, w0 in zip(group.linears, originals):
            lin.weight.data = w0
    if best is None:
        raise RuntimeError(f"{group.name}: the AWQ scale search found no finite loss (non-finite inputs or weights?)")
    return best


def _awq_scales(x_mean: torch.Tensor, w_mean: torch.Tensor, ratio: float) -> torch.Tensor:
    scales = (x_mean.pow(ratio) / (w_mean.pow(1 - ratio) + 1e-4)).clamp(min=1e-4)
    scales = scales / (scales.max() * scales.min()).sqrt()
    scales[torch.isinf(scales) | torch.isnan(scales)] = 1
    return scales


@torch.no_grad()
def apply_scale(group: ScalingGroup, scales: torch.Tensor) -> None:
    """Fold 1/s into `prev` (a norm's weight and bias, or a linear's output rows and bias) and s into the
    linears' input columns, in place. In exact arithmetic the block computes the same function."""
    n = scales.numel()
    prev = group.prev
    if isinstance(prev, nn.Linear):
        if prev.out_features != n:
            raise ValueError(f"{group.name}: cannot fold {n} scales into a linear with {prev.out_features} outputs")
        prev.weight.div_(scales.view(-1, 1).to(prev.weight.dtype))
        if prev.bias is not None:
            prev.bias.div_(scales.to(prev.bias.dtype))
    else:
        weight = getattr(prev, "weight", None)
        if not isinstance(weight, torch.Tensor) or weight.dim() != 1 or weight.numel() != n:
            raise TypeError(
                f"{group.name}: cannot fold scales into {type(prev).__name__}: expected an nn.Linear with {n} "
                f"outputs or a norm whose output is weight * x_hat (+ bias) with a 1-D weight of {n}"
            )
        weight.div_(scales.to(weight.dtype))
        bias = getattr(prev, "bias", None)
        if isinstance(bias, torch.Tensor):
            bias.div_(scales.to(bias.dtype))
    for lin in group.linears:
        if lin.in_features != n:
            raise ValueError(f"{group.name}: {n} scales do not fit a linear with {lin.in_features} inputs")
        lin.weight.mul_(scales.view(1, -1).to(lin.weight.dtype))


# --- clipping ---------------------------------------------------------------------------------------------------
@torch.no_grad()
def search_clip(
    linear: nn.Linear, x: torch.Tensor, group_size: int = 128, bits: int = 4,
    n_grid: int = 20, max_shrink: float = 0.5, n_sample_tokens: int = 512,
) -> torch.Tensor:
    """Per-group clip bounds max_val [out, in/G] for `linear`'s weight, given its input x [..., in].

    Candidates are max|w| · (1 - i/n_grid) for i < max_shrink·n_grid; the error is the mean over (every
    step-th, ≈ n_sample_tokens) tokens of the squared change of each group's partial dot product x_g·w_g.
    Skipping q/k projections is the caller's rule (see `LayerTable.no_clip`)."""
    w = linear.weight.detach()
    check_groupable(w.shape, group_size, "weight")
    out, n_in = w.shape
    n_groups = n_in // group_size
    x = x.reshape(-1, n_in)
    x = x[:: max(1, x.shape[0] // n_sample_tokens)]
    xg = x.to(w.dtype).reshape(-1, n_groups, group_size)  # [t, g, k]
    best_all = []
    for start in range(0, out, _CLIP_OUT_CHUNK):
        wb = w[start:start + _CLIP_OUT_CHUNK]
        wg = wb.reshape(-1, n_groups, group_size)  # [o, g, k]
        org_max = wg.abs().amax(dim=-1)  # [o, g]
        org_out = torch.einsum("tgk,ogk->otg", xg, wg)
        best = org_max.clone()
        min_err = torch.full_like(org_max, float("inf"))
        for i in range(int(max_shrink * n_grid)):
            max_val = org_max * (1 - i / n_grid)
            q = fake_quantize(wb, group_size, bits, clip_max=max_val).reshape(-1, n_groups, group_size)
            err = (torch.einsum("tgk,ogk->otg", xg, q) - org_out).pow(2).mean(dim=1)  # [o, g]
            better = err < min_err
            min_err[better] = err[better]
            best[better] = max_val[better]
        best_all.append(best)
    return torch.cat(best_all, dim=0)


@torch.no_grad()
def apply_clip(linear: nn.Linear, max_val: torch.Tensor) -> None:
    """Clamp each group of `linear`'s weight to [-max_val, max_val] (max_val [out, in/G]), in place."""
    out, n_in = linear.weight.shape
    if max_val.dim() != 2 or max_val.shape[0] != out or n_in % max_val.shape[1] != 0:
        raise ValueError(f"clip bounds of shape {tuple(max_val.shape)} do not fit weight {(out, n_in)}")
    w = linear.weight.view(out, max_val.shape[1], -1)
    m = max_val.to(w.dtype).unsqueeze(-1)
    w.copy_(torch.clamp(w, -m, m))


# --- the decoder layer as data ----------------------------------------------------------------------------------
@dataclass(frozen=True)
class GroupSpec:
    """A scaling group by submodule path. `inspect`: the submodule whose output is the loss (None: the group's
    single linear); `inspect_kwargs`: call it with the layer's keyword arguments (attention: cos, sin, cache).
    A group whose `prev` is a linear applies only when that linear's outputs are the group's inputs one to one
    (v_proj → o_proj only when num_heads == num_kv_heads, as AutoAWQ does)."""

    name: str
    prev: str
    linears: tuple[str, ...]
    inspect: str | None = None
    inspect_kwargs: bool = False


@dataclass(frozen=True)
class LayerTable:
    """How AWQ sees one decoder layer: its scaling groups, in order, and the linears whose clip search is
    skipped. Every linear named in a group is quantized."""

    groups: tuple[GroupSpec, ...]
    no_clip: tuple[str, ...] = ()

    @property
    def linears(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys(name for g in self.groups for name in g.linears))


QWEN2_TABLE = LayerTable(
    groups=(
        GroupSpec("attn_in", "input_layernorm", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
                  inspect="self_attn", inspect_kwargs=True),
        GroupSpec("attn_out", "self_attn.v_proj", ("self_attn.o_proj",)),
        GroupSpec("mlp_in", "post_attention_layernorm", ("mlp.gate_proj", "mlp.up_proj"), inspect="mlp"),
        GroupSpec("mlp_out", "mlp.up_proj", ("mlp.down_proj",)),
    ),
    no_clip=("self_attn.q_proj", "self_attn.k_proj"),
)


def scaling_groups(
    layer: nn.Module, layer_kwargs: dict[str, Any] | None = None, groups_table: LayerTable = QWEN2_TABLE
) -> list[ScalingGroup]:
    """The table's groups that apply to this layer, bound to its modules."""
    kwargs = layer_kwargs or {}
    groups = []
    for spec in groups_table.groups:
        prev = layer.get_submodule(spec.prev)
        linears = [layer.get_submodule(name) for name in spec.linears]
        if isinstance(prev, nn.Linear) and any(lin.in_features != prev.out_features for lin in linears):
            continue
        if spec.inspect is None:
            if len(linears) != 1:
                raise ValueError(f"group {spec.name}: inspect may be omitted only for a single linear")
            inspect: Callable[[torch.Tensor], torch.Tensor] = linears[0]
        else:
            module = layer.get_submodule(spec.inspect)
            inspect = functools.partial(module, **kwargs) if spec.inspect_kwargs else module
        groups.append(ScalingGroup(prev=prev, linears=linears, inspect=inspect, name=spec.name))
    return groups


@torch.no_grad()
def capture_inputs(
    layer: nn.Module, modules: list[nn.Module], layer_input: torch.Tensor,
    layer_kwargs: dict[str, Any] | None = None,
) -> tuple[dict[nn.Module, torch.Tensor], torch.Tensor]:
    """Run `layer(layer_input, **layer_kwargs)` once; return each given submodule's input (forward hooks),
    keyed by the module, and the layer's output."""
    captured: dict[nn.Module, list[torch.Tensor]] = {m: [] for m in modules}

    def keep(module: nn.Module, args: tuple[Any, ...], output: Any) -> None:
        captured[module].append(args[0].detach())

    handles = [m.register_forward_hook(keep) for m in captured]
    try:
        output = layer(layer_input, **(layer_kwargs or {}))
    finally:
        for handle in handles:
            handle.remove()
    missing = [type(m).__name__ for m, xs in captured.items() if not xs]
    if missing:
        raise RuntimeError(f"no input reached {len(missing)} of the given modules in the layer's forward pass")
    return {m: xs[0] if len(xs) == 1 else torch.cat(xs) for m, xs in captured.items()}, output


@torch.no_grad()
def quantize_layer_awq(
    layer: nn.Module,
    layer_input: torch.Tensor,
    layer_kwargs: dict[str, Any] | None = None,
    group_size: int = 128,
    bits: int = 4,
    groups_table: LayerTable = QWEN2_TABLE,
    *,
    n_grid: int = 20,
    scale: bool = True,
    clip: bool = True,
    rounding: str = "rtn",
    chunk_rows: int | None = None,
) -> dict[str, QuantizedWeight]:
    """AWQ-quantize one decoder layer in place: scale search on the original weights, scales applied, clip
    search and clipping, then every linear rounded to 4 bits on its fp16 RTN grid. Returns {linear path:
    (int_weight, zeros, scales)}. `scale=False` / `clip=False` leave a step out (both off is plain RTN).
    `rounding="gptq"` picks the integers on that same grid by GPTQ (quant/gptq.py) instead of to nearest,
    with each linear's Hessian accumulated over forward passes of `chunk_rows` calibration rows at a time.

    `layer_input` [B, T, hidden] and `layer_kwargs` are what `layer(layer_input, **layer_kwargs)` takes (for
    runtime.model.qwen2.DecoderLayer: cos, sin, cache=None). On return the layer computes with the
    quantized weights (each linear's weight is its dequantized matrix) and carries the folded scales in its
    norms and biases: run it for the next layer's input, save those parameters from it."""
    layer_kwargs = dict(layer_kwargs or {})
    if rounding not in ROUNDINGS:
        raise ValueError(f"rounding must be one of {', '.join(ROUNDINGS)}, got {rounding!r}")
    for name in groups_table.linears:
        check_groupable(layer.get_submodule(name).weight.shape, group_size, f"{name}.weight")
    # AutoAWQ searches every group on the original weights, then applies all scales.
    groups = scaling_groups(layer, layer_kwargs, groups_table) if scale else []
    if groups:
        inputs, _ = capture_inputs(layer, [g.linears[0] for g in groups], layer_input, layer_kwargs)
        found = [(g, search_scale(g, inputs[g.linears[0]], group_size, bits, n_grid)) for g in groups]
        del inputs
        for group, scales in found:
            apply_scale(group, scales)

    if clip:
        names = [name for name in groups_table.linears if name not in groups_table.no_clip]
        # captured after scaling: exactly what the scaled linears see (AutoAWQ divides its copies by s instead)
        inputs, _ = capture_inputs(layer, [layer.get_submodule(n) for n in names], layer_input, layer_kwargs)
        for name in names:
            linear = layer.get_submodule(name)
            apply_clip(linear, search_clip(linear, inputs[linear], group_size, bits, n_grid))
        del inputs

    recorder = None
    if rounding == "gptq":
        recorder = HessianRecorder({name: layer.get_submodule(name) for name in groups_table.linears})
        rows = chunk_rows or layer_input.shape[0]
        with recorder.recording():
            for start in range(0, layer_input.shape[0], rows):
                layer(layer_input[start:start + rows], **layer_kwargs)
    result = {}
    for name in groups_table.linears:
        linear = layer.get_submodule(name)
        grid = quantize_rtn(linear.weight.detach().to(torch.float16), group_size, bits)
        if recorder is not None:
            grid = gptq_round(linear.weight, recorder.take(name), grid, bits, name=f"{name}.weight")
        result[name] = grid
        linear.weight.data = dequantize_rtn(grid, linear.weight.dtype)
    return result
