"""What both backends (llama.cpp, AWQ) make of a request: images laid out but not encoded yet (keyed by
`ImageKey`), the prompt as segments and positions, the spans it is evaluated in, and a run whose statistics
fill in while it is iterated."""
from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Literal, Sequence, Union

from ..image import TilingConfig

__all__ = ["ImageKey", "ImageSlot", "Prompt", "Run", "RunStats", "Span", "TextPiece", "image_digest", "interleave",
           "segment_positions", "spans", "tokenize_pieces", "wrap_text_pieces"]

# The text between two images: a string (all of it parsed for special tokens), or (text, parse_special)
# fragments, as `RenderedPrompt.fragments` gives them (message text not parsed for special tokens).
TextPiece = Union[str, Sequence[tuple[str, bool]]]


def image_digest(image: Any) -> str:
    """A digest of a PIL RGB image's pixels and size."""
    digest = hashlib.blake2b(image.tobytes(), digest_size=16)
    digest.update(f"{image.width}x{image.height}".encode())
    return digest.hexdigest()


@dataclass(frozen=True)
class ImageKey:
    """What an image's embeddings follow from: its pixels and how it is laid out. The one key of the image
    embedding cache and of an image's positions in the KV cache (equal keys: equal embeddings), on every backend.

    `tiling` "internvl": cut here by InternVL's rule; the tiles follow from the grid (min/max tiles only pick
    it) and the thumbnail. "llamacpp": libmtmd lays the image out itself from its size (no grid here)."""

    digest: str  # `image_digest`
    tiling: Literal["internvl", "llamacpp"]
    grid: tuple[int, int] | None = None  # (columns, rows)
    thumbnail: bool = False  # the tiling adds a thumbnail tile to a grid of more than one tile


@dataclass(frozen=True)
class ImageSlot:
    """One image of a prompt, loaded and laid out but not encoded yet."""

    key: ImageKey
    image: Any  # PIL RGB
    grid: tuple[int, int] | None  # None: laid out by libmtmd's own tiling
    tiles: int
    n_positions: int
    tiling: TilingConfig | None = None  # InternVL tiling: how to cut it


@dataclass
class Prompt:
    """A prepared prompt: segments (token id lists and images), and what sits at each position."""

    segments: list[list[int] | ImageSlot]
    items: list[Any]
    image_positions: int = 0
    prefix_points: list[tuple[int, str]] = field(default_factory=list)  # (end of an image, prefix cache key)
    tile_choice: Any = None  # what an image budget chose (`tile_budget.TileChoice`), if one was given

    @property
    def n_positions(self) -> int:
        return len(self.items)

    @property
    def images(self) -> list[tuple[tuple[int, int] | None, int]]:
        return [(s.grid, s.tiles) for s in self.segments if isinstance(s, ImageSlot)]


def segment_positions(segment: list[int] | ImageSlot) -> int:
    return segment.n_positions if isinstance(segment, ImageSlot) else len(segment)


@dataclass(frozen=True)
class Span:
    """Prompt positions `start` .. `end`-1 that one engine call evaluates: `parts` are (segment index, first,
    end) within each segment, in order; `logits`: the span ends the prompt (the engine keeps its last logits)."""

    start: int
    end: int
    parts: tuple[tuple[int, int, int], ...]
    logits: bool


def spans(prompt: Prompt, keep: int, n_batch: int, *, across_segments: bool) -> Iterator[Span]:
    """The spans that evaluate `prompt` from position `keep` on, at most `n_batch` positions each. Across
    segments: every `n_batch` positions from `keep` (a span may hold text and image positions). Otherwise each
    segment on its own, split every `n_batch` positions from where it starts to be evaluated."""
    total = prompt.n_positions
    if across_segments:
        for start in range(keep, total, n_batch):
            end, parts, pos = min(start + n_batch, total), [], 0
            for i, segment in enumerate(prompt.segments):
                n = segment_positions(segment)
                a, b = max(start, pos) - pos, min(end, pos + n) - pos
                if a < b:
                    parts.append((i, a, b))
                pos += n
            yield Span(start, end, tuple(parts), end == total)
        return
    pos = 0
    for i, segment in enumerate(prompt.segments):
        n = segment_positions(segment)
        for begin in range(max(keep - pos, 0), n, n_batch):
            end = min(begin + n_batch, n)
            yield Span(pos + begin, pos + end, ((i, begin, end),), pos + end == total)
        pos += n


