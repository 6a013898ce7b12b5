"""Tile budget: how many 448-pixel tiles an image may have so that its prompt is ready within a time budget.

An image costs (1) the vision tower, once per tile, and (2) the language model's prefill of its 256 positions
per tile. Both are measured once per machine and model (`measure_rates`: one tile encoded, one tile's
positions prefilled) and stored beside the prefix cache (`RateStore`, ``rates.json``). The prefill part is
counted in FLOPs of the loaded LLM (`CostModel`: 2 x parameters per position, plus attention to every
earlier position), so a long prompt's growing attention is priced in, and the measured rate turns FLOPs into
seconds. `pick_tiles` then takes the largest `max_tiles` whose estimate for the whole prompt fits.
"""
from __future__ import annotations

import json
import os
import secrets
import time
import warnings
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Callable, Sequence

from ...image import TilingConfig, image_tiles
from .prefix_cache import PrefixCacheWarning, default_cache_dir

__all__ = ["CostModel", "RateStore", "Rates", "TileChoice", "estimate_seconds", "measure_rates",
           "pick_tiles"]

RATES_FILE = "rates.json"
RATES_VERSION = 1


@dataclass(frozen=True)
class CostModel:
    """The loaded model's shape, as prefill work: FLOPs per evaluated position (the LLM's matrix products,
    2 x its non-embedding parameters) and per (position, earlier position) pair (attention: 4 x n_embd per
    layer)."""

    tokens_per_tile: int
    linear_flops_per_position: float
    attention_flops_per_pair: float

    def prefill_flops(self, start: int, n: int) -> float:
        """FLOPs to evaluate positions start .. start+n-1 with positions 0 .. start-1 already in the cache."""
        pairs = n * start + n * (n + 1) / 2
        return n * self.linear_flops_per_position + pairs * self.attention_flops_per_pair


@dataclass(frozen=True)
class Rates:
    """This machine's speed for one model: seconds per tile in the vision tower; seconds per GFLOP of prefill."""

    encode_seconds_per_tile: float
    prefill_seconds_per_gflop: float
    measured_at: float = 0.0

    def __post_init__(self) -> None:
        if not (self.encode_seconds_per_tile > 0 and self.prefill_seconds_per_gflop > 0):
            raise ValueError(f"rates must be positive, got {self}")


def estimate_seconds(rates: Rates, cost: CostModel, tiles: Sequence[int], text_tokens: int = 0) -> float:
    """Seconds to encode the images' tiles and prefill the whole prompt (text + image positions) from empty."""
    n = text_tokens + sum(tiles) * cost.tokens_per_tile
    return (rates.encode_seconds_per_tile * sum(tiles)
            + rates.prefill_seconds_per_gflop * cost.prefill_flops(0, n) / 1e9)


@dataclass(frozen=True)
class TileChoice:
    """What `pick_tiles` chose: the max_tiles to tile with, the tiles each image gets, the estimate, and
    whether it fits the budget (when even one tile per image does not, one tile is used anyway)."""

    max_tiles: int
    tiles: tuple[int, ...]
    estimated_seconds: float
    budget: float
    fits: bool


def pick_tiles(sizes: Sequence[tuple[int, int]], budget: float, rates: Rates, cost: CostModel, cfg: TilingConfig,
               text_tokens: int = 0) -> TileChoice:
    """The largest max_tiles (1 .. cfg.max_tiles) whose estimated prompt time fits `budget` seconds."""
    if budget <= 0:
        raise ValueError(f"the image budget must be > 0 seconds, got {budget}")
    best = None
    for m in range(1, cfg.max_tiles + 1):
        tiled = replace(cfg, max_tiles=m, min_tiles=min(cfg.min_tiles, m))
        tiles = tuple(image_tiles(w, h, tiled) for w, h in sizes)
        estimate = estimate_seconds(rates, cost, tiles, text_tokens)
        if best is None or estimate <= budget:
            best = TileChoice(m, tiles, estimate, budget, estimate <= budget)
    assert best is not None
    return best


def measure_rates(encode_tile: Callable[[], None], prefill: Callable[[], tuple[int, int]], cost: CostModel) -> Rates:
    """Time one tile through `encode_tile`, then `prefill` (which returns (start, n): the positions it
    evaluated); both should be warm (weights paged in)."""
    t0 = time.perf_counter()
    encode_tile()
    encode = time.perf_counter() - t0
    t0 = time.perf_counter()
    start, n = prefill()
    seconds = time.perf_counter() - t0
    return Rates(max(encode, 1e-9), max(seconds, 1e-9) / (cost.prefill_flops(start, n) / 1e9), time.time())


class RateStore:
    """Measured rates by model signature, in one JSON file beside the prefix cache (written atomically)."""

    def __init__(self, path: str | os.PathLike[str] | None = None):
        self.path = Path(path) if path is not None else default_cache_dir() / RATES_FILE

    def _read(self) -> dict[str, dict]:
        try:
            data = json.loads(self.path.read_text())
            if not isinstance(data, dict) or data.get("version") != RATES_VERSION:
                raise ValueError(f"version {data.get('version') if isinstance(data, dict) else None!r}")
            rates = data.get("rates")
            if not isinstance(rates, dict):
                raise ValueError("no rates table")
            return rates
        except FileNotFoundError:
            return {}
        except (OSError, ValueError) as e:
            warnings.warn(f"tile budget: ignoring {self.path} ({e}); the rates will be measured again",
                          PrefixCacheWarning, stacklevel=3)
            return {}

    def get(self, signature: str) -> Rates | None:
        found = self._read().get(signature)
        if found is None:
            return None
        try:
            return Rates(**found)
        except (TypeError, ValueError) as e:
            warnings.warn(f"tile budget: ignoring the rates stored for this model in {self.path} ({e})",
                          PrefixCacheWarning, stacklevel=2)
            return None

    def put(self, signature: str, rates: Rates) -> None:
        table = self._read()
        table[signature] = asdict(rates)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(f".tmp-{os.getpid()}-{secrets.token_hex(6)}-{self.path.name}")
        try:
            tmp.write_text(json.dumps({"version": RATES_VERSION, "rates": table}, indent=1))
            os.replace(tmp, self.path)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise

    def clear(self) -> bool:
        try:
            self.path.unlink()
            return True
        except FileNotFoundError:
            return False
