"""Calibration data for AWQ: what the model actually sees, as token windows plus the images they show.

Items are plain text, or a chat question with an optional image (and an optional answer, the reasoning the
model would write after the forced `<think>`). Two sources:

* `builtin_calibration()`: an offline set, deterministic from a seed — synthetic images drawn with PIL
  (counting shapes, bar and pie charts, arithmetic written in the image, coloured grids) with
  chat-templated questions and `<think>` reasoning answers, math word problems with reasoning chains, and
  generic text (prose, code, lists);
* `load_calibration(path)`: a user JSONL file, one item per line: {"image": "a.png", "question": "..."}
  (image paths relative to the file; "image" is optional), or {"text": "..."}; an "answer" may follow a
  question. Every error names the file and the line.

`build_calibration_batch(ckpt, items, n_samples, seq_len)` renders questions with the checkpoint's chat
template (each image as `<image>\\n` before the question, as Skywork's scripts do), expands each image to
`<img>` + `<IMG_CONTEXT>` x (tokens per tile x tiles) + `</img>`, tokenizes with the checkpoint's
tokenizer.json and packs everything into `n_samples` windows of exactly `seq_len` tokens (long text is split
across windows as AutoAWQ does; an image block is never cut: tiles are limited so a block fits a window,
and a block that does not fit the rest of a window starts the next one, the gap filled with text).

No torch here: the batch is numpy; the driver runs the vision tower and the LLM.
"""
from __future__ import annotations

import hashlib
import math
import random
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator, Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from r1v.converters.jsonl import read_jsonl

if TYPE_CHECKING:
    from r1v.converters.checkpoint import Checkpoint

ITEM_KEYS = ("text", "question", "image", "answer")


class CalibrationError(ValueError):
    """Calibration data that cannot be used; the message names the file and line (or the item)."""


@dataclass(frozen=True, eq=False)
class CalibrationItem:
    """Plain `text`, or a chat `question` with an optional `image` (a PIL image or a path) and an optional
    `answer` (appended after the generation prompt). `source` says where the item came from, for errors."""

    text: str | None = None
    question: str | None = None
    image: Image.Image | Path | None = None
    answer: str | None = None
    source: str = "<item>"

    def __post_init__(self) -> None:
        if (self.text is None) == (self.question is None):
            raise CalibrationError(f"{self.source}: an item has either 'text' or 'question' (not both, not neither)")
        if self.text is not None and (self.image is not None or self.answer is not None):
            raise CalibrationError(f"{self.source}: 'image' and 'answer' go with 'question', not with 'text'")
        for key in ("text", "question", "answer"):
            value = getattr(self, key)
            if value is not None and (not isinstance(value, str) or not value.strip()):
                raise CalibrationError(f"{self.source}: '{key}' must be a non-empty string")

    @property
    def has_image(self) -> bool:
        return self.image is not None


# --- user files ---------------------------------------------------------------------------------------------
def load_calibration(path: str | Path) -> list[CalibrationItem]:
    """Read a JSONL calibration file: {"image", "question"[, "answer"]}, {"question"[, "answer"]} or {"text"}
    per line (blank lines skipped). Images are resolved relative to the file and decoded once here, so an
    unreadable image is reported now, with its line, not halfway through a conversion."""
    from r1v.runtime.image import ImageError, load_image

    path = Path(path)
    try:
        entries = list(read_jsonl(path, error=CalibrationError))
    except OSError as e:
        raise CalibrationError(f"{path}: cannot read calibration file ({e.strerror or e})") from None
    items = []
    for number, entry in entries:
        where = f"{path}:{number}"
        unknown = sorted(set(entry) - set(ITEM_KEYS))
        if unknown:
            raise CalibrationError(f"{where}: unknown key(s) {unknown}; an item has 'text', or 'question' "
                                   "with optional 'image' and 'answer'")
        if "text" not in entry and "question" not in entry:
            missing = "'question'" if "image" in entry else "'text' or 'question'"
            raise CalibrationError(f"{where}: missing key {missing}")
        image = None
        if "image" in entry:
            if not isinstance(entry["image"], str) or not entry["image"]:
                raise CalibrationError(f"{where}: 'image' must be a path (string)")
            image = (path.parent / entry["image"]).resolve()
            try:
                load_image(image).close()
            except (ImageError, OSError) as e:
                raise CalibrationError(f"{where}: unreadable image {entry['image']!r}: {e}") from None
        items.append(CalibrationItem(text=entry.get("text"), question=entry.get("question"), image=image,
                                     answer=entry.get("answer"), source=where))
    if not items:
        raise CalibrationError(f"{path}: calibration file is empty (expected JSON lines of "
                               '{"image": ..., "question": ...} or {"text": ...})')
    return items


