"""The micro-r1v task: synthetic visual reasoning items, generated deterministically from a seed.

Every item is a function of one integer seed: a scene (kept as plain data), the 224x224 image drawn from
it (exactly one InternVL tile, so InternVL's tiling and llama.cpp's agree), a question that needs a look
and a step of reasoning, a short reasoning chain and a final answer from a small, exact-matchable
vocabulary (the numbers 0-18 and four colour words). Some items are text-only.

Two kinds of pictures:

* a row of four shapes (circles or squares in four colours, repeats allowed), one per column: the colour
  of the k-th shape from the left or right, how many shapes of a colour, which of two colours is more
  frequent, how many shapes have one of two colours. The chain first reads the row left to right, numbering
  the shapes ("Shapes: 1 red, 2 blue, ..."), then reasons over what it read.
* a bar chart of three bars in different colours and heights 1-6: which of two bars is taller, by how
  much, which is the tallest. The chain reads every bar, colour and height ("Bars: 1 red 4, ..."), then compares.

Text-only items ask the same questions about a scene described in the words of that reading, or are plain
arithmetic: they teach the reasoning after the reading, so the pictures only need to teach the reading.
Tried first and dropped: counting scattered objects, 448-pixel images (256 image tokens) and an unnumbered
reading ("From left to right: red, blue, ..."): on visual questions a model this size stayed near chance
after half an hour on two CPU cores; so did a wordy numbered one ("Shape 1 is red, shape 2 is ...").

The prompt already opens `<think>`; the model's completion is `reasoning + "</think>\n\n" + answer`.
Splits are disjoint seed ranges (`SPLITS`); `write_items(seed, n, path)` writes the items of seeds
seed .. seed+n-1 as JSONL with the PNGs beside the file.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
from PIL import Image, ImageDraw

SIZE = 224  # one InternVL tile of micro-r1v (image_size 224): no grid choice, no thumbnail
BACKGROUND = (255, 255, 255)
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (20, 150, 40),
    "blue": (30, 70, 230),
    "yellow": (245, 200, 0),
}
COLOR_NAMES = tuple(COLORS)
SHAPES = ("circle", "square")
ORDINALS = ("first", "second", "third", "fourth")
INK = (0, 0, 0)

# Seed ranges of the splits: [start, stop). Training draws from "train" only.
SPLITS: dict[str, tuple[int, int]] = {
    "train": (0, 1_000_000_000),
    "validation": (1_000_000_000, 2_000_000_000),
    "test": (2_000_000_000, 3_000_000_000),
}
TEST_SEED = SPLITS["test"][0]
VALIDATION_SEED = SPLITS["validation"][0]

# Scene geometry (pixels). One image token covers 28 x 28 pixels (14-pixel patches, pixel shuffle 0.5).
# Row shapes sit one per 56-pixel column (two tokens wide); circle and square have about the same area.
# A bar unit is one token row and the baseline lies on a token boundary, so a bar's height is the number
# of token rows it fills.
CELL = SIZE // 4
SQUARE_SIDE = 42
CIRCLE_DIAMETER = 47
JITTER = 4
ROW_Y_SPREAD = 40
BAR_WIDTH = 48
BAR_UNIT = 28
BAR_MAX = 6
BAR_SLOTS = (44, 112, 180)  # x centres of the three bars
BASELINE = 196


@dataclass
class Item:
    """One task item. `scene` is the plain-data description the image is drawn from (None: text-only)."""

    id: str
    seed: int
    task: str
    question: str
    reasoning: str
    answer: str
    scene: dict[str, Any] | None = None  # the drawn scene (None: text-only)
    described: dict[str, Any] | None = None  # a text-only item's scene, given in words in the question
    _image: Image.Image | None = field(default=None, repr=False)

    @property
    def has_image(self) -> bool:
        return self.scene is not None

    def image(self) -> Image.Image | None:
        """The drawn image (448x448 RGB), rendered on first use."""
        if self.scene is None:
            return None
        if self._image is None:
            self._image = render(self.scene)
        return self._image

    @property
    def completion(self) -> str:
        """What the model writes after the prompt's `<think>\\n` (without the end-of-turn token)."""
        return f"{self.reasoning}</think>\n\n{self.answer}"


