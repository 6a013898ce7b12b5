"""The contract every backend meets (`Backend`) and the one request loop they share (`BaseBackend`).

`Backend` is the surface `r1v.runtime.api.Model` uses. `BaseBackend` holds, once, what does not depend on the
engine: preparing a prompt (text pieces around images, the request's tiling, image slots and their
`ImageKey`), the context-overflow checks, keeping the longest common prefix with what the KV cache holds,
gathering image embeddings (one LRU), the prefill and decode timings in `RunStats`, stopping at an end token or
at the token limit, and the teacher-forced `logprobs`. A backend implements what its engine does differently:

- `_encode_image(slot)`: an image's embeddings [n_positions, width].
- `_evaluate_span(sequence, prompt, span, embeddings)`: write one `Span` of prompt positions into the KV cache
  of `sequence` and append them to `sequence.positions`; when `span.logits`, a handle on the last position's
  logits.
- `_step(sequence, token)`: one decode step (the token appended likewise); the new logits handle.
- `_score_tokens(sequence, tokens)`: evaluate tokens keeping the logits of each, numpy [len(tokens), n_vocab].
- `_logits_row(handle)`: numpy float32 [n_vocab] logits of a handle.
- `_sampler(params, prompt)`: a `TokenSampler` primed with the prompt; `_is_end(token)`.
- `_truncate_cache(sequence, keep)`, `_is_open()`, and the vocabulary: `tokenize`, `piece`, `detokenize`.
Where an engine has more to say: `_check_request`, `_request_tiling`, `_slot`, `_prefix_points`, `_restore` (a
saved prefix), `_evaluated` (after each span), `_sync`, `_clear_cache`; `across_segments` picks how the prompt
is cut into spans (`prompt.spans`); `_step_batch` advances several sequences in one forward (the default is a
loop over `_step`).

Per-request state lives in objects, not in the backend: a `SequenceState` (one sequence of the KV cache: its
id and what sits at each of its positions; it outlives requests, for prefix reuse) and a `Request` on it (the
prompt, sampling, token limit, stats, and the sampler while it decodes). Every hook names its sequence. At
`LoadOptions.parallel` 1 a backend runs one request at a time on `self.sequence` (`generate`); an engine that
sets `multi_sequence` holds `parallel` sequences in one context (`self.sequences`), and `scheduler.Scheduler`
runs up to that many requests at once over them, one `_step_batch` per token.
"""
from __future__ import annotations

import dataclasses
import time
from abc import ABC, abstractmethod
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Protocol, Sequence, runtime_checkable

import numpy as np

from ..image import TilingConfig, choose_grid, load_image
from ..options import ContextOverflowError, LoadOptions, SamplingParams
from .prompt import (ImageKey, ImageSlot, Prompt, Run, RunStats, Span, TextPiece, image_digest, interleave,
                     segment_positions, spans, tokenize_pieces, wrap_text_pieces)

__all__ = ["Backend", "BaseBackend", "IMG_END", "IMG_START", "Request", "SequenceState", "TokenSampler",
           "common_prefix"]

IMG_START, IMG_END = "<img>", "</img>"


def common_prefix(held: Sequence[Any], items: Sequence[Any]) -> int:
    """How many leading positions of a sequence (`held`) a prompt (`items`) can keep: the common prefix, short of
    the prompt's last position (always evaluated: its logits give the first token)."""
    keep, limit = 0, min(len(held), len(items) - 1)
    while keep < limit and held[keep] == items[keep]:
        keep += 1
    return keep


@runtime_checkable
class Backend(Protocol):
    """What `Model` uses of a backend. `prepare` lays a prompt out (no model work); `start` checks that it fits
    and returns a `Run` whose iteration evaluates it and samples; `logprobs` scores given tokens."""

    path: Path
    mmproj_path: Path | None
    n_ctx: int
    n_vocab: int
    chat_template: str | None  # the model file's own, if any
    special_texts: dict[str, str]  # bos_token / eos_token, for chat templates
    tiling: TilingConfig | None  # how images are cut (None without a vision tower)
    tokens_per_tile: int | None

    @property
    def has_vision(self) -> bool: ...

    def tokenize(self, text: str, *, special: bool = True) -> list[int]: ...

    def detokenize(self, tokens: Sequence[int]) -> str: ...

    def piece(self, token: int) -> bytes: ...

    def prepare(self, pieces: Sequence[TextPiece], images: Sequence[Any], *, max_tiles: int | None = None,
                image_budget: float | None = None) -> Prompt: ...

    def start(self, prompt: Prompt, params: SamplingParams) -> Run: ...

    def logprobs(self, prompt: Prompt, tokens: Sequence[int]) -> np.ndarray: ...

    def reset(self) -> None: ...

    def close(self) -> None: ...


