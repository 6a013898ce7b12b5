"""`r1v eval`: exact-match accuracy of any loadable model over a JSONL of questions, and how far its
next-token distributions lie from a reference model's on the same prompts.

Items are `{"image", "question", "answer"}` (image optional, relative to the JSONL's folder; `id` and `task`
used when present). Every item is answered greedily; the final answer (after `</think>`) is compared with
the expected one exactly, after trimming whitespace and a trailing full stop.

With a reference model, the reference answers each prompt greedily too, and both models score that answer
token by token (teacher forcing, as llama.cpp's `--kl-divergence` does with a fixed text): the mean over
tokens of KL(reference || model) and the share of positions where both put the same token first.

Each finished item is appended to a results file beside the report (`REPORT.items.jsonl`), flushed and
synced, so an interrupted run resumes where it stopped; the report is computed from that file.
"""
from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import numpy as np

from r1v.converters.jsonl import read_jsonl

from r1v.runtime.reasoning import final_answer

__all__ = ["EvalItem", "EvalReport", "ItemResult", "answers_match", "evaluate", "kl_and_agreement", "read_items"]

RESULTS_FORMAT = 1


@dataclass(frozen=True)
class EvalItem:
    id: str
    question: str
    answer: str
    image: Path | None = None
    task: str | None = None


@dataclass
class ItemResult:
    id: str
    task: str | None
    expected: str
    answer: str
    correct: bool
    output_tokens: int
    kl: float | None = None  # mean over the reference answer's tokens
    top1_agreement: float | None = None
    scored_tokens: int = 0


@dataclass
class EvalReport:
    """`accuracy` is a fraction; `mean_kl` / `top1_agreement` are None without a reference."""

    accuracy: float
    correct: int
    total: int
    mean_output_tokens: float
    mean_kl: float | None
    top1_agreement: float | None
    model: str
    data: str
    reference: str | None
    by_task: dict[str, dict[str, float]] = field(default_factory=dict)
    seconds: float = 0.0

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    def summary(self) -> str:
        text = f"accuracy {self.accuracy:.1%} ({self.correct}/{self.total}), mean output {self.mean_output_tokens:.1f} tokens"
        if self.mean_kl is not None:
            text += f", KL to reference {self.mean_kl:.2e}, top-1 agreement {self.top1_agreement:.2%}"
        return text


# --- input -------------------------------------------------------------------------------------------------

def read_items(path: str | Path, limit: int | None = None) -> list[EvalItem]:
    """The items of a JSONL file; a bad line raises ValueError naming the file, the line and the field."""
    path = Path(path)
    items: list[EvalItem] = []
    seen: set[str] = set()
    for number, row in read_jsonl(path):
        where = f"{path}:{number}"
        for key in ("question", "answer"):
            if not isinstance(row.get(key), (str, int)) or str(row[key]) == "":
                raise ValueError(f"{where}: field {key!r} is missing or not a string")
        image = row.get("image")
        if image is not None and not isinstance(image, str):
            raise ValueError(f"{where}: field 'image' must be a path (string) or null")
        image_path = None if not image else (path.parent / image)
        if image_path is not None and not image_path.is_file():
            raise ValueError(f"{where}: field 'image': no file {image_path}")
        item_id = str(row.get("id", f"line-{number}"))
        if item_id in seen:
            raise ValueError(f"{where}: field 'id': {item_id!r} appears twice")
        seen.add(item_id)
        items.append(EvalItem(item_id, str(row["question"]), str(row["answer"]), image_path, row.get("task")))
        if limit is not None and len(items) >= limit:
            break
    return items


def answers_match(got: str, expected: str) -> bool:
    norm = lambda s: s.strip().rstrip(".").strip()  # noqa: E731
    return norm(got) == norm(expected)


# --- distributions -----------------------------------------------------------------------------------------

def kl_and_agreement(reference: np.ndarray, model: np.ndarray) -> tuple[float, float]:
    """(mean KL(reference || model), share of equal argmax) over rows of log-probabilities [tokens, vocab]."""
    if reference.shape != model.shape:
        raise ValueError(f"the models' distributions differ in shape ({reference.shape} vs {model.shape}): "
                         "not the same vocabulary")
    ref, mod = reference.astype(np.float64), model.astype(np.float64)
    kl = (np.exp(ref) * (ref - mod)).sum(axis=-1)
    agree = ref.argmax(axis=-1) == mod.argmax(axis=-1)
    return float(kl.mean()), float(agree.mean())


# --- the run -----------------------------------------------------------------------------------------------

def _messages(item: EvalItem) -> list[dict[str, Any]]:
    content: list[dict[str, Any]] = []
    if item.image is not None:
        content.append({"type": "image", "image": str(item.image)})
    content.append({"type": "text", "text": item.question})
    return [{"role": "user", "content": content}]


def _answer(model: Any, item: EvalItem, max_tokens: int) -> Any:
    model.reset()  # every item is its own conversation
    return model.generate(_messages(item), temperature=0, max_tokens=max_tokens)


def evaluate_item(model: Any, item: EvalItem, *, reference: Any = None, max_tokens: int = 256) -> ItemResult:
    result = _answer(model, item, max_tokens)
    answer = final_answer(result.text)
    out = ItemResult(item.id, item.task, item.answer, answer, answers_match(answer, item.answer),
                     result.completion_tokens)
    if reference is not None:
        ref_result = _answer(reference, item, max_tokens)
        tokens = ref_result.tokens
        if tokens:
            ref_lp = reference.logprobs(_messages(item), tokens)
            model_lp = model.logprobs(_messages(item), tokens)
            out.kl, out.top1_agreement = kl_and_agreement(ref_lp, model_lp)
            out.scored_tokens = len(tokens)
    return out


