"""Drop-in quantized linears for the torch reference model (weight-only; activations stay fp16 / fp32).

- `AWQLinear`: AutoAWQ GEMM 4-bit (`qweight`, `qzeros`, `scales` buffers, as stored in the checkpoint) run by the
  Triton kernels or the pure-torch path (`kernels.awq_linear`). The LLM's decoder linears, and the vision tower
  at int4.
- `Int4Linear`: the same weights repacked at load for torch's own int4 kernels (`int4`): the default where this
  torch build has them (CPU; NVIDIA GPUs of sm80+). `awq_linear_for` builds it, or an `AWQLinear` for the shapes
  those kernels cannot take.
- `Int8Linear`: int8 per output channel, W = int8_weight * int8_scale[:, None] (the project's `--vision int8`
  format, see `r1v.converters.awq`). The vision tower at int8.

Both are built from tensors (`from_tensors`) or from a float weight at load time (`quantize`), which is how a
placement turns an fp16 vision tower into int8 / int4 without a new checkpoint.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from r1v.quant.pack import pack_awq
from r1v.quant.rtn import quantize_rtn

from . import int4, kernels

__all__ = ["AWQLinear", "Int4Linear", "Int8Linear", "awq_group_size_for", "awq_linear_for", "dense_linear"]


class AWQLinear(nn.Module):
    """y = x W^T + b with W in AutoAWQ's GEMM layout. `kernel`: "triton" or "torch" (see `kernels`)."""

    def __init__(self, qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor,
                 bias: torch.Tensor | None = None, kernel: str = "torch"):
        super().__init__()
        if kernel not in kernels.KERNELS:
            raise ValueError(f"kernel must be one of {kernels.KERNELS}, got {kernel!r}")
        self.in_features, self.out_features = qweight.shape[0], scales.shape[1]
        if scales.shape[0] == 0 or self.in_features % scales.shape[0]:
            raise ValueError(f"qweight {tuple(qweight.shape)} and scales {tuple(scales.shape)} do not fit together")
        self.group_size = self.in_features // scales.shape[0]
        self.kernel = kernel
        self.register_buffer("qweight", qweight)
        self.register_buffer("qzeros", qzeros)
        self.register_buffer("scales", scales)
        self.bias = nn.Parameter(bias, requires_grad=False) if bias is not None else None

    @classmethod
    def quantize(cls, weight: torch.Tensor, bias: torch.Tensor | None, group_size: int,
                 kernel: str = "torch") -> AWQLinear:
        """RTN 4-bit (AutoAWQ's arithmetic on the fp16 weight) of a float weight [out, in], packed."""
        packed = pack_awq(*quantize_rtn(weight.to(torch.float16), group_size))
        return cls(packed.qweight.to(weight.device), packed.qzeros.to(weight.device),
                   packed.scales.to(weight.device), bias, kernel)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return kernels.awq_linear(x, self.qweight, self.qzeros, self.scales, self.group_size, self.bias, self.kernel)

    def dequantized_weight(self, dtype: torch.dtype = torch.float16) -> torch.Tensor:
        return kernels.dequantize_torch(self.qweight, self.qzeros, self.scales, self.group_size, dtype)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, group_size={self.group_size}, "
                f"bias={self.bias is not None}, kernel={self.kernel}")