# ------------------------------------------------------------------------------------------------
# Drawing
# ------------------------------------------------------------------------------------------------

def render(scene: dict[str, Any]) -> Image.Image:
    """Draw a scene as a 448x448 RGB image."""
    img = Image.new("RGB", (SIZE, SIZE), BACKGROUND)
    draw = ImageDraw.Draw(img)
    if scene["kind"] == "row":
        for obj in scene["objects"]:
            x, y, color = obj["x"], obj["y"], COLORS[obj["color"]]
            if obj["shape"] == "circle":
                r = CIRCLE_DIAMETER // 2
                draw.ellipse([x - r, y - r, x + r - 1, y + r - 1], fill=color)
            else:
                r = SQUARE_SIDE // 2
                draw.rectangle([x - r, y - r, x + r - 1, y + r - 1], fill=color)
    elif scene["kind"] == "bars":
        for bar in scene["bars"]:
            x0 = bar["x"] - BAR_WIDTH // 2
            draw.rectangle([x0, BASELINE - bar["height"] * BAR_UNIT, x0 + BAR_WIDTH - 1, BASELINE - 1],
                           fill=COLORS[bar["color"]])
        draw.rectangle([12, BASELINE, SIZE - 13, BASELINE + 2], fill=INK)
    else:
        raise ValueError(f"unknown scene kind {scene['kind']!r}")
    return img


# ------------------------------------------------------------------------------------------------
# Scenes (rng -> plain data) and questions ((rng, scene) -> (question, reasoning, answer) or None when
# the scene cannot pose it)
# ------------------------------------------------------------------------------------------------

