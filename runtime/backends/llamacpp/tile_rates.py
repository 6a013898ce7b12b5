"""This machine's rates for a loaded llama.cpp model, the input of `tile_budget`: looked up in the `RateStore`,
else measured in the model's own context (one generated tile encoded by libmtmd, its positions prefilled)."""
from __future__ import annotations

import warnings
from typing import Any, Callable

import numpy as np

from llama_cpp import llama_cpp as _ll

from .llama_batch import LlamaBatch, decode
from .prefix_cache import PrefixCacheWarning
from .tile_budget import CostModel, Rates, RateStore, measure_rates

__all__ = ["measure_in_context", "stored_or_measured"]


def stored_or_measured(store: RateStore, signature: str, measure: Callable[[], Rates]) -> Rates:
    """The rates stored for `signature`, else `measure()`d and stored (a store that cannot be written only
    warns)."""
    rates = store.get(signature)
    if rates is None:
        rates = measure()
        try:
            store.put(signature, rates)
        except OSError as e:
            warnings.warn(f"tile budget: could not store the measured rates in {store.path} ({e})",
                          PrefixCacheWarning, stacklevel=3)
    return rates


def _pattern_tile(size: int) -> Any:
    from PIL import Image

    yy, xx = np.mgrid[0:size, 0:size]
    pattern = np.stack([np.sin(xx / 37.0), np.cos(yy / 23.0), np.sin((xx + yy) / 61.0)], -1) * 0.4 + 0.5
    return Image.fromarray((pattern * 255).astype(np.uint8))


def measure_in_context(ctx: Any, embd_batch: LlamaBatch, n_batch: int, encode_tile: Callable[[Any], np.ndarray],
                       image_size: int, cost: CostModel) -> Rates:
    """Encode one `image_size` tile (`encode_tile`) and prefill its embeddings in `ctx` (in batches of
    `n_batch`), after paging the weights in; the KV cache is empty afterwards (it should be before)."""
    memory = _ll.llama_get_memory(ctx)
    tile = _pattern_tile(image_size)
    out: list[np.ndarray] = []

    def prefill() -> tuple[int, int]:
        embeddings = out[0]
        for begin in range(0, len(embeddings), n_batch):
            end = min(begin + n_batch, len(embeddings))
            embd_batch.set_embeddings(embeddings[begin:end], begin, end == len(embeddings))
            decode(ctx, embd_batch)
        return 0, len(embeddings)

    try:
        embd_batch.set_embeddings(np.zeros((8, embd_batch.n_embd), np.float32), 0, True)
        decode(ctx, embd_batch)  # pages the weights in (they are memory-mapped)
        _ll.llama_memory_clear(memory, True)
        return measure_rates(lambda: out.append(encode_tile(tile)), prefill, cost)
    finally:
        _ll.llama_memory_clear(memory, True)
