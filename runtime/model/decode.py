"""Decode one token at a time with fixed shapes over the static KV cache, as CUDA graphs where there is a GPU.

Eager PyTorch decode on a GPU is bound by kernel launches (~44 per layer per token here), not by the weights it
reads. `StaticDecoder` runs each step as `Qwen2Model(..., step=StaticStep)`: the token's position is a device
tensor and the attention reads a fixed `span` of the cache (masked beyond the position), so one captured graph per
span replays at every position. Spans are powers of two from `MIN_SPAN` up to the cache's capacity (the last one
the capacity itself): a step attends to at most twice the positions it needs, and a new sequence length never
meets a new shape. All graphs are captured once (`capture`, at load) into one memory pool; the first request
pays nothing for them.

The same step runs eagerly where graphs do not apply (CPU, graphs off, a capture that failed): the code path is
the same, so CPU tests cover it.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from .qwen2 import KVCache, Qwen2ForCausalLM, StaticStep

__all__ = ["MIN_SPAN", "StaticDecoder", "spans_for"]

MIN_SPAN = 256


def spans_for(capacity: int, smallest: int = MIN_SPAN) -> list[int]:
    """The attention spans of one cache: powers of two from `smallest` below the capacity, then the capacity."""
    spans = []
    span = smallest
    while span < capacity:
        spans.append(span)
        span *= 2
    return [*spans, capacity]


@dataclass
class StaticDecoder:
    """Decode steps of `llm` over `cache`: `step(embeds)` -> logits (float32 [vocab]) of the token at
    cache.length, which it then advances. `graphs`: capture CUDA graphs (CUDA only; see the module doc)."""

    llm: Qwen2ForCausalLM
    cache: KVCache
    graphs: bool = True
    spans: list[int] = field(init=False)
    error: str | None = field(init=False, default=None)  # why graphs were given up, if they were
    _graphs: dict[int, Any] = field(init=False, default_factory=dict)
    _outputs: dict[int, torch.Tensor] = field(init=False, default_factory=dict)

    def __post_init__(self) -> None:
        key = self.cache.keys[0]
        self.spans = spans_for(self.cache.capacity)
        self.device = key.device
        self.graphs = self.graphs and key.device.type == "cuda"
        hidden = self.llm.config.hidden_size
        # The graphs' inputs: written before each replay (static addresses).
        self.embeds = torch.zeros(1, 1, hidden, dtype=key.dtype, device=key.device)
        self.position = torch.zeros(1, dtype=torch.long, device=key.device)

    @property
    def captured(self) -> bool:
        return bool(self._graphs)

    def span_for(self, position: int) -> int:
        """The smallest span holding positions 0..position."""
        for span in self.spans:
            if position < span:
                return span
        raise ValueError(f"KV cache full: position {position}, capacity {self.cache.capacity}")

    def _run(self, span: int) -> torch.Tensor:
        hidden = self.llm.model(self.embeds, self.cache, StaticStep(self.position, span))
        return self.llm.lm_head(hidden[0, -1]).float()

    @torch.inference_mode()
    def step(self, embeds: torch.Tensor) -> torch.Tensor:
        """Logits float32 [vocab] of one token's embedding ([hidden] or [1, 1, hidden]) at cache.length."""
        position = self.cache.length
        span = self.span_for(position)
        self.embeds.copy_(embeds.reshape(self.embeds.shape))
        self.position.fill_(position)
        graph = self._graphs.get(span)
        if graph is not None:
            graph.replay()
            logits = self._outputs[span].clone()  # the next replay overwrites the static output
        else:
            logits = self._run(span)
        self.cache.length = position + 1
        return logits

    @torch.inference_mode()
    def capture(self) -> None:
        """Capture one graph per span (CUDA, graphs on; a no-op otherwise). Each is warmed up on a side stream
        first (kernel compilation, allocator). The warm-up and capture runs write K/V at the last cache position
        only, which no valid sequence reaches before the step that overwrites it. On failure the decoder keeps
        the eager steps and says why in `error`."""
        if not self.graphs or self._graphs:
            return
        self.position.fill_(self.cache.capacity - 1)
        pool = torch.cuda.graph_pool_handle()
        try:
            side = torch.cuda.Stream(self.device)
            side.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(side):
                for span in self.spans:
                    for _ in range(2):
                        self._run(span)
            torch.cuda.current_stream(self.device).wait_stream(side)
            for span in self.spans:
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph, pool=pool):
                    self._outputs[span] = self._run(span)
                self._graphs[span] = graph
        except RuntimeError as exc:  # e.g. an op that syncs with the host: fall back to eager steps
            self._graphs.clear()
            self._outputs.clear()
            self.graphs = False
            self.error = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
        torch.cuda.synchronize(self.device)

    def describe(self) -> dict[str, Any]:
        return {"cuda_graphs": self.captured, "spans": self.spans, "graph_error": self.error}
