"""The AWQ backend: an AutoAWQ GEMM checkpoint run by the torch reference model with quantized linears.

The same `base.Backend` surface as the llama.cpp backend, so `r1v.load(awq_dir)` gives the same
`Model.generate` / `Model.stream`.

- Weights: `loader.load_awq` (placement from `placement` / `device_memory` / the GPU's size; see there).
  Kernels (`kernel=` option): "auto" is torch's own int4 kernels where the torch build has them ("int4": CPU,
  NVIDIA GPUs of sm80+; weights repacked at load, see `int4`), else Triton on CUDA, else the pure-torch dequantize
  path; "triton", "torch", or "dense" for the model dequantized once to plain fp linears.
- KV cache: static, preallocated for `n_ctx` positions at load (`model.KVCache`), one row per sequence
  (`parallel` of them). A step runs the first rows of the cache (a bucket), so the sequences it advances are
  moved into the bucket's rows where they are not (`_rows_for`: two rows' positions swapped, only when the set of
  decoding sequences changed): M is the number of sequences stepped, whichever they are. The backend remembers
  what sits at each position (token ids; image embeddings as (image key, index)); a new prompt keeps the longest
  common prefix and evaluates the rest, as the llama.cpp backend does.
- Decode: one token per sequence with fixed shapes (`model.decode.StaticDecoder`); with several sequences one
  forward advances all of them (`_step_batch`: every linear at M = rows, the weights read once), in batch-size
  buckets 1, 2, 4, ... up to `parallel` (up to 8 rows every bucket runs the decode kernels: Triton's GEMV,
  `kernels.GEMV_MAX_M`; tinygemm up to `int4.CUDA_MAX_M`, 16). On a GPU as CUDA graphs (one per bucket and
  attention span) captured at load together with a warm-up of the prompt and vision kernels, so neither the first
  request nor a new sequence length meets first-time costs (R1V_CUDA_GRAPHS=0: eager steps).
- Prefill: chunks of at most `n_batch` positions, text and image positions alike (so a 12-tile image, 3,328
  positions, needs the activations of one chunk, not of the whole prompt); logits only for the last position.
  Images: InternVL tiling (`runtime.image`), the vision tower run `VISION_TILES` tiles at a time, embeddings kept
  for a few images (LRU).
- Sampling: `sampling.Sampler`, the llama.cpp chain's meaning; temperature 0 is greedy.
- `logprobs(prompt, tokens)`: teacher-forced log-probabilities, as the llama.cpp backend gives them (`r1v eval`).

The request loop (prefix reuse, image embeddings and their cache, timings, stop and overflow checks, scoring) is
`base.BaseBackend`'s; this class is the torch engine under it.

Not here (llama.cpp backend only): the on-disk prefix cache (`prefix_cache` options are ignored), the
`image_budget` tile choice, and libmtmd's own tiling.
"""
from __future__ import annotations

import os
from typing import Any, Sequence

import numpy as np
import torch

from r1v.converters.checkpoint import open_checkpoint

from ...options import LoadOptions, SamplingParams
from ...image import TilingConfig, normalize, tile_image
from ...model import KVCache, extract_feature
from ...model.decode import StaticDecoder
from ..base import BaseBackend, SequenceState
from ..prompt import ImageSlot, Prompt, Span
from . import int4, kernels
from .loader import KERNELS, LoadedAWQ, load_awq, weight_bytes
from .sampling import Sampler
from .tokenizer import AWQTokenizer

__all__ = ["AWQBackend", "choose_kernel"]

IMAGE_BUDGET = "image_budget is an option of the llama.cpp backend; with an AWQ model give max_tiles"

VISION_TILES = 4  # tiles per vision-tower call
# Tokens that end a generation besides the configured EOS ids (llama.cpp's end-of-generation set does the same).
END_TOKENS = ("<|im_end|>", "<|endoftext|>", "<｜end▁of▁sentence｜>")


