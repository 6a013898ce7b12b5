"""A compact Qwen2 decoder in plain torch (gpt-fast style): the reference the other backends are held to.

Module and parameter names follow transformers' Qwen2ForCausalLM (`model.layers.{i}.self_attn.q_proj`, ...),
so a checkpoint's `language_model.*` tensors load by name. Every projection is built by one `linear`
factory (default nn.Linear) so a quantized linear (AWQ) can be dropped in without touching this file.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from r1v.converters.config import Qwen2Config

# Called as linear(in_features, out_features, bias=...) and must return an nn.Linear-compatible module.
LinearFactory = Callable[..., nn.Module]


class RMSNorm(nn.Module):
    """T5/Qwen RMSNorm: normalize in float32, cast back, then scale (the order transformers uses)."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}, eps={self.eps}"


def check_supported(cfg: Qwen2Config) -> None:
    """Refuse configs this decoder would run wrongly, naming the field."""
    scaling = cfg.rope_scaling
    if scaling is not None:
        kind = scaling.get("rope_type", scaling.get("type"))
        if kind != "default":
            raise NotImplementedError(f"llm_config.rope_scaling type {kind!r} is not supported (only None/default)")
    if cfg.hidden_act != "silu":
        raise NotImplementedError(f"llm_config.hidden_act {cfg.hidden_act!r} is not supported (only silu)")


