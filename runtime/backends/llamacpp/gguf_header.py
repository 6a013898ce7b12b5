"""A GGUF file's header read and checked without loading it: the magic, the key-values (arrays skipped, only
their length kept), the tensor table, and that the file holds all the tensor data the table declares. For the
llama.cpp backend, before llama.cpp or libmtmd see a file: llama.cpp says only "invalid magic" and gguf-py's
reader raises IndexError on a truncated file (and parses a 150k-entry vocabulary into numpy arrays).
"""
from __future__ import annotations

import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = ["BadModelFileError", "GGUFHeader", "read_gguf_header"]


class BadModelFileError(ValueError):
    """A model or projector file is not a GGUF file, or not a whole one; the message names the file."""


@dataclass(frozen=True)
class GGUFHeader:
    """What a GGUF file's header says: its key-values (arrays skipped: only their length is kept) and the
    bytes its tensors take."""

    path: Path
    version: int
    n_tensors: int
    metadata: dict[str, Any]
    data_offset: int  # where tensor data starts
    data_bytes: int  # the end of the last tensor's data, from data_offset

    def get(self, key: str, default: Any = None) -> Any:
        return self.metadata.get(key, default)


_GGUF_MAGIC = b"GGUF"
_GGUF_SCALARS = {kind: struct.Struct(fmt) for kind, fmt in {
    0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}.items()}
_GGUF_STRING, _GGUF_ARRAY = 8, 9
_U32, _U64 = _GGUF_SCALARS[4], _GGUF_SCALARS[10]


class _Truncated(Exception):
    pass


class _HeaderCursor:
    """Reads little-endian GGUF header values from a memory map, refusing to run past the end."""

    def __init__(self, data: Any):
        self.data, self.at = data, 0

    def take(self, fmt: struct.Struct = _U64) -> Any:
        if self.at + fmt.size > len(self.data):
            raise _Truncated
        value = fmt.unpack_from(self.data, self.at)[0]
        self.at += fmt.size
        return value

    def skip(self, n: int) -> None:
        if n < 0 or self.at + n > len(self.data):
            raise _Truncated
        self.at += n

    def string(self) -> bytes:
        n = self.take()
        start = self.at
        self.skip(n)
        return bytes(self.data[start:self.at])

    def value(self, kind: int, where: str) -> Any:
        if kind in _GGUF_SCALARS:
            return self.take(_GGUF_SCALARS[kind])
        if kind == _GGUF_STRING:
            return self.string().decode("utf-8", "replace")
        if kind == _GGUF_ARRAY:
            item, count = self.take(_U32), self.take()
            if item in _GGUF_SCALARS:
                self.skip(count * _GGUF_SCALARS[item].size)
            elif item == _GGUF_STRING:  # a vocabulary: 150k strings, so the loop is kept tight
                data, at, end, unpack = self.data, self.at, len(self.data), _U64.unpack_from
                for _ in range(count):
                    if at + 8 > end:
                        raise _Truncated
                    at += 8 + unpack(data, at)[0]
                if at > end:
                    raise _Truncated
                self.at = at
            else:
                raise ValueError(f"{where}: an array of value type {item}")
            return _GGUFArray(item, count)
        raise ValueError(f"{where}: value type {kind}")


@dataclass(frozen=True)
class _GGUFArray:
    item_type: int
    length: int


def read_gguf_header(path: str | Path, what: str = "GGUF") -> GGUFHeader:
    """Read and check a GGUF file's header without loading it: the magic, the key-values, the tensor table,
    and that the file holds all the tensor data the table declares. `what` ("model", "vision projector")
    goes into the error. Raises BadModelFileError naming the file - where llama.cpp would say only "invalid
    magic", and gguf-py raise IndexError on a truncated file."""
    import mmap

    from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType

    path = Path(path)
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        head = f.read(4)
        if head != _GGUF_MAGIC:
            raise BadModelFileError(f"{path}: not a GGUF file (it starts with {head!r}, a GGUF file with "
                                    f"{_GGUF_MAGIC!r}); expected a {what} .gguf file")
        with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as data:
            cursor = _HeaderCursor(data)
            cursor.skip(4)
            try:
                version = cursor.take(_U32)
                if version not in (2, 3):
                    raise BadModelFileError(f"{path}: GGUF version {version}; llama.cpp reads versions 2 and 3")
                n_tensors, n_kv = cursor.take(), cursor.take()
                if n_tensors > size or n_kv > size:  # each takes bytes: a count beyond the file is damage
                    raise BadModelFileError(f"{path}: damaged GGUF header ({n_tensors} tensors, {n_kv} key-values "
                                            f"in a file of {size} bytes)")
                metadata: dict[str, Any] = {}
                for i in range(n_kv):
                    key = cursor.string().decode("utf-8", "replace")
                    metadata[key] = cursor.value(cursor.take(_U32), f"key-value {i} ({key})")
                tensors = []
                for i in range(n_tensors):
                    name = cursor.string().decode("utf-8", "replace")
                    n_dims = cursor.take(_U32)
                    if n_dims > 8:
                        raise ValueError(f"tensor {name}: {n_dims} dimensions")
                    shape = [cursor.take() for _ in range(n_dims)]
                    qtype, offset = cursor.take(_U32), cursor.take()
                    tensors.append((name, shape, qtype, offset))
            except _Truncated:
                raise BadModelFileError(f"{path}: truncated GGUF (the file ends inside its header, at {size} "
                                        "bytes)") from None
            except ValueError as e:
                if isinstance(e, BadModelFileError):
                    raise
                raise BadModelFileError(f"{path}: damaged GGUF header ({e})") from None
            header_end = cursor.at
    alignment = metadata.get("general.alignment", 32)
    if not isinstance(alignment, int) or alignment < 1:
        raise BadModelFileError(f"{path}: damaged GGUF header (general.alignment {alignment!r})")
    data_offset = -(-header_end // alignment) * alignment
    data_bytes = 0
    for name, shape, qtype, offset in tensors:
        try:
            block, type_size = GGML_QUANT_SIZES[GGMLQuantizationType(qtype)]
        except (ValueError, KeyError):
            raise BadModelFileError(f"{path}: tensor {name} has an unknown type {qtype}") from None
        n = 1
        for dim in shape:
            n *= dim
        data_bytes = max(data_bytes, offset + n // block * type_size)
    if data_offset + data_bytes > size:
        raise BadModelFileError(f"{path}: truncated GGUF (expected {data_bytes} bytes of tensor data, the file has "
                                f"{max(0, size - data_offset)}); download or convert it again")
    return GGUFHeader(path, version, n_tensors, metadata, data_offset, data_bytes)
