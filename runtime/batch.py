"""`r1v batch`: answer a JSONL file of questions about images; one output line per input line, resumable.

Input (the format of Skywork's r1v4 batch tools), one JSON object a line::

    {"image": "./demo_image/demo_1.png", "question": "What's in this image?"}
    {"image": "", "question": "This is a text-only question"}

`image` is a path relative to the JSONL file ("" or absent: no image; a list: several). Other keys are kept.
Each output line is the input plus, as Skywork's tools write it, ``response: {full_response, raw_response}``
(`full_response`: the output as the model wrote it, with the ``<think>`` the prompt opened, so Skywork's
`parse_full_response` reads it; `raw_response`: the `chat.completion` object `r1v serve` would answer; with
``stream``, also Skywork's `raw_events`, the server's SSE lines), or ``response: {error}`` for an item that
failed; and our parsed fields: `reasoning`, `answer` (`reasoning.final_answer`), `rounds` (think / tool_call /
observation / answer / text), `finish_reason`, `usage`, `seconds`, `index` (the item's position in the input),
`image_path` (the image relative to the output file, for `r1v view`).

Crash safety: every output line is written with one append and fsync'd before the next item starts, so a killed
run loses at most the item it was working on. A rerun skips the items already in the output, keyed by `id` when
the items have one, else by `index`; a half-written last line (a kill during the write) is cut off first.
"""
from __future__ import annotations

import dataclasses
import json
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, TextIO

from .chat import starts_in_reasoning
from .reasoning import final_answer
from .serve.protocol import chunk_response, completion_id, completion_response, usage

__all__ = ["BatchConfig", "BatchPlan", "BatchSummary", "JsonlAppender", "plan_batch", "run_batch"]


@dataclass(frozen=True)
class BatchConfig:
    """input / output: JSONL paths. stream: stream each answer to `echo` and keep Skywork's `raw_events`.
    sampling: `SamplingParams` overrides. model_name: the `model` field of `raw_response`. retry_errors: run
    again the items whose output line is an error (their old lines are dropped first)."""

    input: Path
    output: Path
    stream: bool = False
    sampling: dict[str, Any] = field(default_factory=dict)
    model_name: str = "r1v"
    retry_errors: bool = False
    progress: bool = True

    def __post_init__(self) -> None:
        object.__setattr__(self, "input", Path(self.input))
        object.__setattr__(self, "output", Path(self.output))
        if self.input.resolve() == self.output.resolve():
            raise ValueError(f"the output file must not be the input file ({self.input})")


@dataclass
class BatchPlan:
    """The input's items as (key, index, item), and the keys already answered in the output."""

    items: list[tuple[str, int, dict[str, Any]]]
    done: set[str]

    @property
    def todo(self) -> list[tuple[str, int, dict[str, Any]]]:
        return [entry for entry in self.items if entry[0] not in self.done]


@dataclass(frozen=True)
class BatchSummary:
    total: int
    skipped: int  # already in the output
    answered: int
    failed: int
    seconds: float


# --- input and output files -----------------------------------------------------------------------------

def _key(index: int, item: dict[str, Any], by_id: bool) -> str:
    return f"id:{item['id']}" if by_id else f"index:{index}"


def read_items(path: Path) -> list[tuple[str, int, dict[str, Any]]]:
    """(key, index, item) of each non-blank line; errors name the line."""
    if not path.is_file():
        raise FileNotFoundError(f"input file not found: {path}")
    items: list[dict[str, Any]] = []
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                item = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{number}: not a JSON object: {e}") from None
            if not isinstance(item, dict):
                raise ValueError(f"{path}:{number}: expected a JSON object, got {type(item).__name__}")
            question = item.get("question")
            if not isinstance(question, str):
                raise ValueError(f"{path}:{number}: 'question' must be a string")
            image = item.get("image")
            if image is not None and not isinstance(image, str) and not (
                    isinstance(image, list) and all(isinstance(i, str) for i in image)):
                raise ValueError(f"{path}:{number}: 'image' must be a path, a list of paths, or \"\"")
            items.append(item)
    by_id = bool(items) and all("id" in item for item in items)
    keyed = [(_key(i, item, by_id), i, item) for i, item in enumerate(items)]
    seen: set[str] = set()
    for key, index, _ in keyed:
        if key in seen:
            raise ValueError(f"{path}: item {index} repeats {key} (ids must be unique to resume by them)")
        seen.add(key)
    return keyed