@dataclass
class RunStats:
    prompt_tokens: int = 0
    cached_tokens: int = 0
    restored_tokens: int = 0
    estimated_prefill_seconds: float | None = None
    prefill_seconds: float = 0.0
    image_seconds: float = 0.0
    time_to_first_token: float = 0.0
    decode_seconds: float = 0.0
    images: list[Any] = field(default_factory=list)
    seed: int | None = None

    @classmethod
    def of(cls, prompt: Prompt) -> RunStats:
        """What is known before evaluation: the prompt's size, its images, the image budget's estimate."""
        estimate = prompt.tile_choice.estimated_seconds if prompt.tile_choice is not None else None
        return cls(prompt_tokens=prompt.n_positions, images=prompt.images, estimated_prefill_seconds=estimate)


class Run:
    """An accepted request: iterating `steps` evaluates the prompt and samples, yielding (token, piece, end)
    triples; `stats` fill in as it goes; `close()` stops it."""

    def __init__(self, steps: Iterator[tuple[int, bytes, bool]], stats: RunStats):
        self.stats = stats
        self._gen = steps

    def __iter__(self) -> Iterator[tuple[int, bytes, bool]]:
        return self._gen

    def close(self) -> None:
        self._gen.close()


def tokenize_pieces(tokenize: Callable[..., list[int]], pieces: Sequence[TextPiece]) -> list[list[int]]:
    """Token ids of each text piece with a backend's `tokenize(text, special=...)`.

    A piece whose message text holds no special token's text is tokenized whole, with special tokens on:
    exactly the ids the model's own tools give the rendered prompt (cutting it at message boundaries could
    change merges there). Only where message text would parse into special tokens (a typed ``<|im_end|>`` or
    ``<IMG_CONTEXT>``) is the piece tokenized fragment by fragment, the message text with them off.
    """
    out = []
    for piece in pieces:
        fragments = [(piece, True)] if isinstance(piece, str) else list(piece)
        injected = any(not special and tokenize(text, special=True) != tokenize(text, special=False)
                       for text, special in fragments)
        if injected:
            out.append([t for text, special in fragments for t in tokenize(text, special=special)])
        else:
            out.append(tokenize("".join(text for text, _ in fragments), special=True))
    return out


def wrap_text_pieces(pieces: Sequence[list[int]], n_images: int, bos: int | None,
                     img_tags: Sequence[int] = ()) -> list[list[int]]:
    """The token ids of the text pieces around `n_images` images, as InternVL-chat lays them out: BOS first
    (when `bos` is given and the text does not start with it), `</img>` opening each piece after an image,
    `<img>` closing each piece before one. `img_tags`: the ids of `<img>` and `</img>` (needed with images)."""
    img_start, img_end = img_tags if n_images else (None, None)
    texts = []
    for i, piece in enumerate(pieces):
        ids = list(piece)
        if i == 0 and bos is not None and (not ids or ids[0] != bos):
            ids.insert(0, bos)
        if i > 0:
            ids.insert(0, img_end)
        if i < n_images:
            ids.append(img_start)
        texts.append(ids)
    return texts


def interleave(texts: Sequence[list[int]],
               slots: Sequence[ImageSlot]) -> tuple[list[list[int] | ImageSlot], list[Any]]:
    """(segments, items): text pieces and images in prompt order, and what sits at each position (a token id,
    or (image key, index) for an image embedding)."""
    segments: list[list[int] | ImageSlot] = []
    items: list[Any] = []
    for i, ids in enumerate(texts):
        segments.append(ids)
        items.extend(ids)
        if i < len(slots):
            slot = slots[i]
            segments.append(slot)
            items.extend((slot.key, j) for j in range(slot.n_positions))
    return segments, items
