"""The llama.cpp backend: a GGUF LLM + mmproj through llama-cpp-python's low-level bindings and libmtmd.

Prompt: text pieces around images (from the chat template). Each image becomes ``<img>`` + its tiles'
projector embeddings + ``</img>``, fed to the LLM as an embedding batch, as libmtmd itself does. With
``tiling="internvl"`` (default) the image is cut here exactly as the model was trained (InternVL's
``dynamic_preprocess``, `r1v.runtime.image`), and libmtmd only encodes each 448x448 tile (it neither resizes
nor slices an image of that size); with ``tiling="llamacpp"`` libmtmd tiles the image its own way.

KV cache: the backend remembers what sits in the cache position by position (token ids; image embeddings as
(image key, index)). A new prompt keeps the longest common prefix, removes the rest from the cache and
evaluates only what follows; image embeddings are encoded only for images that are not in the kept prefix,
and kept (a few images, LRU) for later requests.

Sampling: llama.cpp's sampler chain - penalties, top-k, top-p, min-p, temperature, seeded distribution, or
greedy at temperature 0 - run by llama.cpp on the logits of the last position (`llama_sampler_sample`).

No `llama_cpp.Llama`: it allocates n_batch x n_vocab floats for logits nobody reads here (~0.3 GB for
R1V's 152k vocabulary) and evaluates through a slower Python path.
"""
from __future__ import annotations

import ctypes
import hashlib
import os
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np

from llama_cpp import llama_cpp as _ll

from ..api import ContextOverflowError, LoadOptions, NoProjectorError, SamplingParams
from ..image import TilingConfig, choose_grid, load_image, tile_image
from ..llama_batch import DecodeError, LlamaBatch, decode
from ..mtmd import MtmdContext, MtmdError, TextModel, rgb_array

__all__ = ["LlamaCppBackend"]

IMG_START, IMG_END = "<img>", "</img>"


def _available_cpus() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not on Linux
        return max(1, os.cpu_count() or 1)


@dataclass(frozen=True)
class _ImageSlot:
    """One image of a prompt, loaded and laid out but not encoded yet."""

    key: tuple
    image: Any  # PIL RGB
    grid: tuple[int, int] | None
    tiles: int
    n_positions: int


@dataclass
class Prompt:
    """A prepared prompt: segments (token id lists and images), and what sits at each position."""

    segments: list[list[int] | _ImageSlot]
    items: list[Any]
    image_positions: int = 0

    @property
    def n_positions(self) -> int:
        return len(self.items)

    @property
    def images(self) -> list[tuple[tuple[int, int] | None, int]]:
        return [(s.grid, s.tiles) for s in self.segments if isinstance(s, _ImageSlot)]


@dataclass
class RunStats:
    prompt_tokens: int = 0
    cached_tokens: int = 0
    prefill_seconds: float = 0.0
    image_seconds: float = 0.0
    time_to_first_token: float = 0.0
    decode_seconds: float = 0.0
    images: list[Any] = field(default_factory=list)
    seed: int | None = None


class _Run:
    """An accepted request: iterate to evaluate the prompt and sample; `stats` fill in as it goes."""

    def __init__(self, backend: LlamaCppBackend, prompt: Prompt, params: SamplingParams, max_new: int):
        self.stats = RunStats(prompt_tokens=prompt.n_positions, images=prompt.images)
        self._gen = backend._generate(prompt, params, max_new, self.stats)

    def __iter__(self) -> Iterator[tuple[int, bytes, bool]]:
        return self._gen

    def close(self) -> None:
        self._gen.close()


