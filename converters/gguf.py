"""`convert_gguf`: a checkpoint to the GGUF files llama.cpp needs — the LLM at one or more quant types
and the vision projector (mmproj).

F32/F16/BF16/Q8_0 are written directly; k-quants and Q4_0 go through llama.cpp's own quantizer from one
F16/BF16 intermediate, shared by every such type asked for in the run. Files are written under hidden names
and take their final names together when the whole run has succeeded: a run that fails or is interrupted
leaves OUTDIR as it was, earlier runs' files included.
"""
from __future__ import annotations

import os
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

from .checkpoint import Checkpoint, open_checkpoint
from .gguf_common import DIRECT_TYPES, ConversionError
from .gguf_mmproj import MMPROJ_TYPES

LLM_QUANTS = ("f32", "f16", "bf16", "q8_0", "q6_k", "q5_k_m", "q5_k_s", "q4_k_m", "q4_k_s", "q4_0", "q3_k_l", "q3_k_m",
              "q3_k_s", "q2_k")
MMPROJ_QUANTS = MMPROJ_TYPES  # the mmproj writer's types (--mmproj-quant)


@dataclass
class GGUFConversion:
    """What a conversion produced: the LLM file per quant type, the mmproj file, and timings."""

    llm: dict[str, Path] = field(default_factory=dict)
    mmproj: Path | None = None
    seconds: dict[str, float] = field(default_factory=dict)

    @property
    def files(self) -> list[Path]:
        return [*self.llm.values(), *([self.mmproj] if self.mmproj else [])]


def llm_file_name(name: str, quant: str) -> str:
    return f"{name}-{quant}.gguf"


def mmproj_file_name(name: str, quant: str) -> str:
    return f"mmproj-{name}-{quant}.gguf"


def convert_gguf(
    checkpoint: str | Path | Checkpoint,
    outdir: str | Path,
    quant: Sequence[str] = ("q4_k_m",),
    mmproj_quant: str | None = "f16",
    *,
    name: str | None = None,
    pre_tokenizer: str | None = None,
    chat_template: str | None = None,
    imatrix: str | Path | None = None,
    threads: int | None = None,
    progress: bool = True,
) -> GGUFConversion:
    """Convert `checkpoint` into `outdir`: `<name>-<quant>.gguf` per quant and `mmproj-<name>-<q>.gguf`.

    `mmproj_quant=None` skips the projector. `name` defaults to the checkpoint directory's name.
    """
    from .gguf_llm import write_llm_gguf
    from .gguf_mmproj import check_mmproj_supported, write_mmproj_gguf
    from .gguf_quantize import quantize_gguf, read_imatrix

    quants = list(dict.fromkeys(q.lower() for q in quant))
    for q in quants:
        if q not in LLM_QUANTS:
            raise ConversionError(f"unknown --quant {q!r}; choose from {', '.join(LLM_QUANTS)}")
    if mmproj_quant is not None and mmproj_quant.lower() not in MMPROJ_QUANTS:
        raise ConversionError(f"unknown --mmproj-quant {mmproj_quant!r}; choose from {', '.join(MMPROJ_QUANTS)}")
    if not quants and mmproj_quant is None:
        raise ConversionError("nothing to do: no --quant and no mmproj")

    ckpt = checkpoint if isinstance(checkpoint, Checkpoint) else open_checkpoint(checkpoint)
    out = Path(outdir)
    name = name or ckpt.name
    result = GGUFConversion()
    staging: Path | None = None  # this run's files, under their final names, until all of them are complete
    try:
        if mmproj_quant is not None:
            check_mmproj_supported(ckpt.config, str(ckpt.path / "config.json"))  # refuse before any work
        direct = [q for q in quants if q in DIRECT_TYPES]
        via_llama = [q for q in quants if q not in DIRECT_TYPES]
        if imatrix is not None and via_llama:
            read_imatrix(Path(imatrix))  # a bad imatrix is refused now, not after the 16-bit file is written
        staging = _staging_dir(out, name)

        def timed(key: str, start: float) -> None:
            result.seconds[key] = round(time.perf_counter() - start, 3)

        # llama.cpp's quantizer reads one 16-bit intermediate: a requested F16/BF16 output if there is one,
        # else a temporary file, BF16 when the source is BF16 (exact) and F16 otherwise.
        intermediate = next((q for q in ("bf16", "f16") if q in direct), None)
        temporary = None
        if via_llama and intermediate is None:
            source_bf16 = any(t.dtype == "BF16" for t in ckpt.iter_tensors("language_model."))
            intermediate = temporary = "bf16" if source_bf16 else "f16"
            direct.append(temporary)

        for q in direct:
            start = time.perf_counter()
            file = f"{name}-{q}.intermediate.gguf" if q == temporary else llm_file_name(name, q)
            result.llm[q] = write_llm_gguf(ckpt, staging / file, q, pre_tokenizer=pre_tokenizer,
                                           chat_template=chat_template, progress=progress)
            timed(f"llm.{q}", start)
        for q in via_llama:
            start = time.perf_counter()
            result.llm[q] = quantize_gguf(result.llm[intermediate], staging / llm_file_name(name, q), q,
                                          imatrix=Path(imatrix) if imatrix else None, threads=threads,
                                          progress=progress)
            timed(f"llm.{q}", start)
        if temporary:
            result.llm.pop(temporary).unlink()
        if mmproj_quant is not None:
            start = time.perf_counter()
            q = mmproj_quant.lower()
            result.mmproj = write_mmproj_gguf(ckpt, staging / mmproj_file_name(name, q), q, progress=progress)
            timed(f"mmproj.{q}", start)

        # Every file is complete: only now do they replace the files of an earlier run, so a run that fails
        # or is interrupted before this point leaves OUTDIR as it found it.
        for q, file in result.llm.items():
            result.llm[q] = out / file.name
            os.replace(file, result.llm[q])
        if result.mmproj is not None:
            os.replace(result.mmproj, out / result.mmproj.name)
            result.mmproj = out / result.mmproj.name
    finally:
        if staging is not None:
            shutil.rmtree(staging, ignore_errors=True)
        if ckpt is not checkpoint:
            ckpt.close()
    return result


def _staging_dir(out: Path, name: str) -> Path:
    """A new hidden directory in OUTDIR (created if missing) for this run's files: the same file system, so
    each moves into place with one rename."""
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ConversionError(f"{out}: cannot create output directory ({e.strerror})") from None
    try:
        return Path(tempfile.mkdtemp(prefix=f".{name}.partial-", dir=out))
    except OSError as e:
        raise ConversionError(f"{out}: output directory is not writable ({e.strerror})") from None
