"""The README's format table: every format of a micro-r1v checkpoint on the same held-out test items.

`python -m r1v.micro.formats [CHECKPOINT] --work DIR [-n 1000]` writes the test items (test split), builds
the GGUF files (F16, Q8_0, Q4_K_M, Q3_K_S, Q2_K, and Q3_K_S / Q2_K / Q4_K_M again with the importance matrix
`--imatrix-out` records) and the AWQ checkpoints (g128: awq+gptq, awq, gptq, rtn), all calibrated on the
same training-split items the shipped AWQ build uses, then scores each with `r1v eval`'s loop against the F16
GGUF: exact-match accuracy with its standard error, KL(F16 || format) and top-1 agreement on F16's own
answers. Everything lands in DIR (builds, per-item results, `formats.json`, `formats.md`); a rerun reuses
what is finished, so an interrupted run resumes.
"""
from __future__ import annotations

import argparse
import json
import math
import re
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

from . import model_path, task

GGUF_QUANTS = ("f16", "q8_0", "q4_k_m", "q3_k_s", "q2_k")
IMATRIX_QUANTS = ("q4_k_m", "q3_k_s", "q2_k")
AWQ_METHODS = ("awq+gptq", "awq", "gptq", "rtn")
GROUP_SIZE = 128


@dataclass
class Row:
    """One line of the table."""

    format: str
    accuracy: float
    standard_error: float  # of the accuracy: sqrt(p (1 - p) / n)
    correct: int
    total: int
    mean_kl: float | None
    top1_agreement: float | None
    mean_output_tokens: float


def standard_error(p: float, n: int) -> float:
    return math.sqrt(p * (1 - p) / n) if n else 0.0


def gguf_files(checkpoint: Path, folder: Path, quants: tuple[str, ...], progress: bool, imatrix: Path | None = None,
               with_mmproj: bool = False) -> tuple[dict[str, Path], Path | None]:
    """The LLM GGUF file of each of `quants` in `folder` (and its F16 mmproj `with_mmproj`), converting only the
    ones a previous run did not finish."""
    from r1v.converters.gguf import convert_gguf, llm_file_name, mmproj_file_name

    files = {q: folder / llm_file_name("micro-r1v", q) for q in quants}
    mmproj = folder / mmproj_file_name("micro-r1v", "f16") if with_mmproj else None
    missing = [q for q, file in files.items() if not file.is_file()]
    mmproj_missing = mmproj is not None and not mmproj.is_file()
    if missing or mmproj_missing:
        convert_gguf(checkpoint, folder, missing, "f16" if mmproj_missing else None, name="micro-r1v",
                     imatrix=imatrix, progress=progress)
    return files, mmproj


def build(checkpoint: Path, work: Path, progress: bool) -> dict[str, tuple[Path, Path | None]]:
    """Every format's files: name -> (model path, mmproj or None). Skips what a previous run finished."""
    from r1v.quant.driver import quantize_checkpoint_awq

    from .files import calibration_items

    plain, mmproj = gguf_files(checkpoint, work / "gguf", GGUF_QUANTS, progress, with_mmproj=True)
    formats: dict[str, tuple[Path, Path | None]] = {f"GGUF {q.upper()}": (f, mmproj) for q, f in plain.items()}
    imatrix = work / "imatrix.gguf"
    items = None
    for method in AWQ_METHODS:
        out = work / f"awq-{method.replace('+', '-')}"
        if not (out / "config.json").is_file():
            import shutil

            shutil.rmtree(out, ignore_errors=True)
            items = items or calibration_items()
            record = imatrix if method == AWQ_METHODS[0] else None  # the matrix of the default build
            quantize_checkpoint_awq(checkpoint, out, calib=items, group_size=GROUP_SIZE, method=method,
                                    imatrix_out=record, progress=progress)
        formats[f"AWQ g{GROUP_SIZE} {method}"] = (out, None)
    weighted, _ = gguf_files(checkpoint, work / "gguf-imatrix", IMATRIX_QUANTS, progress, imatrix=imatrix)
    formats |= {f"GGUF {q.upper()} + imatrix": (f, mmproj) for q, f in weighted.items()}
    formats["torch fp32 (checkpoint)"] = (checkpoint, None)
    return dict(sorted(formats.items(), key=lambda kv: _display_order(kv[0])))


def _display_order(name: str) -> tuple[int, int, bool]:
    """torch first, then the GGUF types from the most bits down (each with its imatrix twin), then AWQ."""
    if name.startswith("torch"):
        return (0, 0, False)
    if name.startswith("GGUF"):
        quant = name.split()[1].lower()
        return (1, GGUF_QUANTS.index(quant), name.endswith("imatrix"))
    return (2, AWQ_METHODS.index(name.split()[-1]), False)


class _RememberedReference:
    """The F16 reference for every row: its greedy answers and log-probabilities depend only on the item, so a
    worker computes them once, not once per format."""

    def __init__(self, model: Any):
        self.model = model
        self._answers: dict[str, Any] = {}
        self._logprobs: dict[tuple[str, tuple[int, ...]], Any] = {}

    def reset(self) -> None:
        self.model.reset()

    def generate(self, messages: Any, **kwargs: Any) -> Any:
        key = json.dumps([messages, kwargs], sort_keys=True)
        if key not in self._answers:
            self._answers[key] = self.model.generate(messages, **kwargs)
        return self._answers[key]

    def logprobs(self, messages: Any, tokens: Any) -> Any:
        key = (json.dumps(messages, sort_keys=True), tuple(tokens))
        if key not in self._logprobs:
            self._logprobs[key] = self.model.logprobs(messages, tokens)
        return self._logprobs[key]


