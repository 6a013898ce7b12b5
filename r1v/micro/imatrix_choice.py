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

from . import model_path, task
from .formats import IMATRIX_QUANTS, Row, argument_parser, markdown, measure, results_path

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
    from r1v.converters.gguf import convert_gguf, llm_file_name, mmproj_file_name

    plain = work / "gguf"
    mmproj = plain / mmproj_file_name("micro-r1v", "f16")
    wanted = ("f16", *IMATRIX_QUANTS)
    missing = [q for q in wanted if not (plain / llm_file_name("micro-r1v", q)).is_file()]
    if missing or not mmproj.is_file():
        convert_gguf(checkpoint, plain, missing, None if mmproj.is_file() else "f16", name="micro-r1v",
                     progress=progress)
    formats: dict[str, tuple[Path, Path | None]] = {"GGUF F16": (plain / llm_file_name("micro-r1v", "f16"), mmproj)}
    formats |= {f"GGUF {q.upper()}": (plain / llm_file_name("micro-r1v", q), mmproj) for q in IMATRIX_QUANTS}
    for variant in VARIANTS:
        matrix = record(checkpoint, variant, work / f"imatrix-{_slug(variant)}.gguf", progress)
        folder = work / f"gguf-{_slug(variant)}"
        missing = [q for q in IMATRIX_QUANTS if not (folder / llm_file_name("micro-r1v", q)).is_file()]
        if missing:
            convert_gguf(checkpoint, folder, missing, None, name="micro-r1v", imatrix=matrix, progress=progress)
        formats |= {f"GGUF {q.upper()} + imatrix, {variant}": (folder / llm_file_name("micro-r1v", q), mmproj)
                    for q in IMATRIX_QUANTS}
    return formats


def _item_kl(work: Path, name: str) -> dict[str, float]:
    rows = [json.loads(line) for line in results_path(work, name).read_text().splitlines()[1:]]
    return {r["id"]: r["kl"] for r in rows if r["kl"] is not None}


def _names(quant: str) -> dict[str, str]:
    """Row names of one quant type: every matrix, and no matrix."""
    q = quant.upper()
    return {"no imatrix": f"GGUF {q}"} | {v: f"GGUF {q} + imatrix, {v}" for v in VARIANTS}


def summary_markdown(work: Path, rows: list[Row]) -> str:
    """The README's table: per type and matrix, mean / geometric-mean KL to F16 and the accuracy."""
    by_name = {r.format: r for r in rows}
    lines = ["| KL to F16: mean / geometric mean (accuracy) | " + " | ".join(_names("q2_k")) + " |",
             "|---|" + "---|" * len(_names("q2_k"))]
    for quant in IMATRIX_QUANTS:
        cells = []
        for name in _names(quant).values():
            kl = np.array(list(_item_kl(work, name).values()))
            cells.append(f"{by_name[name].mean_kl:.1e} / {geometric_mean(kl):.2e} ({by_name[name].accuracy:.1%})")
        lines.append(f"| {quant.upper()} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def pairs(work: Path) -> list[Pair]:
    """Every matrix against every other and against no matrix, per item, on each quant type."""
    found = []
    for quant in IMATRIX_QUANTS:
        kl = {v: _item_kl(work, n) for v, n in _names(quant).items()}
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
    parser = argument_parser("python -m r1v.micro.imatrix_choice", __doc__)
    args = parser.parse_args(argv)
    checkpoint = Path(args.checkpoint) if args.checkpoint else model_path()
    work = Path(args.work)
    rows = measure(checkpoint, work, args.n, progress=not args.no_progress, workers=args.workers, builder=build,
                   score_reference=False)
    found = pairs(work)
    result = {"checkpoint": str(checkpoint), "items": args.n, "seed": task.TEST_SEED,
              "rows": [asdict(r) for r in rows], "pairs": [asdict(p) for p in found]}
    (work / "imatrix-choice.json").write_text(json.dumps(result, indent=2) + "\n")
    text = summary_markdown(work, rows) + "\n" + markdown(rows) + "\n" + pairs_markdown(found)
    (work / "imatrix-choice.md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
