"""Which positions the importance matrix should count: the README's imatrix comparison on micro-r1v.

`python -m r1v.micro.imatrix_choice [CHECKPOINT] --work DIR [-n 1000]` records three importance matrices from
the same calibration items (the training-split items the shipped AWQ build uses), each by llama.cpp's method
(per input column of every LLM linear, the mean of the squared activations over the positions counted):

- `every position` (what `--imatrix-out` records by default): every token of the multimodal windows, the
  image tokens too;
- `text positions` (`--imatrix-positions text`): the text tokens of the same windows, images in context;
- `text without images`: the same questions and answers with no picture, what llama-imatrix itself would see
  (it reads text only).

Each builds Q4_K_M, Q3_K_S and Q2_K (plus the same types without a matrix), scored on the same held-out test
items as `r1v.micro.formats` against the F16 GGUF; per-item KL is compared in pairs. Writes
`imatrix-choice.json` / `.md` into DIR and reuses what a previous run finished.
"""
from __future__ import annotations

import json
import shutil
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np

from . import task
from .formats import (IMATRIX_QUANTS, Row, argument_parser, gguf_files, markdown, measure, parse,
                      results_path)

VARIANTS = ("every position", "text positions", "text without images")


@dataclass
class Pair:
    """Per-item KL of one matrix against another on the same quant type."""

    quant: str
    variant: str
    versus: str
    kl_ratio: float  # mean KL of `variant` / mean KL of `versus`
    lower_on: float  # share of items where `variant` has the lower KL (ties count half)
    mean_difference: float  # mean of per-item KL differences (variant - versus)
    difference_standard_error: float
    geometric_ratio: float  # geometric mean of per-item KL ratios (variant / versus): robust to the heavy tail
    log_ratio_standard_error: float  # of the mean log ratio


KL_FLOOR = 1e-12  # per-item KL below this counts as this (an item whose answer both models give with certainty)


def geometric_mean(values: np.ndarray) -> float:
    return float(np.exp(np.log(np.maximum(values, KL_FLOOR)).mean()))


def _slug(variant: str) -> str:
    return variant.replace(" ", "-")


def record(checkpoint: Path, variant: str, path: Path, progress: bool) -> Path:
    """One importance matrix (through an RTN build of the checkpoint, the cheapest run that records one)."""
    if path.is_file():
        return path
    from r1v.quant.driver import quantize_checkpoint_awq

    from .files import calibration_items

    items = calibration_items()
    if variant == "text without images":
        items = [replace(item, image=None) for item in items]
    out = path.with_name(f"rtn-{_slug(variant)}")
    shutil.rmtree(out, ignore_errors=True)
    positions = "text" if variant == "text positions" else "all"  # (without images every position is text)
    quantize_checkpoint_awq(checkpoint, out, calib=items, method="rtn", imatrix_out=path,
                            imatrix_positions=positions, progress=progress)  # the matrix is written atomically
    shutil.rmtree(out, ignore_errors=True)
    return path


def build(checkpoint: Path, work: Path, progress: bool) -> dict[str, tuple[Path, Path | None]]:
    """F16 (the reference), the types without a matrix, and the types with each matrix: name -> (model, mmproj)."""
    plain, mmproj = gguf_files(checkpoint, work / "gguf", ("f16", *IMATRIX_QUANTS), progress, with_mmproj=True)
    formats: dict[str, tuple[Path, Path | None]] = {f"GGUF {q.upper()}": (f, mmproj) for q, f in plain.items()}
    for variant in VARIANTS:
        matrix = record(checkpoint, variant, work / f"imatrix-{_slug(variant)}.gguf", progress)
        weighted, _ = gguf_files(checkpoint, work / f"gguf-{_slug(variant)}", IMATRIX_QUANTS, progress, imatrix=matrix)
        formats |= {f"GGUF {q.upper()} + imatrix, {variant}": (f, mmproj) for q, f in weighted.items()}
    return formats


