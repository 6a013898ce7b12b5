"""`r1v batch`: answer a JSONL file of questions about images; one output line per input line, resumable.

Input (the format of Skywork's r1v4 batch tools), one JSON object a line::

    {"image": "./demo_image/demo_1.png", "question": "What's in this image?"}
    {"image": "", "question": "This is a text-only question"}

`image` is a path relative to the JSONL file ("" or absent: no image; a list: several). Every other field is
kept as it is (an `answer` is the expected answer, which `r1v view` compares with the model's). Each output line
is the input line's fields, unchanged, plus two keys of the model's output (an input that already has one of
them is refused, so nothing of the input is overwritten):

- ``response``, as Skywork's tools write it: ``{full_response, raw_response}`` (`full_response`: the output as
  the model wrote it, with the ``<think>`` the prompt opened, so Skywork's `parse_full_response` reads it;
  `raw_response`: the `chat.completion` object `r1v serve` would answer; with ``stream``, also Skywork's
  `raw_events`, the server's SSE lines), or ``{error}`` for an item that failed;
- ``r1v``, our fields: `index` (the item's position in the input), `image_path` (the image relative to the
  output file, for `r1v view`), and for an answered item the parsed `reasoning`, `answer`
  (`reasoning.final_answer`), `rounds` (think / tool_call / observation / answer / text), `finish_reason`,
  `usage`, `seconds`.

Crash safety: every output line is written with one append and fsync'd before the next item starts, so a killed
run loses at most the item it was working on. A rerun skips the items already in the output, keyed by `id` when
the items have one, else by ``r1v.index``; a half-written last line (a kill during the write) is cut off first.
One run at a time writes an output file: `plan_batch` takes an exclusive lock on it (the file ``.OUT.lock``
beside it holds the writer's pid) and a second run is refused with `BatchBusyError` before it touches anything.
"""
from __future__ import annotations

import dataclasses
import fcntl
import json
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, TextIO

from r1v.converters.jsonl import read_jsonl, text_lines

from r1v.runtime.chat import starts_in_reasoning
from r1v.runtime.reasoning import final_answer
from .serve.protocol import chunk_response, completion_id, completion_response, usage

__all__ = ["BatchBusyError", "BatchConfig", "BatchPlan", "BatchSummary", "JsonlAppender", "OUTPUT_KEY", "OutputLock",
           "plan_batch", "run_batch"]

OUTPUT_KEY = "r1v"  # our fields of each output line; Skywork's own are under "response"
_WRITTEN_KEYS = ("response", OUTPUT_KEY)  # what the batch writes: an input may not hold them


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


class BatchBusyError(RuntimeError):
    """Another run holds the output file's lock."""


class OutputLock:
    """An exclusive lock on an output file, taken without waiting: `flock` on the sidecar ``.NAME.lock`` (not on
    the output itself, which ``--retry-errors`` replaces by a rename), which holds the owner's pid for the
    message and is removed on release. The kernel drops the lock when its owner dies, so a killed run leaves
    at most a stale file that the next run takes over."""

    def __init__(self, output: Path):
        self.output = output
        self.path = output.with_name(f".{output.name}.lock")
        self._fd: int | None = None

    @property
    def held(self) -> bool:
        return self._fd is not None

    def acquire(self) -> None:
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                pid = os.read(fd, 32).decode("ascii", "replace").strip() or "unknown"
                os.close(fd)
                raise BatchBusyError(f"{self.output} is being written by another r1v batch (pid {pid})") from None
            # The owner removes the file on release: a lock on a removed file is no lock, so take the new one.
            try:
                here = os.stat(self.path)
                same = (here.st_dev, here.st_ino) == (os.fstat(fd).st_dev, os.fstat(fd).st_ino)
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self._fd = fd

    def release(self) -> None:
        if self._fd is None:
            return
        try:  # removed while still held, so a waiting opener finds it gone and retries (see acquire)
            os.unlink(self.path)
        except FileNotFoundError:
            pass
        os.close(self._fd)
        self._fd = None


