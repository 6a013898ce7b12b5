"""The GGUF and AWQ files of the bundled micro-r1v, built from the shipped checkpoint on first use into the
user cache (`$XDG_CACHE_HOME/r1v/micro-r1v/<checkpoint hash>/`, GGUF files in `gguf-<converter hash>/` below
it), so `r1v.load("micro-r1v")` needs no download."""
from __future__ import annotations

import hashlib
import os
import shutil
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from . import NAME, model_path

if TYPE_CHECKING:
    from r1v.quant.calibration import CalibrationItem

GGUF_QUANTS = ("f16", "q8_0", "q4_k_m")
QUANTS = (*GGUF_QUANTS, "awq")
DEFAULT_QUANT = "q8_0"
AWQ_CALIBRATION_ITEMS = 128  # training-split task items (the task's mixture: most of them with a picture)


def cache_root() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "r1v" / NAME


def _files_hash(root: Path, files: list[Path]) -> str:
    """sha256 over the files' paths (relative to `root`) and bytes, in path order; 16 hex digits."""
    digest = hashlib.sha256()
    for file in sorted(files):
        digest.update(file.relative_to(root).as_posix().encode())
        digest.update(file.read_bytes())
    return digest.hexdigest()[:16]


def checkpoint_hash(path: Path | None = None) -> str:
    """Identity of the shipped checkpoint: a new training run gets new files, never stale ones."""
    path = path or model_path()
    return _files_hash(path, [p for p in path.iterdir() if p.is_file()])


def converter_hash(root: Path | None = None) -> str:
    """Identity of the GGUF converter (its code and the chat templates it embeds, under `root`, default the
    installed r1v.converters): a converter change, such as a template fix, gets freshly built GGUF files
    instead of the ones an older version cached."""
    if root is None:
        import r1v.converters as converters

        root = Path(converters.__file__).parent
    return _files_hash(root, [p for pattern in ("**/*.py", "**/*.jinja") for p in root.glob(pattern)])


def micro_model(quant: str | None = None, progress: bool = True) -> Path:
    """micro-r1v at `quant`: the LLM GGUF file (f16, q8_0, q4_k_m; its F16 mmproj beside it) or the AWQ
    checkpoint directory (awq), built on first use; `progress`: say so on stderr and show the build's bars."""
    quant = (quant or DEFAULT_QUANT).lower()
    if quant not in QUANTS:
        raise ValueError(f"{NAME} comes as {', '.join(QUANTS)}; got quant {quant!r}")
    return micro_awq(progress) if quant == "awq" else micro_gguf(quant, progress)


def _announce(progress: bool, what: str, out: Path) -> None:
    """A first-use build takes seconds (GGUF) to minutes (AWQ on a CPU): say what is being built, and where."""
    if progress:
        print(f"{NAME}: first use: building {what} from the shipped checkpoint into {out}", file=sys.stderr,
              flush=True)


def calibration_items() -> list[CalibrationItem]:
    """The AWQ calibration of micro-r1v: training-split task items, questions with their reasoning answers."""
    from r1v.quant.calibration import CalibrationItem

    from . import task

    return [CalibrationItem(question=i.question, image=i.image(), answer=i.completion, source=i.id)
            for i in task.make_items(task.SPLITS["train"][0] + 5_000_000, AWQ_CALIBRATION_ITEMS)]


def micro_awq(progress: bool = True) -> Path:
    """micro-r1v as a 4-bit AWQ checkpoint, made the way `r1v convert awq` makes one (default method), calibrated
    on the task's own training items (images through the vision tower, chat-templated questions and answers)."""
    from r1v.quant.driver import quantize_checkpoint_awq
    from r1v.quant.methods import DEFAULT_METHOD

    out = cache_root() / checkpoint_hash() / f"awq-{DEFAULT_METHOD.replace('+', '-')}"  # a new method: a new build
    if (out / "config.json").is_file():
        return out
    items = calibration_items()
    tmp = out.with_name(f".awq-{os.getpid()}.partial")
    shutil.rmtree(tmp, ignore_errors=True)
    _announce(progress, f"the 4-bit AWQ checkpoint ({DEFAULT_METHOD}, {AWQ_CALIBRATION_ITEMS} calibration items; "
                        "minutes on a CPU)", out)
    try:
        quantize_checkpoint_awq(model_path(), tmp, calib=items, group_size=128, progress=progress)
        shutil.rmtree(out, ignore_errors=True)
        os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def micro_gguf(quant: str | None = None, progress: bool = True) -> Path:
    """Path of micro-r1v's LLM GGUF at `quant` (f16, q8_0 or q4_k_m), with its F16 mmproj beside it."""
    from r1v.converters.gguf import convert_gguf, llm_file_name, mmproj_file_name

    quant = (quant or DEFAULT_QUANT).lower()
    if quant not in GGUF_QUANTS:
        raise ValueError(f"{NAME} comes as {', '.join(GGUF_QUANTS)}; got quant {quant!r}")
    out = cache_root() / checkpoint_hash() / f"gguf-{converter_hash()}"
    llm, mmproj = out / llm_file_name(NAME, quant), out / mmproj_file_name(NAME, "f16")
    if not (llm.is_file() and mmproj.is_file()):
        _announce(progress, f"the {quant} GGUF files", out)
        convert_gguf(model_path(), out, [] if llm.is_file() else [quant], None if mmproj.is_file() else "f16",
                     name=NAME, progress=progress)
    return llm