class LlamaCppBackend:
    def __init__(self, path: str | os.PathLike[str], mmproj: str | os.PathLike[str] | None, options: LoadOptions):
        self.path = Path(path)
        self.mmproj_path = Path(mmproj) if mmproj is not None else None
        self.options = options
        cpus = _available_cpus()
        self.n_threads = options.n_threads or max(1, cpus // 2)
        self.n_threads_batch = options.n_threads_batch or cpus
        self.n_batch = options.n_batch
        self._mtmd: MtmdContext | None = None
        self._ctx = None
        self._batch: LlamaBatch | None = None
        self._embd_batch: LlamaBatch | None = None
        self._text = TextModel(self.path, verbose=options.verbose)  # MtmdError if llama.cpp cannot load it
        try:
            self._open(options)
        except BaseException:
            self.close()
            raise

    def _open(self, options: LoadOptions) -> None:
        model = self._text.model
        self._vocab = _ll.llama_model_get_vocab(model)
        self.n_vocab = int(_ll.llama_vocab_n_tokens(self._vocab))
        params = _ll.llama_context_default_params()
        params.n_ctx = options.n_ctx
        params.n_batch = options.n_batch
        params.n_ubatch = min(options.n_batch, 512)
        params.n_seq_max = 1
        params.n_threads = self.n_threads
        params.n_threads_batch = self.n_threads_batch
        params.no_perf = True
        if options.flash_attn is not None:
            params.flash_attn_type = (_ll.LLAMA_FLASH_ATTN_TYPE_ENABLED if options.flash_attn
                                      else _ll.LLAMA_FLASH_ATTN_TYPE_DISABLED)
        ctx = _ll.llama_init_from_model(model, params)
        if not ctx:
            raise RuntimeError(f"{self.path}: llama.cpp could not create a context of {options.n_ctx} tokens "
                               "(too little memory? try a smaller n_ctx)")
        self._ctx = ctx
        self._memory = _ll.llama_get_memory(ctx)
        self.n_ctx = int(_ll.llama_n_ctx(ctx))
        self.n_embd = int(_ll.llama_model_n_embd_inp(model))
        self._batch = LlamaBatch(self.n_batch)
        self._kv: list[Any] = []  # what the KV cache holds, position by position
        self._pieces: dict[int, bytes] = {}
        self._image_cache: OrderedDict[tuple, np.ndarray] = OrderedDict()
        template = _ll.llama_model_chat_template(model, None)
        self.chat_template = template.decode("utf-8") if template else None
        self.special_texts = {"bos_token": self._token_text(_ll.llama_vocab_bos(self._vocab)),
                              "eos_token": self._token_text(_ll.llama_vocab_eos(self._vocab))}
        self._bos = int(_ll.llama_vocab_bos(self._vocab))
        self._add_bos = bool(_ll.llama_vocab_get_add_bos(self._vocab)) and self._bos >= 0
        if options.tiling == "llamacpp" and options.max_tiles is not None:
            raise ValueError("max_tiles applies to tiling='internvl'; libmtmd decides its own tiles")
        if self.mmproj_path is not None:
            self._open_vision(options)

    def _open_vision(self, options: LoadOptions) -> None:
        import gguf

        reader = gguf.GGUFReader(self.mmproj_path)

        def kv(name: str, default: Any = None) -> Any:
            f = reader.get_field(name)
            return f.contents() if f is not None else default

        projector = kv("clip.projector_type")
        if options.tiling == "internvl" and projector != "internvl":
            raise ValueError(f"{self.mmproj_path}: projector type {projector!r}, not 'internvl': InternVL tiling "
                             "does not apply; load with tiling='llamacpp' to let libmtmd prepare images")
        size = int(kv("clip.vision.image_size", 448))
        min_tiles = int(kv("clip.vision.preproc_min_tiles", 1))
        max_tiles = options.max_tiles or int(kv("clip.vision.preproc_max_tiles", 12))
        self.tiling = TilingConfig(image_size=size, min_tiles=min(min_tiles, max_tiles), max_tiles=max_tiles)
        del reader
        self._mtmd = MtmdContext(self.mmproj_path, self._text, n_threads=self.n_threads_batch)
        if self._mtmd.n_embd != self.n_embd:
            raise ValueError(f"{self.mmproj_path}: the projector's output width {self._mtmd.n_embd} does not match "
                             f"the LLM's embedding width {self.n_embd} ({self.path.name}): not the same model")
        self.tokens_per_tile = self._mtmd.layout_for_size(size, size).tokens_per_tile[0]
        self._img_tokens = []
        for tag in (IMG_START, IMG_END):
            ids = self.tokenize(tag)
            if len(ids) != 1:
                raise ValueError(f"{self.path}: the vocabulary has no {tag} token; this is not an InternVL-chat / "
                                 "R1V language model")
            self._img_tokens.append(ids[0])
        self._embd_batch = LlamaBatch(self.n_batch, self.n_embd)

    # --- vocabulary ---------------------------------------------------------------------------------
    def _token_text(self, token: int) -> str:
        if token < 0:
            return ""
        text = _ll.llama_vocab_get_text(self._vocab, token)
        return text.decode("utf-8", "replace") if text else ""

    def tokenize(self, text: str, *, special: bool = True) -> list[int]:
        self._live()
        data = text.encode("utf-8")
        if not data:
            return []
        n_max = len(data) + 8
        buf = (_ll.llama_token * n_max)()
        n = _ll.llama_tokenize(self._vocab, data, len(data), buf, n_max, False, special)
        if n < 0:
            n_max = -n
            buf = (_ll.llama_token * n_max)()
            n = _ll.llama_tokenize(self._vocab, data, len(data), buf, n_max, False, special)
            if n < 0:
                raise RuntimeError(f"llama_tokenize failed ({n})")
        return list(buf[:n])

    def piece(self, token: int) -> bytes:
        """The bytes of one token as output text (control tokens such as end markers give b"")."""
        piece = self._pieces.get(token)
        if piece is None:
            self._live()
            buf = ctypes.create_string_buffer(64)
            n = _ll.llama_token_to_piece(self._vocab, token, buf, 64, 0, False)
            if n < 0:
                buf = ctypes.create_string_buffer(-n)
                n = _ll.llama_token_to_piece(self._vocab, token, buf, -n, 0, False)
            piece = self._pieces[token] = buf.raw[:n]
        return piece

    def detokenize(self, tokens: Sequence[int]) -> str:
        return b"".join(self.piece(t) for t in tokens).decode("utf-8", "replace")

    # --- prompts ------------------------------------------------------------------------------------
    def prepare(self, pieces: Sequence[str], images: Sequence[Any]) -> Prompt:
        """Tokenize the text pieces, load the images and lay them out (tile counts, positions); no model
        work yet."""
        self._live()
        if len(pieces) != len(images) + 1:
            raise ValueError(f"{len(pieces)} text pieces for {len(images)} images")
        if images and self._mtmd is None:
            raise NoProjectorError(
                f"{len(images)} image(s) given, but {self.path.name} was loaded without a vision projector: no "
                f"mmproj file was found beside it in {self.path.parent}. Put the matching mmproj-*.gguf there or "
                f"pass mmproj=PATH to load() (--mmproj PATH on the command line).")
        slots = [self._slot(source) for source in images]
        segments: list[list[int] | _ImageSlot] = []
        items: list[Any] = []
        for i, text in enumerate(pieces):
            ids = self.tokenize(text)
            if i == 0 and self._add_bos and (not ids or ids[0] != self._bos):
                ids.insert(0, self._bos)
            if i > 0:
                ids.insert(0, self._img_tokens[1])
            if i < len(slots):
                ids.append(self._img_tokens[0])
            segments.append(ids)
            items.extend(ids)
            if i < len(slots):
                slot = slots[i]
                segments.append(slot)
                items.extend((slot.key, j) for j in range(slot.n_positions))
        return Prompt(segments, items, sum(s.n_positions for s in slots))

    def _slot(self, source: Any) -> _ImageSlot:
        image = load_image(source, self.tiling)  # ImageError naming the source
        width, height = image.size
        digest = hashlib.blake2b(image.tobytes(), digest_size=16)
        digest.update(f"{width}x{height}".encode())
        mode = self.options.tiling
        key = (digest.hexdigest(), mode, self.tiling.max_tiles)
        if mode == "internvl":
            grid = choose_grid(width, height, self.tiling)
            tiles = grid[0] * grid[1]
            tiles += int(self.tiling.use_thumbnail and tiles != 1)
            return _ImageSlot(key, image, grid, tiles, tiles * self.tokens_per_tile)
        layout = self._mtmd.layout_for_size(width, height)
        return _ImageSlot(key, image, layout.grid, layout.n_tiles, layout.n_tokens)

    def _embeddings(self, slot: _ImageSlot) -> np.ndarray:
        """[n_positions, n_embd] float32 projector output of one image (cached by pixels and tiling)."""
        cached = self._image_cache.get(slot.key)
        if cached is not None:
            self._image_cache.move_to_end(slot.key)
            return cached
        assert self._mtmd is not None
        if self.options.tiling == "internvl":
            embeddings = np.concatenate([self._encode_tile(t) for t in tile_image(slot.image, self.tiling)])
        else:
            embeddings = self._mtmd.embed_image(rgb_array(slot.image)).embeddings.reshape(-1, self.n_embd)
        if embeddings.shape != (slot.n_positions, self.n_embd):
            raise MtmdError(f"the image encoder gave {embeddings.shape[0]} embeddings for an image laid out as "
                            f"{slot.n_positions} positions")
        if self.options.image_cache:
            self._image_cache[slot.key] = embeddings
            while len(self._image_cache) > self.options.image_cache:
                self._image_cache.popitem(last=False)
        return embeddings

    def _encode_tile(self, tile: Any) -> np.ndarray:
        mtmd = self._mtmd
        with mtmd.tokenize(mtmd.marker, [tile]) as tokenized:
            chunks = [c.index for c in tokenized.chunks if c.kind == "image"]
            if len(chunks) != 1:
                raise MtmdError(f"libmtmd cut a {tile.width}x{tile.height} tile into {len(chunks)} pieces; "
                                "expected it to take the tile whole")
            return mtmd.encode_chunk(tokenized, chunks[0])

    # --- generation ---------------------------------------------------------------------------------
    def start(self, prompt: Prompt, params: SamplingParams) -> _Run:
        """Check that the prompt fits; the returned run evaluates and samples as it is iterated."""
        self._live()
        n = prompt.n_positions
        if n >= self.n_ctx:
            images = f", {prompt.image_positions} of them for images" if prompt.image_positions else ""
            raise ContextOverflowError(
                f"the prompt is {n} tokens{images}, but the context window is {self.n_ctx} tokens (n_ctx), "
                f"which leaves no room for an answer; load with a larger n_ctx, shorten the conversation, or "
                f"use fewer or smaller images (max_tiles)", prompt_tokens=n, n_ctx=self.n_ctx)
        return _Run(self, prompt, params, min(params.max_tokens, self.n_ctx - n))

    def _sampler(self, params: SamplingParams) -> Any:
        chain = _ll.llama_sampler_chain_init(_ll.llama_sampler_chain_default_params())
        add = lambda s: _ll.llama_sampler_chain_add(chain, s)  # noqa: E731 - the chain owns what it is given
        if params.repetition_penalty != 1.0:
            last_n = self.n_ctx if params.repeat_last_n == -1 else params.repeat_last_n
            add(_ll.llama_sampler_init_penalties(self.n_vocab, last_n, params.repetition_penalty, 0.0, 0.0))
        if params.temperature == 0:
            add(_ll.llama_sampler_init_greedy())
            return chain
        if params.top_k > 0:
            add(_ll.llama_sampler_init_top_k(params.top_k))
        if params.top_p < 1.0:
            add(_ll.llama_sampler_init_top_p(params.top_p, 1))
        if params.min_p > 0.0:
            add(_ll.llama_sampler_init_min_p(params.min_p, 1))
        add(_ll.llama_sampler_init_temp(params.temperature))
        seed = _ll.LLAMA_DEFAULT_SEED if params.seed is None else params.seed & 0xFFFFFFFF
        add(_ll.llama_sampler_init_dist(seed))
        return chain

    def _generate(self, prompt: Prompt, params: SamplingParams, max_new: int,
                  stats: RunStats) -> Iterator[tuple[int, bytes, bool]]:
        start = time.perf_counter()
        ctx, items = self._live(), prompt.items
        keep = 0
        limit = min(len(self._kv), len(items) - 1)  # the last prompt position is always evaluated: its logits
        while keep < limit and self._kv[keep] == items[keep]:
            keep += 1
        self._truncate(keep)
        keep = len(self._kv)
        stats.cached_tokens = keep

        embeddings: dict[int, np.ndarray] = {}
        pos = 0
        for i, segment in enumerate(prompt.segments):
            n = segment.n_positions if isinstance(segment, _ImageSlot) else len(segment)
            if isinstance(segment, _ImageSlot) and pos + n > keep:
                embeddings[i] = self._embeddings(segment)
            pos += n
        stats.image_seconds = time.perf_counter() - start

        sampler = self._sampler(params)
        try:
            stats.seed = None if params.temperature == 0 else int(_ll.llama_sampler_get_seed(sampler))
            if params.repetition_penalty != 1.0:  # the penalty window starts in the prompt
                text_tokens = [t for t in items if isinstance(t, int)]
                window = len(text_tokens) if params.repeat_last_n == -1 else params.repeat_last_n
                for token in text_tokens[len(text_tokens) - min(window, len(text_tokens)):]:
                    _ll.llama_sampler_accept(sampler, token)
            self._evaluate(prompt, embeddings, keep)
            stats.prefill_seconds = time.perf_counter() - start
            first = 0.0
            for n in range(1, max_new + 1):
                token = int(_ll.llama_sampler_sample(sampler, ctx, -1))
                now = time.perf_counter()
                if n == 1:
                    first = now
                    stats.time_to_first_token = now - start
                stats.decode_seconds = now - first
                end = bool(_ll.llama_vocab_is_eog(self._vocab, token))
                yield token, self.piece(token), end
                if end or n == max_new:
                    return
                self._batch.set_token(token, len(self._kv))
                self._decode(self._batch, (token,))
        finally:
            _ll.llama_sampler_free(sampler)

    def _evaluate(self, prompt: Prompt, embeddings: dict[int, np.ndarray], keep: int) -> None:
        """Decode the prompt from position `keep` on, in batches; logits for the last position only."""
        last = prompt.n_positions - 1
        pos = 0
        for i, segment in enumerate(prompt.segments):
            image = isinstance(segment, _ImageSlot)
            n = segment.n_positions if image else len(segment)
            for begin in range(max(keep - pos, 0), n, self.n_batch):
                end = min(begin + self.n_batch, n)
                logits = pos + end - 1 == last
                if image:
                    self._embd_batch.set_embeddings(embeddings[i][begin:end], pos + begin, logits)
                    self._decode(self._embd_batch, prompt.items[pos + begin:pos + end])
                else:
                    self._batch.set_tokens(segment[begin:end], pos + begin, logits)
                    self._decode(self._batch, segment[begin:end])
            pos += n

    def _decode(self, batch: LlamaBatch, items: Sequence[Any]) -> None:
        try:
            decode(self._ctx, batch)
        except DecodeError:
            self._truncate(len(self._kv))  # drop whatever part of the batch went in
            raise
        self._kv.extend(items)

    def _truncate(self, keep: int) -> None:
        """Remove positions from `keep` on from the KV cache (everything, if llama.cpp cannot cut there)."""
        if not _ll.llama_memory_seq_rm(self._memory, 0, keep, -1):
            _ll.llama_memory_clear(self._memory, True)
            keep = 0
        del self._kv[keep:]

    def reset(self) -> None:
        self._live()
        _ll.llama_memory_clear(self._memory, True)
        self._kv.clear()

    # --- lifetime -----------------------------------------------------------------------------------
    def _live(self) -> Any:
        if self._ctx is None:
            raise RuntimeError(f"the model {self.path.name} is closed")
        return self._ctx

    def close(self) -> None:
        if self._mtmd is not None:
            self._mtmd.close()
            self._mtmd = None
        for batch in (self._batch, self._embd_batch):
            if batch is not None:
                batch.free()
        self._batch = self._embd_batch = None
        if self._ctx is not None:
            _ll.llama_free(self._ctx)
            self._ctx = None
        getattr(self, "_image_cache", {}).clear()
        self._text.close()

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:  # noqa: BLE001 - interpreter shutdown
            pass