class RotaryEmbedding(nn.Module):
    """Plain RoPE (rotate-half convention). No buffers: cos/sin come from the positions on each call,
    in float32, so the module can be built on the meta device and needs no fix-up after loading."""

    def __init__(self, head_dim: int, theta: float):
        super().__init__()
        self.head_dim = head_dim
        self.theta = theta

    def forward(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """positions [T] (int) -> cos, sin [T, head_dim] in `dtype`."""
        exponent = torch.arange(0, self.head_dim, 2, dtype=torch.int64, device=positions.device).float()
        inv_freq = 1.0 / (self.theta ** (exponent / self.head_dim))
        freqs = positions.float()[:, None] * inv_freq[None, :]
        emb = torch.cat((freqs, freqs), dim=-1)
        return emb.cos().to(dtype), emb.sin().to(dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [B, H, T, D]; cos/sin [T, D], or [B, 1, 1, D] for one position per row (a decode step)."""
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat((-x2, x1), dim=-1) * sin


@dataclass
class StaticStep:
    """A one-token decode step of B sequences with fixed shapes: row b's token sits at `position[b]` (int64 [B], on
    the device) in row b of the KV cache and attends to the first `span` positions of that row, of which `mask`
    ([B, 1, 1, span] bool) shows those <= its position. Nothing in it depends on a host value, so one step per
    (B, span) can be captured as a CUDA graph and replayed at any positions (`model.decode.StaticDecoder`); the
    cache's lengths are not touched (the caller advances them)."""

    position: torch.Tensor
    span: int

    @property
    def mask(self) -> torch.Tensor:
        keys = torch.arange(self.span, device=self.position.device)
        return (keys[None, :] <= self.position[:, None])[:, None, None, :]


@dataclass
class KVCache:
    """Static (preallocated) key/value cache for all layers: [B, kv_heads, capacity, head_dim] per layer.

    `length` positions are filled; a forward pass with the cache writes at `length` and advances it. A cache of
    several rows holds one sequence per row (`row(b)`: that row as a one-sequence cache with its own length).
    """

    keys: list[torch.Tensor]
    values: list[torch.Tensor]
    length: int = 0

    @classmethod
    def allocate(
        cls, cfg: Qwen2Config, capacity: int, batch: int = 1,
        dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu",
    ) -> KVCache:
        if capacity > cfg.max_position_embeddings:
            raise ValueError(f"KV cache capacity {capacity} exceeds max_position_embeddings {cfg.max_position_embeddings}")
        shape = (batch, cfg.num_key_value_heads, capacity, cfg.head_dim)
        n = cfg.num_hidden_layers
        return cls(
            keys=[torch.zeros(shape, dtype=dtype, device=device) for _ in range(n)],
            values=[torch.zeros(shape, dtype=dtype, device=device) for _ in range(n)],
        )

    @property
    def capacity(self) -> int:
        return self.keys[0].shape[2]

    @property
    def rows(self) -> int:
        return self.keys[0].shape[0]

    def row(self, index: int) -> KVCache:
        """Row `index` as a one-sequence cache over the same memory (its writes land in this cache's tensors);
        its `length` is its own, starting at 0."""
        if not 0 <= index < self.rows:
            raise IndexError(f"KV cache row {index} of {self.rows}")
        return KVCache([k[index:index + 1] for k in self.keys], [v[index:index + 1] for v in self.values])

    def write_at(self, layer: int, step: StaticStep, k: torch.Tensor,
                 v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store one position per row, k/v [B, kv_heads, 1, D], row b at `step.position[b]` of cache row b (a
        tensor: no host value, so the same captured CUDA graph serves every position); return the first
        `step.span` positions of rows 0..B-1."""
        b, heads, _, dim = k.shape
        keys, values = self.keys[layer][:b], self.values[layer][:b]
        # Rows of [B * kv_heads * capacity, D]: row (b, h, position[b]) is (b * kv_heads + h) * capacity + position[b].
        at = (torch.arange(b * heads, device=k.device).view(b, heads) * self.capacity
              + step.position[:, None]).reshape(-1)
        keys.view(-1, dim).index_copy_(0, at, k.reshape(-1, dim))
        values.view(-1, dim).index_copy_(0, at, v.reshape(-1, dim))
        return keys[:, :, :step.span], values[:, :, :step.span]

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store k/v [B, kv_heads, T, D] at positions length..length+T; return all filled keys/values."""
        end = self.length + k.shape[2]
        if end > self.capacity:
            raise ValueError(f"KV cache full: {end} positions needed, capacity {self.capacity}")
        self.keys[layer][:, :, self.length:end] = k
        self.values[layer][:, :, self.length:end] = v
        return self.keys[layer][:, :, :end], self.values[layer][:, :, :end]

    def reset(self) -> None:
        self.length = 0


class Attention(nn.Module):
    """Grouped-query attention with q/k/v bias (Qwen2), no bias on o_proj."""

    def __init__(self, cfg: Qwen2Config, layer: int, linear: LinearFactory):
        super().__init__()
        self.layer = layer
        self.n_heads, self.n_kv, self.head_dim = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        h = cfg.hidden_size
        self.q_proj = linear(h, self.n_heads * self.head_dim, bias=True)
        self.k_proj = linear(h, self.n_kv * self.head_dim, bias=True)
        self.v_proj = linear(h, self.n_kv * self.head_dim, bias=True)
        self.o_proj = linear(self.n_heads * self.head_dim, h, bias=False)

    def forward(
        self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, cache: KVCache | None,
        step: StaticStep | None = None, mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        b, t, _ = x.shape
        q = self.q_proj(x).view(b, t, self.n_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(b, t, self.n_kv, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(b, t, self.n_kv, self.head_dim).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if step is not None:
            if cache is None or t != 1:
                raise ValueError("a static step is one token over a KV cache")
            k, v = cache.write_at(self.layer, step, k, v)
            # Grouped-query attention without repeating keys: the query heads that share a KV head are that
            # head's queries (head h reads KV head h // groups, as repeat_interleave below lays them out); each
            # row attends to its own cache row under its own mask.
            q = q.reshape(b, self.n_kv, self.n_heads // self.n_kv, self.head_dim)
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
            return self.o_proj(out.reshape(b, 1, self.n_heads * self.head_dim))
        if cache is None:
            mask, causal = None, True
        else:
            start = cache.length
            k, v = cache.update(self.layer, k, v)
            # Query i sits at absolute position start+i and sees keys 0..start+i.
            q_pos = torch.arange(start, start + t, device=x.device)
            mask = torch.arange(k.shape[2], device=x.device)[None, :] <= q_pos[:, None]
            causal = False
        groups = self.n_heads // self.n_kv
        k = k.repeat_interleave(groups, dim=1)
        v = v.repeat_interleave(groups, dim=1)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal)
        return self.o_proj(out.transpose(1, 2).reshape(b, t, self.n_heads * self.head_dim))


class MLP(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x))."""

    def __init__(self, cfg: Qwen2Config, linear: LinearFactory):
        super().__init__()
        self.gate_proj = linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.up_proj = linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.down_proj = linear(cfg.intermediate_size, cfg.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    def __init__(self, cfg: Qwen2Config, layer: int, linear: LinearFactory):
        super().__init__()
        self.self_attn = Attention(cfg, layer, linear)
        self.mlp = MLP(cfg, linear)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, cache: KVCache | None,
                step: StaticStep | None = None, mask: torch.Tensor | None = None) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, cache, step, mask)
        return x + self.mlp(self.post_attention_layernorm(x))


class Qwen2Model(nn.Module):
    """Embeddings, decoder layers, final norm: hidden states out."""

    def __init__(self, cfg: Qwen2Config, linear: LinearFactory = nn.Linear):
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg, i, linear) for i in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.rotary = RotaryEmbedding(cfg.head_dim, cfg.rope_theta)

    def forward(self, inputs_embeds: torch.Tensor, cache: KVCache | None = None,
                step: StaticStep | None = None) -> torch.Tensor:
        """Hidden states of `inputs_embeds` [B, T, H] continuing the cached sequence (advancing cache.length); with
        `step`, one token per row (T = 1) at step.position with fixed shapes (the lengths are left to the caller)."""
        mask = None
        if step is not None:
            positions, mask = step.position, step.mask  # the mask once for all layers
        else:
            start = cache.length if cache is not None else 0
            positions = torch.arange(start, start + inputs_embeds.shape[1], device=inputs_embeds.device)
        cos, sin = self.rotary(positions, inputs_embeds.dtype)
        if step is not None:  # one position per row: [B, D] -> [B, 1, 1, D] against q/k [B, heads, 1, D]
            cos, sin = cos[:, None, None, :], sin[:, None, None, :]
        x = inputs_embeds
        for layer in self.layers:
            x = layer(x, cos, sin, cache, step, mask)
        if cache is not None and step is None:  # every layer wrote at the same offset; advance once
            cache.length += inputs_embeds.shape[1]
        return self.norm(x)


class Qwen2ForCausalLM(nn.Module):
    """Qwen2Model + lm_head (kept a plain nn.Linear: quantization leaves the head in fp16)."""

    def __init__(self, cfg: Qwen2Config, linear: LinearFactory = nn.Linear):
        super().__init__()
        check_supported(cfg)
        self.config = cfg
        self.model = Qwen2Model(cfg, linear)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        self.tie_weights()

    def tie_weights(self) -> None:
        """With tie_word_embeddings the head shares the embedding table (and the checkpoint has no lm_head)."""
        if self.config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def new_cache(self, capacity: int, batch: int = 1) -> KVCache:
        """A KV cache in this model's dtype and device."""
        w = self.model.embed_tokens.weight
        return KVCache.allocate(self.config, capacity, batch, dtype=w.dtype, device=w.device)

    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        cache: KVCache | None = None,
    ) -> torch.Tensor:
        """input_ids [B, T] or inputs_embeds [B, T, H] -> logits [B, T, vocab]. With `cache`, the tokens
        continue the cached sequence (prefill or one-token decode alike)."""
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids or inputs_embeds")
        if inputs_embeds is None:
            inputs_embeds = self.model.embed_tokens(input_ids)
        return self.lm_head(self.model(inputs_embeds, cache))
