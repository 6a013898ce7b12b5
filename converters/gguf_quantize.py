"""k-quants and Q4_0 through llama.cpp's own quantizer (`llama_model_quantize`), from an F16/BF16/F32 GGUF.

llama.cpp chooses the per-tensor mix itself (Q4_K_M keeps attn_v / ffn_down of some layers and the output at
Q6_K, and so on), so the file is exactly what `llama-quantize` would write. The source's metadata is copied;
`r1v.quant` is set to the new type. An importance matrix (llama.cpp's imatrix GGUF, or the legacy .dat)
is passed as llama.cpp's `llama_model_imatrix_data` array, as `llama-quantize --imatrix` does.
"""
from __future__ import annotations

import ctypes
import re
import struct
from pathlib import Path
from typing import Any

import numpy as np

from .gguf_common import ConversionError, atomic_path

# quant name -> llama_ftype (include/llama.h)
QUANT_FTYPES: dict[str, int] = {
    "q4_0": 2,
    "q8_0": 7,
    "q2_k": 10,
    "q3_k_s": 11,
    "q3_k_m": 12,
    "q3_k_l": 13,
    "q4_k_s": 14,
    "q4_k_m": 15,
    "q5_k_s": 16,
    "q5_k_m": 17,
    "q6_k": 18,
}
_TENSOR_LINE = re.compile(r"\[\s*(\d+)/\s*(\d+)\]\s+(\S+)")
# enum ggml_log_level (ggml/include/ggml.h). llama-cpp-python 0.3.36's _logger.py still maps the old numbering
# (1 = INFO, 3 = ERROR, 4 = DEBUG): with verbose=False it prints llama.cpp's warnings and hides its errors.
GGML_LOG_LEVEL_ERROR, GGML_LOG_LEVEL_CONT = 4, 5


def quantize_gguf(
    src: Path,
    dst: Path,
    quant: str,
    *,
    imatrix: Path | None = None,
    threads: int | None = None,
    progress: bool = True,
) -> Path:
    """Quantize GGUF `src` to `dst` as `quant` (a key of QUANT_FTYPES: k-quants, q4_0, q8_0) with llama.cpp.

    `imatrix`: an importance matrix file from llama.cpp's imatrix tool (or r1v's calibration), used for the
    k-quant rounding. `threads`: default all cores. `dst` appears only when complete."""
    import llama_cpp

    src, dst = Path(src), Path(dst)
    quant = quant.lower()
    if quant not in QUANT_FTYPES:
        raise ConversionError(
            f"quant {quant!r} is not supported by quantize_gguf; choose from {', '.join(QUANT_FTYPES)}")
    if not src.is_file():
        raise ConversionError(f"{src}: source GGUF not found")

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = QUANT_FTYPES[quant]
    params.nthread = threads or 0
    overrides: dict[str, str | int] = {"r1v.quant": quant}
    keep_alive: list[Any] = []  # buffers llama.cpp reads through params: alive until this function returns
    if imatrix is not None:
        entries, info = read_imatrix(Path(imatrix))
        array, keep_alive = _imatrix_array(entries)
        params.imatrix = array
        overrides.update(info)
    kv_array = _kv_overrides(overrides)
    params.kv_overrides = kv_array

    with atomic_path(dst) as tmp, _LlamaLog(progress, dst.name) as log:
        status = llama_cpp.llama_model_quantize(str(src).encode(), str(tmp).encode(), ctypes.byref(params))
        if status != 0:
            reason = log.errors() or "no message from llama.cpp"
            raise ConversionError(f"{src}: llama.cpp failed to quantize to {quant} ({dst.name}): {reason}")
    return dst


# --- importance matrix ---------------------------------------------------------------------------------------
def read_imatrix(path: Path) -> tuple[dict[str, np.ndarray], dict[str, str | int]]:
    """Per-tensor importance (mean squared activation per input column, float32) from an imatrix file, and
    the `quantize.imatrix.*` keys llama-quantize records. GGUF (`<name>.in_sum2` / `<name>.counts`) or legacy."""
    if not path.is_file():
        raise ConversionError(f"{path}: imatrix file not found")
    with open(path, "rb") as f:
        magic = f.read(4)
    try:
        entries, chunks, datasets = (_read_gguf_imatrix if magic == b"GGUF" else _read_legacy_imatrix)(path)
    except ConversionError:
        raise
    except (ValueError, KeyError, IndexError, struct.error) as e:  # gguf-py / numpy on a damaged file
        raise ConversionError(f"{path}: not a readable imatrix file ({e})") from None
    if not entries:
        raise ConversionError(f"{path}: the imatrix holds no entries")
    for name, values in entries.items():
        if not np.isfinite(values).all():
            raise ConversionError(f"{path}: imatrix entry {name!r} has non-finite values")
    info: dict[str, str | int] = {
        "quantize.imatrix.file": path.name[:127],
        "quantize.imatrix.entries_count": len(entries),
        "quantize.imatrix.chunks_count": chunks,
    }
    if datasets:
        info["quantize.imatrix.dataset"] = datasets[0][:127]
    return entries, info