class TokenSampler(Protocol):
    """One request's sampler: `sample` picks the next token from a logits handle and counts it for the
    repetition penalty; `seed` is the draw's seed (None when greedy)."""

    seed: int | None

    def sample(self, logits: Any) -> int: ...

    def close(self) -> None: ...


@dataclass
class SequenceState:
    """One sequence of the KV cache: its id in the engine, and what sits at each position (a token id, or
    (`ImageKey`, index) for an image embedding)."""

    seq_id: int = 0
    positions: list[Any] = field(default_factory=list)


@dataclass
class Request:
    """An accepted request on a sequence: it may add `max_new` tokens; `stats` fill in as it runs."""

    sequence: SequenceState
    prompt: Prompt
    params: SamplingParams
    max_new: int
    stats: RunStats
    sampler: TokenSampler | None = None  # while it decodes
    started: float = 0.0  # perf_counter when its evaluation began
    produced: int = 0  # tokens sampled so far
    first: float = 0.0  # perf_counter of the first token


class BaseBackend(ABC):
    """The request loop and prompt preparation of every backend; subclasses supply the engine (module doc)."""

    across_segments = False  # spans may hold text and image positions together (else one segment per span)
    multi_sequence = False  # the engine keeps several sequences in one context (LoadOptions.parallel > 1)
    n_ctx: int
    n_batch: int
    n_vocab: int
    chat_template: str | None
    special_texts: dict[str, str]

    def __init__(self, path: str | Path, mmproj_path: str | Path | None, options: LoadOptions):
        self.path = Path(path)
        self.mmproj_path = Path(mmproj_path) if mmproj_path is not None else None
        self.options = options
        self.tiling: TilingConfig | None = None
        self.tokens_per_tile: int | None = None
        if options.parallel > 1 and not self.multi_sequence:
            raise ValueError(f"parallel={options.parallel}: {type(self).__name__} holds one sequence; load with "
                             "parallel=1")
        self.max_sequences = options.parallel
        self.sequences = [SequenceState(i) for i in range(self.max_sequences)]
        self.sequence = self.sequences[0]  # the one sequence of `generate` (parallel=1)
        self._image_cache: OrderedDict[ImageKey, Any] = OrderedDict()
        self._img_tokens: list[int] = []  # ids of <img> and </img>
        self._bos: int | None = None
        self._add_bos = False  # the text starts with `_bos`

    @property
    def has_vision(self) -> bool:
        return self.mmproj_path is not None

    def _read_image_tags(self) -> None:
        """The ids of <img> and </img>, around each image's positions: one token each, or not an R1V model."""
        self._img_tokens = []
        for tag in (IMG_START, IMG_END):
            ids = self.tokenize(tag)
            if len(ids) != 1:
                raise ValueError(f"{self.path}: the vocabulary has no {tag} token; this is not an InternVL-chat / "
                                 "R1V language model")
            self._img_tokens.append(ids[0])

    # --- prompts ------------------------------------------------------------------------------------
    def prepare(self, pieces: Sequence[TextPiece], images: Sequence[Any], *, max_tiles: int | None = None,
                image_budget: float | None = None) -> Prompt:
        """Tokenize the text pieces (`tokenize_pieces`), load the images and lay them out (tile counts,
        positions); no model work yet. `max_tiles` (and `image_budget`, seconds, where the backend takes one)
        override the load options for this prompt's images."""
        self._live()
        if len(pieces) != len(images) + 1:
            raise ValueError(f"{len(pieces)} text pieces for {len(images)} images")
        self._check_request(images, max_tiles, image_budget)
        loaded = [load_image(source, self.tiling) for source in images]  # ImageError naming the source
        texts = wrap_text_pieces(tokenize_pieces(self.tokenize, pieces), len(loaded),
                                 self._bos if self._add_bos else None, self._img_tokens)
        tiling, choice = self._request_tiling([im.size for im in loaded], sum(map(len, texts)), max_tiles,
                                              image_budget)
        slots = [self._slot(image, tiling) for image in loaded]
        segments, items = interleave(texts, slots)
        points = self._prefix_points(segments) if slots else []
        return Prompt(segments, items, sum(s.n_positions for s in slots), points, choice)

    def _check_request(self, images: Sequence[Any], max_tiles: int | None, image_budget: float | None) -> None:
        """Refuse a request's tiling options before any image is loaded."""
        if max_tiles is not None and max_tiles < 1:
            raise ValueError(f"max_tiles must be >= 1, got {max_tiles}")

    def _request_tiling(self, sizes: list[tuple[int, int]], text_tokens: int, max_tiles: int | None,
                        image_budget: float | None) -> tuple[TilingConfig | None, Any]:
        """How this request's images (of these sizes) are cut: the load's tiling with the request's
        `max_tiles`; and what an image budget chose (`tile_budget.TileChoice`; None here)."""
        if not sizes:
            return None, None
        cfg = self.tiling
        assert cfg is not None
        if max_tiles is not None:
            cfg = dataclasses.replace(cfg, max_tiles=max_tiles, min_tiles=min(cfg.min_tiles, max_tiles))
        return cfg, None

    def _slot(self, image: Any, tiling: TilingConfig) -> ImageSlot:
        """An image laid out by InternVL's rule: its grid, tiles (the thumbnail included) and positions."""
        assert self.tokens_per_tile is not None
        grid = choose_grid(image.width, image.height, tiling)
        tiles = grid[0] * grid[1]
        tiles += int(tiling.use_thumbnail and tiles != 1)
        key = ImageKey(image_digest(image), "internvl", grid, tiling.use_thumbnail)  # the tiles follow from these
        return ImageSlot(key, image, grid, tiles, tiles * self.tokens_per_tile, tiling)

    def _prefix_points(self, segments: list[list[int] | ImageSlot]) -> list[tuple[int, str]]:
        """(end of an image, prefix cache key) of a prompt whose state a prefix cache would keep; none here."""
        return []

    # --- image embeddings -----------------------------------------------------------------------------
    def _embeddings(self, slot: ImageSlot) -> Any:
        """An image's embeddings [n_positions, width], kept for the last `image_cache` images (by `ImageKey`)."""
        cached = self._image_cache.get(slot.key)
        if cached is not None:
            self._image_cache.move_to_end(slot.key)
            return cached
        embeddings = self._encode_image(slot)
        if embeddings.shape[0] != slot.n_positions:
            raise RuntimeError(f"the image encoder gave {embeddings.shape[0]} embeddings for an image laid out as "
                               f"{slot.n_positions} positions")
        if self.options.image_cache:
            self._image_cache[slot.key] = embeddings
            while len(self._image_cache) > self.options.image_cache:
                self._image_cache.popitem(last=False)
        return embeddings

    def _image_embeddings(self, prompt: Prompt, keep: int) -> dict[int, Any]:
        """The embeddings of the images that end after position `keep`, by segment index."""
        out, pos = {}, 0
        for i, segment in enumerate(prompt.segments):
            n = segment_positions(segment)
            if isinstance(segment, ImageSlot) and pos + n > keep:
                out[i] = self._embeddings(segment)
            pos += n
        return out

    # --- the request loop -----------------------------------------------------------------------------
    def start(self, prompt: Prompt, params: SamplingParams) -> Run:
        """Check that the prompt leaves room for an answer; the returned run evaluates and samples as it is
        iterated (`generate`)."""
        request = self.request(prompt, params, self.sequence)
        return Run(self.generate(request), request.stats)

    def request(self, prompt: Prompt, params: SamplingParams, sequence: SequenceState) -> Request:
        """A request of the prompt on `sequence`, once the prompt leaves room for an answer in a sequence's
        window (`n_ctx`); ContextOverflowError otherwise."""
        self._live()
        n = prompt.n_positions
        if n >= self.n_ctx:
            images = f", {prompt.image_positions} of them for images" if prompt.image_positions else ""
            raise ContextOverflowError(
                f"the prompt is {n} tokens{images}, but the context window is {self.n_ctx} tokens (n_ctx), "
                f"which leaves no room for an answer; load with a larger n_ctx, shorten the conversation, or "
                f"use fewer or smaller images (max_tiles)", prompt_tokens=n, n_ctx=self.n_ctx)
        return Request(sequence, prompt, params, min(params.max_tokens, self.n_ctx - n), RunStats.of(prompt))

    def generate(self, request: Request) -> Iterator[tuple[int, bytes, bool]]:
        """Run a request: keep the cached prefix, encode the images after it, evaluate the rest of the prompt,
        then sample and step until an end token or `max_new` tokens; yields (token, piece, is_end)."""
        self._live()
        keep, embeddings = self._begin(request)
        sampler = request.sampler
        assert sampler is not None
        try:
            logits = None
            for span in self.prompt_spans(request, keep):
                logits = self._evaluate_prompt_span(request, span, embeddings)
            while True:
                token, piece, end = self._sample(request, logits)
                yield token, piece, end
                if end or request.produced == request.max_new:
                    return
                logits = self._step(request.sequence, token)
        finally:
            self._finish(request)

    def _begin(self, request: Request) -> tuple[int, dict[int, Any]]:
        """Start evaluating a request: keep its cached prefix, encode the images after it, open its sampler;
        (the positions its sequence already holds, the images' embeddings by segment index)."""
        stats = request.stats
        request.started = time.perf_counter()
        keep = self._reuse(request)
        embeddings = self._image_embeddings(request.prompt, keep)
        self._sync()
        stats.image_seconds = time.perf_counter() - request.started
        request.sampler = self._sampler(request.params, request.prompt)
        stats.seed = request.sampler.seed
        return keep, embeddings

    def prompt_spans(self, request: Request, keep: int) -> Iterator[Span]:
        """The spans that evaluate the request's prompt after the `keep` positions its sequence holds."""
        return spans(request.prompt, keep, self.n_batch, across_segments=self.across_segments)

    def _evaluate_prompt_span(self, request: Request, span: Span, embeddings: dict[int, Any]) -> Any:
        """One span of the request's prompt into its sequence; the logits handle after the prompt's last span
        (the prefill time is taken then), else None."""
        logits = self._evaluate_span(request.sequence, request.prompt, span, embeddings)
        self._evaluated(request.sequence, request.prompt, span.end)
        if span.logits:
            self._sync()
            request.stats.prefill_seconds = time.perf_counter() - request.started
        return logits

    def _sample(self, request: Request, logits: Any) -> tuple[int, bytes, bool]:
        """The request's next token from a logits handle, its piece and whether it ends the answer (an end
        token; `request.produced == request.max_new` says the limit is reached); the timings follow."""
        assert request.sampler is not None and logits is not None
        token = request.sampler.sample(logits)
        now = time.perf_counter()
        request.produced += 1
        stats = request.stats
        if request.produced == 1:
            request.first = now
            stats.time_to_first_token = now - request.started
        stats.decode_seconds = now - request.first
        return token, self.piece(token), self._is_end(token)

    def _finish(self, request: Request) -> None:
        """Close the request's sampler (it ended, was cancelled or failed)."""
        if request.sampler is not None:
            request.sampler.close()
            request.sampler = None

    def _reuse(self, request: Request) -> int:
        """Keep the longest common prefix of the prompt and what the request's sequence holds, then restore a
        longer saved prefix where the backend has one; the positions the cache now holds. The last prompt
        position is always evaluated: its logits give the first token."""
        prompt, stats, sequence = request.prompt, request.stats, request.sequence
        keep = common_prefix(sequence.positions, prompt.items)
        self._truncate(sequence, keep)
        keep = len(sequence.positions)
        stats.cached_tokens = keep
        restored = self._restore(sequence, prompt, keep)
        if restored != keep:
            stats.cached_tokens = min(keep, restored)
            stats.restored_tokens = restored - stats.cached_tokens
        return restored

    def _evaluate(self, prompt: Prompt, embeddings: dict[int, Any], keep: int) -> Any:
        """Evaluate the prompt from position `keep` on into `self.sequence`, span by span; the logits handle of
        its last position."""
        logits = None
        for span in spans(prompt, keep, self.n_batch, across_segments=self.across_segments):
            logits = self._evaluate_span(self.sequence, prompt, span, embeddings)
            self._evaluated(self.sequence, prompt, span.end)
        assert logits is not None
        return logits

    def _truncate(self, sequence: SequenceState, keep: int) -> None:
        """Forget the sequence's positions from `keep` on (all of them where the engine cannot cut there)."""
        keep = self._truncate_cache(sequence, keep)
        del sequence.positions[keep:]

    def _step_batch(self, steps: list[tuple[SequenceState, int]]) -> list[Any]:
        """Advance each sequence by its token (appended to its positions); the logits handle of each, in
        order. One forward where the engine batches sequences; here one `_step` after another."""
        return [self._step(sequence, token) for sequence, token in steps]

    # --- scoring (r1v eval) ---------------------------------------------------------------------------
    def logprobs(self, prompt: Prompt, tokens: Sequence[int]) -> np.ndarray:
        """Teacher forcing: float32 log-probabilities [len(tokens), n_vocab], row i the distribution after the
        prompt and tokens[:i]. Evaluates from an empty cache (the cache then holds the prompt and tokens)."""
        tokens = [int(t) for t in tokens]
        if not tokens:
            return np.zeros((0, self.n_vocab), np.float32)
        n = prompt.n_positions + len(tokens) - 1
        if n > self.n_ctx:
            raise ContextOverflowError(f"scoring needs {n} positions, but the context window is {self.n_ctx} "
                                       "tokens (n_ctx)", prompt_tokens=n, n_ctx=self.n_ctx)
        self.reset()
        embeddings = self._image_embeddings(prompt, 0)
        rows = [self._logits_row(self._evaluate(prompt, embeddings, 0))[None]]
        rest = tokens[:-1]
        for begin in range(0, len(rest), self.n_batch):
            rows.append(self._score_tokens(self.sequence, rest[begin:begin + self.n_batch]))
        logits = np.concatenate(rows).astype(np.float64)
        logits -= logits.max(axis=-1, keepdims=True)
        return (logits - np.log(np.exp(logits).sum(axis=-1, keepdims=True))).astype(np.float32)

    # --- lifetime -------------------------------------------------------------------------------------
    def reset(self) -> None:
        """Empty the KV cache (the next request evaluates its whole prompt)."""
        self._live()
        self._clear_cache()
        for sequence in self.sequences:
            sequence.positions.clear()

    def _live(self) -> None:
        if not self._is_open():
            raise RuntimeError(f"the model {self.path.name} is closed")

    def close(self) -> None:
        self._image_cache.clear()
        for sequence in self.sequences:
            sequence.positions.clear()

    # --- the engine -----------------------------------------------------------------------------------
    @abstractmethod
    def tokenize(self, text: str, *, special: bool = True) -> list[int]: ...

    @abstractmethod
    def piece(self, token: int) -> bytes:
        """The bytes of one token as output text (control tokens such as end markers give b"")."""

    @abstractmethod
    def detokenize(self, tokens: Sequence[int]) -> str: ...

    @abstractmethod
    def _is_open(self) -> bool: ...

    @abstractmethod
    def _encode_image(self, slot: ImageSlot) -> Any: ...

    @abstractmethod
    def _evaluate_span(self, sequence: SequenceState, prompt: Prompt, span: Span, embeddings: dict[int, Any]) -> Any:
        ...

    @abstractmethod
    def _step(self, sequence: SequenceState, token: int) -> Any: ...

    @abstractmethod
    def _score_tokens(self, sequence: SequenceState, tokens: list[int]) -> np.ndarray: ...

    @abstractmethod
    def _logits_row(self, logits: Any) -> np.ndarray: ...

    @abstractmethod
    def _sampler(self, params: SamplingParams, prompt: Prompt) -> TokenSampler: ...

    @abstractmethod
    def _is_end(self, token: int) -> bool: ...

    @abstractmethod
    def _truncate_cache(self, sequence: SequenceState, keep: int) -> int:
        """Drop the sequence's positions from `keep` on from the engine's cache; where it now ends (0 where
        the engine cannot cut there and emptied that sequence)."""

    def _clear_cache(self) -> None:
        """Empty the cache of every sequence."""
        for sequence in self.sequences:
            self._truncate_cache(sequence, 0)

    def _restore(self, sequence: SequenceState, prompt: Prompt, keep: int) -> int:
        """Positions the sequence holds after restoring a saved prefix of `prompt` longer than `keep`; no store
        here."""
        return keep

    def _evaluated(self, sequence: SequenceState, prompt: Prompt, end: int) -> None:
        """Called after the prompt's positions up to `end` are in the sequence's cache."""

    def _sync(self) -> None:
        """Wait for the device, before a time is taken."""
