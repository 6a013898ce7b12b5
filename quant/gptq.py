"""GPTQ rounding (Frantar et al. 2022) on AWQ's group grid: the same 4-bit integers, zeros and scales layout,
with each column's rounding error pushed onto the columns not yet rounded.

RTN rounds every weight to its nearest level independently. GPTQ walks the input columns in order and, after
rounding column j, corrects the remaining columns by the error times row j of the inverse Hessian
H = 2·XᵀX/n of the linear's calibration inputs (upper Cholesky factor, as the reference implementation), so
that the layer's *output* error on those inputs is what gets minimised, not the weights' error. The grid
(per-group zero and scale) is fixed beforehand from the weight, exactly the one RTN would use: the result is
an ordinary `QuantizedWeight`, packed and loaded like any other (vLLM and AutoAWQ cannot tell).

The Hessian is accumulated over chunks of tokens with forward hooks (`HessianRecorder`), so memory is one
[in, in] matrix per linear, never the calibration activations.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Iterator

import torch
from torch import nn

from .rtn import QuantizedWeight, check_groupable

_BLOCK = 128  # columns per lazy-update block (the reference's blocksize)


@torch.no_grad()
def gptq_round(
    weight: torch.Tensor, hessian: torch.Tensor, grid: QuantizedWeight, bits: int = 4, damp: float = 0.01,
    name: str = "weight",
) -> QuantizedWeight:
    """The integers of `weight` [out, in] on `grid`'s zeros and scales ([out, in/G]), chosen column by column
    against `hessian` [in, in] (Σ xᵀx over calibration tokens; a positive factor on it changes nothing).
    `damp` × mean(diag H) is added to the diagonal, as the reference does, so H is invertible; a float32
    `hessian` on the weight's device is damped in place (the caller hands it over, as HessianRecorder.take)."""
    out, n_in = weight.shape
    group_size = n_in // grid.scales.shape[1]
    check_groupable(weight.shape, group_size, name)
    if hessian.shape != (n_in, n_in):
        raise ValueError(f"{name}: Hessian of shape {tuple(hessian.shape)} does not fit weight {(out, n_in)}")
    w = weight.detach().to(torch.float32).clone()
    h = hessian.to(w.device, torch.float32)  # damped in place: at most two [in, in] matrices live at once
    dead = torch.diag(h) == 0  # inputs never active: their columns cannot matter
    h[dead, dead] = 1
    w[:, dead] = 0
    h.diagonal().add_(damp * torch.diag(h).mean())
    try:
        h = torch.linalg.cholesky(h)
        h = torch.cholesky_inverse(h)
        hinv = torch.linalg.cholesky(h, upper=True)
    except RuntimeError as e:  # torch.linalg.LinAlgError is a RuntimeError
        raise ValueError(f"{name}: the calibration Hessian is not positive definite ({e}); use more calibration "
                         "tokens or a larger damping") from None
    del h
    scales = grid.scales.to(w.device, torch.float32)
    zeros = grid.zeros.to(w.device, torch.float32)
    max_int = 2**bits - 1
    ints = torch.empty(out, n_in, dtype=torch.uint8, device=w.device)
    for start in range(0, n_in, _BLOCK):
        stop = min(start + _BLOCK, n_in)
        block = w[:, start:stop].clone()
        errors = torch.empty_like(block)
        h_block = hinv[start:stop, start:stop]
        for i in range(stop - start):
            g = (start + i) // group_size
            q = torch.clamp(torch.round(block[:, i] / scales[:, g]) + zeros[:, g], 0, max_int)
            ints[:, start + i] = q.to(torch.uint8)
            err = (block[:, i] - (q - zeros[:, g]) * scales[:, g]) / h_block[i, i]
            block[:, i:] -= err[:, None] * h_block[i, i:][None, :]
            errors[:, i] = err
        w[:, stop:] -= errors @ hinv[start:stop, stop:]
    return QuantizedWeight(ints.to(grid.int_weight.device), grid.zeros, grid.scales)


class HessianRecorder:
    """Σ xᵀx of each given linear's input over every forward pass while `recording()` is active (fp32,
    [in, in] per linear), with the token count."""

    def __init__(self, linears: dict[str, nn.Linear]):
        self.linears = linears
        self.sums: dict[str, torch.Tensor] = {}
        self.tokens: dict[str, int] = {name: 0 for name in linears}

    @contextmanager
    def recording(self) -> Iterator[HessianRecorder]:
        def hook(name: str) -> Any:
            def add(module: nn.Module, args: tuple[Any, ...], output: Any) -> None:
                x = args[0].detach().reshape(-1, args[0].shape[-1]).to(torch.float32)
                if name not in self.sums:
                    self.sums[name] = torch.zeros(x.shape[1], x.shape[1], dtype=torch.float32, device=x.device)
                self.sums[name].addmm_(x.T, x)
                self.tokens[name] += x.shape[0]
            return add

        handles = [lin.register_forward_hook(hook(name)) for name, lin in self.linears.items()]
        try:
            yield self
        finally:
            for handle in handles:
                handle.remove()

    def take(self, name: str) -> torch.Tensor:
        """2·Σxᵀx/n of `name`, handed over (the recorder lets go of it: one [in, in] matrix fewer held)."""
        if not self.tokens.get(name):
            raise RuntimeError(f"{name}: no calibration input was recorded")
        return self.sums.pop(name).mul_(2 / self.tokens[name])