def calibration_fingerprint(items: Sequence[CalibrationItem]) -> str:
    """sha256 over the items' contents (image pixels or file bytes included): what a resumed run must match."""
    h = hashlib.sha256()
    for item in items:
        for value in (item.text, item.question, item.answer):
            h.update(b"\x00" if value is None else b"\x01" + value.encode("utf-8") + b"\x02")
        if isinstance(item.image, Image.Image):
            h.update(f"{item.image.mode}{item.image.size}".encode())
            h.update(item.image.tobytes())
        elif item.image is not None:
            h.update(Path(item.image).read_bytes())
        h.update(b"\x03")
    return h.hexdigest()


# --- the built-in set -----------------------------------------------------------------------------------------
COLOURS = {"red": (220, 40, 40), "green": (40, 160, 60), "blue": (40, 80, 220), "yellow": (235, 200, 30),
           "purple": (140, 60, 180), "orange": (245, 140, 30), "black": (20, 20, 20)}
SIZES = ((448, 448), (640, 448), (448, 640), (896, 448), (512, 384), (448, 896), (768, 576))

GENERIC_TEXT = (
    "The water cycle moves water between the oceans, the air and the land. Heat from the sun evaporates water "
    "from the sea; the vapour rises, cools and condenses into clouds, and falls again as rain or snow. Rivers "
    "carry much of it back to the sea, while some soaks into the ground and feeds springs and wells.",
    "def moving_average(values, window):\n    \"\"\"Mean of each run of `window` consecutive values.\"\"\"\n"
    "    if window <= 0:\n        raise ValueError('window must be positive')\n    total = sum(values[:window])\n"
    "    out = [total / window]\n    for i in range(window, len(values)):\n"
    "        total += values[i] - values[i - window]\n        out.append(total / window)\n    return out\n",
    "In 1869 Dmitri Mendeleev arranged the known elements by atomic weight and noticed that their properties "
    "repeat periodically. He left gaps for elements not yet discovered and predicted their properties; when "
    "gallium and germanium were found, they matched his predictions closely.",
    "Theorem. The sum of the first n odd numbers is n^2. Proof by induction: for n = 1 the sum is 1 = 1^2. If "
    "1 + 3 + ... + (2n - 1) = n^2, then adding the next odd number 2n + 1 gives n^2 + 2n + 1 = (n + 1)^2.",
    "Shopping list for the week: 2 kg of potatoes, 6 eggs, a loaf of wholemeal bread, 500 g of rice, "
    "3 onions, a bunch of carrots, olive oil, 1 litre of milk, apples and a jar of honey.",
    "A histogram groups numeric data into bins and draws one bar per bin, its height the number of values "
    "in the bin. Unlike a bar chart of categories, the bars touch, because the bins cover a continuous range.",
    "SELECT region, SUM(amount) AS total\nFROM sales\nWHERE year = 2023\nGROUP BY region\nORDER BY total DESC\n"
    "LIMIT 5;",
    "Photosynthesis turns light, water and carbon dioxide into sugar and oxygen. It happens in chloroplasts, "
    "where chlorophyll absorbs mostly red and blue light and reflects green, which is why leaves look green.",
    "Q: A train leaves at 09:40 and arrives at 13:15. How long is the journey?\nA: From 09:40 to 13:40 is 4 "
    "hours; 13:15 is 25 minutes earlier, so the journey takes 3 hours and 35 minutes.",
    "Les villes côtières profitent d'un climat plus doux : la mer se réchauffe et se refroidit lentement. "
    "Auf dem Land sind die Winter kälter und die Sommer heißer. 海洋调节气温，沿海城市冬暖夏凉。",
)