def _repair_tail(path: Path) -> None:
    """Cut a half-written last line (a run killed during its write) so the item is answered again."""
    with open(path, "rb+") as f:
        size = f.seek(0, os.SEEK_END)
        if size == 0:
            return
        f.seek(size - 1)
        if f.read(1) == b"\n":
            return
        keep = 0
        position = size
        while position > 0:  # find the last newline, reading backwards in blocks
            start = max(0, position - 65536)
            f.seek(start)
            block = f.read(position - start)
            newline = block.rfind(b"\n")
            if newline >= 0:
                keep = start + newline + 1
                break
            position = start
        f.truncate(keep)
        f.flush()
        os.fsync(f.fileno())


def read_done(output: Path, items: list[tuple[str, int, dict[str, Any]]], *,
              retry_errors: bool = False) -> set[str]:
    """Keys of the items answered in `output` (after cutting a half-written last line). With `retry_errors`,
    the error lines are removed from the file (rewritten atomically) and their items count as not done."""
    if not output.exists():
        return set()
    _repair_tail(output)
    by_id = bool(items) and items[0][0].startswith("id:")
    done: set[str] = set()
    kept: list[str] = []
    errors = 0
    with open(output, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
                key = _key(record["index"], record, by_id)
            except (json.JSONDecodeError, KeyError, TypeError):
                raise ValueError(f"{output}:{number}: not an output line of r1v batch (a JSON object with 'index'"
                                 f"{' and id' if by_id else ''}); use another output file") from None
            if retry_errors and "error" in (record.get("response") or {}):
                errors += 1
                continue
            done.add(key)
            kept.append(line if line.endswith("\n") else line + "\n")
    if errors:
        _rewrite(output, kept)
    return done


def _rewrite(path: Path, lines: list[str]) -> None:
    temporary = path.with_name(f".{path.name}.tmp")
    with open(temporary, "w", encoding="utf-8") as f:
        f.writelines(lines)
        f.flush()
        os.fsync(f.fileno())
    os.replace(temporary, path)


class JsonlAppender:
    """Appends one JSON object per line: one write() call each, then fsync, so a line is in the file whole
    (or, killed mid-write, cut off by the next run) before the next item starts."""

    def __init__(self, path: Path):
        created = not path.exists()
        self._fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        if created:  # make the new directory entry durable too
            directory = os.open(path.parent, os.O_RDONLY)
            try:
                os.fsync(directory)
            finally:
                os.close(directory)

    def write(self, record: dict[str, Any]) -> None:
        data = (json.dumps(record, ensure_ascii=False) + "\n").encode("utf-8")
        view = memoryview(data)
        while view:
            view = view[os.write(self._fd, view):]
        os.fsync(self._fd)

    def close(self) -> None:
        os.close(self._fd)

    def __enter__(self) -> JsonlAppender:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# --- one item -------------------------------------------------------------------------------------------

def _images(item: dict[str, Any], base: Path) -> list[Path]:
    image = item.get("image") or []
    paths = [image] if isinstance(image, str) else image
    return [base / p for p in paths if p.strip()]


def _relative(path: Path, start: Path) -> str:
    try:
        return os.path.relpath(path.resolve(), start.resolve())
    except ValueError:  # another drive (Windows)
        return str(path.resolve())


def answer_item(model: Any, item: dict[str, Any], images: list[Path], config: BatchConfig,
                echo: Callable[[str, str], None] | None = None) -> dict[str, Any]:
    """The output fields for one item (response, reasoning, answer, ...). Raises what the model raises."""
    for path in images:
        if not path.is_file():
            raise FileNotFoundError(f"image not found: {path}")
    start = time.perf_counter()
    result = None
    events: list[str] = []
    id, created = completion_id(), int(time.time())
    for chunk in model.stream(item["question"], images=[str(p) for p in images], **config.sampling):
        if chunk.text:
            if echo is not None:
                echo(chunk.text, chunk.kind)
            if config.stream:
                key = "reasoning_content" if chunk.kind == "reasoning" else "content"
                events.append("data: " + json.dumps(chunk_response(id, created, config.model_name,
                                                                   {key: chunk.text}), ensure_ascii=False))
        result = chunk.result or result
    assert result is not None
    opened = starts_in_reasoning(result.prompt)
    # As the model wrote it: the <think> the chat template put in the prompt belongs to the output's reading.
    full = "<think>\n" + result.text if opened and not result.text.lstrip().startswith("<think>") else result.text
    response: dict[str, Any] = {
        "full_response": full,
        "raw_response": completion_response(result, model=config.model_name, id=id, created=created),
    }
    if config.stream:
        events.append("data: " + json.dumps(chunk_response(id, created, config.model_name, {},
                                                           result.finish_reason, usage=usage(result))))
        events.append("data: [DONE]")
        response["raw_events"] = "\n".join(events)
    return {
        "response": response,
        "reasoning": result.reasoning,
        "answer": final_answer(result.text, starts_in_reasoning=opened),
        "rounds": [{k: v for k, v in dataclasses.asdict(r).items() if v is not None} for r in result.rounds],
        "finish_reason": result.finish_reason,
        "usage": usage(result),
        "seconds": round(time.perf_counter() - start, 3),
    }


# --- the run --------------------------------------------------------------------------------------------

def plan_batch(config: BatchConfig) -> BatchPlan:
    items = read_items(config.input)
    return BatchPlan(items, read_done(config.output, items, retry_errors=config.retry_errors))


class _Echo:
    """--stream: each answer printed as it comes (reasoning between <think> tags), item by item."""

    def __init__(self, out: TextIO):
        self.out, self.kind = out, "content"

    def start(self, index: int, question: str) -> None:
        self.out.write(f"\n[{index}] {question}\n")
        self.kind = "content"

    def __call__(self, text: str, kind: str) -> None:
        if kind != self.kind:
            self.out.write("<think>\n" if kind == "reasoning" else "\n</think>\n")
            self.kind = kind
        self.out.write(text)
        self.out.flush()

    def end(self) -> None:
        self.out.write("\n</think>\n" if self.kind == "reasoning" else "\n")
        self.out.flush()


def run_batch(model: Any, config: BatchConfig, plan: BatchPlan | None = None, *,
              out: TextIO = sys.stdout) -> BatchSummary:
    """Answer the items not yet in the output, appending a line for each (an error line when one fails)."""
    from tqdm import tqdm

    plan = plan or plan_batch(config)
    todo = plan.todo
    base = config.input.parent
    echo = _Echo(out) if config.stream else None
    answered = failed = 0
    start = time.perf_counter()
    config.output.parent.mkdir(parents=True, exist_ok=True)
    with JsonlAppender(config.output) as writer, tqdm(total=len(plan.items), initial=len(plan.items) - len(todo),
                                                      desc="r1v batch", unit="item", disable=not config.progress,
                                                      file=sys.stderr) as bar:
        for key, index, item in todo:
            images = _images(item, base)
            record = {**item, "index": index}
            if images:
                record["image_path"] = [_relative(p, config.output.parent) for p in images] \
                    if isinstance(item.get("image"), list) else _relative(images[0], config.output.parent)
            if echo is not None:
                echo.start(index, item["question"])
            try:
                record.update(answer_item(model, item, images, config, echo))
                answered += 1
            except Exception as e:  # the item is recorded as failed; the run goes on
                record["response"] = {"error": f"{type(e).__name__}: {e}"}
                failed += 1
            finally:
                if echo is not None:
                    echo.end()
            writer.write(record)
            bar.update(1)
    return BatchSummary(len(plan.items), len(plan.items) - len(todo), answered, failed,
                        time.perf_counter() - start)