def scene_row(rng: np.random.Generator, ease: float = 0.0) -> dict[str, Any]:
    """Four shapes of random colours (repeats allowed) in a row, one per column. With `ease` > 0 (the
    perception curriculum of training) each shape after the first takes the first one's colour with that
    probability: at 1 the row is one colour, which a glance at the whole picture reads, so the words for the
    colours get tied to what the picture shows before the model has to find the k-th column. At 0 (every item
    of every split) the draws are the task's own."""
    objects = []
    for k in range(4):
        dx = int(rng.integers(-JITTER, JITTER + 1))
        objects.append({"shape": SHAPES[int(rng.integers(2))], "color": COLOR_NAMES[int(rng.integers(4))],
                        "x": k * CELL + CELL // 2 + dx,
                        "y": SIZE // 2 + int(rng.integers(-ROW_Y_SPREAD, ROW_Y_SPREAD + 1))})
    if ease > 0:
        for obj in objects[1:]:
            if rng.random() < ease:
                obj["color"] = objects[0]["color"]
    return {"kind": "row", "objects": objects}


def scene_bars(rng: np.random.Generator, ease: float = 0.0) -> dict[str, Any]:
    """Three bars of different colours and different heights (1-6 units) on a baseline (`ease` unused: the
    colours a bar chart needs are learned on the rows)."""
    colors = _pick_colors(rng, 3)
    heights = [int(h) + 1 for h in rng.permutation(BAR_MAX)[:3]]
    return {"kind": "bars", "bars": [{"color": c, "height": h, "x": x}
                                     for c, h, x in zip(colors, heights, BAR_SLOTS)]}


SCENES: dict[str, Callable[..., dict[str, Any]]] = {"row": scene_row, "bars": scene_bars}


def _pick_colors(rng: np.random.Generator, k: int) -> list[str]:
    return [COLOR_NAMES[i] for i in rng.permutation(len(COLOR_NAMES))[:k]]


def row_colors(scene: dict[str, Any]) -> list[str]:
    return [o["color"] for o in sorted(scene["objects"], key=lambda o: o["x"])]


def _read_row(scene: dict[str, Any]) -> str:
    # Numbered reading: the number just written tells the model which column to look at next (and, in
    # text-only items, which word of the question to copy: one token of context to match).
    return "Shapes: " + ", ".join(f"{k} {c}" for k, c in enumerate(row_colors(scene), 1)) + "."


def ask_row_kth(rng, scene):
    colors = row_colors(scene)
    k = int(rng.integers(4))
    side = "left" if rng.integers(2) == 0 else "right"
    index = k + 1 if side == "left" else 4 - k
    pick = colors[index - 1]
    where = f"The {ORDINALS[k]} from the {side} is shape {index}"
    return (f"What colour is the {ORDINALS[k]} shape from the {side}?",
            f"{_read_row(scene)} {where}, {pick}.", pick)


def ask_row_count(rng, scene):
    (c,) = _pick_colors(rng, 1)
    n = row_colors(scene).count(c)
    return f"How many {c} shapes are there?", f"{_read_row(scene)} That makes {n} {c}.", str(n)


def ask_row_compare(rng, scene):
    c1, c2 = _pick_colors(rng, 2)
    a, b = row_colors(scene).count(c1), row_colors(scene).count(c2)
    if a == b:
        return None
    reasoning = f"{_read_row(scene)} That makes {a} {c1} and {b} {c2}. {max(a, b)} is more than {min(a, b)}."
    return f"Are there more {c1} shapes or {c2} shapes?", reasoning, c1 if a > b else c2


def ask_row_sum(rng, scene):
    c1, c2 = _pick_colors(rng, 2)
    a, b = row_colors(scene).count(c1), row_colors(scene).count(c2)
    reasoning = f"{_read_row(scene)} That makes {a} {c1} and {b} {c2}. {a} + {b} = {a + b}."
    return f"How many shapes are {c1} or {c2}?", reasoning, str(a + b)


def _two_bars(rng, scene):
    i, j = (int(v) for v in rng.permutation(3)[:2])
    return scene["bars"][i], scene["bars"][j]


def _read_bars(scene: dict[str, Any]) -> str:
    return "Bars: " + ", ".join(f"{k} {b['color']} {b['height']}" for k, b in enumerate(scene["bars"], 1)) + "."


def _bar_heights(scene, b1, b2) -> str:
    return (f"{_read_bars(scene)} "
            f"The {b1['color']} bar is {b1['height']} high and the {b2['color']} bar is {b2['height']} high.")


def ask_bars_taller(rng, scene):
    b1, b2 = _two_bars(rng, scene)
    h1, h2 = b1["height"], b2["height"]
    reasoning = f"{_bar_heights(scene, b1, b2)} {max(h1, h2)} is more than {min(h1, h2)}."
    answer = b1["color"] if h1 > h2 else b2["color"]
    return f"Which bar is taller, the {b1['color']} one or the {b2['color']} one?", reasoning, answer


def ask_bars_diff(rng, scene):
    b1, b2 = sorted(_two_bars(rng, scene), key=lambda b: -b["height"])
    h1, h2 = b1["height"], b2["height"]
    reasoning = f"{_bar_heights(scene, b1, b2)} {h1} - {h2} = {h1 - h2}."
    return f"How much taller is the {b1['color']} bar than the {b2['color']} bar?", reasoning, str(h1 - h2)


def ask_bars_tallest(rng, scene):
    best = max(scene["bars"], key=lambda b: b["height"])
    reasoning = f"{_read_bars(scene)} {best['height']} is the most, the {best['color']} bar."
    return "Which bar is the tallest?", reasoning, best["color"]


def describe(scene: dict[str, Any]) -> str:
    """A scene in words (for the text-only versions of the visual questions)."""
    if scene["kind"] == "bars":
        return f"In a chart: {_read_bars(scene).split(': ', 1)[1]}"
    return f"In a row: {_read_row(scene).split(': ', 1)[1]}"


def ask_text_scene(rng, scene):
    """A visual question asked about a scene described in words; returns (question, reasoning, answer,
    described scene)."""
    visual = [n for n, t in TASKS.items() if t.scene is not None]
    name = visual[int(rng.integers(len(visual)))]
    while True:
        described = SCENES[TASKS[name].scene](rng)
        qa = TASKS[name].ask(rng, described)
        if qa is not None:
            question, reasoning, answer = qa
            return f"{describe(described)} {question}", reasoning, answer, described


def ask_text_add(rng, scene):
    a, b = (int(v) for v in rng.integers(0, 10, size=2))
    return f"What is {a} + {b}?", f"{a} + {b} = {a + b}.", str(a + b)


def ask_text_sub(rng, scene):
    a, b = sorted((int(v) for v in rng.integers(0, 10, size=2)), reverse=True)
    return f"What is {a} - {b}?", f"{a} - {b} = {a - b}.", str(a - b)


def ask_text_larger(rng, scene):
    a, b = (int(v) for v in rng.permutation(10)[:2])
    return f"Which is larger, {a} or {b}?", f"{max(a, b)} is more than {min(a, b)}.", str(max(a, b))


@dataclass(frozen=True)
class Task:
    scene: str | None  # scene kind (None: text-only)
    ask: Callable
    weight: float


TASKS: dict[str, Task] = {
    "row_kth": Task("row", ask_row_kth, 0.14),
    "row_count": Task("row", ask_row_count, 0.14),
    "row_compare": Task("row", ask_row_compare, 0.10),
    "row_sum": Task("row", ask_row_sum, 0.10),
    "bars_taller": Task("bars", ask_bars_taller, 0.12),
    "bars_diff": Task("bars", ask_bars_diff, 0.10),
    "bars_tallest": Task("bars", ask_bars_tallest, 0.08),
    "text_add": Task(None, ask_text_add, 0.04),
    "text_sub": Task(None, ask_text_sub, 0.04),
    "text_larger": Task(None, ask_text_larger, 0.04),
    "text_scene": Task(None, ask_text_scene, 0.10),
}
_NAMES = tuple(TASKS)
TEXT_SCENE_SHARE = 0.7  # of the text-only questions in training groups
_WEIGHTS = np.array([t.weight for t in TASKS.values()]) / sum(t.weight for t in TASKS.values())
_KINDS = tuple(dict.fromkeys(t.scene for t in TASKS.values()))  # scene kinds, None for text-only
_KIND_WEIGHTS = np.array([sum(t.weight for t in TASKS.values() if t.scene == k) for k in _KINDS])
_KIND_WEIGHTS = _KIND_WEIGHTS / _KIND_WEIGHTS.sum()


def split_of(seed: int) -> str:
    for name, (start, stop) in SPLITS.items():
        if start <= seed < stop:
            return name
    raise ValueError(f"seed {seed} lies in no split {SPLITS}")


def make_item(seed: int, task: str | None = None) -> Item:
    """The item of `seed`: a task drawn from the mixture (or `task`), a scene that can pose it, a question."""
    if seed < 0:
        raise ValueError(f"seed must be >= 0, got {seed}")
    rng = np.random.default_rng([seed, 0x7231])
    name = _NAMES[int(rng.choice(len(_NAMES), p=_WEIGHTS))]
    if task is not None:
        if task not in TASKS:
            raise ValueError(f"unknown task {task!r}; known: {', '.join(TASKS)}")
        name = task
    return Item(f"micro-{seed}", seed, name, *_ask(rng, name))


def _ask(rng: np.random.Generator, name: str, scene: dict[str, Any] | None = None) -> tuple:
    """(question, reasoning, answer, scene, described) of task `name`, about `scene` if given (a new scene
    that can pose the question otherwise); None when the given scene cannot pose it."""
    spec = TASKS[name]
    while True:
        drawn = scene if scene is not None else (SCENES[spec.scene](rng) if spec.scene else None)
        qa = spec.ask(rng, drawn)
        if qa is None and scene is not None:
            return None
        if qa is not None:
            question, reasoning, answer, *described = qa
            return question, reasoning, answer, drawn, (described[0] if described else None)


def make_items(seed: int, n: int) -> list[Item]:
    return [make_item(seed + i) for i in range(n)]


def make_group(seed: int, k: int, text: bool = False, ease: float = 0.0) -> list[Item]:
    """Training material: up to k different questions about one drawn scene (the image is encoded once for
    all of them), or with `text`, k text-only items. The scene kind is drawn with the summed weight of its
    tasks and each question's task with its weight among the kind's tasks, as in `make_item`; `ease` is the
    perception curriculum's (`scene_row`)."""
    rng = np.random.default_rng([seed, 0x6770 + text])
    if text:
        # Text-only practice is cheap, so training uses many of these, mostly questions about scenes told
        # in words: the same reasoning over a read-out row or chart that the visual items need.
        names = [n for n in _NAMES if TASKS[n].scene is None]
        weights = np.array([TEXT_SCENE_SHARE if n == "text_scene" else 0.0 for n in names])
        others = weights == 0
        weights[others] = (1 - TEXT_SCENE_SHARE) / others.sum()
        picks = rng.choice(len(names), size=k, p=weights)
        return [Item(f"micro-{seed}-t{i}", seed, names[int(j)], *_ask(rng, names[int(j)]))
                for i, j in enumerate(picks)]
    kinds = [kd for kd in _KINDS if kd is not None]
    kind_weights = np.array([_KIND_WEIGHTS[_KINDS.index(kd)] for kd in kinds])
    kind = kinds[int(rng.choice(len(kinds), p=kind_weights / kind_weights.sum()))]
    names = [n for n in _NAMES if TASKS[n].scene == kind]
    weights = np.array([TASKS[n].weight for n in names])
    scene = SCENES[kind](rng, ease)
    items: list[Item] = []
    questions: set[str] = set()
    for _ in range(3 * k):
        if len(items) == k:
            break
        name = names[int(rng.choice(len(names), p=weights / weights.sum()))]
        qa = _ask(rng, name, scene)
        if qa is None or qa[0] in questions:
            continue
        questions.add(qa[0])
        items.append(Item(f"micro-{seed}-{len(items)}", seed, name, *qa))
    image = items[0].image()  # one rendering, shared
    for item in items[1:]:
        item._image = image
    return items


def reading(text: str) -> list[str]:
    """What a completion read off the picture, element by element: `["red", "blue", ...]` from
    "Shapes: 1 red, 2 blue, ...", `["red 4", ...]` from "Bars: 1 red 4, ..."; [] when it opens with no reading.
    Training and evaluation report how many elements a model reads right (the skill the answers hang on)."""
    head, _, rest = text.partition(": ")
    if head not in ("Shapes", "Bars"):
        return []
    elements = rest.split(".", 1)[0].split(", ")
    return [e.split(" ", 1)[1] if " " in e else "" for e in elements]


def answer_vocabulary() -> list[str]:
    return [str(i) for i in range(19)] + list(COLOR_NAMES)


def final_answer(text: str) -> str:
    """The final answer in a completion: what follows the last `</think>`, stripped (all of it if none)."""
    return text.rsplit("</think>", 1)[-1].strip()


def write_items(seed: int, n: int, out_jsonl: str | Path) -> Path:
    """Write the items of seeds seed .. seed+n-1 to `out_jsonl`, the images as PNGs in a folder beside it
    (`<stem>_images/<id>.png`, paths relative to the JSONL's folder)."""
    out = Path(out_jsonl)
    out.parent.mkdir(parents=True, exist_ok=True)
    image_dir = out.parent / f"{out.stem}_images"
    lines = []
    for item in make_items(seed, n):
        rel = None
        if item.has_image:
            image_dir.mkdir(exist_ok=True)
            rel = f"{image_dir.name}/{item.id}.png"
            item.image().save(out.parent / rel, format="PNG", optimize=False)
        lines.append(json.dumps({
            "id": item.id, "image": rel, "question": item.question, "answer": item.answer,
            "reasoning": item.reasoning, "task": item.task, "scene": item.scene or item.described,
        }))
    out.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return out


def corpus(n: int = 2000, seed: int = 0) -> list[str]:
    """Task text (questions and completions of n training items) for training the tokenizer."""
    return [f"{item.question}\n{item.completion}" for item in make_items(seed, n)]
