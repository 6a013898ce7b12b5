"""Activation statistics as a llama.cpp importance matrix (imatrix), for low-bit GGUF k-quants.

What llama.cpp's imatrix tool (tools/imatrix/imatrix.cpp) accumulates, per weight matrix of a block: the sum
over calibration tokens of x² for each input column (`in_sum2`) and the number of tokens (`counts`). Its
quantizer (tools/quantize → llama_model_quantize's `llama_model_imatrix_data`) weighs each column's rounding
error by in_sum2 / counts. Entries are keyed by the GGUF weight name (`blk.{i}.attn_q.weight`, ...), taken
from gguf-py's tensor map for qwen2, so they match the tensors of the GGUF this project writes.

File format: the GGUF imatrix of current llama.cpp (read by common/imatrix-loader.cpp) — no architecture,
`general.type = imatrix`, keys `imatrix.datasets` (string array), `imatrix.chunk_count`,
`imatrix.chunk_size` (u32; llama-quantize refuses a GGUF imatrix lacking any of the three), and per entry two
F32 tensors `<name>.in_sum2` [1, n_in] and `<name>.counts` [1, 1].

Differences from the tool, on purpose: sums are kept in float64 until written (the tool adds in float32),
and every recorded batch counts (the tool ignores matmuls with fewer than 16 rows, i.e. its decode steps).
The tool sees text only; `recording(keep=...)` counts chosen positions of multimodal windows (the AWQ driver's
`imatrix_positions`: every position, the default, or the text positions, whose context still holds the image).
Measured on micro-r1v (1,000 test items; README "The importance matrix", `python -m r1v.micro.imatrix_choice`):
counting every position gave Q3_K_S a mean KL 0.67x the text positions' and 0.70x the same text without its
images (what the tool would see), and Q4_K_M the lowest geometric-mean KL; on Q2_K the text matrices were
ahead by 9-13% in geometric mean with the mean KL tied.
"""
from __future__ import annotations

import contextlib
import functools
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import gguf
import numpy as np

# Which positions of multimodal calibration windows the AWQ driver's imatrix counts: every one (the default,
# image tokens included) or the text tokens only (their context still holds the image).
IMATRIX_POSITIONS = ("all", "text")
DEFAULT_IMATRIX_POSITIONS = "all"
SUMS_SUFFIX = ".in_sum2"
COUNTS_SUFFIX = ".counts"
LLM_PREFIX = "language_model."  # where the Qwen2 LLM sits in an InternVL-chat checkpoint
DEFAULT_DATASET = "r1v calibration"


@functools.lru_cache(maxsize=8)
def _name_map(n_blocks: int) -> gguf.TensorNameMap:
    return gguf.get_tensor_name_map(gguf.MODEL_ARCH.QWEN2, n_blocks)


def gguf_weight_name(hf_name: str, n_blocks: int) -> str:
    """The GGUF weight name of a Qwen2 linear, from its HF module or weight name (with or without the
    `language_model.` prefix): `model.layers.3.self_attn.q_proj` -> `blk.3.attn_q.weight`."""
    name = hf_name.removeprefix(LLM_PREFIX).removesuffix(".weight")
    mapped = _name_map(n_blocks).get_name(name)
    if mapped is None:
        raise KeyError(f"{hf_name!r} has no GGUF name in gguf-py's qwen2 tensor map ({n_blocks} blocks)")
    return mapped + ".weight"


