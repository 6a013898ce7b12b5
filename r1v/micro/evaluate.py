"""Greedy answers and exact-match accuracy of a micro-r1v checkpoint with the torch reference model.

(`r1v eval` is the general tool for any backend; this is the small loop training and tests need.)
"""
from __future__ import annotations

import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

from . import task
from .build import encode, prompt_text


@dataclass
class Score:
    """Exact-match accuracy of the final answer, overall and per task."""

    correct: int = 0
    total: int = 0
    by_task: dict[str, list[int]] = field(default_factory=lambda: defaultdict(lambda: [0, 0]))
    seconds: float = 0.0
    wrong: list[dict[str, str]] = field(default_factory=list)
    read_correct: int = 0  # elements of the pictures' readings (a colour, or a bar's colour and height) read right
    read_total: int = 0

    @property
    def accuracy(self) -> float:
        return self.correct / self.total if self.total else 0.0

    @property
    def reading_accuracy(self) -> float:
        return self.read_correct / self.read_total if self.read_total else 0.0

    def add(self, item: task.Item, output: str) -> bool:
        ok = task.final_answer(output) == item.answer
        if item.has_image:
            expected = task.reading(item.reasoning)
            self.read_total += len(expected)
            self.read_correct += sum(a == b for a, b in zip(expected, task.reading(output)))
        self.correct += ok
        self.total += 1
        self.by_task[item.task][0] += ok
        self.by_task[item.task][1] += 1
        if not ok:
            self.wrong.append({"id": item.id, "question": item.question, "expected": item.completion,
                               "got": output})
        return ok

    def summary(self) -> str:
        parts = ", ".join(f"{t} {c}/{n}" for t, (c, n) in sorted(self.by_task.items()))
        return (f"accuracy {self.accuracy:.1%} ({self.correct}/{self.total}), picture elements read right "
                f"{self.reading_accuracy:.1%} [{parts}]")

    def to_json(self) -> dict[str, Any]:
        return {"accuracy": self.accuracy, "correct": self.correct, "total": self.total,
                "reading_accuracy": self.reading_accuracy,
                "by_task": {t: {"correct": c, "total": n} for t, (c, n) in sorted(self.by_task.items())},
                "seconds": round(self.seconds, 1)}


def load_reference(path: str | Path, dtype: Any = None):
    """(R1VModel in float32, tokenizers.Tokenizer) of a checkpoint directory."""
    import torch
    from tokenizers import Tokenizer

    from r1v.runtime.model import R1VModel

    model = R1VModel.from_checkpoint(path, dtype=dtype or torch.float32)
    return model, Tokenizer.from_file(str(Path(path) / "tokenizer.json"))


def generate(model: Any, tokenizer: Any, question: str, image: Any = None, max_new_tokens: int = 64) -> str:
    """The model's greedy completion (text after the prompt's `<think>\\n`, end-of-turn token dropped) for a
    question about `image` (a path, PIL image, or anything `prepare_image` takes; None: text-only)."""
    import torch

    from r1v.runtime.image import TilingConfig, prepare_image

    pixel_values, tiles = None, 0
    if image is not None:
        cfg = model.config
        tiling = TilingConfig(image_size=cfg.image_size, min_tiles=cfg.min_dynamic_patch,
                              max_tiles=cfg.max_dynamic_patch, use_thumbnail=cfg.use_thumbnail)
        prepared = prepare_image(image, tiling)
        pixel_values, tiles = torch.from_numpy(prepared.pixel_values), prepared.num_tiles
    ids = encode(tokenizer, prompt_text(question, image is not None, model.config.tokens_per_tile, tiles))
    out = model.greedy(ids, pixel_values, max_new_tokens=max_new_tokens).tolist()
    if out and out[-1] in model.eos_token_ids:
        out = out[:-1]
    return tokenizer.decode(out, skip_special_tokens=False)


def evaluate(model: Any, tokenizer: Any, items: Iterable[task.Item], progress: bool = False) -> Score:
    """Greedy-decode every item and score the final answers."""
    score = Score()
    start = time.perf_counter()
    for i, item in enumerate(items, 1):
        score.add(item, generate(model, tokenizer, item.question, item.image()))
        if progress and i % 50 == 0:
            print(f"  eval {i}: {score.accuracy:.1%}", flush=True)
    score.seconds = time.perf_counter() - start
    return score


def main(argv: list[str] | None = None) -> int:
    """`python -m r1v.micro.evaluate CHECKPOINT [--seed S] [-n N] [--json FILE]`: greedy accuracy of the
    torch reference (float32) on N task items from seed S (default: the first 200 test items)."""
    import argparse
    import json

    import torch

    parser = argparse.ArgumentParser(prog="python -m r1v.micro.evaluate", description=main.__doc__)
    parser.add_argument("checkpoint")
    parser.add_argument("--seed", type=int, default=task.TEST_SEED)
    parser.add_argument("-n", type=int, default=200)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", default=None, help="write the score (and the wrong answers) here")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    model, tokenizer = load_reference(args.checkpoint)
    score = evaluate(model, tokenizer, task.make_items(args.seed, args.n), progress=True)
    print(f"{task.split_of(args.seed)} seeds {args.seed}..{args.seed + args.n - 1}: {score.summary()} "
          f"in {score.seconds:.0f} s")
    if args.json:
        Path(args.json).write_text(json.dumps({**score.to_json(), "seed": args.seed, "wrong": score.wrong}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