def builtin_calibration(seed: int = 0, n_images: int = 48, n_reasoning: int = 32,
                        images: bool = True) -> list[CalibrationItem]:
    """The offline set: `n_images` synthetic image questions (with `<think>` reasoning answers), interleaved
    with `n_reasoning` text-only reasoning questions and the generic passages. Deterministic in `seed`; a
    different seed gives different images, numbers and order (use one as held-out prompts).
    `images=False` gives the same questions without their images (text-only calibration)."""
    rng = random.Random(seed)
    visual = [_visual_item(rng, i) for i in range(n_images)]
    reasoning = [_reasoning_item(rng, i) for i in range(n_reasoning)]
    generic = [CalibrationItem(text=t, source=f"builtin:generic:{i}") for i, t in enumerate(GENERIC_TEXT)]
    texts = reasoning + generic
    rng.shuffle(texts)
    items: list[CalibrationItem] = []
    for i in range(max(len(visual), len(texts))):
        if i < len(visual):
            item = visual[i]
            if not images:
                item = CalibrationItem(question=item.question, answer=item.answer, source=item.source)
            items.append(item)
        if i < len(texts):
            items.append(texts[i])
    return items


def _font(size: int) -> ImageFont.ImageFont:
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1: one small bitmap font
        return ImageFont.load_default()


def _visual_item(rng: random.Random, index: int) -> CalibrationItem:
    kind = ("shapes", "bars", "arithmetic", "pie", "grid")[index % 5]
    size = rng.choice(SIZES)
    image = Image.new("RGB", size, (255, 255, 255))
    question, answer = globals()[f"_draw_{kind}"](ImageDraw.Draw(image), size, rng)
    return CalibrationItem(question=question, image=image, answer=answer, source=f"builtin:{kind}:{index}")


def _draw_shapes(draw: ImageDraw.ImageDraw, size: tuple[int, int], rng: random.Random) -> tuple[str, str]:
    w, h = size
    counts: dict[tuple[str, str], int] = {}
    for _ in range(rng.randint(3, 12)):
        colour, shape = rng.choice(list(COLOURS)[:6]), rng.choice(("circle", "square", "triangle"))
        r = rng.randint(18, 40)
        x, y = rng.randint(r, w - r), rng.randint(r, h - r)
        fill = COLOURS[colour]
        if shape == "circle":
            draw.ellipse((x - r, y - r, x + r, y + r), fill=fill)
        elif shape == "square":
            draw.rectangle((x - r, y - r, x + r, y + r), fill=fill)
        else:
            draw.polygon(((x, y - r), (x - r, y + r), (x + r, y + r)), fill=fill)
        counts[colour, shape] = counts.get((colour, shape), 0) + 1
    (colour, shape), n = rng.choice(sorted(counts.items()))
    total = sum(counts.values())
    seen = ", ".join(f"{c} {s} x{k}" for (c, s), k in sorted(counts.items()))
    question = f"How many {colour} {shape}s are there in the image?"
    answer = (f"I will list every shape I can see: {seen}. That is {total} shapes in all. Only the {colour} "
              f"{shape}s count here, and I find {n}.\n</think>\n\nThere {'is' if n == 1 else 'are'} "
              f"{n} {colour} {shape}{'' if n == 1 else 's'}.")
    return question, answer