_reference: _RememberedReference | None = None


def _open_reference(path: str, mmproj: str) -> None:
    global _reference
    from r1v.runtime.api import load

    _reference = _RememberedReference(load(path, mmproj=mmproj, n_threads=1, n_threads_batch=1))


def results_path(work: Path, name: str) -> Path:
    """Where the row `name` keeps its per-item results (a file-safe form of the name)."""
    slug = re.sub(r"[^a-z0-9_]+", "-", name.lower().replace("+", " plus ")).strip("-")
    return work / f"eval-{slug}.items.jsonl"


def _score(name: str, path: str, mmproj: str | None, data: str, work: str) -> Row:
    """One row, in a worker process (one thread each: this model is too small for llama.cpp's threads to pay,
    so two workers on two cores measure twice as fast)."""
    from r1v.apps.evaluation import evaluate, read_items
    from r1v.runtime.api import load

    options: dict[str, Any] = {"mmproj": mmproj} if mmproj else {}
    with load(path, n_threads=1, n_threads_batch=1, **options) as model:
        report = evaluate(model, read_items(data), reference=_reference,
                          results_path=results_path(Path(work), name),
                          names={"model": name, "data": data, "reference": "GGUF F16"}, progress=False)
    return Row(name, report.accuracy, standard_error(report.accuracy, report.total), report.correct,
               report.total, report.mean_kl, report.top1_agreement, report.mean_output_tokens)


Builder = Callable[[Path, Path, bool], dict[str, tuple[Path, Path | None]]]


def measure(checkpoint: Path, work: Path, n: int, progress: bool = True, workers: int = 2,
            builder: Builder | None = None, score_reference: bool = True) -> list[Row]:
    """Score every format `builder` (default: `build`) makes, each against its "GGUF F16" (a row of its own
    unless `score_reference` is False)."""
    from concurrent.futures import ProcessPoolExecutor

    work.mkdir(parents=True, exist_ok=True)
    data = work / "test.jsonl"
    if not data.is_file() or len(data.read_text().splitlines()) != n:
        task.write_items(task.TEST_SEED, n, data)
    formats = (builder or build)(checkpoint, work, progress)
    reference_path, reference_mmproj = formats["GGUF F16"] if score_reference else formats.pop("GGUF F16")
    with ProcessPoolExecutor(workers, initializer=_open_reference,
                             initargs=(str(reference_path), str(reference_mmproj))) as pool:
        futures = {name: pool.submit(_score, name, str(path), str(mmproj) if mmproj else None, str(data), str(work))
                   for name, (path, mmproj) in formats.items()}
        rows = []
        for name, future in futures.items():
            row = future.result()
            rows.append(row)
            if progress:
                print(f"{name}: {row.accuracy:.1%} ± {row.standard_error:.1%}, KL {row.mean_kl}, "
                      f"top-1 {row.top1_agreement}", file=sys.stderr, flush=True)
    return rows


def markdown(rows: list[Row]) -> str:
    lines = ["| model | accuracy (± 1 SE) | KL to F16 | top-1 agreement |", "|---|---|---|---|"]
    for r in rows:
        kl = "—" if r.mean_kl is None or r.format == "GGUF F16" else f"{r.mean_kl:.1e}"
        top1 = "—" if r.top1_agreement is None or r.format == "GGUF F16" else f"{r.top1_agreement:.2%}"
        lines.append(f"| {r.format} | {r.accuracy:.1%} ± {r.standard_error:.1%} | {kl} | {top1} |")
    return "\n".join(lines) + "\n"


def argument_parser(prog: str, doc: str) -> argparse.ArgumentParser:
    """The options this tool and its kin (`r1v.micro.imatrix_choice`) share."""
    parser = argparse.ArgumentParser(prog=prog, description=doc.split("\n\n")[0])
    parser.add_argument("checkpoint", nargs="?", default=None, help="checkpoint directory (default: the shipped one)")
    parser.add_argument("--work", required=True, help="folder for the items, builds and results (reused on rerun)")
    parser.add_argument("-n", type=int, default=1000, help="test items (default %(default)s)")
    parser.add_argument("--workers", type=int, default=2, help="formats measured at once (default %(default)s)")
    parser.add_argument("--no-progress", action="store_true")
    return parser


def parse(parser: argparse.ArgumentParser, argv: list[str] | None) -> tuple[argparse.Namespace, Path, Path]:
    """The options, the checkpoint (refused before any work when it is none) and the work folder."""
    args = parser.parse_args(argv)
    checkpoint = Path(args.checkpoint) if args.checkpoint else model_path()
    if not (checkpoint / "config.json").is_file():
        parser.error(f"{checkpoint}: not a checkpoint directory (no config.json)")
    return args, checkpoint, Path(args.work)


def main(argv: list[str] | None = None) -> int:
    args, checkpoint, work = parse(argument_parser("python -m r1v.micro.formats", __doc__), argv)
    rows = measure(checkpoint, work, args.n, progress=not args.no_progress, workers=args.workers)
    table: dict[str, Any] = {"checkpoint": str(checkpoint), "items": args.n, "seed": task.TEST_SEED,
                             "rows": [asdict(r) for r in rows]}
    (work / "formats.json").write_text(json.dumps(table, indent=2) + "\n")
    (work / "formats.md").write_text(markdown(rows))
    print(markdown(rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
