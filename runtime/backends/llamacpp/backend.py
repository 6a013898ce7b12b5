"""The llama.cpp backend: a GGUF LLM + mmproj through llama-cpp-python's low-level bindings and libmtmd.

Prompt: text pieces around images (from the chat template). Each image becomes ``<img>`` + its tiles'
projector embeddings + ``</img>``, fed to the LLM as an embedding batch, as libmtmd itself does. With
``tiling="internvl"`` (default) the image is cut here exactly as the model was trained (InternVL's
``dynamic_preprocess``, `r1v.runtime.image`), and libmtmd only encodes each 448x448 tile (it neither resizes
nor slices an image of that size); with ``tiling="llamacpp"`` libmtmd tiles the image its own way.

KV cache (`base.BaseBackend`): the backend remembers what sits in the cache position by position (token ids;
image embeddings as (`ImageKey`, index)). A new prompt keeps the longest common prefix, removes the rest from
the cache and evaluates only what follows, one llama_decode batch per span of a segment; image embeddings are
encoded only for images that are not in the kept prefix, and kept (a few images, LRU) for later requests.

Prefix cache (`LoadOptions.prefix_cache`; `prefix_state` in the context, `prefix_cache` on disk): after the
last image of a prompt is evaluated, the sequence state up to the end of that image (llama.cpp's
`llama_state_seq_get_data`) is kept in memory and written to disk in the background, keyed by the model files,
the context settings, the tokens and the images (pixels and tiling) before it. A later request - in this
process after other conversations, or in another process - whose prompt starts with the same prefix restores
it (`llama_state_seq_set_data`) instead of encoding and prefilling the images. The prefix ends at an image
segment's end, where prompt evaluation starts a new batch anyway, so the restored cache holds exactly the
numbers a fresh evaluation computes and greedy outputs are the same with and without it.

Tile budget (`LoadOptions.image_budget`, or per request): the largest max_tiles whose estimated prompt time
fits, from this machine's measured encode and prefill rates (`tile_budget`; measured by `tile_rates`).

Sampling (`sampler`): llama.cpp's sampler chain - penalties, top-k, top-p, min-p, temperature, seeded
distribution, or greedy at temperature 0 - run by llama.cpp on the logits of the last position.

Files and sizes: both GGUF files are read and checked before llama.cpp sees them (`gguf_header.read_gguf_header`:
not GGUF, truncated), and a projector whose provenance (`r1v.source.*`) names another checkpoint than the
model's is refused (`provenance.check_same_source`) unless `allow_mismatched_mmproj`. The context window is
the n_ctx asked for (llama.cpp pads its KV cache to 256 cells but caps each llama_decode batch at the asked
n_ctx and aborts on a larger one), and prompts go to llama_decode in batches of llama.cpp's own n_batch.

No `llama_cpp.Llama`: it allocates n_batch x n_vocab floats for logits nobody reads here (~0.3 GB for
R1V's 152k vocabulary) and evaluates through a slower Python path.

Several sequences (`LoadOptions.parallel` N > 1, driven by `scheduler.Scheduler`): one context with
n_seq_max = N and one KV stream per sequence (kv_unified off), each of n_ctx cells, so a sequence's window is
the n_ctx asked for, as at N = 1 (the context holds N x n_ctx). A decode step of several sequences is one
llama_decode of one token per sequence (`LlamaBatch.set_steps`, mixed sequence ids; logits row i for
sequence i); prompt spans, text or image embeddings, go in their own llama_decode of one sequence (llama.cpp
takes no batch that mixes tokens and embeddings). Prefix reuse and the prefix cache are per sequence (a state
saved from any sequence restores into any other; a context of another stream count cannot read it, so the
count is part of the cache key when above 1).

The request loop (prefix reuse, image embeddings, timings, stop and overflow checks, scoring) is
`base.BaseBackend`'s; this class is the llama.cpp engine under it (`vocab`: tokens and pieces).
"""
from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any, Sequence

import numpy as np
from gguf import Keys

from llama_cpp import llama_cpp as _ll

from ...options import LoadOptions, NoProjectorError, SamplingParams
from ...image import TilingConfig, tile_image
from .llama_batch import DecodeError, LlamaBatch, decode
from .mtmd import MtmdContext, MtmdError, TextModel, rgb_array
from ..base import BaseBackend, SequenceState
from ..prompt import ImageKey, ImageSlot, Prompt, RunStats, Span, image_digest  # noqa: F401 - RunStats: tests
from .gguf_header import read_gguf_header
from .prefix_cache import DEFAULT_MAX_BYTES, PrefixStore, default_cache_dir, file_identity
from .prefix_state import PrefixState
from .provenance import check_same_source
from .sampler import ChainSampler
from .tile_budget import RATES_FILE, CostModel, Rates, RateStore, TileChoice, pick_tiles
from .tile_rates import measure_in_context, stored_or_measured
from .vocab import LlamaVocab

