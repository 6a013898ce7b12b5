"""safetensors read by hand with numpy memory maps (no torch), and a small writer.

Format: 8-byte little-endian header length N, N bytes of JSON header {name: {dtype, shape, data_offsets}}
(plus optional "__metadata__"), then the data. Reading maps the file once and hands out views, so a tensor
costs no RAM until it is touched. Every check names the file and the tensor.
"""
from __future__ import annotations

import json
import mmap
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

import numpy as np

from .errors import CheckpointError

# safetensors dtype -> (numpy storage dtype, bytes per element). BF16 is stored as raw uint16.
DTYPES: dict[str, tuple[np.dtype, int]] = {
    "F32": (np.dtype("<f4"), 4),
    "F16": (np.dtype("<f2"), 2),
    "BF16": (np.dtype("<u2"), 2),
    "F64": (np.dtype("<f8"), 8),
    "I64": (np.dtype("<i8"), 8),
    "I32": (np.dtype("<i4"), 4),
    "I16": (np.dtype("<i2"), 2),
    "I8": (np.dtype("i1"), 1),
    "U8": (np.dtype("u1"), 1),
    "BOOL": (np.dtype("?"), 1),
}
MAX_HEADER_BYTES = 100 * 1024 * 1024  # the safetensors reference refuses larger headers too


@dataclass(frozen=True)
class TensorInfo:
    """Where one tensor lives: file, dtype, shape and the absolute byte range in the file."""

    name: str
    file: Path
    dtype: str
    shape: tuple[int, ...]
    start: int
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.start

    @property
    def numel(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64))


def bf16_to_f32(raw: np.ndarray) -> np.ndarray:
    """uint16 bfloat16 bit patterns -> float32 (exact)."""
    return (raw.astype(np.uint32) << 16).view(np.float32)


def f32_to_bf16(values: np.ndarray) -> np.ndarray:
    """float32 -> uint16 bfloat16 bit patterns, round to nearest even (as torch does)."""
    bits = np.ascontiguousarray(values, dtype=np.float32).view(np.uint32)
    rounded = bits + np.uint32(0x7FFF) + ((bits >> np.uint32(16)) & np.uint32(1))
    out = (rounded >> np.uint32(16)).astype(np.uint16)
    nan = np.isnan(values)
    if nan.any():  # keep NaN a NaN instead of rounding it into infinity
        out[nan] = 0x7FC0
    return out


