"""The options and errors the public API and the backends share: `LoadOptions`, `SamplingParams`, and the
errors a request can raise before anything is decoded. `r1v.runtime.api` re-exports them; the backends import
them from here, so no backend module imports the API that loads it.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

__all__ = ["ContextOverflowError", "LoadOptions", "MismatchedProjectorError", "NoProjectorError", "SamplingParams"]


# --- errors ---------------------------------------------------------------------------------------------

class ContextOverflowError(ValueError):
    """The prompt does not fit in the context window; raised before anything is decoded."""

    def __init__(self, message: str, *, prompt_tokens: int, n_ctx: int):
        super().__init__(message)
        self.prompt_tokens, self.n_ctx = prompt_tokens, n_ctx


class NoProjectorError(ValueError):
    """Images were given to a model loaded without a vision projector (mmproj)."""


class MismatchedProjectorError(ValueError):
    """The vision projector (mmproj) was converted from another checkpoint than the LLM beside it."""


# --- options --------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class LoadOptions:
    """How to find and run a model. ``None`` means: the file's or the backend's own choice.

    quant / mmproj / cache_dir / offline: passed to `resolve_model` (pick a GGUF quant; the projector file
    when not beside the model; the Hugging Face cache; no downloads). allow_mismatched_mmproj: load a
    projector whose provenance (`r1v.source.*`) names another checkpoint than the model's (refused by default:
    `MismatchedProjectorError`).
    n_ctx: context window in tokens (prompt + output, images included: 256 per 448-pixel tile), of each sequence.
    parallel: sequences in one context, that many requests generated at once over one copy of the weights
    (`Model.stream` from up to `parallel` threads; continuous batching, `backends.scheduler`). Each sequence has
    the whole n_ctx window, so the KV cache takes parallel x n_ctx positions (llama-server's -np splits its -c
    among the slots instead). 1: one request at a time, the single-sequence path.
    n_threads: decoding threads (default: half the CPUs available, at least 1); n_threads_batch: prompt
    and image threads (default: all CPUs available). n_batch: tokens per llama_decode call in the prompt.
    max_tiles: most tiles per image (default: the model's, 12 for R1V). tiling: "internvl" cuts images
    exactly as the model was trained (InternVL's dynamic_preprocess); "llamacpp" lets libmtmd tile them its
    own way (a different grid for many sizes; for comparison).
    chat_template: a bundled template name (chatml-think, deepseek-r1-think), a .jinja file or Jinja text,
    instead of the one the model file carries. flash_attn: None = llama.cpp decides.
    seed: default sampling seed for requests that give none. image_cache: how many images' embeddings to
    keep for reuse.
    prefix_cache: keep llama.cpp's state after a prompt's images (in memory and on disk) and restore it when a
    later request, in this process or another, starts with the same prefix; prefix_cache_dir: where
    (default $R1V_PREFIX_CACHE_DIR, else ~/.cache/r1v/prefix-cache); prefix_cache_max_bytes: disk bound,
    least recently used entries evicted (default 2 GiB). image_budget: seconds the prompt may take before the
    first token: images get the largest max_tiles whose estimate fits, from this machine's encode and prefill
    rates (measured once per model, stored beside the prefix cache).
    extra_buffers: GGUF only: llama.cpp's extra weight buffer types (CPU_REPACK, AMX). None: on, except where
    llama.cpp's CPU backend has AMX, whose matrix product crashes on many hosts ($R1V_LLAMA_AMX=1 allows it);
    True: on (AMX included); False: off (llama.cpp's --no-repack). See runtime/backends/llamacpp/llama_params.py.
    n_gpu_layers: GGUF only: layers llama.cpp offloads to the GPU (llama_model_params.n_gpu_layers, llama.cpp's
    -ngl), the output layer counting as one: 0 none (the default), -1 all; needs a llama-cpp-python built with
    CUDA or Metal (a CPU build says once that it has no effect). `r1v plan CKPT -ngl N` shows the split.

    AWQ checkpoints only (`backends.awq`): device ("cuda", "cuda:1", "cpu"; default CUDA when there is one);
    device_memory: the memory budget ("24GB" = 24 GiB, or bytes) from which `r1v plan` picks the placement,
    default the GPU's size; placement: an explicit one instead, e.g. "awq[vision=int4,embed=cpu]";
    kernel: "auto" (torch's int4 kernels where the build has them, else Triton on CUDA, else torch), "int4",
    "triton", "torch", or "dense" (dequantized once to fp linears).
    """

    quant: str | None = None
    mmproj: str | Path | None = None
    allow_mismatched_mmproj: bool = False
    n_ctx: int = 8192
    parallel: int = 1
    n_threads: int | None = None
    n_threads_batch: int | None = None
    n_batch: int = 512
    max_tiles: int | None = None
    tiling: Literal["internvl", "llamacpp"] = "internvl"
    chat_template: str | None = None
    flash_attn: bool | None = None
    cache_dir: str | Path | None = None
    offline: bool | None = None
    verbose: bool = False
    seed: int | None = None
    image_cache: int = 4
    prefix_cache: bool = True
    prefix_cache_dir: str | Path | None = None
    prefix_cache_max_bytes: int | None = None
    image_budget: float | None = None
    extra_buffers: bool | None = None
    n_gpu_layers: int = 0
    device: str | None = None
    device_memory: int | str | None = None
    placement: str | None = None
    kernel: Literal["auto", "int4", "triton", "torch", "dense"] = "auto"

    def __post_init__(self) -> None:
        if self.n_ctx < 16:
            raise ValueError(f"n_ctx must be >= 16, got {self.n_ctx}")
        if self.parallel < 1:
            raise ValueError(f"parallel must be >= 1, got {self.parallel}")
        if self.n_batch < 1:
            raise ValueError(f"n_batch must be >= 1, got {self.n_batch}")
        for name in ("n_threads", "n_threads_batch", "max_tiles"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"{name} must be >= 1, got {value}")
        if self.tiling not in ("internvl", "llamacpp"):
            raise ValueError(f"tiling must be 'internvl' or 'llamacpp', got {self.tiling!r}")
        if self.n_gpu_layers < -1:
            raise ValueError(f"n_gpu_layers must be >= -1 (-1: all layers), got {self.n_gpu_layers}")
        if self.image_cache < 0:
            raise ValueError(f"image_cache must be >= 0, got {self.image_cache}")
        if self.prefix_cache_max_bytes is not None and self.prefix_cache_max_bytes < 0:
            raise ValueError(f"prefix_cache_max_bytes must be >= 0, got {self.prefix_cache_max_bytes}")
        if self.image_budget is not None and not self.image_budget > 0:
            raise ValueError(f"image_budget must be > 0 seconds, got {self.image_budget}")
        if self.kernel not in ("auto", "int4", "triton", "torch", "dense"):
            raise ValueError(f"kernel must be 'auto', 'int4', 'triton', 'torch' or 'dense', got {self.kernel!r}")


@dataclass(frozen=True)
class SamplingParams:
    """Sampling for one request; defaults are the model's (models.yaml), else Skywork's (0.6 / 0.95 / 1.05).

    temperature 0 is greedy decoding (the repetition penalty still applies, as in llama.cpp and vLLM; set
    repetition_penalty=1.0 for plain argmax). top_k 0, top_p 1.0 and min_p 0.0 are off. The repetition
    penalty covers the last `repeat_last_n` tokens of prompt and output (-1: the whole context, as
    transformers and vLLM apply it). max_tokens counts output tokens and is capped by the free context.
    stop: strings that end the output (not included in it). seed None: a random seed (Result.seed says which).
    The same seed, prompt and cache state give the same output; a prompt partly served from the KV cache is
    evaluated in other batch sizes, which moves the last digits of the logits and, on a flat distribution,
    can change a sampled token (greedy decoding is not affected in practice).
    """

    temperature: float = 0.6
    top_p: float = 0.95
    top_k: int = 0
    min_p: float = 0.0
    repetition_penalty: float = 1.05
    repeat_last_n: int = -1
    seed: int | None = None
    max_tokens: int = 64000
    stop: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        stop = self.stop
        if isinstance(stop, str):
            stop = (stop,)
        stop = tuple(stop or ())
        if not all(isinstance(s, str) and s for s in stop):
            raise ValueError(f"stop must be non-empty strings, got {self.stop!r}")
        object.__setattr__(self, "stop", stop)
        checks = [
            (self.temperature >= 0, "temperature must be >= 0"),
            (0 < self.top_p <= 1, "top_p must be in (0, 1]"),
            (self.top_k >= 0, "top_k must be >= 0"),
            (0 <= self.min_p <= 1, "min_p must be in [0, 1]"),
            (self.repetition_penalty > 0, "repetition_penalty must be > 0"),
            (self.repeat_last_n >= -1, "repeat_last_n must be >= -1"),
            (self.max_tokens >= 1, "max_tokens must be >= 1"),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(message)

    def replace(self, **changes: Any) -> SamplingParams:
        known = {f.name for f in dataclasses.fields(self)}
        unknown = sorted(set(changes) - known)
        if unknown:
            raise TypeError(f"unknown sampling parameter(s) {unknown}; known: {sorted(known)}")
        return dataclasses.replace(self, **changes)
