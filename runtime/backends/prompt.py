"""What both backends (llama.cpp, AWQ) make of a request: images laid out but not encoded yet, the prompt
as segments and positions, and a run whose statistics fill in while it is iterated."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Sequence, Union

from ..image import TilingConfig

__all__ = ["ImageSlot", "Prompt", "Run", "RunStats", "TextPiece", "interleave", "tokenize_pieces", "wrap_text_pieces"]

# The text between two images: a string (all of it parsed for special tokens), or (text, parse_special)
# fragments, as `RenderedPrompt.fragments` gives them (message text not parsed for special tokens).
TextPiece = Union[str, Sequence[tuple[str, bool]]]


@dataclass(frozen=True)
class ImageSlot:
    """One image of a prompt, loaded and laid out but not encoded yet."""

    key: tuple
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


class Run:
    """An accepted request: iterate to evaluate the prompt and sample (`backend._generate` yields
    (token, piece, end) triples); `stats` fill in as it goes."""

    def __init__(self, backend: Any, prompt: Prompt, params: Any, max_new: int):
        estimate = prompt.tile_choice.estimated_seconds if prompt.tile_choice is not None else None
        self.stats = RunStats(prompt_tokens=prompt.n_positions, images=prompt.images,
                              estimated_prefill_seconds=estimate)
        self._gen = backend._generate(prompt, params, max_new, self.stats)

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
