"""What every GGUF file this project writes shares: atomic output, streaming tensor writes, encodings,
provenance keys.

A file is planned first (names, shapes, types: the header needs all of them), then each tensor is produced,
encoded and written one at a time, so peak memory is one tensor, not the model. Output goes to a hidden
temporary name beside the target and is renamed only when complete; any exception, Ctrl-C included,
removes it.
"""
from __future__ import annotations

import os
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import gguf
from gguf.gguf_writer import WriterState
import numpy as np
from tqdm import tqdm

from .errors import CheckpointError

QType = gguf.GGMLQuantizationType

# Types gguf-py can encode itself; everything else goes through llama.cpp's quantizer.
DIRECT_TYPES: dict[str, QType] = {"f32": QType.F32, "f16": QType.F16, "bf16": QType.BF16, "q8_0": QType.Q8_0}
# general.file_type values (llama_ftype) for the files we write directly.
FILE_TYPES: dict[str, int] = {
    "f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
    "bf16": gguf.LlamaFileType.MOSTLY_BF16, "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0,
}


class ConversionError(CheckpointError):
    """A checkpoint cannot be converted as asked (unsupported model, bad output location, ...)."""


CHUNK_BYTES = 64 << 20  # float32 bytes encoded at a time when a tensor can be read in row blocks