def _item_kl(work: Path, name: str) -> dict[str, float]:
    rows = [json.loads(line) for line in results_path(work, name).read_text().splitlines()[1:]]
    return {r["id"]: r["kl"] for r in rows if r["kl"] is not None}


MATRICES = ("no imatrix", *VARIANTS)


def _row_name(quant: str, matrix: str) -> str:
    return f"GGUF {quant.upper()}" if matrix == "no imatrix" else f"GGUF {quant.upper()} + imatrix, {matrix}"


def item_kls(work: Path) -> dict[str, dict[str, dict[str, float]]]:
    """Per-item KL to F16: quant type -> matrix (or "no imatrix") -> item id -> KL."""
    return {q: {m: _item_kl(work, _row_name(q, m)) for m in MATRICES} for q in IMATRIX_QUANTS}


def summary_markdown(kls: dict[str, dict[str, dict[str, float]]], rows: list[Row]) -> str:
    """The README's table: per type and matrix, mean / geometric-mean KL to F16 and the accuracy."""
    by_name = {r.format: r for r in rows}
    lines = ["| KL to F16: mean / geometric mean (accuracy) | " + " | ".join(MATRICES) + " |",
             "|---|" + "---|" * len(MATRICES)]
    for quant, by_matrix in kls.items():
        cells = []
        for matrix, kl in by_matrix.items():
            row = by_name[_row_name(quant, matrix)]
            cells.append(f"{row.mean_kl:.1e} / {geometric_mean(np.array(list(kl.values()))):.2e} ({row.accuracy:.1%})")
        lines.append(f"| {quant.upper()} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def pairs(kls: dict[str, dict[str, dict[str, float]]]) -> list[Pair]:
    """Every matrix against every other and against no matrix, per item, on each quant type."""
    found = []
    for quant, kl in kls.items():
        for i, variant in enumerate(VARIANTS):
            for versus in [*VARIANTS[i + 1:], "no imatrix"]:
                ids = sorted(kl[variant].keys() & kl[versus].keys())
                a = np.array([kl[variant][k] for k in ids])
                b = np.array([kl[versus][k] for k in ids])
                d = a - b
                log_ratio = np.log(np.maximum(a, KL_FLOOR)) - np.log(np.maximum(b, KL_FLOOR))
                found.append(Pair(quant.upper(), variant, versus, float(a.mean() / b.mean()),
                                  float(((d < 0).sum() + 0.5 * (d == 0).sum()) / len(d)), float(d.mean()),
                                  float(d.std(ddof=1) / np.sqrt(len(d))), float(np.exp(log_ratio.mean())),
                                  float(log_ratio.std(ddof=1) / np.sqrt(len(d)))))
    return found


def pairs_markdown(found: list[Pair]) -> str:
    lines = ["| type | matrix | against | mean KL ratio | KL difference (± 1 SE) | geometric mean ratio "
             "(± 1 SE of its log) | items with lower KL |", "|---|---|---|---|---|---|---|"]
    for p in found:
        lines.append(f"| {p.quant} | {p.variant} | {p.versus} | {p.kl_ratio:.2f} | "
                     f"{p.mean_difference:+.1e} ± {p.difference_standard_error:.1e} | {p.geometric_ratio:.2f} "
                     f"(± {p.log_ratio_standard_error:.3f}) | {p.lower_on:.0%} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    args, checkpoint, work = parse(argument_parser("python -m r1v.micro.imatrix_choice", __doc__), argv)
    rows = measure(checkpoint, work, args.n, progress=not args.no_progress, workers=args.workers, builder=build,
                   score_reference=False)
    kls = item_kls(work)
    found = pairs(kls)
    result = {"checkpoint": str(checkpoint), "items": args.n, "seed": task.TEST_SEED,
              "rows": [asdict(r) for r in rows], "pairs": [asdict(p) for p in found]}
    (work / "imatrix-choice.json").write_text(json.dumps(result, indent=2) + "\n")
    text = summary_markdown(kls, rows) + "\n" + markdown(rows) + "\n" + pairs_markdown(found)
    (work / "imatrix-choice.md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