def read_header(path: Path) -> tuple[dict[str, TensorInfo], dict[str, str]]:
    """Parse and validate the header of one .safetensors file; returns (tensors, metadata)."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise CheckpointError(f"{path}: truncated safetensors file ({size} bytes, no header length)")
        (n,) = struct.unpack("<Q", head)
        if n > MAX_HEADER_BYTES or 8 + n > size:
            raise CheckpointError(
                f"{path}: safetensors header claims {n} bytes but the file has {size} bytes (truncated or not safetensors)"
            )
        try:
            header = json.loads(f.read(n))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise CheckpointError(f"{path}: safetensors header is not valid JSON ({e})") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: safetensors header is not a JSON object")
    metadata = header.pop("__metadata__", None) or {}
    data_start = 8 + n
    data_size = size - data_start
    tensors: dict[str, TensorInfo] = {}
    for name, entry in header.items():
        tensors[name] = _tensor_info(path, name, entry, data_start, data_size)
    _check_no_overlap(path, tensors)
    return tensors, metadata


def _tensor_info(path: Path, name: str, entry: object, data_start: int, data_size: int) -> TensorInfo:
    if not isinstance(entry, dict) or not {"dtype", "shape", "data_offsets"} <= entry.keys():
        raise CheckpointError(f"{path}: tensor {name!r}: header entry lacks dtype/shape/data_offsets")
    dtype, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
    if dtype not in DTYPES:
        raise CheckpointError(f"{path}: tensor {name!r}: unsupported dtype {dtype!r}")
    if not (isinstance(shape, list) and all(isinstance(d, int) and d >= 0 for d in shape)):
        raise CheckpointError(f"{path}: tensor {name!r}: bad shape {shape!r}")
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(isinstance(o, int) for o in offsets)):
        raise CheckpointError(f"{path}: tensor {name!r}: bad data_offsets {offsets!r}")
    begin, end = offsets
    expected = int(np.prod(shape, dtype=np.int64)) * DTYPES[dtype][1]
    if not 0 <= begin <= end or end - begin != expected:
        raise CheckpointError(
            f"{path}: tensor {name!r}: header says {dtype}{shape} ({expected} bytes) "
            f"but data_offsets {offsets} span {end - begin} bytes"
        )
    if end > data_size:
        raise CheckpointError(
            f"{path}: tensor {name!r} ends at byte {end} of the data section, "
            f"which has only {data_size} bytes (file truncated?)"
        )
    return TensorInfo(name, path, dtype, tuple(shape), data_start + begin, data_start + end)


def _check_no_overlap(path: Path, tensors: Mapping[str, TensorInfo]) -> None:
    spans = sorted((t.start, t.end, t.name) for t in tensors.values() if t.nbytes)
    for (_, end_a, name_a), (start_b, _, name_b) in zip(spans, spans[1:]):
        if start_b < end_a:
            raise CheckpointError(f"{path}: tensors {name_a!r} and {name_b!r} overlap in the data section")


class MappedFile:
    """One safetensors file mapped read-only; views stay valid while this object lives."""

    def __init__(self, path: Path):
        self.path = path
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            self._map = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) if size else None

    def array(self, info: TensorInfo) -> np.ndarray:
        """A read-only numpy view of the tensor's stored values (BF16 as uint16)."""
        np_dtype, _ = DTYPES[info.dtype]
        if info.nbytes == 0:
            return np.zeros(info.shape, dtype=np_dtype)
        flat = np.frombuffer(self._map, dtype=np_dtype, count=info.numel, offset=info.start)
        return flat.reshape(info.shape)

    def release(self, start: int, end: int) -> None:
        """Drop the pages of file bytes [start, end) from this process's resident set (they stay in the
        page cache). Touched pages of a file mapping count as RSS until unmapped; without this, streaming
        through a 76 GB checkpoint would grow RSS with every tensor read."""
        if self._map is None or end <= start or not hasattr(mmap, "MADV_DONTNEED"):
            return
        start -= start % mmap.PAGESIZE
        self._map.madvise(mmap.MADV_DONTNEED, start, end - start)

    def close(self) -> None:
        if self._map is not None:
            try:
                self._map.close()
            except BufferError:  # a caller still holds a view; the map closes when it is freed
                pass
            self._map = None


def write_safetensors(
    path: str | Path, tensors: Mapping[str, tuple[str, np.ndarray]], metadata: Mapping[str, str] | None = None
) -> None:
    """Write {name: (dtype, array)} to `path`, via a temporary file renamed when complete.

    For "BF16" the array may be float32 (rounded here) or uint16 bit patterns.
    """
    path = Path(path)
    header: dict[str, object] = {}
    if metadata:
        header["__metadata__"] = dict(metadata)
    blobs: list[bytes] = []
    offset = 0
    for name, (dtype, array) in tensors.items():
        if dtype == "BF16" and array.dtype != np.uint16:
            array = f32_to_bf16(array)
        else:
            array = np.ascontiguousarray(array, dtype=DTYPES[dtype][0])
        blob = array.tobytes()
        header[name] = {"dtype": dtype, "shape": list(array.shape), "data_offsets": [offset, offset + len(blob)]}
        blobs.append(blob)
        offset += len(blob)
    head = json.dumps(header, separators=(",", ":")).encode()
    head += b" " * (-len(head) % 8)  # align the data section to 8 bytes, as the reference writer does
    tmp = path.with_name(path.name + ".tmp")
    try:
        with open(tmp, "wb") as f:
            f.write(struct.pack("<Q", len(head)))
            f.write(head)
            for blob in blobs:
                f.write(blob)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