@dataclass
class BatchPlan:
    """The input's items as (key, index, item), the keys already answered in the output, and the output's lock,
    held until the plan is closed (``with plan_batch(config) as plan: ...``)."""

    items: list[tuple[str, int, dict[str, Any]]]
    done: set[str]
    lock: OutputLock | None = None

    @property
    def todo(self) -> list[tuple[str, int, dict[str, Any]]]:
        return [entry for entry in self.items if entry[0] not in self.done]

    def close(self) -> None:
        if self.lock is not None:
            self.lock.release()

    def __enter__(self) -> BatchPlan:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


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
    for number, item in read_jsonl(path):
        for written in _WRITTEN_KEYS:
            if written in item:
                raise ValueError(f"{path}:{number}: field {written!r} is where r1v batch writes the model's output; "
                                 "rename it in the input (every other field is kept)")
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
    for number, line in text_lines(output):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            key = _key(record[OUTPUT_KEY]["index"], record, by_id)
        except (json.JSONDecodeError, KeyError, TypeError):
            raise ValueError(f"{output}:{number}: not an output line of r1v batch (a JSON object with "
                             f"'{OUTPUT_KEY}.index'{' and id' if by_id else ''}); use another output file") from None
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
    """The item's output: ``{"response": Skywork's fields, OUTPUT_KEY: our parsed fields}``. Raises what the
    model raises."""
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
    return {"response": response, OUTPUT_KEY: {
        "reasoning": result.reasoning,
        "answer": final_answer(result.text, starts_in_reasoning=opened),
        "rounds": [{k: v for k, v in dataclasses.asdict(r).items() if v is not None} for r in result.rounds],
        "finish_reason": result.finish_reason,
        "usage": usage(result),
        "seconds": round(time.perf_counter() - start, 3),
    }}


# --- the run --------------------------------------------------------------------------------------------

def plan_batch(config: BatchConfig) -> BatchPlan:
    """Read the input, lock the output (BatchBusyError when another run holds it) and find what is done. The
    plan holds the lock until closed: ``with plan_batch(config) as plan: run_batch(model, config, plan)``."""
    items = read_items(config.input)  # a bad input is reported before anything is created
    config.output.parent.mkdir(parents=True, exist_ok=True)
    lock = OutputLock(config.output)
    lock.acquire()
    try:
        return BatchPlan(items, read_done(config.output, items, retry_errors=config.retry_errors), lock)
    except BaseException:
        lock.release()
        raise


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
    """Answer the items not yet in the output, appending a line for each (an error line when one fails). Without
    a plan, plans (and locks) here; a plan given must still be open, that is, still hold the output's lock."""
    from tqdm import tqdm

    if plan is None:
        with plan_batch(config) as plan:
            return run_batch(model, config, plan, out=out)
    if plan.lock is None or not plan.lock.held or plan.lock.output != config.output:
        raise ValueError(f"the plan for {config.output} is closed (or for another file): plan again")
    todo = plan.todo
    base = config.input.parent
    echo = _Echo(out) if config.stream else None
    answered = failed = 0
    start = time.perf_counter()
    with JsonlAppender(config.output) as writer, tqdm(total=len(plan.items), initial=len(plan.items) - len(todo),
                                                      desc="r1v batch", unit="item", disable=not config.progress,
                                                      file=sys.stderr) as bar:
        for key, index, item in todo:
            images = _images(item, base)
            ours: dict[str, Any] = {"index": index}
            if images:
                ours["image_path"] = [_relative(p, config.output.parent) for p in images] \
                    if isinstance(item.get("image"), list) else _relative(images[0], config.output.parent)
            record = {**item, OUTPUT_KEY: ours}
            if echo is not None:
                echo.start(index, item["question"])
            try:
                output = answer_item(model, item, images, config, echo)
                record["response"] = output["response"]
                ours.update(output[OUTPUT_KEY])
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
