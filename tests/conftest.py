"""Shared fixtures: tiny R1V-layout checkpoints, built once per test session."""
from __future__ import annotations

import atexit
import os
import shutil
import tempfile
from pathlib import Path

import pytest

# Models loaded by the tests write llama.cpp states after images to the prefix cache (on by default): keep
# them out of the user's cache. Set before any test imports the runtime; removed when the session ends.
if "R1V_PREFIX_CACHE_DIR" not in os.environ:
    os.environ["R1V_PREFIX_CACHE_DIR"] = tempfile.mkdtemp(prefix="r1v-test-prefix-cache-")
    atexit.register(shutil.rmtree, os.environ["R1V_PREFIX_CACHE_DIR"], ignore_errors=True)
# Without an NVIDIA GPU the AWQ Triton kernels run under Triton's interpreter on CPU tensors. Triton reads the
# flag when a kernel is defined, so it is set here, before any test module can import triton.
if not Path("/dev/nvidia0").exists():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from r1v.testing import make_tiny_checkpoint


@pytest.fixture(scope="session")
def tiny_6b(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """InternViT-6B flavour (rms_norm, qk norm, no qkv bias), bf16, sharded."""
    return make_tiny_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny-6b", vit="6b", seed=0)


@pytest.fixture(scope="session")
def tiny_300m(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """InternViT-300M flavour (layer_norm, qkv bias, no qk norm), bf16, sharded."""
    return make_tiny_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny-300m", vit="300m", seed=1)
