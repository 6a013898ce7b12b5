"""Writing a checkpoint directory in AutoAWQ's GEMM layout (what vLLM's and transformers' AWQ loaders read).

The output is the source checkpoint's layout with every quantized linear `<prefix>.weight` replaced by
`<prefix>.qweight` (int32 [in, out/8]), `<prefix>.qzeros` (int32 [in/G, out/8]) and `<prefix>.scales`
(fp16 [in/G, out]); everything else fp16 under its own name. config.json is the source config with
`torch_dtype: float16` and

    quantization_config = {quant_method: awq, bits: 4, group_size: G, zero_point: true, version: gemm,
                           modules_to_not_convert: [...]}

plus the tokenizer, generation, preprocessor and remote-code files copied unchanged.

The quantizer produces the tensors as *parts*: small safetensors files (one decoder layer, the embeddings,
a slice of the vision tower), each written atomically, so a run can stop and resume between them. `assemble`
turns finished parts into the final shards (one part = one shard, hard-linked, not copied, where the file
system allows), writes model.safetensors.index.json and config.json, and copies the tokenizer files.
A part is one decoder layer, the embedding table, the final norm + lm_head, or up to MAX_SHARD_BYTES of the
vision tower; for R1V-38B every one is under 2 GB (the largest, each embedding matrix, is 1.56 GB in fp16).

The vision tower is written fp16 (listed in `modules_to_not_convert`) or, with `vision="int4"`, in the same
AWQ GEMM layout as the LLM (only `mlp1` listed). There is no int8 export: the AutoAWQ layout has no int8 mode,
so vLLM cannot load such a tower (it refuses the unknown tensor names) and transformers would leave those
weights randomly initialised with only a warning. int8 is a load-time placement of the awq backend instead
(`awq[vision=int8]`, quantized from the stored fp16 tower). Checkpoints an earlier version wrote with
`<prefix>.int8_weight` (int8 [out, in]) and `<prefix>.int8_scale` (fp16 [out]) still load in r1v
(runtime/backends/awq/loader.py), and only there.
"""
from __future__ import annotations

import copy
import json
import os
import shutil
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

import numpy as np

from .gguf_common import ConversionError
from .safetensors_io import DTYPES, read_header

MAX_SHARD_BYTES = 2 * 1024**3  # parts (and so shards) are cut at this size
INDEX_FILE = "model.safetensors.index.json"
INT8_WEIGHT, INT8_SCALE = "int8_weight", "int8_scale"  # the int8 vision layout earlier versions wrote (read only)
INT8_VISION_REFUSED = (  # completes "int8 is ..."
    "not written to checkpoints: vLLM and transformers read no int8 vision tower in an AWQ "
    "checkpoint. Convert with --vision fp16 (every loader) or int4 (the AWQ layout), and hold the tower in int8 "
    "when loading with r1v: --placement 'awq[vision=int8]' (r1v.load(DIR, placement=\"awq[vision=int8]\"))")
# Copied unchanged from the source checkpoint when present (plus its *.py remote code).
COPIED_FILES = (
    "tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt", "added_tokens.json",
    "special_tokens_map.json", "generation_config.json", "preprocessor_config.json", "chat_template.jinja",
    "chat_template.json",
)
_NUMPY_TO_SAFETENSORS = {np.dtype(v[0]).str: k for k, v in DTYPES.items() if k != "BF16"}