class ResultsFile:
    """Finished items, one JSON line each after a header line naming the run; appended, flushed and synced.
    `overwrite`: start over even when the file holds results (of this run or another)."""

    def __init__(self, path: Path, header: dict[str, Any], overwrite: bool = False):
        self.path, self.header = path, {"r1v_eval_results": RESULTS_FORMAT, **header}
        self.done: dict[str, ItemResult] = {}
        if path.exists() and not overwrite:
            self._read()
        else:
            path.unlink(missing_ok=True)
            self._append(self.header)

    def _read(self) -> None:
        lines = self.path.read_text(encoding="utf-8").splitlines()
        try:
            header = json.loads(lines[0]) if lines else None
        except json.JSONDecodeError:
            header = None
        if header != self.header:
            raise ValueError(run_conflict(self.path, header, self.header))
        for line in lines[1:]:
            try:
                row = json.loads(line)
            except json.JSONDecodeError:  # the line being written when a run was killed: redone
                continue
            self.done[row["id"]] = ItemResult(**row)
        # rewrite without a torn last line, so appends start on a fresh line
        self._write_all()

    def _write_all(self) -> None:
        tmp = self.path.with_name(self.path.name + ".tmp")
        with tmp.open("w", encoding="utf-8") as f:
            for row in [self.header, *(asdict(r) for r in self.done.values())]:
                f.write(json.dumps(row) + "\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.path)

    def _append(self, row: dict[str, Any]) -> None:
        with self.path.open("a", encoding="utf-8") as f:
            f.write(json.dumps(row) + "\n")
            f.flush()
            os.fsync(f.fileno())

    def add(self, result: ItemResult) -> None:
        self.done[result.id] = result
        self._append(asdict(result))


def run_conflict(path: Path, found: Any, wanted: dict[str, Any]) -> str:
    """One line saying how the run recorded in `path` differs from this one, and what to do."""
    what = "r1v eval --force starts over (evaluate(..., overwrite=True)), or write the report elsewhere (-o)"
    if not isinstance(found, dict) or "r1v_eval_results" not in found:
        return f"{path} is not an r1v eval results file; {what}"
    changed = [f"{key} {_shown(found.get(key))} there, {_shown(wanted.get(key))} now"
               for key in dict.fromkeys([*wanted, *found]) if found.get(key) != wanted.get(key)]
    return f"{path} holds results of another run ({'; '.join(changed)}): {what}"


def _shown(value: Any) -> str:
    return "none" if value is None else repr(value) if isinstance(value, str) else str(value)


def summarize(results: Sequence[ItemResult], *, model: str, data: str, reference: str | None,
              seconds: float = 0.0) -> EvalReport:
    total = len(results)
    correct = sum(r.correct for r in results)
    scored = [r for r in results if r.kl is not None]
    weights = np.array([r.scored_tokens for r in scored], dtype=np.float64)
    mean_kl = top1 = None
    if scored and weights.sum() > 0:  # per token, over all items
        mean_kl = float(np.average([r.kl for r in scored], weights=weights))
        top1 = float(np.average([r.top1_agreement for r in scored], weights=weights))
    by_task: dict[str, dict[str, float]] = {}
    for r in results:
        entry = by_task.setdefault(r.task or "-", {"correct": 0, "total": 0})
        entry["correct"] += r.correct
        entry["total"] += 1
    for entry in by_task.values():
        entry["accuracy"] = entry["correct"] / entry["total"]
    return EvalReport(
        accuracy=correct / total if total else 0.0, correct=correct, total=total,
        mean_output_tokens=float(np.mean([r.output_tokens for r in results])) if results else 0.0,
        mean_kl=mean_kl, top1_agreement=top1, model=model, data=data, reference=reference,
        by_task=dict(sorted(by_task.items())), seconds=round(seconds, 1))


def evaluate(
    model: Any,
    items: Iterable[EvalItem],
    *,
    reference: Any = None,
    results_path: str | Path | None = None,
    names: dict[str, str | None] | None = None,
    max_tokens: int = 256,
    progress: bool = True,
    on_item: Callable[[ItemResult], None] | None = None,
    overwrite: bool = False,
) -> EvalReport:
    """Evaluate loaded `model` (and `reference`) on `items`. `names` ({"model", "data", "reference"}) label
    the report and identify the run in the results file, which makes the run resumable; `overwrite` discards
    what the results file holds instead."""
    from tqdm import tqdm

    names = {"model": str(getattr(model, "path", model)), "data": "", "reference": None, **(names or {})}
    items = list(items)
    store = ResultsFile(Path(results_path), {**names, "max_tokens": max_tokens}, overwrite) if results_path else None
    done = store.done if store else {}
    start = time.perf_counter()
    todo = [item for item in items if item.id not in done]
    for item in tqdm(todo, desc="eval", unit="item", disable=not progress,
                     initial=len(items) - len(todo), total=len(items)):
        result = evaluate_item(model, item, reference=reference, max_tokens=max_tokens)
        if store:
            store.add(result)
        else:
            done[item.id] = result
        if on_item:
            on_item(result)
    results = [done[item.id] for item in items]
    return summarize(results, model=names["model"], data=names["data"], reference=names["reference"],
                     seconds=time.perf_counter() - start)


def write_report(report: EvalReport, path: str | Path) -> Path:
    """The report as JSON (`accuracy` at its top level), written under a temporary name and renamed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(report.to_json(), indent=2) + "\n", encoding="utf-8")
    os.replace(tmp, path)
    return path
