"""Test pictures: a smooth pattern plus noise, deterministic from a seed (structure for attention to see,
every pixel value used)."""
from __future__ import annotations

import numpy as np


def pattern_pixels(width: int, height: int, seed: int = 0, noise: float = 0.08) -> np.ndarray:
    """[height, width, 3] uint8 RGB."""
    yy, xx = np.mgrid[0:height, 0:width]
    base = np.stack([np.sin(xx / 37.0), np.cos(yy / 23.0), np.sin((xx + yy) / 61.0)], -1) * 0.4 + 0.5
    jitter = np.random.default_rng(seed).normal(0, noise, base.shape) if noise else 0.0
    return (np.clip(base + jitter, 0, 1) * 255).astype(np.uint8)