def choose_kernel(kernel: str | None, device: torch.device) -> str:
    """"auto" (or None): torch's int4 kernels where this torch build has them for the device (CPU; NVIDIA GPUs of
    sm80+), else Triton on CUDA when triton is installed, else the torch path."""
    kernel = (kernel or "auto").lower()
    if kernel == "auto":
        if int4.available(device):
            return "int4"
        return "triton" if device.type == "cuda" and kernels.triton_available() else "torch"
    if kernel not in KERNELS:
        raise ValueError(f"kernel must be 'auto', {', '.join(map(repr, KERNELS))}, got {kernel!r}")
    if kernel == "int4" and not int4.available(device):
        raise ValueError(f"kernel='int4' cannot run here: {int4.unsupported(128, 128, 128, device)}")
    if kernel == "triton" and not kernels.triton_usable_on(device):
        why = "triton is not installed" if not kernels.triton_available() else f"the device is {device.type}"
        raise ValueError(f"kernel='triton' cannot run here ({why}): the Triton kernels need CUDA, or "
                         "TRITON_INTERPRET=1 set before triton is imported (slow; for tests)")
    return kernel


class AWQBackend(BaseBackend):
    across_segments = True  # prefill chunks of n_batch positions, text and image positions alike
    multi_sequence = True  # one KV cache row per sequence; `_step_batch` steps them in one forward

    def __init__(self, path: str | os.PathLike[str], options: LoadOptions):
        super().__init__(path, None, options)  # no mmproj: the vision tower is inside the checkpoint
        if options.tiling != "internvl":
            raise ValueError("the AWQ backend tiles images as InternVL does; tiling='llamacpp' is for GGUF models")
        if options.image_budget is not None:
            raise ValueError(IMAGE_BUDGET)
        device = torch.device(options.device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.kernel = choose_kernel(options.kernel, device)
        if options.n_threads and device.type == "cpu":
            torch.set_num_threads(options.n_threads)
        with open_checkpoint(self.path, check_shapes=False) as ckpt:
            cfg = ckpt.config
            self.tokenizer = AWQTokenizer(ckpt.tokenizer, self.path)
            self.chat_template = ckpt.tokenizer.chat_template
            tc = ckpt.tokenizer.tokenizer_config
            self.special_texts = {"bos_token": _token_text(tc.get("bos_token")),
                                  "eos_token": _token_text(tc.get("eos_token"))}
            self._bos = ckpt.generation_config.get("bos_token_id", cfg.llm.bos_token_id)
            self._add_bos = bool(tc.get("add_bos_token", False)) and self._bos is not None
            ends = set(ckpt.eos_token_ids)
            ends.update(i for t in END_TOKENS if (i := ckpt.tokenizer.token_id(t)) is not None)
            self._end_ids = frozenset(ends)
        if options.n_ctx > cfg.llm.max_position_embeddings:
            raise ValueError(f"n_ctx {options.n_ctx} exceeds the model's max_position_embeddings "
                             f"{cfg.llm.max_position_embeddings}")
        self.config = cfg
        self.loaded: LoadedAWQ = load_awq(  # the placement plans for the KV cache of every sequence
            self.path, device=device, kernel=self.kernel, placement=options.placement,
            device_memory=options.device_memory, n_ctx=options.n_ctx * self.max_sequences)
        self.model = self.loaded.model
        self.device, self.dtype = self.loaded.device, self.loaded.dtype
        self.n_ctx = options.n_ctx
        self.n_batch = options.n_batch
        self.n_vocab = cfg.llm.vocab_size
        self.cache: KVCache | None = KVCache.allocate(cfg.llm, self.n_ctx, self.max_sequences, dtype=self.dtype,
                                                      device=self.device)
        max_tiles = options.max_tiles or cfg.max_dynamic_patch
        self.tiling = TilingConfig(image_size=cfg.image_size, min_tiles=min(cfg.min_dynamic_patch, max_tiles),
                                   max_tiles=max_tiles, use_thumbnail=cfg.use_thumbnail)
        self.tokens_per_tile = cfg.tokens_per_tile
        self._read_image_tags()
        graphs = os.environ.get("R1V_CUDA_GRAPHS", "1") not in ("0", "", "false", "no")
        self.decoder = StaticDecoder(self.model.language_model, self.cache, graphs=graphs)
        self._row = list(range(self.max_sequences))  # the cache row of each sequence (by seq_id), and back
        self._sequence_in = list(range(self.max_sequences))
        if self.device.type == "cuda":
            self._warm_up()

    # --- facts ----------------------------------------------------------------------------------------
    @property
    def has_vision(self) -> bool:
        return True

    @property
    def placement(self) -> str:
        return self.loaded.placement.key

    def describe(self) -> dict[str, Any]:
        """How the model was loaded: device, dtype, kernel, placement, bytes per part."""
        m = self.model
        llm = m.language_model
        return {
            "device": str(self.device), "dtype": str(self.dtype).removeprefix("torch."), "kernel": self.kernel,
            "placement": self.loaded.placement.key, "placement_source": self.loaded.placement.source,
            "requested_placement": self.loaded.requested.key, "group_size": self.loaded.group_size,
            "n_ctx": self.n_ctx, "n_batch": self.n_batch, "parallel": self.max_sequences,
            "decode": self.decoder.describe(),
            "int4_fallbacks": self.loaded.fallbacks, "fallback_kernel": self.loaded.fallback_kernel,
            "bytes": {"llm_layers": weight_bytes(llm.model.layers), "embeddings": weight_bytes(llm.model.embed_tokens),
                      "lm_head": weight_bytes(llm.lm_head), "vision": weight_bytes(m.vision_model),
                      "projector": weight_bytes(m.mlp1),
                      "kv_cache": 2 * sum(k.numel() * k.element_size() for k in self.cache.keys) if self.cache else 0},
        }

    def decode_weight_bytes(self) -> int:
        """Bytes of weights one decode step reads: the decoder layers, the final norm and the head (one row of
        the embedding table is negligible)."""
        llm = self.model.language_model
        return weight_bytes(llm.model.layers) + weight_bytes(llm.model.norm) + weight_bytes(llm.lm_head)

    # --- vocabulary -----------------------------------------------------------------------------------
    def tokenize(self, text: str, *, special: bool = True) -> list[int]:
        self._live()
        return self.tokenizer.tokenize(text, special=special)

    def piece(self, token: int) -> bytes:
        return self.tokenizer.piece(token)

    def detokenize(self, tokens: Sequence[int]) -> str:
        return self.tokenizer.detokenize(tokens)

    # --- the engine under the request loop ----------------------------------------------------------
    def _check_request(self, images: Sequence[Any], max_tiles: int | None, image_budget: float | None) -> None:
        if image_budget is not None:
            raise ValueError(IMAGE_BUDGET)
        super()._check_request(images, max_tiles, image_budget)

    @torch.inference_mode()
    def _encode_image(self, slot: ImageSlot) -> torch.Tensor:
        """[n_positions, hidden] image embeddings in the compute dtype, on the device."""
        pixels = torch.from_numpy(normalize(tile_image(slot.image, slot.tiling)))
        cfg, m = self.config, self.model
        parts = [extract_feature(m.vision_model, m.mlp1, pixels[i:i + VISION_TILES].to(self.device, self.dtype),
                                 cfg.downsample_ratio, cfg.ps_version) for i in range(0, len(pixels), VISION_TILES)]
        return torch.cat(parts).reshape(-1, parts[0].shape[-1])

    def _sampler(self, params: SamplingParams, prompt: Prompt) -> _AcceptingSampler:
        sampler = _AcceptingSampler(params, self.n_ctx)
        for token in (t for t in prompt.items if isinstance(t, int)):  # the penalty window starts in the prompt
            sampler.accept(token)
        return sampler

    def _is_end(self, token: int) -> bool:
        return token in self._end_ids

    def _embed_tokens(self, ids: Sequence[int]) -> torch.Tensor:
        table = self.model.language_model.model.embed_tokens
        index = torch.tensor(list(ids), dtype=torch.long, device=table.weight.device)
        return table(index).to(self.device, self.dtype, non_blocking=True)

    @torch.inference_mode()
    def _forward(self, sequence: SequenceState, embeds: torch.Tensor, items: Sequence[Any],
                 logits: bool | str) -> torch.Tensor | None:
        """Run [T, hidden] embeddings at the end of the sequence's cache row; the logits [vocab] of the last one
        when `logits`, of every one ([T, vocab]) when it is "all"."""
        llm = self.model.language_model
        hidden = llm.model(embeds[None], self.decoder.rows[self._row[sequence.seq_id]])
        sequence.positions.extend(items)
        if not logits:
            return None
        return llm.lm_head(hidden[0] if logits == "all" else hidden[0, -1]).float()

    def _evaluate_span(self, sequence: SequenceState, prompt: Prompt, span: Span,
                       embeddings: dict[int, torch.Tensor]) -> torch.Tensor | None:
        """One chunk of the prompt (it may span text and images) in one forward."""
        parts = [embeddings[i][a:b] if isinstance(prompt.segments[i], ImageSlot)
                 else self._embed_tokens(prompt.segments[i][a:b]) for i, a, b in span.parts]
        embeds = parts[0] if len(parts) == 1 else torch.cat(parts)
        return self._forward(sequence, embeds, prompt.items[span.start:span.end], span.logits)

    def _step(self, sequence: SequenceState, token: int) -> torch.Tensor:
        """One decode step: fixed shapes (a replayed CUDA graph on the GPU), see `model.decode`."""
        return self._step_batch([(sequence, token)])[0]

    def _step_batch(self, steps: list[tuple[SequenceState, int]]) -> list[torch.Tensor]:
        """One forward advancing every listed sequence (its cache row) by its token."""
        ids = [sequence.seq_id for sequence, _ in steps]
        if len(set(ids)) != len(ids):
            raise ValueError(f"a decode step advances each sequence once; got sequences {ids}")
        rows = self._rows_for(ids)
        embeds = self._embed_tokens([token for _, token in steps])
        logits = self.decoder.step_rows(dict(zip(rows, embeds)))
        for sequence, token in steps:
            sequence.positions.append(token)
        return [logits[row] for row in rows]

    def _rows_for(self, ids: list[int]) -> list[int]:
        """The cache rows of the sequences a step advances, each moved into the step's bucket (the first
        `bucket_for(len(ids))` rows) where it is not, by swapping it with a row of the bucket that does not step."""
        rows = [self._row[i] for i in ids]
        bucket = self.decoder.bucket_for(len(rows))
        spare = (row for row in range(bucket) if row not in rows)
        for k, row in enumerate(rows):
            if row >= bucket:
                target = next(spare)
                self.decoder.swap_rows(row, target)
                moved = self._sequence_in[target]
                self._row[ids[k]], self._row[moved] = target, row
                self._sequence_in[target], self._sequence_in[row] = ids[k], moved
                rows[k] = target
        return rows

    def _score_tokens(self, sequence: SequenceState, tokens: list[int]) -> np.ndarray:
        return self._forward(sequence, self._embed_tokens(tokens), tokens, "all").cpu().numpy()

    def _logits_row(self, logits: torch.Tensor) -> np.ndarray:
        return logits.float().cpu().numpy()

    @torch.inference_mode()
    def _warm_up(self) -> None:
        """Pay the first-time costs at load, not in the first request: a prompt chunk (Triton compilation, cuBLAS
        handles; more rows than the int4 decode kernel takes), one vision tile, then the decode graphs."""
        llm, cfg = self.model.language_model, self.config
        rows = min(32, self.n_ctx)
        hidden = llm.model(torch.zeros(1, rows, cfg.llm.hidden_size, dtype=self.dtype, device=self.device),
                           self.decoder.rows[0])
        llm.lm_head(hidden[0, -1])
        self._truncate(self.sequence, 0)
        pixels = torch.zeros(1, 3, cfg.image_size, cfg.image_size, dtype=self.dtype, device=self.device)
        extract_feature(self.model.vision_model, self.model.mlp1, pixels, cfg.downsample_ratio, cfg.ps_version)
        self.decoder.capture()

    def _truncate_cache(self, sequence: SequenceState, keep: int) -> int:
        """The sequence's cache row is simply overwritten later."""
        self.decoder.rows[self._row[sequence.seq_id]].length = keep
        return keep

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    # --- lifetime -------------------------------------------------------------------------------------
    def _is_open(self) -> bool:
        return self.cache is not None

    def close(self) -> None:
        self.cache = self.decoder = None
        self.model = self.loaded = None
        super().close()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()


class _AcceptingSampler(Sampler):
    """`sampling.Sampler` as a `base.TokenSampler`: each sampled token joins the penalty window."""

    def sample(self, logits: torch.Tensor) -> int:
        token = super().sample(logits)
        self.accept(token)
        return token

    def close(self) -> None:
        pass


def _token_text(token: Any) -> str:
    if isinstance(token, dict):
        token = token.get("content")
    return token if isinstance(token, str) else ""
