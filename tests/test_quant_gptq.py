"""GPTQ rounding on AWQ's group grid (quant/gptq.py), against AutoGPTQ's own implementation."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from r1v.quant.gptq import HessianRecorder, gptq_round
from r1v.quant.rtn import dequantize_rtn, quantize_rtn

from autogptq_oracle import autogptq_gptq


def correlated_inputs(n: int, width: int, seed: int) -> torch.Tensor:
    """Tokens whose features are correlated (a low-rank mix plus noise), as real activations are; on white
    inputs GPTQ's error feedback has nothing to work with."""
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(width // 4, width, generator=g)
    return torch.randn(n, width // 4, generator=g) @ mix + 0.3 * torch.randn(n, width, generator=g)


def recorded_hessian(linear: nn.Linear, x: torch.Tensor, chunk: int) -> torch.Tensor:
    recorder = HessianRecorder({"lin": linear})
    with recorder.recording():
        for s in range(0, x.shape[0], chunk):
            linear(x[s:s + chunk])
    return recorder.take("lin")


@pytest.mark.parametrize("group_size", [32, 64])
def test_equals_autogptq_on_the_same_grid(group_size, monkeypatch):
    """Same inputs, same grid (ours: AutoAWQ's zero point and scale per group, fed to AutoGPTQ's static
    groups): AutoGPTQ's fasterquant gives the very integers we give."""
    gptq = autogptq_gptq()
    torch.manual_seed(0)
    linear = nn.Linear(192, 48, bias=False)
    x = correlated_inputs(512, 192, seed=1)
    grid = quantize_rtn(linear.weight.detach(), group_size, 4)
    ours = gptq_round(linear.weight, recorded_hessian(linear, x, chunk=100), grid, 4)

    oracle = gptq.GPTQ(linear)
    oracle.quantizer.configure(4, perchannel=True, sym=False)
    groups = iter(range(192 // group_size))

    def our_group(self, w, weight=False):  # AutoGPTQ's find_params, answering with our grid's group
        g = next(groups)
        self.scale = grid.scales[:, g:g + 1].float()
        self.zero = grid.zeros[:, g:g + 1].float()

    oracle.quantizer.scale = torch.ones(48, 1)  # "ready": no whole-matrix find_params first
    monkeypatch.setattr(type(oracle.quantizer), "find_params", our_group)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda *a, **k: None)
    for s in range(0, 512, 128):  # AutoGPTQ's own running average of the Hessian
        oracle.add_batch(x[s:s + 128], None)
    oracle.fasterquant(blocksize=128, percdamp=0.01, group_size=group_size, static_groups=True)
    torch.testing.assert_close(dequantize_rtn(ours, torch.float32), linear.weight.data, rtol=0, atol=1e-6)
    assert torch.equal(ours.zeros, grid.zeros) and torch.equal(ours.scales, grid.scales)


def test_diagonal_hessian_is_round_to_nearest():
    """Uncorrelated inputs leave no column to push an error onto: GPTQ is RTN then."""
    torch.manual_seed(0)
    w = torch.randn(16, 64)
    grid = quantize_rtn(w, 32, 4)
    out = gptq_round(w, torch.diag(torch.rand(64) + 0.5), grid, 4)
    assert torch.equal(out.int_weight, grid.int_weight)


def test_output_error_well_below_rtn_on_correlated_inputs():
    torch.manual_seed(0)
    linear = nn.Linear(256, 64, bias=False)
    x = correlated_inputs(2048, 256, seed=2)
    train, held_out = x[:1024], x[1024:]
    grid = quantize_rtn(linear.weight.detach(), 64, 4)
    rounded = gptq_round(linear.weight, recorded_hessian(linear, train, chunk=256), grid, 4)
    reference = held_out @ linear.weight.detach().T
    err_rtn = (held_out @ dequantize_rtn(grid, torch.float32).T - reference).pow(2).mean()
    err_gptq = (held_out @ dequantize_rtn(rounded, torch.float32).T - reference).pow(2).mean()
    assert err_gptq < 0.5 * err_rtn, (float(err_gptq), float(err_rtn))


def test_refusals():
    w = torch.randn(8, 64)
    grid = quantize_rtn(w, 32, 4)
    with pytest.raises(ValueError, match=r"proj.weight: Hessian of shape \(32, 32\) does not fit weight \(8, 64\)"):
        gptq_round(w, torch.eye(32), grid, 4, name="proj.weight")
    with pytest.raises(ValueError, match="not positive definite"):
        gptq_round(w, -torch.eye(64), grid, 4, damp=0.0)
    recorder = HessianRecorder({"lin": nn.Linear(4, 4)})
    with pytest.raises(RuntimeError, match="lin: no calibration input was recorded"):
        recorder.take("lin")
