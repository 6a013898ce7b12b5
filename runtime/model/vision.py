"""InternViT (300M and 6B flavours) as InternVL-chat's `InternVisionModel` runs it.

Names match the checkpoint (`embeddings.class_embedding`, `encoder.layers.{i}.attn.qkv`, `ls1`, ...), so
`vision_model.*` tensors load by name. The 6B flavour differs only by config: rms_norm, qk normalization
over the full hidden size, no qkv bias.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from r1v.converters.config import VisionConfig

from .qwen2 import LinearFactory, RMSNorm

_ACTIVATIONS = {"gelu": F.gelu}  # InternViT's "gelu" is the exact (erf) GELU


def make_norm(cfg: VisionConfig, dim: int) -> nn.Module:
    """InternViT's NORM2FN: the same norm type is used for norm1/norm2 and for q_norm/k_norm."""
    if cfg.norm_type == "rms_norm":
        return RMSNorm(dim, cfg.layer_norm_eps)
    if cfg.norm_type == "layer_norm":
        return nn.LayerNorm(dim, eps=cfg.layer_norm_eps)
    raise NotImplementedError(f"vision_config.norm_type {cfg.norm_type!r} is not supported")


class VisionEmbeddings(nn.Module):
    """CLS token + Conv2d patch embedding + learned absolute position embedding [1, 1+N, h]."""

    def __init__(self, cfg: VisionConfig):
        super().__init__()
        h = cfg.hidden_size
        self.grid = cfg.image_size // cfg.patch_size
        self.class_embedding = nn.Parameter(torch.zeros(1, 1, h))
        self.patch_embedding = nn.Conv2d(cfg.num_channels, h, kernel_size=cfg.patch_size, stride=cfg.patch_size)
        self.position_embedding = nn.Parameter(torch.zeros(1, 1 + self.grid**2, h))

    def _patch_positions(self, height: int, width: int) -> torch.Tensor:
        """Position embeddings for a height x width patch grid; bicubic-resized (in float32, as upstream)
        only when the grid differs from the trained one, since resizing to the same size is the identity."""
        pos = self.position_embedding[:, 1:]
        if (height, width) == (self.grid, self.grid):
            return pos
        grid = pos.float().reshape(1, self.grid, self.grid, -1).permute(0, 3, 1, 2)
        grid = F.interpolate(grid, size=(height, width), mode="bicubic", align_corners=False)
        return grid.reshape(1, -1, height * width).permute(0, 2, 1).to(pos.dtype)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        patches = self.patch_embedding(pixel_values.to(self.patch_embedding.weight.dtype))
        b, _, height, width = patches.shape
        patches = patches.flatten(2).transpose(1, 2)
        x = torch.cat([self.class_embedding.expand(b, 1, -1), patches], dim=1)
        pos = torch.cat([self.position_embedding[:, :1], self._patch_positions(height, width)], dim=1)
        return x + pos


class VisionAttention(nn.Module):
    """Fused qkv; optional q/k normalization over the FULL hidden size before the head split."""

    def __init__(self, cfg: VisionConfig, linear: LinearFactory):
        super().__init__()
        h = cfg.hidden_size
        self.n_heads, self.head_dim = cfg.num_attention_heads, cfg.head_dim
        self.qkv = linear(h, 3 * h, bias=cfg.qkv_bias)
        self.proj = linear(h, h, bias=True)
        self.qk_normalization = cfg.qk_normalization
        if cfg.qk_normalization:
            self.q_norm = make_norm(cfg, h)
            self.k_norm = make_norm(cfg, h)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        # Rows of qkv are [q; k; v], each heads x head_dim (upstream reshapes to (B, N, 3, heads, hd)).
        q, k, v = self.qkv(x).split(c, dim=-1)
        if self.qk_normalization:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k, v = (t.view(b, n, self.n_heads, self.head_dim).transpose(1, 2) for t in (q, k, v))
        out = F.scaled_dot_product_attention(q, k, v)
        return self.proj(out.transpose(1, 2).reshape(b, n, c))


class VisionMLP(nn.Module):
    def __init__(self, cfg: VisionConfig, linear: LinearFactory):
        super().__init__()
        if cfg.hidden_act not in _ACTIVATIONS:
            raise NotImplementedError(f"vision_config.hidden_act {cfg.hidden_act!r} is not supported")
        self.act = _ACTIVATIONS[cfg.hidden_act]
        self.fc1 = linear(cfg.hidden_size, cfg.intermediate_size, bias=True)
        self.fc2 = linear(cfg.intermediate_size, cfg.hidden_size, bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class VisionLayer(nn.Module):
    """Pre-norm block with layer scale: x += ls1 * attn(norm1(x)); x += ls2 * mlp(norm2(x))."""

    def __init__(self, cfg: VisionConfig, linear: LinearFactory):
        super().__init__()
        self.norm1 = make_norm(cfg, cfg.hidden_size)
        self.attn = VisionAttention(cfg, linear)
        self.ls1 = nn.Parameter(torch.full((cfg.hidden_size,), cfg.initializer_factor))
        self.norm2 = make_norm(cfg, cfg.hidden_size)
        self.mlp = VisionMLP(cfg, linear)
        self.ls2 = nn.Parameter(torch.full((cfg.hidden_size,), cfg.initializer_factor))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x).to(x.dtype)) * self.ls1
        return x + self.mlp(self.norm2(x).to(x.dtype)) * self.ls2


class VisionEncoder(nn.Module):
    def __init__(self, cfg: VisionConfig, linear: LinearFactory):
        super().__init__()
        self.layers = nn.ModuleList(VisionLayer(cfg, linear) for _ in range(cfg.num_hidden_layers))


class InternViT(nn.Module):
    """pixel_values [B, 3, H, W] -> hidden state of `select_layer` [B, 1 + patches, hidden] (CLS first).

    `select_layer` indexes upstream's hidden_states tuple (embeddings, layer 1, ..., layer L): -1 is the
    last layer, 0 the embeddings. Layers after the selected one are not run (upstream runs and drops them).
    """

    def __init__(self, cfg: VisionConfig, select_layer: int = -1, linear: LinearFactory = nn.Linear):
        super().__init__()
        n = cfg.num_hidden_layers
        if not -(n + 1) <= select_layer <= n:
            raise ValueError(f"select_layer {select_layer} is out of range for {n} vision layers")
        self.config = cfg
        self.n_run = select_layer if select_layer >= 0 else n + 1 + select_layer
        self.embeddings = VisionEmbeddings(cfg)
        self.encoder = VisionEncoder(cfg, linear)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        x = self.embeddings(pixel_values)
        for layer in self.encoder.layers[: self.n_run]:
            x = layer(x)
        return x
