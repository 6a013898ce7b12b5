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

Prefix cache (`LoadOptions.prefix_cache`, `r1v.runtime.backends.llamacpp.prefix_cache`): after the last image of a prompt is
evaluated, the sequence state up to the end of that image (llama.cpp's `llama_state_seq_get_data`) is kept in
memory and written to disk in the background, keyed by the model files, the context settings, the tokens and
the images (pixels and tiling) before it. A later request - in this process after other conversations, or in
another process - whose prompt starts with the same prefix restores it (`llama_state_seq_set_data`) instead
of encoding and prefilling the images. The prefix ends at an image segment's end, where prompt evaluation
starts a new batch anyway, so the restored cache holds exactly the numbers a fresh evaluation computes and
greedy outputs are the same with and without it.

Tile budget (`LoadOptions.image_budget`, or per request): the largest max_tiles whose estimated prompt time
fits, from this machine's measured encode and prefill rates (`r1v.runtime.backends.llamacpp.tile_budget`).

Sampling: llama.cpp's sampler chain - penalties, top-k, top-p, min-p, temperature, seeded distribution, or
greedy at temperature 0 - run by llama.cpp on the logits of the last position (`llama_sampler_sample`).

Files and sizes: both GGUF files are read and checked before llama.cpp sees them (`gguf_header.read_gguf_header`:
not GGUF, truncated), and a projector whose provenance (`r1v.source.*`) names another checkpoint than the
model's is refused (`check_same_source`) unless `allow_mismatched_mmproj`. The context window is the n_ctx
asked for (llama.cpp pads its KV cache to 256 cells but caps each llama_decode batch at the asked n_ctx and
aborts on a larger one), and prompts go to llama_decode in batches of llama.cpp's own n_batch.

No `llama_cpp.Llama`: it allocates n_batch x n_vocab floats for logits nobody reads here (~0.3 GB for
R1V's 152k vocabulary) and evaluates through a slower Python path.
"""
from __future__ import annotations

import ctypes
import dataclasses
import hashlib
import os
import threading
import time
import warnings
from collections import OrderedDict
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
from gguf import Keys

from llama_cpp import llama_cpp as _ll

from ...options import ContextOverflowError, LoadOptions, MismatchedProjectorError, NoProjectorError, SamplingParams
from ...image import TilingConfig, choose_grid, load_image, tile_image
from .llama_batch import DecodeError, LlamaBatch, decode
from .mtmd import MtmdContext, MtmdError, TextModel, rgb_array
from ..prompt import ImageSlot, Prompt, Run, RunStats, TextPiece, interleave, tokenize_pieces, wrap_text_pieces
from .gguf_header import GGUFHeader, read_gguf_header
from .prefix_cache import (DEFAULT_MAX_BYTES, PrefixCacheWarning, PrefixHasher, PrefixStore, default_cache_dir,
                            file_identity)
from .tile_budget import RATES_FILE, CostModel, Rates, RateStore, TileChoice, measure_rates, pick_tiles

__all__ = ["LlamaCppBackend", "check_same_source"]

IMG_START, IMG_END = "<img>", "</img>"


# Provenance keys the converter writes into both files of a model (`converters.gguf_common.add_provenance`)
# that tell which checkpoint they come from: the config's hash, and the checkpoint's directory name.
SOURCE_KEYS = ("r1v.source.config_sha256", "r1v.source.checkpoint")


def _source_value(header: GGUFHeader, key: str) -> str | None:
    value = header.get(key)
    if not isinstance(value, str) or not value:
        return None
    if key == "r1v.source.checkpoint":  # older files store the converting machine's path: compare its name
        value = value.replace("\\", "/").rstrip("/").rsplit("/", 1)[-1]
    return value


def check_same_source(model: GGUFHeader, mmproj: GGUFHeader) -> None:
    """Refuse a projector converted from another checkpoint than the LLM: the same shapes run, but give
    garbage. Only keys both files carry are compared (stock-converted or older files have none: no check)."""
    for key in SOURCE_KEYS:
        ours, theirs = _source_value(model, key), _source_value(mmproj, key)
        if ours is not None and theirs is not None and ours != theirs:
            raise MismatchedProjectorError(
                f"{mmproj.path} does not belong to {model.path}: they come from different checkpoints ({key} is "
                f"{theirs!r} in the projector, {ours!r} in the model). Give the projector converted with this model "
                f"(mmproj=PATH, --mmproj PATH), or load with allow_mismatched_mmproj=True "
                f"(--allow-mismatched-mmproj) if you are sure they go together")


def _available_cpus() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not on Linux
        return max(1, os.cpu_count() or 1)


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
        self._prefix: PrefixStore | None = None
        self._writers: list[threading.Thread] = []
        self._rates: Rates | None = None
        self._img_tokens: list[int] = []  # ids of <img> and </img>, read with the vision projector
        # Whole GGUF files, checked before llama.cpp and libmtmd see them (they abort or say "invalid magic").
        self._header = read_gguf_header(self.path, "model")
        self._mmproj_header = read_gguf_header(self.mmproj_path, "vision projector") if self.mmproj_path else None
        if self._mmproj_header is not None and not options.allow_mismatched_mmproj:
            check_same_source(self._header, self._mmproj_header)
        # MtmdError if llama.cpp cannot load it
        self._text = TextModel(self.path, n_gpu_layers=options.n_gpu_layers, extra_buffers=options.extra_buffers,
                               verbose=options.verbose)
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
        # llama.cpp pads the KV cache (64 asked -> 256 cells) but caps its batch at the n_ctx asked for, and
        # aborts on a larger batch: the window is what was asked, the batch what llama.cpp took.
        self.n_ctx = min(options.n_ctx, int(_ll.llama_n_ctx(ctx)))
        self.n_batch = min(self.n_batch, int(_ll.llama_n_batch(ctx)))
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
        if options.tiling == "llamacpp" and (options.max_tiles is not None or options.image_budget is not None):
            raise ValueError("max_tiles and image_budget apply to tiling='internvl'; libmtmd decides its own tiles")
        if self.mmproj_path is not None:
            self._open_vision(options)
            if options.prefix_cache:
                self._open_prefix_cache(options)
            if options.image_budget is not None:
                self.rates()  # measured now (once per machine and model) rather than in the first request

    def _open_vision(self, options: LoadOptions) -> None:
        kv = self._mmproj_header.get
        projector = kv(Keys.Clip.PROJECTOR_TYPE)
        if options.tiling == "internvl" and projector != "internvl":
            raise ValueError(f"{self.mmproj_path}: projector type {projector!r}, not 'internvl': InternVL tiling "
                             "does not apply; load with tiling='llamacpp' to let libmtmd prepare images")
        size = int(kv(Keys.ClipVision.IMAGE_SIZE, 448))
        min_tiles = int(kv(Keys.ClipVision.PREPROC_MIN_TILES, 1))
        max_tiles = options.max_tiles or int(kv(Keys.ClipVision.PREPROC_MAX_TILES, 12))
        self.tiling = TilingConfig(image_size=size, min_tiles=min(min_tiles, max_tiles), max_tiles=max_tiles)
        self._mtmd = MtmdContext(self.mmproj_path, self._text, n_threads=self.n_threads_batch)
        if self._mtmd.n_embd != self.n_embd:
            raise ValueError(f"{self.mmproj_path}: the projector's output width {self._mtmd.n_embd} does not match "
                             f"the LLM's embedding width {self.n_embd} ({self.path.name}): not the same model")
        self.tokens_per_tile = self._mtmd.layout_for_size(size, size).tokens_per_tile[0]
        self._img_tokens.clear()
        for tag in (IMG_START, IMG_END):
            ids = self.tokenize(tag)
            if len(ids) != 1:
                raise ValueError(f"{self.path}: the vocabulary has no {tag} token; this is not an InternVL-chat / "
                                 "R1V language model")
            self._img_tokens.append(ids[0])
        self._embd_batch = LlamaBatch(self.n_batch, self.n_embd)
        model = self._text.model
        n_params, n_vocab = float(_ll.llama_model_n_params(model)), self.n_vocab
        self.cost_model = CostModel(
            tokens_per_tile=self.tokens_per_tile,
            linear_flops_per_position=2 * max(n_params - 2 * n_vocab * self.n_embd, n_params / 2),
            attention_flops_per_pair=4.0 * int(_ll.llama_model_n_embd(model)) * int(_ll.llama_model_n_layer(model)))

    # --- prefix cache and tile budget ------------------------------------------------------------------
    def _cache_dir(self) -> Path:
        return Path(self.options.prefix_cache_dir) if self.options.prefix_cache_dir else default_cache_dir()

    def _open_prefix_cache(self, options: LoadOptions) -> None:
        max_bytes = DEFAULT_MAX_BYTES if options.prefix_cache_max_bytes is None else options.prefix_cache_max_bytes
        self._prefix = PrefixStore(self._cache_dir(), max_bytes=max_bytes)
        import llama_cpp

        self._prefix_context = {  # everything besides the prompt that the saved numbers depend on
            "model": file_identity(self.path), "mmproj": file_identity(self.mmproj_path),
            "llama_cpp": llama_cpp.__version__, "n_batch": self.n_batch,
            "n_ubatch": int(_ll.llama_n_ubatch(self._ctx)),
            "flash_attn": options.flash_attn, "tiling": options.tiling,
        }

    def _prefix_points(self, segments: list[list[int] | ImageSlot]) -> list[tuple[int, str]]:
        hasher, pos, points = PrefixHasher(self._prefix_context), 0, []
        for segment in segments:
            if isinstance(segment, ImageSlot):
                hasher.image(segment.key)
                pos += segment.n_positions
                points.append((pos, hasher.key()))
            else:
                hasher.tokens(segment)
                pos += len(segment)
        return points

    def _restore_prefix(self, prompt: Prompt, keep: int) -> int:
        """Restore the longest saved prefix of `prompt` longer than `keep`; the positions now in the cache."""
        for end, key in reversed(prompt.prefix_points):
            if end <= keep:
                break
            payload = self._prefix.get(key)
            if payload is None:
                continue
            _ll.llama_memory_seq_rm(self._memory, 0, -1, -1)
            self._kv.clear()
            if isinstance(payload, bytearray):  # saved by this process: no copy either way
                data = (ctypes.c_uint8 * len(payload)).from_buffer(payload)
            else:
                data = ctypes.cast(ctypes.c_char_p(payload), ctypes.POINTER(ctypes.c_uint8))
            read = _ll.llama_state_seq_set_data(self._ctx, data, len(payload), 0)
            del data
            if read == len(payload) and _ll.llama_memory_seq_pos_max(self._memory, 0) == end - 1:
                self._kv = list(prompt.items[:end])
                return end
            warnings.warn(f"prefix cache: llama.cpp could not restore entry {key[:16]}... ({read} of "
                          f"{len(payload)} bytes read); it will be recomputed", PrefixCacheWarning, stacklevel=2)
            self._prefix.discard(key)
            _ll.llama_memory_clear(self._memory, True)
            keep = 0
        return keep

    def _save_prefix(self, prompt: Prompt, end: int, key: str) -> None:
        """Keep the state of positions 0 .. end-1 (all the cache holds now) and write it to disk in the
        background."""
        size = int(_ll.llama_state_seq_get_size(self._ctx, 0))
        payload = bytearray(size)
        view = (ctypes.c_uint8 * size).from_buffer(payload)
        written = int(_ll.llama_state_seq_get_data(self._ctx, view, size, 0))
        del view
        if written <= 0:
            return
        if written < size:
            del payload[written:]
        self._prefix.remember(key, payload)
        meta = {"model": self.path.name, "mmproj": self.mmproj_path.name, "positions": end,
                "images": sum(1 for p, _ in prompt.prefix_points if p <= end)}
        self._writers = [t for t in self._writers if t.is_alive()]
        writer = threading.Thread(target=self._write_entry, args=(key, payload, meta), name="r1v-prefix-cache")
        writer.start()
        self._writers.append(writer)

    def _write_entry(self, key: str, payload: bytes | bytearray, meta: dict[str, Any]) -> None:
        try:
            self._prefix.write(key, payload, meta)
        except OSError as e:
            warnings.warn(f"prefix cache: could not write an entry to {self._prefix.directory} ({e})",
                          PrefixCacheWarning, stacklevel=1)

    def wait_for_writes(self) -> None:
        """Block until prefix cache entries being written in the background are on disk."""
        for writer in self._writers:
            writer.join()
        self._writers.clear()

    def _rate_signature(self) -> str:
        return "|".join([file_identity(self.path), file_identity(self.mmproj_path), f"threads={self.n_threads_batch}",
                         f"batch={self.n_batch}", f"flash_attn={self.options.flash_attn}"])

    def rates(self) -> Rates:
        """This machine's encode and prefill rates for this model: stored beside the prefix cache, measured
        (one tile encoded, its positions prefilled: a few seconds for R1V-size models is minutes) when absent.
        Measuring empties the KV cache."""
        if self._rates is None:
            store = RateStore(self._cache_dir() / RATES_FILE)
            signature = self._rate_signature()
            rates = store.get(signature)
            if rates is None:
                rates = self._measure_rates()
                try:
                    store.put(signature, rates)
                except OSError as e:
                    warnings.warn(f"tile budget: could not store the measured rates in {store.path} ({e})",
                                  PrefixCacheWarning, stacklevel=2)
            self._rates = rates
        return self._rates

    def _measure_rates(self) -> Rates:
        size = self.tiling.image_size
        yy, xx = np.mgrid[0:size, 0:size]
        pattern = np.stack([np.sin(xx / 37.0), np.cos(yy / 23.0), np.sin((xx + yy) / 61.0)], -1) * 0.4 + 0.5
        from PIL import Image

        tile = Image.fromarray((pattern * 255).astype(np.uint8))
        out: list[np.ndarray] = []
        self.reset()

        def prefill() -> tuple[int, int]:
            embeddings = out[0]
            for begin in range(0, len(embeddings), self.n_batch):
                end = min(begin + self.n_batch, len(embeddings))
                self._embd_batch.set_embeddings(embeddings[begin:end], begin, end == len(embeddings))
                decode(self._ctx, self._embd_batch)
            return 0, len(embeddings)

        try:
            self._embd_batch.set_embeddings(np.zeros((8, self.n_embd), np.float32), 0, True)
            decode(self._ctx, self._embd_batch)  # pages the weights in (they are memory-mapped)
            _ll.llama_memory_clear(self._memory, True)
            return measure_rates(lambda: out.append(self._encode_tile(tile)), prefill, self.cost_model)
        finally:
            _ll.llama_memory_clear(self._memory, True)

    def _request_tiling(self, sizes: list[tuple[int, int]], text_tokens: int, max_tiles: int | None,
                        image_budget: float | None) -> tuple[TilingConfig | None, TileChoice | None]:
        if not sizes:
            return None, None
        cfg = self.tiling
        budget = image_budget if image_budget is not None else self.options.image_budget
        if self.options.tiling != "internvl":
            if max_tiles is not None or image_budget is not None:
                raise ValueError("max_tiles and image_budget apply to tiling='internvl'; libmtmd decides its own "
                                 "tiles")
            return cfg, None
        if max_tiles is not None:
            if max_tiles < 1:
                raise ValueError(f"max_tiles must be >= 1, got {max_tiles}")
            cfg = dataclasses.replace(cfg, max_tiles=max_tiles, min_tiles=min(cfg.min_tiles, max_tiles))
        if budget is None:
            return cfg, None
        choice = pick_tiles(sizes, budget, self.rates(), self.cost_model, cfg, text_tokens)
        return dataclasses.replace(cfg, max_tiles=choice.max_tiles, min_tiles=min(cfg.min_tiles, choice.max_tiles)), \
            choice

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
    def prepare(self, pieces: Sequence[TextPiece], images: Sequence[Any], *, max_tiles: int | None = None,
                image_budget: float | None = None) -> Prompt:
        """Tokenize the text pieces (`tokenize_pieces`), load the images and lay them out (tile counts,
        positions); no model work yet (except measuring this machine's rates once, for a first image budget).
        `max_tiles` and `image_budget` (seconds) override the load options for this prompt."""
        self._live()
        if len(pieces) != len(images) + 1:
            raise ValueError(f"{len(pieces)} text pieces for {len(images)} images")
        if images and self._mtmd is None:
            raise NoProjectorError(
                f"{len(images)} image(s) given, but {self.path.name} was loaded without a vision projector: no "
                f"mmproj file was found beside it in {self.path.parent}. Put the matching mmproj-*.gguf there or "
                f"pass mmproj=PATH to load() (--mmproj PATH on the command line).")
        loaded = [load_image(source, self.tiling) for source in images]  # ImageError naming the source
        texts = wrap_text_pieces(tokenize_pieces(self.tokenize, pieces), len(loaded),
                                 self._bos if self._add_bos else None, self._img_tokens)
        tiling, choice = self._request_tiling([im.size for im in loaded], sum(map(len, texts)), max_tiles,
                                              image_budget)
        slots = [self._slot(image, tiling) for image in loaded]
        segments, items = interleave(texts, slots)
        points = self._prefix_points(segments) if self._prefix is not None and slots else []
        return Prompt(segments, items, sum(s.n_positions for s in slots), points, choice)

    def _slot(self, image: Any, tiling: TilingConfig) -> ImageSlot:
        width, height = image.size
        digest = hashlib.blake2b(image.tobytes(), digest_size=16)
        digest.update(f"{width}x{height}".encode())
        mode = self.options.tiling
        if mode == "internvl":
            grid = choose_grid(width, height, tiling)
            tiles = grid[0] * grid[1]
            tiles += int(tiling.use_thumbnail and tiles != 1)
            key = (digest.hexdigest(), mode, grid, tiling.use_thumbnail)  # the tiles follow from the grid
            return ImageSlot(key, image, grid, tiles, tiles * self.tokens_per_tile, tiling)
        layout = self._mtmd.layout_for_size(width, height)
        return ImageSlot((digest.hexdigest(), mode), image, layout.grid, layout.n_tiles, layout.n_tokens)

    def _embeddings(self, slot: ImageSlot) -> np.ndarray:
        """[n_positions, n_embd] float32 projector output of one image (cached by pixels and tiling)."""
        cached = self._image_cache.get(slot.key)
        if cached is not None:
            self._image_cache.move_to_end(slot.key)
            return cached
        assert self._mtmd is not None
        if self.options.tiling == "internvl":
            embeddings = np.concatenate([self._encode_tile(t) for t in tile_image(slot.image, slot.tiling)])
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
    def start(self, prompt: Prompt, params: SamplingParams) -> Run:
        """Check that the prompt fits; the returned run evaluates and samples as it is iterated."""
        self._live()
        n = prompt.n_positions
        if n >= self.n_ctx:
            images = f", {prompt.image_positions} of them for images" if prompt.image_positions else ""
            raise ContextOverflowError(
                f"the prompt is {n} tokens{images}, but the context window is {self.n_ctx} tokens (n_ctx), "
                f"which leaves no room for an answer; load with a larger n_ctx, shorten the conversation, or "
                f"use fewer or smaller images (max_tiles)", prompt_tokens=n, n_ctx=self.n_ctx)
        return Run(self, prompt, params, min(params.max_tokens, self.n_ctx - n))

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
        if prompt.prefix_points and self._prefix is not None:
            restored = self._restore_prefix(prompt, keep)
            if restored != keep:
                stats.cached_tokens = min(keep, restored)
                stats.restored_tokens = restored - stats.cached_tokens
                keep = restored

        embeddings: dict[int, np.ndarray] = {}
        pos = 0
        for i, segment in enumerate(prompt.segments):
            n = segment.n_positions if isinstance(segment, ImageSlot) else len(segment)
            if isinstance(segment, ImageSlot) and pos + n > keep:
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
        save = prompt.prefix_points[-1] if prompt.prefix_points and prompt.prefix_points[-1][0] > keep else None
        pos = 0
        for i, segment in enumerate(prompt.segments):
            image = isinstance(segment, ImageSlot)
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
            if save is not None and pos == save[0] and len(self._kv) == pos:
                self._save_prefix(prompt, *save)  # the last image's end: a batch boundary in every evaluation

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
        embeddings = {i: self._embeddings(s) for i, s in enumerate(prompt.segments) if isinstance(s, ImageSlot)}
        self._evaluate(prompt, embeddings, 0)
        rows = [self._logits_row(-1)]
        rest = tokens[:-1]
        for begin in range(0, len(rest), self.n_batch):
            chunk = rest[begin:begin + self.n_batch]
            self._batch.set_tokens(chunk, len(self._kv), logits_all=True)
            self._decode(self._batch, chunk)
            rows.extend(self._logits_row(j) for j in range(len(chunk)))
        logits = np.stack(rows).astype(np.float64)
        logits -= logits.max(axis=-1, keepdims=True)
        return (logits - np.log(np.exp(logits).sum(axis=-1, keepdims=True))).astype(np.float32)

    def _logits_row(self, i: int) -> np.ndarray:
        pointer = _ll.llama_get_logits_ith(self._ctx, i)
        return np.ctypeslib.as_array(pointer, shape=(self.n_vocab,)).copy()

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
        for writer in getattr(self, "_writers", ()):
            writer.join()
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