class Int4Linear(nn.Module):
    """y = x W^T + b by torch's int4 kernels (`int4.int4_linear`), W repacked from AutoAWQ's layout at load."""

    def __init__(self, weight: int4.Int4Weight, bias: torch.Tensor | None = None):
        super().__init__()
        self.in_features, self.out_features = weight.in_features, weight.out_features
        self.group_size = weight.group_size
        self.register_buffer("int4_weight", weight.packed)
        self.register_buffer("int4_scales_and_zeros", weight.scales_and_zeros)
        self.bias = nn.Parameter(bias, requires_grad=False) if bias is not None else None

    @classmethod
    def from_awq(cls, qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor,
                 bias: torch.Tensor | None = None) -> Int4Linear:
        return cls(int4.pack_awq_as_int4(qweight, qzeros, scales), bias)

    @property
    def weight4(self) -> int4.Int4Weight:
        return int4.Int4Weight(self.int4_weight, self.int4_scales_and_zeros, self.group_size, self.in_features,
                               self.out_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return int4.int4_linear(x, self.weight4, self.bias)

    def dequantized_weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The weight [out, in] the kernels multiply by (slow: for checks)."""
        return int4.dequantize_reference(self.weight4, dtype)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, group_size={self.group_size}, "
                f"bias={self.bias is not None}, kernel=int4")


def awq_linear_for(qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor, bias: torch.Tensor | None,
                   kernel: str, fallback: str) -> AWQLinear | Int4Linear:
    """The quantized linear for `kernel` ("int4", "triton" or "torch"): with "int4", an `Int4Linear` when torch's
    int4 kernel takes the shape on this device, else an `AWQLinear` running `fallback`."""
    if kernel == "int4":
        k, n = qweight.shape[0], scales.shape[1]
        if scales.shape[0] and not int4.unsupported(k, n, k // scales.shape[0], qweight.device):
            return Int4Linear.from_awq(qweight, qzeros, scales, bias)
        kernel = fallback
    return AWQLinear(qweight, qzeros, scales, bias, kernel)


class Int8Linear(nn.Module):
    """y = x (int8_weight * int8_scale[:, None])^T + b, dequantized per call into the input's dtype."""

    def __init__(self, int8_weight: torch.Tensor, int8_scale: torch.Tensor, bias: torch.Tensor | None = None):
        super().__init__()
        if int8_weight.dtype != torch.int8 or int8_scale.shape != (int8_weight.shape[0],):
            raise ValueError(f"int8_weight {int8_weight.dtype} {tuple(int8_weight.shape)} / int8_scale "
                             f"{tuple(int8_scale.shape)}: expected int8 [out, in] and [out]")
        self.out_features, self.in_features = int8_weight.shape
        self.register_buffer("int8_weight", int8_weight)
        self.register_buffer("int8_scale", int8_scale)
        self.bias = nn.Parameter(bias, requires_grad=False) if bias is not None else None

    @classmethod
    def quantize(cls, weight: torch.Tensor, bias: torch.Tensor | None) -> Int8Linear:
        """Symmetric per output channel: scale = max|w| / 127 (stored fp16), codes round(w / scale)."""
        w = weight.to(torch.float32)
        scale = (w.abs().amax(dim=1) / 127).clamp(min=1e-8).to(torch.float16)
        codes = torch.round(w / scale.to(torch.float32)[:, None]).clamp(-127, 127).to(torch.int8)
        return cls(codes, scale, bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = (self.int8_weight.to(torch.float32) * self.int8_scale.to(torch.float32)[:, None]).to(x.dtype)
        return F.linear(x, w, None if self.bias is None else self.bias.to(x.dtype))

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


def dense_linear(module: nn.Module, dtype: torch.dtype) -> nn.Linear:
    """A plain nn.Linear computing what a quantized `module` computes (weights dequantized once): the
    baseline of `r1v bench generate` and the `kernel="dense"` option."""
    if isinstance(module, AWQLinear):
        weight = module.dequantized_weight(dtype)
    elif isinstance(module, Int8Linear):
        weight = (module.int8_weight.to(torch.float32) * module.int8_scale.to(torch.float32)[:, None]).to(dtype)
    else:
        raise TypeError(f"not a quantized linear: {type(module).__name__}")
    with torch.device("meta"):
        linear = nn.Linear(module.in_features, module.out_features, bias=module.bias is not None)
    linear.weight = nn.Parameter(weight.contiguous(), requires_grad=False)
    if module.bias is not None:
        linear.bias = nn.Parameter(module.bias.to(dtype), requires_grad=False)
    return linear


def awq_group_size_for(in_features: int, preferred: int) -> int:
    """The group size for load-time int4 of a linear with `in_features` inputs: `preferred` (the checkpoint's)
    when it divides, else the largest power of two <= preferred that does."""
    if in_features % preferred == 0:
        return preferred
    size = 1 << (min(preferred, in_features).bit_length() - 1)
    while size > 1 and in_features % size:
        size //= 2
    return size