def _draw_bars(draw: ImageDraw.ImageDraw, size: tuple[int, int], rng: random.Random) -> tuple[str, str]:
    w, h = size
    labels = "ABCDEFG"[: rng.randint(3, 7)]
    values = [rng.randint(1, 20) for _ in labels]
    font = _font(max(12, h // 30))
    base, top = h - 40, 40
    step = (w - 60) // len(labels)
    draw.line((30, base, w - 20, base), fill=(0, 0, 0), width=2)
    draw.line((30, top - 10, 30, base), fill=(0, 0, 0), width=2)
    for i, (label, value) in enumerate(zip(labels, values)):
        x0 = 40 + i * step
        y0 = base - int((base - top) * value / 20)
        draw.rectangle((x0, y0, x0 + step * 2 // 3, base), fill=COLOURS[list(COLOURS)[i % 6]])
        draw.text((x0 + step // 4, base + 6), label, fill=(0, 0, 0), font=font)
        draw.text((x0 + step // 4, y0 - 18), str(value), fill=(0, 0, 0), font=font)
    a, b = rng.sample(range(len(labels)), 2)
    best = max(range(len(values)), key=values.__getitem__)
    if rng.random() < 0.5:
        question = f"What is the sum of the values of bars {labels[a]} and {labels[b]}?"
        answer = (f"Bar {labels[a]} is labelled {values[a]} and bar {labels[b]} is labelled {values[b]}. "
                  f"{values[a]} + {values[b]} = {values[a] + values[b]}.\n</think>\n\nThe sum is "
                  f"{values[a] + values[b]}.")
    else:
        listing = ", ".join(f"{l}={v}" for l, v in zip(labels, values))
        question = "Which bar in the chart is the tallest, and what is its value?"
        answer = (f"Reading the labels: {listing}. The largest value is {values[best]}, on bar {labels[best]}."
                  f"\n</think>\n\nBar {labels[best]} is the tallest, with a value of {values[best]}.")
    return question, answer


def _draw_arithmetic(draw: ImageDraw.ImageDraw, size: tuple[int, int], rng: random.Random) -> tuple[str, str]:
    w, h = size
    a, b = rng.randint(2, 99), rng.randint(2, 99)
    op = rng.choice("+-x")
    result = a + b if op == "+" else a - b if op == "-" else a * b
    font = _font(max(24, h // 6))
    draw.text((w // 8, h // 3), f"{a} {op} {b} = ?", fill=COLOURS[rng.choice(list(COLOURS))], font=font)
    word = {"+": "add", "-": "subtract", "x": "multiply"}[op]
    question = "Solve the expression written in the image."
    steps = f"{a} x {b} = {a} x {b // 10 * 10} + {a} x {b % 10} = {a * (b // 10 * 10)} + {a * (b % 10)}" \
        if op == "x" else f"{a} {op} {b}"
    answer = (f"The image shows {a} {op} {b}. I need to {word}: {steps} = {result}. Let me check: "
              f"{'the result minus ' + str(b) + ' gives ' + str(result - b) if op == '+' else 'done'}."
              f"\n</think>\n\n{a} {op} {b} = {result}.")
    return question, answer


def _draw_pie(draw: ImageDraw.ImageDraw, size: tuple[int, int], rng: random.Random) -> tuple[str, str]:
    w, h = size
    names = rng.sample(list(COLOURS)[:6], rng.randint(2, 5))
    weights = [rng.randint(5, 40) for _ in names]
    total = sum(weights)
    shares = [round(100 * x / total) for x in weights]
    r = min(w, h) // 2 - 30
    cx, cy = w // 2, h // 2
    start = 0.0
    for name, weight in zip(names, weights):
        end = start + 360 * weight / total
        draw.pieslice((cx - r, cy - r, cx + r, cy + r), start, end, fill=COLOURS[name])
        mid = math.radians((start + end) / 2)
        draw.text((cx + 0.6 * r * math.cos(mid), cy + 0.6 * r * math.sin(mid)), f"{shares[names.index(name)]}%",
                  fill=(255, 255, 255), font=_font(16))
        start = end
    best = max(range(len(names)), key=weights.__getitem__)
    listing = ", ".join(f"{n} {s}%" for n, s in zip(names, shares))
    question = "Which colour takes the largest share of the pie chart?"
    answer = (f"The slices are: {listing}. Comparing them, {names[best]} is the largest at {shares[best]}%."
              f"\n</think>\n\nThe {names[best]} slice is the largest ({shares[best]}%).")
    return question, answer


def _draw_grid(draw: ImageDraw.ImageDraw, size: tuple[int, int], rng: random.Random) -> tuple[str, str]:
    w, h = size
    rows, cols = rng.randint(2, 5), rng.randint(2, 5)
    cw, ch = (w - 40) // cols, (h - 40) // rows
    colours = [[rng.choice(list(COLOURS)[:4]) for _ in range(cols)] for _ in range(rows)]
    for r in range(rows):
        for c in range(cols):
            x0, y0 = 20 + c * cw, 20 + r * ch
            draw.rectangle((x0, y0, x0 + cw - 4, y0 + ch - 4), fill=COLOURS[colours[r][c]], outline=(0, 0, 0))
    target = rng.choice(list(COLOURS)[:4])
    per_row = [row.count(target) for row in colours]
    n = sum(per_row)
    question = f"The image shows a grid of coloured cells. How many cells are {target}?"
    answer = (f"Going row by row, the {target} cells per row are {', '.join(map(str, per_row))}. Adding them: "
              f"{' + '.join(map(str, per_row))} = {n}.\n</think>\n\nThere are {n} {target} cells.")
    return question, answer


def _reasoning_item(rng: random.Random, index: int) -> CalibrationItem:
    kind = index % 4
    if kind == 0:
        a, b, c = rng.randint(3, 30), rng.randint(2, 9), rng.randint(1, 20)
        question = f"Tom has {a} marbles. He buys {b} bags with {c} marbles each. How many marbles does he have now?"
        answer = (f"Each bag has {c} marbles, so {b} bags hold {b} x {c} = {b * c}. Adding the {a} he had: "
                  f"{a} + {b * c} = {a + b * c}.\n</think>\n\nTom has {a + b * c} marbles.")
    elif kind == 1:
        start, step = rng.randint(1, 20), rng.randint(2, 9)
        seq = [start + i * step for i in range(5)]
        question = f"What is the next number in the sequence {', '.join(map(str, seq))}?"
        answer = (f"The differences are all {step}: {seq[1]} - {seq[0]} = {step}, {seq[2]} - {seq[1]} = {step}. "
                  f"So the next number is {seq[-1]} + {step} = {seq[-1] + step}.\n</think>\n\n{seq[-1] + step}")
    elif kind == 2:
        w, h = rng.randint(2, 15), rng.randint(2, 15)
        question = f"A rectangle is {w} cm wide and {h} cm tall. What are its area and perimeter?"
        answer = (f"Area is width times height: {w} x {h} = {w * h} square cm. Perimeter is twice the sum: "
                  f"2 x ({w} + {h}) = {2 * (w + h)} cm.\n</think>\n\nArea {w * h} cm², perimeter {2 * (w + h)} cm.")
    else:
        x = rng.randint(1, 12)
        a, b = rng.randint(2, 9), rng.randint(1, 30)
        question = f"Solve for x: {a}x + {b} = {a * x + b}."
        answer = (f"Subtract {b} from both sides: {a}x = {a * x + b} - {b} = {a * x}. Divide by {a}: "
                  f"x = {a * x} / {a} = {x}. Check: {a} x {x} + {b} = {a * x + b}. Correct.\n</think>\n\nx = {x}")
    return CalibrationItem(question=question, answer=answer, source=f"builtin:reasoning:{index}")


# --- token windows ------------------------------------------------------------------------------------------
@dataclass
class CalibrationBatch:
    """`input_ids` int64 [n_samples, seq_len]; `images`: pixel values [tiles, 3, S, S] of each distinct image
    used; `image_refs[i]`: the images of window i, in the order of their `<IMG_CONTEXT>` blocks."""

    input_ids: np.ndarray
    images: list[np.ndarray]
    image_refs: list[list[int]]
    tokens_per_tile: int
    image_token_id: int
    stats: dict[str, int] = field(default_factory=dict)

    def __iter__(self) -> Iterator[Any]:
        """Unpacks as (input_ids, pixel_values)."""
        return iter((self.input_ids, self.pixel_values))

    @property
    def pixel_values(self) -> list[np.ndarray | None]:
        """Per window: its images' tiles concatenated (what R1VModel.forward takes), None without images."""
        return [np.concatenate([self.images[j] for j in refs]) if refs else None for refs in self.image_refs]


@dataclass
class _Piece:
    ids: list[int]
    image: int | None = None  # index into the prepared images
    image_end: int = 0  # position just after </img>


def build_calibration_batch(
    ckpt: Checkpoint, items: Sequence[CalibrationItem], n_samples: int, seq_len: int
) -> CalibrationBatch:
    """Render, tokenize and pack `items` into `n_samples` windows of `seq_len` tokens (see the module doc)."""
    from r1v.runtime.image import ImageError, TilingConfig, prepare_image

    if n_samples < 1 or seq_len < 16:
        raise CalibrationError(f"need n_samples >= 1 and seq_len >= 16, got {n_samples} and {seq_len}")
    if not items:
        raise CalibrationError("no calibration items")
    cfg = ckpt.config
    tokenizer = _tokenizer(ckpt)
    special = ckpt.special_tokens()
    missing = [t for t in ("<img>", "</img>", "<IMG_CONTEXT>") if t not in special]
    if missing:
        raise CalibrationError(f"{ckpt.path}: the tokenizer lacks {missing}; cannot place images in prompts")
    per_tile = cfg.tokens_per_tile
    template = _template(ckpt)
    eos = _eos_text(ckpt)

    def encode(text: str) -> list[int]:
        return tokenizer.encode(text, add_special_tokens=False).ids

    images: list[np.ndarray] = []
    pieces: list[_Piece] = []
    text_pieces: list[_Piece] = []
    dropped = 0
    for item in items:
        if item.text is not None:
            pieces.append(_Piece(encode(item.text)))
            text_pieces.append(pieces[-1])
            continue
        before, after = _render(template, item, eos)
        head = encode(before)
        tail = encode(after)
        if item.image is None:
            pieces.append(_Piece(head + tail))
            text_pieces.append(pieces[-1])
            continue
        budget = (seq_len - len(head) - 2) // per_tile
        if budget < 1:
            dropped += 1
            pieces.append(_Piece(head + tail))
            continue
        max_tiles = min(cfg.max_dynamic_patch, budget if budget == 1 or not cfg.use_thumbnail else budget - 1)
        tiling = TilingConfig(image_size=cfg.image_size, min_tiles=min(cfg.min_dynamic_patch, max_tiles),
                              max_tiles=max_tiles, use_thumbnail=cfg.use_thumbnail)
        try:
            prepared = prepare_image(item.image, tiling)
        except (ImageError, OSError) as e:
            raise CalibrationError(f"{item.source}: unreadable image: {e}") from None
        block = [special["<img>"], *[special["<IMG_CONTEXT>"]] * (per_tile * prepared.num_tiles), special["</img>"]]
        images.append(prepared.pixel_values)
        pieces.append(_Piece(head + block + tail, image=len(images) - 1, image_end=len(head) + len(block)))
    if dropped:
        warnings.warn(f"seq_len {seq_len} leaves no room for a {per_tile}-token image tile: {dropped} image(s) "
                      "used as text only", stacklevel=2)
    if not text_pieces:  # the filler for the rest of a window: the questions without their images
        text_pieces = [_Piece(encode("".join(_render(template, CalibrationItem(
            question=i.question, answer=i.answer, source=i.source), eos)))) for i in items]

    windows, refs = _pack(pieces, text_pieces, n_samples, seq_len)
    used = sorted({j for r in refs for j in r})
    remap = {old: new for new, old in enumerate(used)}
    input_ids = np.asarray(windows, dtype=np.int64)
    n_ctx = int((input_ids == special["<IMG_CONTEXT>"]).sum())
    return CalibrationBatch(
        input_ids=input_ids,
        images=[images[j] for j in used],
        image_refs=[[remap[j] for j in r] for r in refs],
        tokens_per_tile=per_tile,
        image_token_id=special["<IMG_CONTEXT>"],
        stats={"windows": n_samples, "tokens": int(input_ids.size), "image_tokens": n_ctx,
               "images": sum(len(r) for r in refs), "distinct_images": len(used),
               "tiles": sum(images[j].shape[0] for j in used), "images_dropped": dropped},
    )


def _pack(pieces: list[_Piece], text_pieces: list[_Piece], n_samples: int, seq_len: int
          ) -> tuple[list[list[int]], list[list[int]]]:
    windows: list[list[int]] = []
    refs: list[list[int]] = []
    cur: list[int] = []
    cur_refs: list[int] = []
    cursor = filler = 0
    pending: _Piece | None = None
    while len(windows) < n_samples:
        if pending is not None:
            piece, pending = pending, None
        else:
            piece, cursor = pieces[cursor % len(pieces)], cursor + 1
        room = seq_len - len(cur)
        if piece.image is not None and piece.image_end > room:
            # The image block does not fit here: fill the window with text, start the next with the image.
            pending = piece
            while len(cur) < seq_len:
                text, filler = text_pieces[filler % len(text_pieces)], filler + 1
                cur += text.ids[: seq_len - len(cur)]
        else:
            cur += piece.ids[:room]
            if piece.image is not None:
                cur_refs.append(piece.image)
            if len(piece.ids) > room:  # the rest (never inside the image block) continues the next window
                pending = _Piece(piece.ids[room:])
        if len(cur) == seq_len:
            windows.append(cur)
            refs.append(cur_refs)
            cur, cur_refs = [], []
    return windows, refs


def _tokenizer(ckpt: Checkpoint) -> Any:
    from tokenizers import Tokenizer

    path = ckpt.tokenizer.tokenizer_json
    if path is None:
        raise CalibrationError(f"{ckpt.path}: calibration needs tokenizer.json (vocab.json + merges.txt alone "
                               "do not say how the tokenizer pre-splits text)")
    return Tokenizer.from_file(str(path))


def _template(ckpt: Checkpoint) -> str:
    from r1v.converters.gguf_vocab import resolve_chat_template

    return resolve_chat_template(ckpt)


def _eos_text(ckpt: Checkpoint) -> str:
    eos = ckpt.tokenizer.tokenizer_config.get("eos_token")
    if isinstance(eos, dict):
        eos = eos.get("content")
    return eos if isinstance(eos, str) else ""


def _render(template: str, item: CalibrationItem, eos: str) -> tuple[str, str]:
    """The prompt split at its image placeholder: (text before `<image>`, text after it + the answer)."""
    from r1v.converters.gguf_vocab import render_chat_template

    content = ("<image>\n" if item.image is not None else "") + (item.question or "")
    prompt = render_chat_template(template, [{"role": "user", "content": content}], add_generation_prompt=True)
    if item.answer is not None:
        opened = prompt.rstrip().endswith("<think>")
        reasoning = "</think>" in item.answer and not item.answer.lstrip().startswith("<think>")
        prompt += ("<think>\n" if reasoning and not opened else "") + item.answer + eos + "\n"
    before, marker, after = prompt.partition("<image>")
    if item.image is not None and not marker:
        raise CalibrationError(f"{item.source}: the chat template dropped the <image> placeholder")
    return (before, after) if marker else (prompt, "")