@dataclass(frozen=True)
class PlannedTensor:
    """One tensor of an output file: GGUF name, numpy-order shape, storage type, and how to make it.

    Give `rows(start, stop)` (rows along the first axis) where the tensor can be read in blocks: big
    tensors are then streamed in CHUNK_BYTES pieces, so peak memory is a block, not a 1.5 GB embedding
    table. Otherwise `produce()` makes the whole tensor. Both return float32 values (or, for BF16 sources
    written as BF16, uint16 bit patterns).
    """

    name: str
    shape: tuple[int, ...]
    qtype: QType
    produce: Callable[[], np.ndarray] | None = None
    rows: Callable[[int, int], np.ndarray] | None = None

    def __post_init__(self) -> None:
        if (self.produce is None) == (self.rows is None):
            raise ValueError(f"tensor {self.name!r}: give exactly one of produce or rows")

    @property
    def nbytes(self) -> int:
        return nbytes_of(self.shape, self.qtype)

    def blocks(self) -> Iterator[np.ndarray]:
        """The tensor's values in row blocks (one block when it has no `rows` reader)."""
        if self.rows is None:
            yield self.produce()  # type: ignore[misc]
            return
        n_rows = self.shape[0]
        row_bytes = 4 * int(np.prod(self.shape[1:], dtype=np.int64))
        step = max(1, CHUNK_BYTES // max(row_bytes, 1))
        for start in range(0, n_rows, step):
            yield self.rows(start, min(start + step, n_rows))


def nbytes_of(shape: tuple[int, ...], qtype: QType) -> int:
    block, type_size = gguf.GGML_QUANT_SIZES[qtype]
    numel = int(np.prod(shape, dtype=np.int64))
    return numel // block * type_size


def storage_type(requested: QType, shape: tuple[int, ...]) -> QType:
    """The type a tensor is actually stored in: 1-D tensors (norms, biases) stay F32 as llama.cpp expects,
    and block types fall back to F16 when the row length is not a multiple of the block. Shape alone
    decides: a caller whose N-D non-weight tensors (class/position embeddings) must stay F32 says so itself."""
    if len(shape) < 2:
        return QType.F32
    block, _ = gguf.GGML_QUANT_SIZES[requested]
    if shape[-1] % block:
        return QType.F16
    return requested


def encode(values: np.ndarray, qtype: QType) -> np.ndarray:
    """Encode float32 values (or uint16 BF16 bits when qtype is BF16) into qtype's bytes/array."""
    if qtype == QType.BF16 and values.dtype == np.uint16:
        return np.ascontiguousarray(values)  # already bf16: copy the bits, no rounding twice
    values = np.asarray(values, dtype=np.float32)
    if qtype == QType.F32:
        return np.ascontiguousarray(values)
    if qtype == QType.F16:
        return values.astype(np.float16)
    return gguf.quants.quantize(values, qtype)


@contextmanager
def atomic_path(final: Path) -> Iterator[Path]:
    """Yield a temporary path beside `final`; rename it to `final` on success, delete it on any failure."""
    final = Path(final)
    if not final.parent.is_dir():
        raise ConversionError(f"{final.parent}: output directory does not exist")
    tmp = final.with_name(f".{final.name}.partial")
    try:
        try:
            tmp.touch()  # fails early, before any work, where the directory is not writable
        except OSError as e:
            raise ConversionError(f"{final.parent}: output directory is not writable ({e.strerror})") from None
        yield tmp
        os.replace(tmp, final)
    except OSError as e:  # disk full, read-only file system...: name the file, keep the cause
        raise ConversionError(f"{final}: writing failed ({e.strerror or e})") from e
    finally:
        tmp.unlink(missing_ok=True)


KVWriter = Callable[[gguf.GGUFWriter], None]


class _StreamingWriter(gguf.GGUFWriter):
    """GGUFWriter that can write one tensor's data as a sequence of blocks (same bytes as
    write_tensor_data on the whole array, which would need the whole tensor in memory)."""

    def write_tensor_blocks(self, blocks: Iterator[np.ndarray], expected_nbytes: int, name: str) -> None:
        if self.state not in (WriterState.TI_DATA, WriterState.WEIGHTS) or len(self.fout or []) != 1:
            raise ValueError(f"Expected one open output file with tensor info written, got {self.state}")
        fout = self.fout[0]
        info_name = next(iter(self.tensors[0]))
        info = self.tensors[0].pop(info_name)
        if info_name != name or info.nbytes != expected_nbytes:
            raise ValueError(f"tensor data out of order: expected {info_name!r}, got {name!r}")
        self.write_padding(fout, fout.tell())
        written = 0
        for block in blocks:
            block.tofile(fout)
            written += block.nbytes
        if written != info.nbytes:
            raise ConversionError(f"{self.path}: tensor {name!r} encoded to {written} bytes, planned {info.nbytes}")
        self.write_padding(fout, info.nbytes)
        self.state = WriterState.WEIGHTS


def write_gguf(path: Path, arch: str, add_kv: KVWriter, tensors: list[PlannedTensor], progress: bool = True) -> Path:
    """Write a GGUF file tensor by tensor: header, key-values (from `add_kv`), tensor infos, data."""
    path = Path(path)
    with atomic_path(path) as tmp:
        writer = _StreamingWriter(tmp, arch)
        try:
            add_kv(writer)
            for t in tensors:
                writer.add_tensor_info(t.name, t.shape, np.dtype(np.float32), t.nbytes, raw_dtype=t.qtype)
            writer.write_header_to_file()
            writer.write_kv_data_to_file()
            writer.write_ti_data_to_file()
            bar = tqdm(tensors, desc=Path(path).name, unit="tensor", disable=None if progress else True)
            for t in bar:
                bar.set_postfix_str(t.name, refresh=False)
                writer.write_tensor_blocks((encode(block, t.qtype) for block in t.blocks()), t.nbytes, t.name)
        finally:
            writer.close()
    return path


def add_provenance(writer: gguf.GGUFWriter, source_name: str, config_sha256: str, quant: str) -> None:
    """Where a file came from: the source checkpoint's directory name (not its path: a file others download
    should not carry the converting machine's directories), its config hash, our version and the quant type."""
    from r1v import __version__

    writer.add_string("r1v.source.checkpoint", source_name)
    writer.add_string("r1v.source.config_sha256", config_sha256)
    writer.add_string("r1v.version", __version__)
    writer.add_string("r1v.quant", quant)
    writer.add_quantized_by(f"r1v-edge {__version__}")
