"""Decode one token per sequence with fixed shapes over the static KV cache, as CUDA graphs where there is a GPU.

Eager PyTorch decode on a GPU is bound by kernel launches (~44 per layer per token here), not by the weights it
reads. `StaticDecoder` runs each step as `Qwen2Model(..., step=StaticStep)`: the tokens' positions are a device
tensor and the attention reads a fixed `span` of the cache (masked beyond each position), so one captured graph per
span replays at every position. Spans are powers of two from `MIN_SPAN` up to the cache's capacity (the last one
the capacity itself): a step attends to at most twice the positions it needs, and a new sequence length never
meets a new shape. All graphs are captured once (`capture`, at load) into one memory pool; the first request
pays nothing for them.

Several sequences: a cache of several rows holds one sequence per row (`rows[b]`, a `KVCache.row` with its own
length). `step_rows` advances any set of rows in one forward, so each linear runs with M = rows and reads its
weight once for all of them (decode is bound by reading the weights). The rows a step runs are always rows
0..bucket-1 of the cache, bucket the smallest of 1, 2, 4, ... (up to the number of rows) above the highest row
with a token: the attention reads each row's keys in place, no gather (`swap_rows` moves a sequence to another
row: the backend keeps the sequences it steps in the first rows). A row of the bucket without a token this
step (free, holding a cached prefix, or in prefill) is a padding row: zero input, written at its own next position
(which its sequence overwrites before anything reads it) or, when full, at the last position (which no request
reads back: a prompt always leaves room for one new token); its output is dropped. One graph per (bucket, span).

The same step runs eagerly where graphs do not apply (CPU, graphs off, a capture that failed): the code path is
the same, so CPU tests cover it.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping

import torch

from .qwen2 import KVCache, Qwen2ForCausalLM, StaticStep

__all__ = ["MIN_SPAN", "StaticDecoder", "spans_for"]

MIN_SPAN = 256


def spans_for(capacity: int, smallest: int = MIN_SPAN) -> list[int]:
    """The attention spans of one cache: powers of two from `smallest` below the capacity, then the capacity (also
    the batch-size buckets of a cache of `capacity` rows, from 1)."""
    spans = []
    span = smallest
    while span < capacity:
        spans.append(span)
        span *= 2
    return [*spans, capacity]


@dataclass
class StaticDecoder:
    """Decode steps of `llm` over `cache`: `step(embeds)` -> logits (float32 [vocab]) of the token at
    cache.length, which it then advances (a one-row cache); `step_rows({row: embeds})` for several sequences, one
    per cache row (`rows`). `graphs`: capture CUDA graphs (CUDA only; see the module doc)."""

    llm: Qwen2ForCausalLM
    cache: KVCache
    graphs: bool = True
    spans: list[int] = field(init=False)
    buckets: list[int] = field(init=False)
    rows: list[KVCache] = field(init=False)  # one sequence per cache row: the cache itself when it has one row
    error: str | None = field(init=False, default=None)  # why graphs were given up, if they were
    _graphs: dict[tuple[int, int], Any] = field(init=False, default_factory=dict)
    _outputs: dict[tuple[int, int], torch.Tensor] = field(init=False, default_factory=dict)

    def __post_init__(self) -> None:
        key = self.cache.keys[0]
        self.spans = spans_for(self.cache.capacity)
        self.buckets = spans_for(self.cache.rows, 1)
        self.rows = [self.cache] if self.cache.rows == 1 else [self.cache.row(b) for b in range(self.cache.rows)]
        self.device = key.device
        self.graphs = self.graphs and key.device.type == "cuda"
        hidden = self.llm.config.hidden_size
        # The graphs' inputs: written before each replay (static addresses; bucket b reads the first b rows).
        self.embeds = torch.zeros(self.cache.rows, 1, hidden, dtype=key.dtype, device=key.device)
        self.position = torch.zeros(self.cache.rows, dtype=torch.long, device=key.device)

    @property
    def captured(self) -> bool:
        return bool(self._graphs)

    def span_for(self, position: int) -> int:
        """The smallest span holding positions 0..position."""
        for span in self.spans:
            if position < span:
                return span
        raise ValueError(f"KV cache full: position {position}, capacity {self.cache.capacity}")

    def bucket_for(self, rows: int) -> int:
        """The smallest batch-size bucket holding rows 0..rows-1."""
        for bucket in self.buckets:
            if rows <= bucket:
                return bucket
        raise ValueError(f"row {rows - 1} of a KV cache of {self.cache.rows} rows")

    def _run(self, bucket: int, span: int) -> torch.Tensor:
        hidden = self.llm.model(self.embeds[:bucket], self.cache, StaticStep(self.position[:bucket], span))
        return self.llm.lm_head(hidden[:, -1]).float()

    @torch.inference_mode()
    def step(self, embeds: torch.Tensor) -> torch.Tensor:
        """Logits float32 [vocab] of one token's embedding ([hidden] or [1, 1, hidden]) at cache.length (row 0)."""
        return self.step_rows({0: embeds})[0]

    @torch.inference_mode()
    def step_rows(self, embeds: Mapping[int, torch.Tensor]) -> dict[int, torch.Tensor]:
        """One forward advancing each given cache row by one token (its embedding, [hidden] or [1, 1, hidden], at
        that row's length): the logits float32 [vocab] of each, by row."""
        if not embeds:
            raise ValueError("a decode step needs at least one row")
        bucket = self.bucket_for(max(embeds) + 1)
        capacity = self.cache.capacity
        positions = [min(self.rows[b].length, capacity - 1) for b in range(bucket)]  # padding rows: see module doc
        span = self.span_for(max(self.rows[b].length for b in embeds))
        self.embeds[:bucket].zero_()
        for b, row in embeds.items():
            self.embeds[b].copy_(row.reshape(self.embeds[b].shape))
        self.position[:bucket].copy_(torch.tensor(positions, dtype=torch.long))
        graph = self._graphs.get((bucket, span))
        if graph is not None:
            graph.replay()
            logits = self._outputs[bucket, span].clone()  # the next replay overwrites the static output
        else:
            logits = self._run(bucket, span)
        for b in embeds:
            self.rows[b].length += 1
        return {b: logits[b] for b in embeds}

    @torch.inference_mode()
    def swap_rows(self, a: int, b: int) -> None:
        """Exchange the sequences of cache rows a and b (their keys, values and lengths): a copy of the positions
        they hold, so that the sequences a step advances can sit in its first rows."""
        n = max(self.rows[a].length, self.rows[b].length)
        for tensor in (*self.cache.keys, *self.cache.values):
            tensor[[a, b], :, :n] = tensor[[b, a], :, :n]
        self.rows[a].length, self.rows[b].length = self.rows[b].length, self.rows[a].length

    @torch.inference_mode()
    def capture(self) -> None:
        """Capture one graph per (bucket, span) (CUDA, graphs on; a no-op otherwise). Each is warmed up on a side
        stream first (kernel compilation, allocator). The warm-up and capture runs write K/V at the last cache
        position only, which no request reads back (see the module doc). On failure the decoder keeps the eager
        steps and says why in `error`."""
        if not self.graphs or self._graphs:
            return
        self.position.fill_(self.cache.capacity - 1)
        shapes = [(bucket, span) for bucket in self.buckets for span in self.spans]
        pool = torch.cuda.graph_pool_handle()
        try:
            side = torch.cuda.Stream(self.device)
            side.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(side):
                for shape in shapes:
                    for _ in range(2):
                        self._run(*shape)
            torch.cuda.current_stream(self.device).wait_stream(side)
            for shape in shapes:
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph, pool=pool):
                    self._outputs[shape] = self._run(*shape)
                self._graphs[shape] = graph
        except RuntimeError as exc:  # e.g. an op that syncs with the host: fall back to eager steps
            self._graphs.clear()
            self._outputs.clear()
            self.graphs = False
            self.error = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
        torch.cuda.synchronize(self.device)

    def describe(self) -> dict[str, Any]:
        return {"cuda_graphs": self.captured, "spans": self.spans, "batch_buckets": self.buckets,
                "graph_error": self.error}
