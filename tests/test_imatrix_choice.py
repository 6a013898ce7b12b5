"""Which positions the importance matrix counts: `r1v convert awq --imatrix-out` records every position of the
calibration windows (image tokens too; the choice measured best on micro-r1v, quant/imatrix.py module doc,
README "The importance matrix"), or with `--imatrix-positions text` the text positions only (their context
still holds the image)."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from r1v.converters.checkpoint import open_checkpoint
from r1v.converters.gguf_common import ConversionError
from r1v.quant.calibration import build_calibration_batch, builtin_calibration
from r1v.quant.driver import LLM, embed_calibration_batch, load_module, quantize_checkpoint_awq
from r1v.quant.imatrix import Imatrix
from r1v.runtime.model.qwen2 import RMSNorm
from r1v.testing import make_tiny_checkpoint

SIZES = {"llm_hidden": 256, "llm_intermediate": 512, "llm_layers": 2, "image_size": 224}
RUN = {"group_size": 64, "n_samples": 4, "seq_len": 160, "method": "rtn", "progress": False}


class _Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.self_attn = nn.Module()
        self.self_attn.q_proj = nn.Linear(8, 4)


def test_recording_counts_only_kept_positions_across_chunks():
    torch.manual_seed(0)
    block, x = _Block(), torch.randn(3, 5, 8)
    keep = torch.rand(3, 5) > 0.4
    imatrix = Imatrix()
    with imatrix.recording(block, prefix="model.layers.0.", n_blocks=1, keep=keep):
        block.self_attn.q_proj(x[:2])  # the driver feeds the windows in chunks of rows, in order
        block.self_attn.q_proj(x[2:])
    name = "blk.0.attn_q.weight"
    assert imatrix.counts[name] == int(keep.sum()) < 15
    np.testing.assert_allclose(imatrix.sums[name], (x[keep].double() ** 2).sum(0).numpy(), rtol=1e-12)


def test_a_mask_that_does_not_cover_the_inputs_is_refused():
    block, imatrix = _Block(), Imatrix()
    with imatrix.recording(block, prefix="model.layers.0.", keep=torch.ones(2, 5, dtype=torch.bool)):
        block.self_attn.q_proj(torch.zeros(2, 5, 8))
        with pytest.raises(ValueError, match=r"blk\.0\.attn_q\.weight: positions mask \(2, 5\) does not cover "
                                             r"inputs \(1, 5, 8\) arriving at row 2"):
            block.self_attn.q_proj(torch.zeros(1, 5, 8))


def test_an_unknown_positions_choice_is_refused_before_any_work(tmp_path):
    with pytest.raises(ConversionError, match=r"unknown imatrix_positions 'image'; choose from all, text"):
        quantize_checkpoint_awq(tmp_path / "missing", tmp_path / "out", imatrix_positions="image", **RUN)
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
@pytest.mark.parametrize("positions", [None, "all", "text"])
def test_awq_imatrix_out_counts_the_chosen_positions_of_the_windows(tmp_path, positions):
    ckpt = make_tiny_checkpoint(tmp_path / "tiny", vit="6b", seed=0, **SIZES)
    items = builtin_calibration(n_images=4, n_reasoning=2)
    path = tmp_path / "imatrix.gguf"
    chosen = {} if positions is None else {"imatrix_positions": positions}  # None: the default
    result = quantize_checkpoint_awq(ckpt, tmp_path / "out", calib=items, imatrix_out=path, **RUN, **chosen)
    imatrix = Imatrix.load(path)

    # The first layer's inputs, recomputed: the calibration windows' embeddings through input_layernorm.
    opened = open_checkpoint(ckpt)
    batch = build_calibration_batch(opened, items, RUN["n_samples"], RUN["seq_len"])
    text = batch.input_ids != batch.image_token_id
    assert result.calibration["image_tokens"] > 0 and int(text.sum()) == (
        RUN["n_samples"] * RUN["seq_len"] - result.calibration["image_tokens"])
    norm = load_module(opened, lambda: RMSNorm(SIZES["llm_hidden"], opened.config.llm.rms_norm_eps),
                       f"{LLM}layers.0.input_layernorm.")
    with torch.no_grad():
        x = norm(embed_calibration_batch(opened, batch)).double().numpy()

    counted = text if positions == "text" else np.ones_like(text)
    assert set(imatrix.counts.values()) == {int(counted.sum())}
    assert imatrix.chunk_count == RUN["n_samples"] and imatrix.chunk_size == RUN["seq_len"]
    assert imatrix.datasets[0].endswith(f", {positions or 'all'} positions")
    expected = (x[counted] ** 2).sum(0)
    np.testing.assert_allclose(imatrix.sums["blk.0.attn_q.weight"], expected, rtol=1e-5)
    other = (x.reshape(-1, x.shape[-1]) ** 2).sum(0) if positions == "text" else (x[text] ** 2).sum(0)
    assert not np.allclose(imatrix.sums["blk.0.attn_q.weight"], other, rtol=1e-2)


def test_cli_refuses_positions_without_an_imatrix_to_count_them(tmp_path, capsys):
    from r1v.cli import main

    with pytest.raises(SystemExit) as exit_info:
        main(["convert", "awq", str(tmp_path / "ckpt"), "-o", str(tmp_path / "out"), "--imatrix-positions", "text"])
    assert exit_info.value.code == 2
    assert "--imatrix-positions says which positions --imatrix-out counts: give --imatrix-out FILE too" in (
        capsys.readouterr().err)
    assert not (tmp_path / "out").exists()
