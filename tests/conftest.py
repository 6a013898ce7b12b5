"""Shared fixtures: tiny R1V-layout checkpoints and their GGUF / AWQ conversions, built once per test session.

A shared model is read-only: a test that edits one copies it to tmp_path first; one that writes into a shared model
gets an error at its teardown instead of changing what the tests after it read. What each model is:
tests/tiny_models.py."""
from __future__ import annotations

import atexit
import os
import shutil
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Iterator

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
from tiny_models import (AWQ_RUN, AWQ_SOURCE, K_QUANT_SIZES, MMPROJ_SOURCE, R1V_AWQ_RUN, R1V_QUANTS, TIED,
                         tiny_r1v_checkpoint)

if TYPE_CHECKING:
    from r1v.converters.gguf import GGUFConversion


# Shared model directory -> its files as built (path -> size, mtime), checked after every test.
_SHARED: dict[Path, dict[str, tuple[int, int]]] = {}


def _state(root: Path) -> dict[str, tuple[int, int]]:
    # os.walk, not Path.rglob: a third of the time, and this runs after every test (~0.3 ms for all models)
    state = {}
    for top, _, names in os.walk(root):
        for name in names:
            path = os.path.join(top, name)
            st = os.stat(path)
            state[path] = (st.st_size, st.st_mtime_ns)
    return state


def _shared(root: Path) -> Path:
    """Register a freshly built model directory as read-only for the tests; returns it."""
    _SHARED[root] = _state(root)
    return root


@pytest.fixture(autouse=True)
def _shared_models_unchanged() -> Iterator[None]:
    """After each test: no file of a shared model added, removed or rewritten (an error at that test's teardown,
    not a wrong model for the tests after it)."""
    yield
    for root, built in _SHARED.items():
        now = _state(root)
        changed = sorted(os.path.relpath(p, root) for p in built.keys() | now.keys() if built.get(p) != now.get(p))
        if changed:
            _SHARED[root] = now  # reported once, here
            pytest.fail(f"this test changed the shared model {root}: {', '.join(changed)} (copy it to tmp_path "
                        "before editing)", pytrace=False)


@pytest.fixture(scope="session")
def tiny_6b(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """InternViT-6B flavour (rms_norm, qk norm, no qkv bias), bf16, sharded."""
    return _shared(make_tiny_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny-6b", vit="6b", seed=0))


@pytest.fixture(scope="session")
def tiny_300m(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """InternViT-300M flavour (layer_norm, qkv bias, no qk norm), bf16, sharded."""
    return _shared(make_tiny_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny-300m", vit="300m", seed=1))


@pytest.fixture(scope="session")
def tiny_r1v(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The runtime tests' checkpoint (tests/tiny_models.py R1V_SIZES, seed 8, f32), directory `tiny-r1v`."""
    return _shared(tiny_r1v_checkpoint(tmp_path_factory.mktemp("shared") / "tiny-r1v"))


@pytest.fixture(scope="session")
def tiny_r1v_gguf(tiny_r1v: Path, tmp_path_factory: pytest.TempPathFactory) -> GGUFConversion:
    """tiny_r1v converted by `r1v convert gguf`: tiny-r1v-f16.gguf, tiny-r1v-q8_0.gguf, mmproj-tiny-r1v-f16.gguf."""
    from r1v.converters.gguf import convert_gguf

    out = tmp_path_factory.mktemp("shared") / "gguf"
    made = convert_gguf(tiny_r1v, out, quant=list(R1V_QUANTS), mmproj_quant="f16", progress=False)
    _shared(out)
    return made


@pytest.fixture(scope="session")
def tiny_r1v_awq(tiny_r1v: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """tiny_r1v converted by `r1v convert awq` (tests/tiny_models.py R1V_AWQ_RUN: RTN, group 32), `tiny-r1v-awq`."""
    pytest.importorskip("torch")
    from r1v.quant.driver import quantize_checkpoint_awq

    out = tmp_path_factory.mktemp("shared") / "tiny-r1v-awq"
    quantize_checkpoint_awq(tiny_r1v, out, **R1V_AWQ_RUN)
    return _shared(out)


@pytest.fixture(scope="session")
def awq_source(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The AWQ tests' checkpoint (tests/tiny_models.py AWQ_SOURCE: 6B-flavour ViT, 224-pixel tiles), `tiny`."""
    return _shared(make_tiny_checkpoint(tmp_path_factory.mktemp("shared") / "tiny", **AWQ_SOURCE))


@pytest.fixture(scope="session")
def tiny_awq(awq_source: Path, tmp_path_factory: pytest.TempPathFactory) -> Callable[[str], Path]:
    """tiny_awq(vision): awq_source converted by `r1v convert awq` (AWQ_RUN: RTN, group 32) with the vision tower
    `vision` (fp16 or int4), directory `tiny-awq-<vision>`; each one converted on first use."""
    from r1v.quant.driver import quantize_checkpoint_awq

    root = tmp_path_factory.mktemp("shared")
    made: dict[str, Path] = {}

    def get(vision: str) -> Path:
        if vision not in made:
            quantize_checkpoint_awq(awq_source, root / f"tiny-awq-{vision}", vision=vision, **AWQ_RUN)
            made[vision] = _shared(root / f"tiny-awq-{vision}")
        return made[vision]

    return get


@pytest.fixture(scope="session")
def tiny_k_quant(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """300M-flavour ViT, LLM rows of 256/512 (tests/tiny_models.py K_QUANT_SIZES), seed 0, bf16, directory `tiny`."""
    return _shared(make_tiny_checkpoint(tmp_path_factory.mktemp("shared") / "tiny", vit="300m", **K_QUANT_SIZES))


@pytest.fixture(scope="session")
def tiny_k_quant_f16(tiny_k_quant: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """tiny_k_quant's LLM in F16 (no mmproj): tiny-f16.gguf, the input of llama.cpp's quantizer."""
    from r1v.converters.gguf import convert_gguf

    out = tmp_path_factory.mktemp("shared")
    f16 = convert_gguf(tiny_k_quant, out, ["f16"], None, progress=False).llm["f16"]
    _shared(out)
    return f16


@pytest.fixture(scope="session")
def mmproj_source(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The mmproj tests' checkpoint (tests/tiny_models.py MMPROJ_SOURCE: 300M-flavour ViT 64 wide, seed 3, f32),
    directory `tiny-300m`."""
    return _shared(make_tiny_checkpoint(tmp_path_factory.mktemp("shared") / "tiny-300m", **MMPROJ_SOURCE))


@pytest.fixture(scope="session")
def tiny_tied(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Tied embeddings (tests/tiny_models.py TIED: 300M-flavour ViT, seed 5, f32), directory `tied`."""
    return _shared(make_tiny_checkpoint(tmp_path_factory.mktemp("shared") / "tied", **TIED))