__all__ = ["LlamaCppBackend", "check_same_source"]


def _available_cpus() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not on Linux
        return max(1, os.cpu_count() or 1)


class LlamaCppBackend(BaseBackend):
    multi_sequence = True

    def __init__(self, path: str | os.PathLike[str], mmproj: str | os.PathLike[str] | None, options: LoadOptions):
        super().__init__(path, mmproj, options)
        cpus = _available_cpus()
        self.n_threads = options.n_threads or max(1, cpus // 2)
        self.n_threads_batch = options.n_threads_batch or cpus
        self.n_batch = options.n_batch
        self._mtmd: MtmdContext | None = None
        self._ctx = None
        self._batch: LlamaBatch | None = None
        self._embd_batch: LlamaBatch | None = None
        self._prefix: PrefixState | None = None
        self._rates: Rates | None = None
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

    def _new_context(self, sequences: int) -> Any:
        """A llama.cpp context of `sequences` sequences, each with the n_ctx window asked for."""
        options = self.options
        params = _ll.llama_context_default_params()
        params.n_ctx = options.n_ctx * sequences
        params.n_batch = options.n_batch
        params.n_ubatch = min(options.n_batch, 512)
        params.n_seq_max = sequences
        params.kv_unified = False  # one KV stream per sequence: n_ctx cells each
        params.n_threads = self.n_threads
        params.n_threads_batch = self.n_threads_batch
        params.no_perf = True
        if options.flash_attn is not None:
            params.flash_attn_type = (_ll.LLAMA_FLASH_ATTN_TYPE_ENABLED if options.flash_attn
                                      else _ll.LLAMA_FLASH_ATTN_TYPE_DISABLED)
        ctx = _ll.llama_init_from_model(self._text.model, params)
        if not ctx:
            raise RuntimeError(f"{self.path}: llama.cpp could not create a context of {options.n_ctx} tokens "
                               f"x {sequences} sequence(s) (too little memory? try a smaller n_ctx)")
        return ctx

    def _open(self, options: LoadOptions) -> None:
        model = self._text.model
        self.vocab = LlamaVocab(model)
        self.n_vocab = self.vocab.n_tokens
        ctx = self._new_context(self.max_sequences)
        self._ctx = ctx
        self._memory = _ll.llama_get_memory(ctx)
        # llama.cpp pads the KV cache (64 asked -> 256 cells) but caps its batch at the n_ctx asked for, and
        # aborts on a larger batch: the window is what was asked, the batch what llama.cpp took.
        self.n_ctx = min(options.n_ctx, int(_ll.llama_n_ctx_seq(ctx)))
        self.n_batch = min(self.n_batch, int(_ll.llama_n_batch(ctx)))
        self.n_embd = int(_ll.llama_model_n_embd_inp(model))
        self._batch = LlamaBatch(self.n_batch)
        template = _ll.llama_model_chat_template(model, None)
        self.chat_template = template.decode("utf-8") if template else None
        self.special_texts = {"bos_token": self.vocab.token_text(self.vocab.bos),
                              "eos_token": self.vocab.token_text(self.vocab.eos)}
        self._bos, self._add_bos = self.vocab.bos, self.vocab.add_bos
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
        self._read_image_tags()
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
        import llama_cpp

        context = {  # everything besides the prompt that the saved numbers depend on
            "model": file_identity(self.path), "mmproj": file_identity(self.mmproj_path),
            "llama_cpp": llama_cpp.__version__, "n_batch": self.n_batch,
            "n_ubatch": int(_ll.llama_n_ubatch(self._ctx)),
            "flash_attn": options.flash_attn, "tiling": options.tiling,
        }
        if self.max_sequences > 1:  # llama.cpp restores a state only into a context of as many KV streams
            context["kv_streams"] = self.max_sequences
        self._prefix = PrefixState(self._ctx, PrefixStore(self._cache_dir(), max_bytes=max_bytes), context,
                                   {"model": self.path.name, "mmproj": self.mmproj_path.name})

    def _prefix_points(self, segments: list[list[int] | ImageSlot]) -> list[tuple[int, str]]:
        return self._prefix.points(segments) if self._prefix is not None else []

    def _restore(self, sequence: SequenceState, prompt: Prompt, keep: int) -> int:
        if not prompt.prefix_points or self._prefix is None:
            return keep
        restored = self._prefix.restore(sequence.seq_id, prompt, keep)
        if restored != keep:  # the cache now holds exactly this prefix (or nothing, when restoring failed)
            sequence.positions[:] = prompt.items[:restored]
        return restored

    def _evaluated(self, sequence: SequenceState, prompt: Prompt, end: int) -> None:
        """Save the state at the end of the prompt's last image: a batch boundary in every evaluation."""
        points = prompt.prefix_points
        if self._prefix is not None and points and end == points[-1][0] and len(sequence.positions) == end:
            self._prefix.save(sequence.seq_id, prompt, *points[-1])

    def wait_for_writes(self) -> None:
        """Block until prefix cache entries being written in the background are on disk."""
        if self._prefix is not None:
            self._prefix.wait_for_writes()

    def _rate_signature(self) -> str:
        return "|".join([file_identity(self.path), file_identity(self.mmproj_path), f"threads={self.n_threads_batch}",
                         f"batch={self.n_batch}", f"flash_attn={self.options.flash_attn}"])

    def rates(self) -> Rates:
        """This machine's encode and prefill rates for this model: stored beside the prefix cache, measured
        (one tile encoded, its positions prefilled: a few seconds for R1V-size models is minutes) when absent.
        Measuring empties the KV cache (of a model of one sequence)."""
        if self._rates is None:
            self._rates = stored_or_measured(RateStore(self._cache_dir() / RATES_FILE), self._rate_signature(),
                                             self._measure_rates)
        return self._rates

    def _measure_rates(self) -> Rates:
        """Measured in the model's context (emptied), or with several sequences - whose requests may be running -
        in a context of its own."""
        if self.max_sequences == 1:
            self.reset()
            return measure_in_context(self._ctx, self._embd_batch, self.n_batch, self._encode_tile,
                                      self.tiling.image_size, self.cost_model)
        ctx = self._new_context(1)
        try:
            return measure_in_context(ctx, self._embd_batch, self.n_batch, self._encode_tile,
                                      self.tiling.image_size, self.cost_model)
        finally:
            _ll.llama_free(ctx)

    def _check_request(self, images: Sequence[Any], max_tiles: int | None, image_budget: float | None) -> None:
        if images and self._mtmd is None:
            raise NoProjectorError(
                f"{len(images)} image(s) given, but {self.path.name} was loaded without a vision projector: no "
                f"mmproj file was found beside it in {self.path.parent}. Put the matching mmproj-*.gguf there or "
                f"pass mmproj=PATH to load() (--mmproj PATH on the command line).")
        if images and self.options.tiling != "internvl" and (max_tiles is not None or image_budget is not None):
            raise ValueError("max_tiles and image_budget apply to tiling='internvl'; libmtmd decides its own tiles")
        super()._check_request(images, max_tiles, image_budget)

    def _request_tiling(self, sizes: list[tuple[int, int]], text_tokens: int, max_tiles: int | None,
                        image_budget: float | None) -> tuple[TilingConfig | None, TileChoice | None]:
        """The base's, then an image budget (the request's, else the load's): the largest max_tiles whose
        estimated prompt time fits, from this machine's measured rates."""
        cfg, _ = super()._request_tiling(sizes, text_tokens, max_tiles, image_budget)
        budget = image_budget if image_budget is not None else self.options.image_budget
        if cfg is None or budget is None or self.options.tiling != "internvl":
            return cfg, None
        choice = pick_tiles(sizes, budget, self.rates(), self.cost_model, cfg, text_tokens)
        return dataclasses.replace(cfg, max_tiles=choice.max_tiles, min_tiles=min(cfg.min_tiles, choice.max_tiles)), \
            choice

    # --- vocabulary ---------------------------------------------------------------------------------
    def tokenize(self, text: str, *, special: bool = True) -> list[int]:
        self._live()
        return self.vocab.tokenize(text, special=special)

    def piece(self, token: int) -> bytes:
        """The bytes of one token as output text (control tokens such as end markers give b"")."""
        self._live()
        return self.vocab.piece(token)

    def detokenize(self, tokens: Sequence[int]) -> str:
        self._live()
        return self.vocab.detokenize(tokens)

    # --- images -------------------------------------------------------------------------------------
    def _slot(self, image: Any, tiling: TilingConfig) -> ImageSlot:
        if self.options.tiling == "internvl":
            return super()._slot(image, tiling)
        layout = self._mtmd.layout_for_size(image.width, image.height)
        return ImageSlot(ImageKey(image_digest(image), "llamacpp"), image, layout.grid, layout.n_tiles,
                         layout.n_tokens)

    def _encode_image(self, slot: ImageSlot) -> np.ndarray:
        """[n_positions, n_embd] float32 projector output of one image."""
        assert self._mtmd is not None
        if self.options.tiling == "internvl":
            return np.concatenate([self._encode_tile(t) for t in tile_image(slot.image, slot.tiling)])
        return self._mtmd.embed_image(rgb_array(slot.image)).embeddings.reshape(-1, self.n_embd)

    def _encode_tile(self, tile: Any) -> np.ndarray:
        mtmd = self._mtmd
        with mtmd.tokenize(mtmd.marker, [tile]) as tokenized:
            chunks = [c.index for c in tokenized.chunks if c.kind == "image"]
            if len(chunks) != 1:
                raise MtmdError(f"libmtmd cut a {tile.width}x{tile.height} tile into {len(chunks)} pieces; "
                                "expected it to take the tile whole")
            return mtmd.encode_chunk(tokenized, chunks[0])

    # --- the engine under the request loop ----------------------------------------------------------
    def _sampler(self, params: SamplingParams, prompt: Prompt) -> ChainSampler:
        text = [t for t in prompt.items if isinstance(t, int)]
        return ChainSampler(self._ctx, params, self.n_ctx, self.n_vocab, text)

    def _is_end(self, token: int) -> bool:
        return self.vocab.is_end(token)

    def _evaluate_span(self, sequence: SequenceState, prompt: Prompt, span: Span,
                       embeddings: dict[int, np.ndarray]) -> int | None:
        """llama_decode one batch (a span never crosses segments here); logits: batch row -1."""
        (i, begin, end), = span.parts
        segment = prompt.segments[i]
        if isinstance(segment, ImageSlot):
            self._embd_batch.set_embeddings(embeddings[i][begin:end], span.start, span.logits, sequence.seq_id)
            self._decode(self._embd_batch, [(sequence, prompt.items[span.start:span.end])])
        else:
            self._batch.set_tokens(segment[begin:end], span.start, span.logits, seq_id=sequence.seq_id)
            self._decode(self._batch, [(sequence, segment[begin:end])])
        return -1 if span.logits else None

    def _step(self, sequence: SequenceState, token: int) -> int:
        self._batch.set_token(token, len(sequence.positions), sequence.seq_id)
        self._decode(self._batch, [(sequence, (token,))])
        return -1

    def _step_batch(self, steps: list[tuple[SequenceState, int]]) -> list[int]:
        """One llama_decode of one token per sequence; logits row i belongs to steps[i]."""
        if len(steps) == 1:
            return [self._step(*steps[0])]
        self._batch.set_steps([t for _, t in steps], [len(s.positions) for s, _ in steps],
                              [s.seq_id for s, _ in steps])
        self._decode(self._batch, [(s, (t,)) for s, t in steps])
        return list(range(len(steps)))

    def _score_tokens(self, sequence: SequenceState, tokens: list[int]) -> np.ndarray:
        self._batch.set_tokens(tokens, len(sequence.positions), logits_all=True, seq_id=sequence.seq_id)
        self._decode(self._batch, [(sequence, tokens)])
        return np.stack([self._logits_row(j) for j in range(len(tokens))])

    def _logits_row(self, i: int) -> np.ndarray:
        pointer = _ll.llama_get_logits_ith(self._ctx, i)
        return np.ctypeslib.as_array(pointer, shape=(self.n_vocab,)).copy()

    def _decode(self, batch: LlamaBatch, added: list[tuple[SequenceState, Sequence[Any]]]) -> None:
        """llama_decode the batch; `added`: what each sequence in it gains."""
        try:
            decode(self._ctx, batch)
        except DecodeError:
            for sequence, _ in added:  # drop whatever part of the batch went in
                self._truncate(sequence, len(sequence.positions))
            raise
        for sequence, items in added:
            sequence.positions.extend(items)

    def _truncate_cache(self, sequence: SequenceState, keep: int) -> int:
        if not _ll.llama_memory_seq_rm(self._memory, sequence.seq_id, keep, -1):  # cannot cut there: all of it
            _ll.llama_memory_seq_rm(self._memory, sequence.seq_id, -1, -1)
            return 0
        return keep

    def _clear_cache(self) -> None:
        _ll.llama_memory_clear(self._memory, True)

    # --- lifetime -----------------------------------------------------------------------------------
    def _is_open(self) -> bool:
        return self._ctx is not None

    def close(self) -> None:
        if self._prefix is not None:
            self._prefix.wait_for_writes()
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
        super().close()
        self._text.close()

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:  # noqa: BLE001 - interpreter shutdown
            pass