@dataclass
class Imatrix:
    """Σx² per input column and token counts per weight, keyed by GGUF weight name."""

    sums: dict[str, np.ndarray] = field(default_factory=dict)  # float64 [n_in]
    counts: dict[str, int] = field(default_factory=dict)
    datasets: list[str] = field(default_factory=list)
    chunk_size: int = 0  # tokens per calibration sequence (the tool's n_ctx / n_parallel)
    chunks: int = 0  # calibration sequences seen; 0: the largest count / chunk_size (every position counted)

    def add(self, name: str, x: Any) -> None:
        """Accumulate activations x [..., n_in] (numpy array or torch tensor) entering weight `name`."""
        if hasattr(x, "detach"):  # torch: square and sum where the tensor lives, copy back only n_in values
            x = x.detach()
            n_in = x.shape[-1]
            rows = x.numel() // n_in if n_in else 0
            sq = x.reshape(-1, n_in).double().pow(2).sum(dim=0).cpu().numpy()
        else:
            x = np.asarray(x)
            n_in = x.shape[-1]
            rows = x.size // n_in if n_in else 0
            flat = x.reshape(-1, n_in).astype(np.float64)
            sq = np.einsum("ij,ij->j", flat, flat)
        if not np.isfinite(sq).all():
            raise ValueError(f"non-finite activations entering {name}")
        if name in self.sums:
            if self.sums[name].shape[0] != n_in:
                raise ValueError(f"{name}: activations of width {n_in}, earlier {self.sums[name].shape[0]}")
            self.sums[name] += sq
            self.counts[name] += rows
        else:
            self.sums[name] = sq
            self.counts[name] = rows

    def mean(self, name: str) -> np.ndarray:
        """Mean x² per column, float32: what llama.cpp's quantizer weighs rounding errors with."""
        count = self.counts[name]
        return (self.sums[name] / count if count else np.ones_like(self.sums[name])).astype(np.float32)

    @property
    def chunk_count(self) -> int:
        if self.chunks:
            return self.chunks
        return max(self.counts.values(), default=0) // self.chunk_size if self.chunk_size else 0

    @contextlib.contextmanager
    def recording(self, module: Any, prefix: str = "", n_blocks: int = 1, keep: Any = None) -> Iterator[Imatrix]:
        """While active, every nn.Linear under `module` that maps to a GGUF name (module path = `prefix` +
        its name inside `module`, e.g. prefix `model.layers.3.` for one decoder layer) adds its inputs here.
        `keep`: a bool mask [windows, seq_len] of the positions to count, for inputs [rows, seq_len, n_in] that
        arrive as consecutive chunks of those windows, in order (each linear counts off the rows it has seen)."""
        from torch import nn

        handles = []
        for sub_name, sub in module.named_modules():
            if not isinstance(sub, nn.Linear):
                continue
            try:
                name = gguf_weight_name(prefix + sub_name, n_blocks)
            except KeyError:
                continue
            handles.append(sub.register_forward_hook(functools.partial(_record, self, name, keep, {})))
        if not handles:
            raise ValueError(f"no linear under {type(module).__name__} (prefix {prefix!r}) has a GGUF name")
        try:
            yield self
        finally:
            for handle in handles:
                handle.remove()

    def save(self, path: str | os.PathLike[str]) -> Path:
        """Write llama.cpp's GGUF imatrix (entries sorted by name, as the tool does); atomic."""
        path = Path(path)
        if not self.sums:
            raise ValueError(f"{path}: no activations were recorded; refusing to write an empty imatrix")
        tmp = path.with_name(path.name + ".tmp")
        writer = _ImatrixWriter(tmp, arch="")
        try:
            writer.add_type(gguf.GGUFType.IMATRIX)
            writer.add_array(gguf.Keys.IMatrix.DATASETS, list(self.datasets) or [DEFAULT_DATASET])
            writer.add_uint32(gguf.Keys.IMatrix.CHUNK_COUNT, self.chunk_count)
            writer.add_uint32(gguf.Keys.IMatrix.CHUNK_SIZE, self.chunk_size)
            for name in sorted(self.sums):
                writer.add_tensor(name + SUMS_SUFFIX, self.sums[name].astype(np.float32).reshape(1, -1))
                writer.add_tensor(name + COUNTS_SUFFIX, np.array([[self.counts[name]]], dtype=np.float32))
            writer.write_header_to_file()
            writer.write_kv_data_to_file()
            writer.write_tensors_to_file()
        finally:
            writer.close()
        os.replace(tmp, path)
        return path

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> Imatrix:
        """Read a GGUF imatrix (ours or llama.cpp's) back; dense entries only (one count per weight)."""
        path = Path(path)
        reader = gguf.GGUFReader(path)
        fields = reader.fields
        if "general.type" not in fields or fields["general.type"].contents() != "imatrix":
            raise ValueError(f"{path}: not a GGUF imatrix (general.type is not 'imatrix')")
        sums: dict[str, np.ndarray] = {}
        counts: dict[str, int] = {}
        for t in reader.tensors:
            values = np.asarray(t.data, dtype=np.float32).reshape(-1)
            if t.name.endswith(SUMS_SUFFIX):
                sums[t.name.removesuffix(SUMS_SUFFIX)] = values.astype(np.float64)
            elif t.name.endswith(COUNTS_SUFFIX):
                if values.size != 1:
                    raise ValueError(f"{path}: {t.name} has {values.size} counts (per-expert entries: unsupported)")
                counts[t.name.removesuffix(COUNTS_SUFFIX)] = int(round(float(values[0])))
        if set(sums) != set(counts):
            odd = sorted(set(sums) ^ set(counts))[0]
            raise ValueError(f"{path}: imatrix entry {odd!r} lacks its in_sum2 or counts tensor")
        keys = gguf.Keys.IMatrix
        datasets = [str(d) for d in fields[keys.DATASETS].contents()] if keys.DATASETS in fields else []
        chunk_size = int(fields[keys.CHUNK_SIZE].contents()) if keys.CHUNK_SIZE in fields else 0
        chunks = int(fields[keys.CHUNK_COUNT].contents()) if keys.CHUNK_COUNT in fields else 0
        return cls(sums=sums, counts=counts, datasets=datasets, chunk_size=chunk_size, chunks=chunks)


def _record(imatrix: Imatrix, name: str, keep: Any, seen: dict[str, int], module: Any, args: tuple[Any, ...],
            output: Any) -> None:
    x = args[0]
    if keep is not None:
        start = seen.get("rows", 0)
        seen["rows"] = start + x.shape[0]
        rows = keep[start:start + x.shape[0]]
        if tuple(rows.shape) != tuple(x.shape[:-1]):
            raise ValueError(f"{name}: positions mask {tuple(keep.shape)} does not cover inputs {tuple(x.shape)} "
                             f"arriving at row {start}")
        x = x[rows.to(x.device)]
    imatrix.add(name, x)


class _ImatrixWriter(gguf.GGUFWriter):
    """imatrix files carry no `general.architecture` (llama.cpp's own writer and converter leave it out)."""

    def add_architecture(self) -> None:
        pass