# --- parts ----------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class PartTensor:
    """One tensor of a part: name, safetensors dtype, shape, and `blocks()` giving its data in order (any
    split along the first axis), so a 1.5 GB embedding table is written without being held whole."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    blocks: Callable[[], Iterable[np.ndarray]]

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64)) * DTYPES[self.dtype][1]


def array_tensor(name: str, array: np.ndarray) -> PartTensor:
    """A PartTensor holding `array` (its numpy dtype decides the safetensors dtype)."""
    array = np.ascontiguousarray(array)
    try:
        dtype = _NUMPY_TO_SAFETENSORS[array.dtype.str]
    except KeyError:
        raise ValueError(f"{name}: no safetensors dtype for numpy {array.dtype}") from None
    return PartTensor(name, dtype, tuple(array.shape), lambda: (array,))


def write_part(path: Path, tensors: Sequence[PartTensor], metadata: Mapping[str, str] | None = None) -> Path:
    """Write a safetensors file block by block, atomically (temporary name, fsync, rename). Tensors are laid
    out in the given order; `{"format": "pt"}` is always in the metadata (transformers requires it)."""
    path = Path(path)
    header: dict[str, Any] = {"__metadata__": {"format": "pt", **dict(metadata or {})}}
    offset = 0
    for t in tensors:
        if t.name in header:
            raise ValueError(f"{path}: tensor {t.name!r} given twice")
        header[t.name] = {"dtype": t.dtype, "shape": list(t.shape), "data_offsets": [offset, offset + t.nbytes]}
        offset += t.nbytes
    head = json.dumps(header, separators=(",", ":")).encode()
    head += b" " * (-len(head) % 8)
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        with open(tmp, "wb") as f:
            f.write(struct.pack("<Q", len(head)))
            f.write(head)
            for t in tensors:
                storage = DTYPES[t.dtype][0]
                written = 0
                for block in t.blocks():
                    block = np.ascontiguousarray(block)
                    if block.dtype != storage:
                        raise ValueError(f"{path}: tensor {t.name!r} block has dtype {block.dtype}, expected {storage}")
                    f.write(memoryview(block).cast("B"))
                    written += block.nbytes
                if written != t.nbytes:
                    raise ValueError(f"{path}: tensor {t.name!r} gave {written} bytes, its header says {t.nbytes}")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        raise ConversionError(f"{path}: writing failed ({e.strerror or e})") from e
    finally:
        tmp.unlink(missing_ok=True)
    return path


def read_part(path: Path) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """Every tensor of a (small) safetensors file as a private numpy array, and its metadata."""
    infos, metadata = read_header(Path(path))
    out = {}
    with open(path, "rb") as f:
        for name, info in infos.items():
            np_dtype = DTYPES[info.dtype][0]
            f.seek(info.start)
            out[name] = np.fromfile(f, dtype=np_dtype, count=info.numel).reshape(info.shape)
    return out, metadata


# --- config ---------------------------------------------------------------------------------------------------
def quantization_config(group_size: int, modules_to_not_convert: Sequence[str], bits: int = 4) -> dict[str, Any]:
    """The `quantization_config` block AutoAWQ writes for GEMM checkpoints."""
    return {
        "quant_method": "awq", "bits": bits, "group_size": group_size, "zero_point": True, "version": "gemm",
        "modules_to_not_convert": list(modules_to_not_convert),
    }


def awq_config(source: Mapping[str, Any], qconfig: Mapping[str, Any], extra: Mapping[str, Any] | None = None
               ) -> dict[str, Any]:
    """The source config.json with fp16 as the dtype everywhere, `quantization_config` and `extra` keys."""
    config = copy.deepcopy(dict(source))
    config["torch_dtype"] = "float16"
    for key in ("llm_config", "vision_config"):
        if isinstance(config.get(key), dict):
            config[key]["torch_dtype"] = "float16"
    config["quantization_config"] = dict(qconfig)
    config.update(extra or {})
    return config


# --- the output directory -------------------------------------------------------------------------------------
def shard_name(index: int, total: int) -> str:
    return f"model-{index:05d}-of-{total:05d}.safetensors"


def assemble(parts: Sequence[Path], dest: Path, config: Mapping[str, Any], source_dir: Path) -> list[Path]:
    """Make `dest` (which must not exist) a complete checkpoint: the parts as shards, the index, config.json
    and the copied tokenizer/processor files. Returns the files written, shards first."""
    dest = Path(dest)
    dest.mkdir(parents=True)
    files = []
    weight_map: dict[str, str] = {}
    total_size = 0
    for i, part in enumerate(parts, 1):
        name = shard_name(i, len(parts))
        target = dest / name
        try:
            os.link(part, target)
        except OSError:  # another file system, or no hard links: copy
            shutil.copyfile(part, target)
        infos, _ = read_header(target)
        for tensor, info in infos.items():
            if tensor in weight_map:
                raise ConversionError(f"{part}: tensor {tensor!r} is also in {weight_map[tensor]}")
            weight_map[tensor] = name
            total_size += info.nbytes
        files.append(target)
    index = {"metadata": {"total_size": total_size}, "weight_map": dict(sorted(weight_map.items()))}
    files.append(_write_json(dest / INDEX_FILE, index))
    files.append(_write_json(dest / "config.json", config))
    files.extend(copy_tokenizer_files(source_dir, dest))
    return files


def copy_tokenizer_files(source_dir: Path, dest: Path) -> list[Path]:
    """Copy the tokenizer, generation, preprocessor and chat-template files and any remote code (*.py)."""
    names = [n for n in COPIED_FILES if (Path(source_dir) / n).is_file()]
    names += sorted(p.name for p in Path(source_dir).glob("*.py") if p.is_file())
    out = []
    for name in names:
        shutil.copyfile(Path(source_dir) / name, Path(dest) / name)
        out.append(Path(dest) / name)
    return out


def _write_json(path: Path, data: Any) -> Path:
    path.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    return path
