"""The tile budget (`r1v.runtime.backends.llamacpp.tile_budget`): cost model, tile choice, stored rates; `max_tiles` per request
and `image_budget` on the llama.cpp backend and the command line."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from r1v.converters.gguf import GGUFConversion
from r1v.runtime.api import load
from r1v.runtime.image import TilingConfig, image_tiles
from r1v.runtime.backends.llamacpp.prefix_cache import PrefixCacheWarning
from r1v.runtime.backends.llamacpp.tile_budget import (CostModel, Rates, RateStore, estimate_seconds, measure_rates,
                                     pick_tiles)
from r1v.testing.images import pattern_pixels

THREADS = dict(n_threads=1, n_threads_batch=1, n_ctx=8192)
COST = CostModel(tokens_per_tile=256, linear_flops_per_position=1e9, attention_flops_per_pair=1e5)
RATES = Rates(encode_seconds_per_tile=2.0, prefill_seconds_per_gflop=0.01)


def test_cost_model_counts_attention_to_earlier_positions():
    cost = CostModel(256, linear_flops_per_position=10.0, attention_flops_per_pair=1.0)
    assert cost.prefill_flops(0, 1) == 10 + 1  # a position attends to itself
    assert cost.prefill_flops(0, 4) == 40 + (1 + 2 + 3 + 4)
    assert cost.prefill_flops(0, 7) == pytest.approx(cost.prefill_flops(0, 3) + cost.prefill_flops(3, 4))


def test_estimate_grows_with_tiles_and_text():
    one, three = (estimate_seconds(RATES, COST, [t], text_tokens=20) for t in (1, 3))
    assert 3 * one > three > 2.9 * one  # tiles cost about the same each; attention grows a little
    assert estimate_seconds(RATES, COST, [3], text_tokens=500) > three
    # encode 2 s/tile; prefill 256 positions x 1 GFLOP x 0.01 s/GFLOP = 2.56 s + attention
    assert estimate_seconds(RATES, COST, [1]) == pytest.approx(2 + 0.01 * COST.prefill_flops(0, 256) / 1e9)


def test_pick_tiles_fewer_on_a_small_budget_more_on_a_large_one():
    cfg = TilingConfig(max_tiles=12)
    size = (1792, 896)  # 2:1 -> 2x1, 4x2 grids (+ thumbnail)
    assert image_tiles(*size, cfg) == 9
    per_tile = estimate_seconds(RATES, COST, [1])
    small = pick_tiles([size], 1.5 * per_tile, RATES, COST, cfg)
    medium = pick_tiles([size], 4 * per_tile, RATES, COST, cfg)
    large = pick_tiles([size], 100 * per_tile, RATES, COST, cfg)
    assert (small.tiles, medium.tiles, large.tiles) == ((1,), (3,), (9,))
    assert small.fits and medium.fits and large.fits
    assert medium.estimated_seconds <= 4 * per_tile < estimate_seconds(RATES, COST, [9])
    assert large.max_tiles == 12  # the largest that fits
    too_small = pick_tiles([size], 0.1, RATES, COST, cfg)
    assert too_small.tiles == (1,) and not too_small.fits
    two = pick_tiles([size, size], 8 * per_tile, RATES, COST, cfg)  # the budget covers the whole prompt
    assert two.tiles == (3, 3)
    with pytest.raises(ValueError, match="> 0"):
        pick_tiles([size], 0, RATES, COST, cfg)


def test_measure_rates_divides_by_flops():
    rates = measure_rates(lambda: None, lambda: (0, 256), COST)
    assert rates.encode_seconds_per_tile > 0 and rates.prefill_seconds_per_gflop > 0


def test_rate_store_round_trip_and_damage(tmp_path: Path):
    store = RateStore(tmp_path / "rates.json")
    assert store.get("model-a") is None
    store.put("model-a", RATES)
    store.put("model-b", Rates(1.0, 1.0))
    assert store.get("model-a") == RATES and store.get("model-b") == Rates(1.0, 1.0)
    assert [p.name for p in tmp_path.iterdir()] == ["rates.json"]
    (tmp_path / "rates.json").write_text("{not json")
    with pytest.warns(PrefixCacheWarning, match="measured again"):
        assert store.get("model-a") is None
        store.put("model-a", RATES)  # replaces the damaged file
    assert store.get("model-a") == RATES and store.clear() and not store.clear()


# --- on the llama.cpp backend ---------------------------------------------------------------------------------

def _image(width: int, height: int, seed: int = 0) -> Image.Image:
    return Image.fromarray(pattern_pixels(width, height, seed))


@pytest.fixture(scope="module")
def llm(tiny_r1v_gguf: GGUFConversion) -> Path:
    return tiny_r1v_gguf.llm["f16"]


@pytest.mark.slow
def test_max_tiles_per_request(llm: Path, tmp_path: Path):
    wide = _image(1792, 896, seed=3)
    with load(llm, prefix_cache_dir=tmp_path, **THREADS) as model:
        assert model.generate("q", images=[wide], max_tokens=1).images == [((4, 2), 9)]
        assert model.generate("q", images=[wide], max_tokens=1, max_tiles=2).images == [((2, 1), 3)]
        assert model.generate("q", images=[wide], max_tokens=1, max_tiles=1).images == [((1, 1), 1)]
    with load(llm, max_tiles=2, prefix_cache=False, **THREADS) as model:
        assert model.generate("q", images=[wide], max_tokens=1).images == [((2, 1), 3)]
    with pytest.raises(ValueError, match="internvl"):
        load(llm, tiling="llamacpp", image_budget=5.0, **THREADS)


@pytest.mark.slow
def test_image_budget_measures_once_and_picks_tiles(llm: Path, tmp_path: Path, monkeypatch):
    wide = _image(1792, 896, seed=4)
    with load(llm, image_budget=1000.0, prefix_cache_dir=tmp_path, **THREADS) as model:
        rates = model._backend.rates()
        signature = model._backend._rate_signature()
        assert RateStore(tmp_path / "rates.json").get(signature) == rates  # stored beside the cache
        large = model.generate("q", images=[wide], max_tokens=1)
        assert large.images == [((4, 2), 9)] and large.estimated_prefill_seconds is not None
        per_tile = estimate_seconds(rates, model._backend.cost_model, [1], text_tokens=20)
        small = model.generate("q", images=[wide], max_tokens=1, image_budget=1.5 * per_tile)
        assert small.images == [((1, 1), 1)]
        assert 0 < small.estimated_prefill_seconds < large.estimated_prefill_seconds
        no_budget = model.generate("q", max_tokens=1)  # no images: nothing to choose
        assert no_budget.estimated_prefill_seconds is None

    from r1v.runtime.backends.llamacpp.backend import LlamaCppBackend

    def never(self):
        raise AssertionError("measured again")

    monkeypatch.setattr(LlamaCppBackend, "_measure_rates", never)
    with load(llm, image_budget=1000.0, prefix_cache_dir=tmp_path, **THREADS) as model:
        assert model._backend.rates() == rates


@pytest.mark.slow
def test_generate_command_image_budget(llm: Path, tmp_path: Path):
    png = tmp_path / "wide.png"
    _image(896, 448, seed=2).save(png)
    run = subprocess.run([sys.executable, "-m", "r1v", "generate", str(llm), "--image", str(png), "--prompt", "q",
                          "--image-budget", "1000", "--max-tokens", "2", "--temperature", "0", "--threads", "1",
                          "--n-threads-batch", "1", "--prefix-cache-dir", str(tmp_path / "cache")],
                         capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    assert "image budget: 3 tile(s)" in run.stderr
    assert json.loads((tmp_path / "cache" / "rates.json").read_text())["rates"]
    again = subprocess.run([sys.executable, "-m", "r1v", "generate", str(llm), "--image", str(png), "--prompt", "q",
                            "--max-tokens", "2", "--temperature", "0", "--threads", "1", "--n-threads-batch", "1",
                            "--prefix-cache-dir", str(tmp_path / "cache"), "--max-tiles", "1", "--no-prefix-cache"],
                           capture_output=True, text=True)
    assert again.returncode == 0, again.stderr
    assert "restored" not in again.stderr and "image budget" not in again.stderr