def _read_gguf_imatrix(path: Path) -> tuple[dict[str, np.ndarray], int, list[str]]:
    import gguf

    reader = gguf.GGUFReader(path)
    sums: dict[str, np.ndarray] = {}
    counts: dict[str, np.ndarray] = {}
    for t in reader.tensors:
        values = np.asarray(t.data, dtype=np.float32).reshape(-1)
        if t.name.endswith(".in_sum2"):
            sums[t.name.removesuffix(".in_sum2")] = values
        elif t.name.endswith(".counts"):
            counts[t.name.removesuffix(".counts")] = values
    if set(sums) != set(counts):
        odd = sorted(set(sums) ^ set(counts))[0]
        raise ConversionError(f"{path}: imatrix entry {odd!r} lacks its in_sum2 or counts tensor")
    entries = {}
    for name, total in sums.items():
        n = counts[name]  # one count per expert; sums are [n_expert, n_per_row]
        per = total.reshape(len(n), -1)
        mean = np.where(n[:, None] > 0, per / np.maximum(n[:, None], 1), 1.0)
        entries[name] = np.ascontiguousarray(mean.reshape(-1), dtype=np.float32)
    fields = reader.fields
    chunks = int(fields["imatrix.chunk_count"].contents()) if "imatrix.chunk_count" in fields else 0
    datasets = list(fields["imatrix.datasets"].contents()) if "imatrix.datasets" in fields else []
    return entries, chunks, datasets


def _read_legacy_imatrix(path: Path) -> tuple[dict[str, np.ndarray], int, list[str]]:
    data = path.read_bytes()
    pos = 0

    def take(fmt: str) -> tuple[Any, ...]:
        nonlocal pos
        size = struct.calcsize(fmt)
        if pos + size > len(data):
            raise ConversionError(f"{path}: truncated imatrix file")
        values = struct.unpack_from(fmt, data, pos)
        pos += size
        return values

    (n_entries,) = take("<i")
    if not 1 <= n_entries <= len(data) // 12:  # each entry takes at least 12 bytes
        raise ConversionError(f"{path}: not an imatrix file (it claims {n_entries} entries)")
    entries = {}
    for _ in range(n_entries):
        (length,) = take("<i")
        if not 0 < length <= len(data) - pos:
            raise ConversionError(f"{path}: not an imatrix file (an entry name of {length} bytes)")
        name = data[pos:pos + length].decode("utf-8")
        pos += length
        ncall, nval = take("<ii")
        if not 0 < nval <= (len(data) - pos) // 4:
            raise ConversionError(f"{path}: truncated or not an imatrix file (entry {name!r} claims {nval} values)")
        values = np.frombuffer(data, dtype="<f4", count=nval, offset=pos).astype(np.float32)
        pos += 4 * nval
        entries[name] = values / ncall if ncall > 0 else values
    chunks, datasets = 0, []
    if pos + 4 <= len(data):
        (chunks,) = take("<i")
        if pos + 4 <= len(data):
            (length,) = take("<i")
            if length > 0:
                datasets.append(data[pos:pos + length].decode("utf-8", "replace"))
    return entries, chunks, datasets


def _imatrix_array(entries: dict[str, np.ndarray]) -> tuple[Any, list[Any]]:
    """A NULL-terminated llama_model_imatrix_data[]; the second value keeps its buffers alive."""
    import llama_cpp

    array = (llama_cpp.llama_model_imatrix_data * (len(entries) + 1))()
    keep: list[Any] = [array]
    for i, (name, values) in enumerate(entries.items()):
        values = np.ascontiguousarray(values, dtype=np.float32)
        keep.append(values)
        array[i].name = name.encode()
        array[i].data = values.ctypes.data_as(ctypes.POINTER(ctypes.c_float))
        array[i].size = values.size
    array[len(entries)].name = None
    return array, keep


def _kv_overrides(values: dict[str, str | int]) -> Any:
    """A llama_model_kv_override[] ending with an empty key, as llama.cpp expects."""
    import llama_cpp

    array = (llama_cpp.llama_model_kv_override * (len(values) + 1))()
    for i, (key, value) in enumerate(values.items()):
        array[i].key = key.encode()
        if isinstance(value, str):
            array[i].tag = llama_cpp.LLAMA_KV_OVERRIDE_TYPE_STR
            array[i].value.val_str = value.encode()[:127]
        else:
            array[i].tag = llama_cpp.LLAMA_KV_OVERRIDE_TYPE_INT
            array[i].value.val_i64 = int(value)
    return array


# --- llama.cpp's log: a per-tensor progress bar, and the error text for ConversionError ---------------------
class _LlamaLog:
    """While active, llama.cpp's log goes here: tensor lines drive a tqdm bar, errors are kept, the rest is
    dropped. llama-cpp-python's own callback is put back afterwards."""

    def __init__(self, progress: bool, desc: str):
        self.progress, self.desc = progress, desc
        self._errors: list[str] = []
        self._bar: Any = None
        self._last_level = 0

    def errors(self) -> str:
        return "; ".join(line.strip() for line in "".join(self._errors).splitlines() if line.strip(" =\n"))

    def __enter__(self) -> _LlamaLog:
        import llama_cpp

        def on_log(level: int, text: bytes, user_data: ctypes.c_void_p) -> None:
            message = text.decode("utf-8", "replace")
            if level != GGML_LOG_LEVEL_CONT:
                self._last_level = level
            if self._last_level == GGML_LOG_LEVEL_ERROR:
                self._errors.append(message)
            elif self.progress and (m := _TENSOR_LINE.search(message)):
                self._advance(int(m.group(1)), int(m.group(2)), m.group(3))

        self._callback = llama_cpp.llama_log_callback(on_log)  # referenced for as long as it is installed
        llama_cpp.llama_log_set(self._callback, ctypes.c_void_p(0))
        return self

    def _advance(self, i: int, n: int, name: str) -> None:
        from tqdm import tqdm

        if self._bar is None:
            self._bar = tqdm(total=n, desc=self.desc, unit="tensor")
        self._bar.set_postfix_str(name, refresh=False)
        self._bar.update(i - self._bar.n)

    def __exit__(self, *exc: object) -> None:
        import llama_cpp
        from llama_cpp._logger import llama_log_callback  # llama-cpp-python's default

        llama_cpp.llama_log_set(llama_log_callback, ctypes.c_void_p(0))
        if self._bar is not None:
            self._bar.close()
