"""Which order libmtmd wants an InternVL mmproj's position rows in, and a copy of a file in the other order.

llama.cpp's InternVL graph (tools/mtmd/models/internvl.cpp, as vendored by llama-cpp-python 0.3.36) appends
the class token *after* the patches but adds the position rows in file order (llama.cpp issue #25814), so
our mmproj files store them patches-then-class (``r1v.vision.position_embd_order = "patches,cls"``). A
llama.cpp with the fix (PR #25844) puts the class token first and wants the checkpoint's order
("cls,patches"); that is also the order of a file without the key (llama.cpp's own converter writes it).

The probe (`write_probe_mmproj`, `order_from_probe`): a tiny mmproj in which every block is the identity
(zero output projections), the patch embedding and class token are zero, and only the first and the last
position rows are non-zero. Each patch then leaves the ViT as its own position row, and after the pixel
shuffle and the projector an output token is non-zero exactly when one of its patches got a non-zero row: the
first token when the first patch got row 0 (the library wants "patches,cls"), the last token when the last
patch got the last row ("cls,patches"). Running it takes a few milliseconds; `mtmd.library_position_order`
runs it once per library build and keeps the answer (in memory and in ``$XDG_CACHE_HOME/r1v``).

No torch, no libmtmd here (mtmd.py runs the probe): numpy and gguf-py only.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import gguf
import numpy as np

from r1v.converters.config import IMAGENET_MEAN, IMAGENET_STD, VisionConfig
from r1v.converters.gguf_common import PlannedTensor, QType, atomic_path, write_gguf
from r1v.converters.gguf_mmproj import (
    ARCH, BLOCK_NAMES, CHECKPOINT_POSITION_ORDER, EMBEDDING_NAMES, POSITION_EMBD, POSITION_ORDER, POSITION_ORDER_KEY,
    POSITION_ORDERS, PROJECTOR_NAMES, QKV_SPLIT, add_vision_kv,
)

__all__ = ["PROBE_IMAGE_SIZE", "ProbeResult", "file_order", "library_key", "order_from_probe", "reordered_copy",
           "reordered_mmproj", "write_probe_mmproj"]

# The probe ViT: 56-pixel image of 14-pixel patches = 4 x 4 patches -> 2 x 2 output tokens after the shuffle.
PROBE_IMAGE_SIZE = 56
_PROBE = VisionConfig(hidden_size=8, num_hidden_layers=1, num_attention_heads=2, intermediate_size=16,
                      image_size=PROBE_IMAGE_SIZE, patch_size=14)
_PROJECTOR_HIDDEN = 16
_SCALE = 2  # pixel shuffle 0.5


@dataclass(frozen=True)
class ProbeResult:
    """What the probe found: the order the library wants, and which output tokens came out non-zero."""

    order: str
    live_tokens: tuple[int, ...]


# --- the probe file -----------------------------------------------------------------------------------------

def _probe_tensors(n_embd: int, roll: int = 0) -> dict[str, np.ndarray]:
    """GGUF name -> float32 values (numpy order, as the converter plans them) of the probe mmproj."""
    h, i, p = _PROBE.hidden_size, _PROBE.intermediate_size, _PROBE.patch_size
    n_rows = _PROBE.num_patches + 1
    position = np.zeros((1, n_rows, h), np.float32)
    position[0, 0] = position[0, -1] = np.linspace(1.0, 2.0, h)  # only the first and the last row are non-zero
    position = np.roll(position, roll, axis=1)
    rng = np.random.default_rng(0)
    emb = dict(zip(EMBEDDING_NAMES.values(), (np.zeros((h, 3, p, p)), np.zeros(h), np.zeros((1, 1, h)), position)))
    block = {"norm1.weight": np.ones(h), "norm1.bias": np.zeros(h), "attn.proj.weight": np.zeros((h, h)),
             "attn.proj.bias": np.zeros(h), "ls1": np.ones(h), "norm2.weight": np.ones(h), "norm2.bias": np.zeros(h),
             "mlp.fc1.weight": np.zeros((i, h)), "mlp.fc1.bias": np.zeros(i), "mlp.fc2.weight": np.zeros((h, i)),
             "mlp.fc2.bias": np.zeros(h), "ls2": np.ones(h)}
    tensors = {**emb, **{BLOCK_NAMES[k].format(bid=0): v for k, v in block.items()}}
    for suffix, names in QKV_SPLIT.items():
        for name in names:
            tensors[name.format(bid=0)] = np.zeros((h, h) if suffix.endswith("weight") else (h,))
    d_in = h * _SCALE * _SCALE
    projector = (np.ones(d_in), np.zeros(d_in), rng.normal(size=(_PROJECTOR_HIDDEN, d_in)), np.zeros(_PROJECTOR_HIDDEN),
                 rng.normal(size=(n_embd, _PROJECTOR_HIDDEN)), np.zeros(n_embd))
    tensors.update(zip(PROJECTOR_NAMES.values(), projector))
    return {name: np.asarray(values, np.float32) for name, values in tensors.items()}


def write_probe_mmproj(path: Path, n_embd: int, *, roll: int = 0) -> Path:
    """The probe mmproj (all F32) for a text model `n_embd` wide. `roll` shifts its position rows: -1 gives
    each patch the row a library that puts the class token first would give it (what tests use to show the
    probe's other answer on this library)."""
    tensors = _probe_tensors(n_embd, roll)

    def add_kv(w: gguf.GGUFWriter) -> None:
        w.add_type(gguf.GGUFType.MMPROJ)
        w.add_name("r1v-position-order-probe")
        w.add_file_type(gguf.LlamaFileType.ALL_F32)
        add_vision_kv(w, _PROBE, block_count=1, projection_dim=n_embd, scale_factor=_SCALE, tiles=(1, 1),
                      mean=list(IMAGENET_MEAN), std=list(IMAGENET_STD))

    planned = [PlannedTensor(name, values.shape, QType.F32, produce=lambda v=values: v)
               for name, values in tensors.items()]
    return write_gguf(path, ARCH, add_kv, planned, progress=False)


def order_from_probe(embeddings: np.ndarray) -> ProbeResult:
    """The library's order from the probe's output [tokens, n_embd] (one 56-pixel tile: 4 tokens)."""
    magnitude = np.abs(np.asarray(embeddings, np.float32)).max(axis=1)
    live = tuple(int(i) for i in np.flatnonzero(magnitude > 1e-3 * max(float(magnitude.max()), 1e-30)))
    n = len(magnitude)
    if live == (0,):
        return ProbeResult(POSITION_ORDER, live)
    if live == (n - 1,):
        return ProbeResult(CHECKPOINT_POSITION_ORDER, live)
    raise ValueError(f"libmtmd's InternVL class-token probe gave non-zero output tokens {list(live)} of {n}; "
                     "expected only the first (class token appended) or only the last (class token first): this "
                     "llama.cpp runs the InternVL graph in a way r1v does not know")


# --- the file's order and a copy in the other one -----------------------------------------------------------

def file_order(path: str | os.PathLike[str]) -> str:
    """The position-row order of an InternVL mmproj: its r1v key, else the checkpoint's (llama.cpp's own
    converter writes the rows as the checkpoint holds them)."""
    field = gguf.GGUFReader(path).get_field(POSITION_ORDER_KEY)
    if field is None:
        return CHECKPOINT_POSITION_ORDER
    order = str(field.contents())
    if order not in POSITION_ORDERS:
        raise ValueError(f"{path}: {POSITION_ORDER_KEY} is {order!r}; expected one of {', '.join(POSITION_ORDERS)}")
    return order


def _move_rows(values: np.ndarray, source: str, target: str, where: str) -> np.ndarray:
    """Position rows [1, 1 + N, h] from `source` order to `target` order."""
    if values.ndim != 3 or values.shape[0] != 1:
        raise ValueError(f"{where}: {POSITION_EMBD} has shape {values.shape}; expected [1, 1 + patches, width]")
    if source == target:
        return values
    if target == CHECKPOINT_POSITION_ORDER:  # class row last -> first
        return np.concatenate([values[:, -1:], values[:, :-1]], axis=1)
    return np.concatenate([values[:, 1:], values[:, :1]], axis=1)


def reordered_copy(src: str | os.PathLike[str], dest: str | os.PathLike[str], order: str) -> Path:
    """Write `src` to `dest` with its position rows in `order` (and the key saying so); every other key and
    tensor byte for byte. The file appears only when complete."""
    if order not in POSITION_ORDERS:
        raise ValueError(f"unknown position order {order!r}; expected one of {', '.join(POSITION_ORDERS)}")
    src, dest = Path(src), Path(dest)
    reader = gguf.GGUFReader(src)
    source = file_order(src)
    arch = reader.get_field(gguf.Keys.General.ARCHITECTURE)
    if arch is None or arch.contents() != ARCH or POSITION_EMBD not in {t.name for t in reader.tensors}:
        raise ValueError(f"{src}: not an InternVL mmproj (needs general.architecture {ARCH!r} and {POSITION_EMBD})")
    with atomic_path(dest) as tmp:
        writer = gguf.GGUFWriter(tmp, ARCH)
        try:
            for field in reader.fields.values():
                if field.name.startswith("GGUF.") or field.name in (gguf.Keys.General.ARCHITECTURE, POSITION_ORDER_KEY):
                    continue
                kind = field.types[0]
                sub = field.types[-1] if kind == gguf.GGUFValueType.ARRAY else None
                writer.add_key_value(field.name, field.contents(), kind, sub_type=sub)
            writer.add_string(POSITION_ORDER_KEY, order)
            data = {t.name: (_move_rows(np.asarray(t.data), source, order, str(src)) if t.name == POSITION_EMBD
                             else t.data) for t in reader.tensors}
            for t in reader.tensors:
                writer.add_tensor_info(t.name, data[t.name].shape, data[t.name].dtype, data[t.name].nbytes,
                                       t.tensor_type)
            writer.write_header_to_file()
            writer.write_kv_data_to_file()
            writer.write_ti_data_to_file()
            for t in reader.tensors:
                writer.write_tensor_data(data[t.name], tensor_endianess=reader.endianess)
        finally:
            writer.close()
    return dest


# --- caches -------------------------------------------------------------------------------------------------

def cache_dir() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "r1v"


def library_key(libraries: Sequence[str | os.PathLike[str]], version: str) -> str:
    """One llama.cpp build: the bindings' version and each shared library's path, size and mtime."""
    parts = [version]
    for lib in libraries:
        st = os.stat(lib)
        parts.append(f"{Path(lib).resolve()}:{st.st_size}:{st.st_mtime_ns}")
    return hashlib.sha256("|".join(parts).encode()).hexdigest()[:24]


def stored_order(key: str) -> str | None:
    try:
        found = json.loads((cache_dir() / "mtmd-position-order.json").read_text()).get(key)
    except (OSError, ValueError, AttributeError):
        return None
    return found if found in POSITION_ORDERS else None


def store_order(key: str, order: str) -> None:
    """Remember `order` for library build `key` (best effort: an unwritable cache only costs a re-probe)."""
    path = cache_dir() / "mtmd-position-order.json"
    try:
        known = json.loads(path.read_text()) if path.is_file() else {}
        known = known if isinstance(known, dict) else {}
        known[key] = order
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.partial")
        tmp.write_text(json.dumps(known, indent=1, sort_keys=True))
        os.replace(tmp, path)
    except (OSError, ValueError):
        pass


def reordered_mmproj(path: str | os.PathLike[str], order: str) -> Path:
    """`path` with its rows in `order`, written once into the cache (keyed by the file's identity)."""
    from .prefix_cache import file_identity

    ident = hashlib.sha256(file_identity(path).encode()).hexdigest()[:24]
    dest = cache_dir() / "mmproj-reordered" / f"{ident}-{order.replace(',', '-')}-{Path(path).name}"
    if not dest.is_file():
        dest.parent.mkdir(parents=True, exist_ok=True)
        reordered_copy(path, dest, order)
    return dest


def main(argv: Sequence[str] | None = None) -> int:
    """`python -m r1v.runtime.backends.llamacpp.position_order MMPROJ OUT --order cls,patches`"""
    parser = argparse.ArgumentParser(
        prog="python -m r1v.runtime.backends.llamacpp.position_order",
        description="Write a copy of an InternVL mmproj with its position rows in another order: cls,patches for "
                    "a llama.cpp with PR #25844 (class token first), patches,cls for one without it.")
    parser.add_argument("mmproj", type=Path)
    parser.add_argument("out", type=Path)
    parser.add_argument("--order", choices=POSITION_ORDERS, required=True)
    args = parser.parse_args(argv)
    from .gguf_header import read_gguf_header

    try:  # a missing, truncated or non-GGUF file: one line naming it (BadModelFileError is a ValueError)
        read_gguf_header(args.mmproj, "vision projector")
        reordered_copy(args.mmproj, args.out, args.order)
    except (OSError, ValueError) as e:
        parser.exit(2, f"{parser.prog}: error: {e}\n")
    print(f"{args.out}: position rows {args.order} (was {file_order(args.mmproj)})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
