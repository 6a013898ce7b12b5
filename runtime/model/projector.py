"""Pixel shuffle and the `mlp1` projector: ViT patch features -> LLM embeddings (InternVL-chat)."""
from __future__ import annotations

import torch
from torch import nn

from .qwen2 import LinearFactory
from .vision import InternViT


def pixel_shuffle(x: torch.Tensor, scale_factor: float = 0.5, ps_version: str = "v2") -> torch.Tensor:
    """InternVLChatModel.pixel_shuffle, step for step: [N, W, H, C] -> [N, W*s, H*s, C/s^2].

    Each output token concatenates a 2x2 (for s=0.5) block of neighbouring patches. v1 skips the final
    transpose (the grid comes out transposed); R1V and every current InternVL use v2.
    """
    if ps_version not in ("v1", "v2"):
        raise NotImplementedError(f"ps_version {ps_version!r} is not supported (v1 or v2)")
    n, w, h, c = x.size()
    x = x.view(n, w, int(h * scale_factor), int(c / scale_factor))
    x = x.permute(0, 2, 1, 3).contiguous()
    x = x.view(n, int(h * scale_factor), int(w * scale_factor), int(c / (scale_factor * scale_factor)))
    if ps_version == "v2":
        x = x.permute(0, 2, 1, 3).contiguous()
    return x


class Projector(nn.Sequential):
    """mlp1: LayerNorm(4*vit_hidden) -> Linear -> GELU -> Linear. An nn.Sequential so the tensor names
    are the checkpoint's (`mlp1.0`, `mlp1.1`, `mlp1.3`)."""

    def __init__(self, in_features: int, out_features: int, linear: LinearFactory = nn.Linear):
        super().__init__(
            nn.LayerNorm(in_features),  # default eps 1e-5, as upstream
            linear(in_features, out_features, bias=True),
            nn.GELU(),
            linear(out_features, out_features, bias=True),
        )


def extract_feature(
    vision: InternViT,
    mlp1: Projector,
    pixel_values: torch.Tensor,
    downsample_ratio: float = 0.5,
    ps_version: str = "v2",
) -> torch.Tensor:
    """InternVLChatModel.extract_feature: pixel_values [n, 3, H, W] -> [n, tokens_per_tile, llm_hidden].

    ViT hidden state -> drop CLS -> square grid -> pixel shuffle -> mlp1.
    """
    vit = vision(pixel_values)[:, 1:, :]
    side = int(vit.shape[1] ** 0.5)
    if side * side != vit.shape[1]:
        raise ValueError(f"{vit.shape[1]} patches do not form a square grid")
    vit = vit.reshape(vit.shape[0], side, side, -1)
    vit = pixel_shuffle(vit, downsample_ratio, ps_version)
    vit = vit.reshape(vit.shape[0], -1, vit.shape[-1])
    return mlp1(vit)
