"""The runtime's public face: `load` a model, then `Model.generate` / `Model.stream` over chat messages.

    import r1v
    with r1v.load("Skywork-R1V3-38B-Q4_K_M.gguf") as model:         # mmproj found beside it
        for chunk in model.stream("How many cats?", images=["cats.jpg"]):
            print(chunk.text, end="")                                  # chunk.kind: "reasoning" | "content"
        result = model.generate("How many cats?", images=["cats.jpg"], temperature=0)
        result.content, result.reasoning, result.decode_tokens_per_second

`generate` is a loop over `stream` (one code path): the last chunk of a stream carries the `Result`. Options
for loading are one dataclass (`LoadOptions`), sampling another (`SamplingParams`); both accept keyword
overrides. The backend comes from the resolved format: GGUF runs on llama.cpp (`backends.llamacpp`), AWQ
checkpoints on torch with Triton kernels (`backends.awq`).

Nothing heavy is imported here at module level: llama_cpp loads with the first `load()`.
"""
from __future__ import annotations

import codecs
import dataclasses
import threading
import weakref
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator, Literal, Mapping, NamedTuple, Sequence

from .chat import RenderedPrompt, normalize_messages, render_prompt
from .options import ContextOverflowError, LoadOptions, MismatchedProjectorError, NoProjectorError, SamplingParams
from .reasoning import ReasoningParser, Round, parse_rounds, split_reasoning

if TYPE_CHECKING:
    from .backends.base import Backend
    from .backends.prompt import Run
    from .backends.scheduler import Scheduler
    from .image import TilingConfig
    from .files.resolve import ResolvedModel

__all__ = [
    "ContextOverflowError", "ImageInfo", "LoadOptions", "MismatchedProjectorError", "Model", "NoProjectorError",
    "Result", "SamplingParams", "StreamChunk", "generate", "load",
]

FinishReason = Literal["stop", "length", "stop_string"]
Kind = Literal["reasoning", "content"]


# --- results --------------------------------------------------------------------------------------------

class ImageInfo(NamedTuple):
    """How one image of the prompt was cut: grid (columns, rows) and tiles (the thumbnail included)."""

    grid: tuple[int, int] | None
    tiles: int


@dataclass(frozen=True)
class Result:
    """One finished generation. `text` is the raw output (tags included, stop string and end token not);
    `reasoning` / `content` split it at ``</think>``; `rounds` are R1V4-style blocks.

    Counts: prompt_tokens (positions, image embeddings included), cached_tokens (of those, reused from the
    previous request's KV cache, not evaluated again), restored_tokens (of those, restored from the prefix
    cache, not evaluated either), completion_tokens (sampled, the end token included).
    estimated_prefill_seconds: what the image budget expected the prompt to take (None without a budget).
    Timings: prefill_seconds (from the call to the prompt's logits: image encoding + prompt evaluation;
    image_seconds of it for the vision tower), time_to_first_token, decode_seconds (first to last token);
    prefill_tokens_per_second counts the evaluated (not cached) positions, decode_tokens_per_second the
    tokens after the first.
    """

    text: str
    reasoning: str
    content: str
    rounds: list[Round]
    finish_reason: FinishReason
    tokens: list[int]
    prompt_tokens: int
    cached_tokens: int
    completion_tokens: int
    prefill_seconds: float
    image_seconds: float
    time_to_first_token: float
    decode_seconds: float
    images: list[ImageInfo] = field(default_factory=list)
    seed: int | None = None
    prompt: str = ""
    restored_tokens: int = 0
    estimated_prefill_seconds: float | None = None

    @property
    def prefill_tokens_per_second(self) -> float:
        n = self.prompt_tokens - self.cached_tokens - self.restored_tokens
        return n / self.prefill_seconds if self.prefill_seconds > 0 else 0.0

    @property
    def decode_tokens_per_second(self) -> float:
        n = self.completion_tokens - 1
        return n / self.decode_seconds if n > 0 and self.decode_seconds > 0 else 0.0

    @property
    def message(self) -> dict[str, Any]:
        """The assistant message to append to the conversation: the answer, without the reasoning (as for
        DeepSeek-R1-style models; Skywork's templates drop reasoning from history too)."""
        return {"role": "assistant", "content": self.content}

    def summary(self) -> str:
        """One line of counts and speeds."""
        cached = f", {self.cached_tokens} cached" if self.cached_tokens else ""
        restored = f" | {self.restored_tokens} prompt tokens restored from the prefix cache" \
            if self.restored_tokens else ""
        return (f"prompt {self.prompt_tokens} tokens{cached}: {self.prefill_seconds:.2f} s "
                f"({self.prefill_tokens_per_second:.1f} tok/s) | output {self.completion_tokens} tokens: "
                f"{self.decode_seconds:.2f} s ({self.decode_tokens_per_second:.1f} tok/s) | "
                f"first token {self.time_to_first_token:.2f} s | finish: {self.finish_reason}{restored}")


@dataclass(frozen=True)
class StreamChunk:
    """A piece of streamed output. `text` is reasoning or answer text (``<think>`` tags are not part of it);
    `token_id` is the token whose arrival released it. The last chunk of a stream has empty text, a
    `finish_reason` and the whole `result`."""

    text: str
    kind: Kind
    token_id: int | None = None
    finish_reason: FinishReason | None = None
    result: Result | None = None


# --- text assembly: bytes -> text, stop strings, reasoning split ----------------------------------------

class _TextAssembler:
    """Token pieces (bytes) in, released text out. UTF-8 characters split across tokens are joined; text
    that could be the start of a stop string is held back until it is decided."""

    def __init__(self, stop: Sequence[str], in_reasoning: bool):
        self._decoder = codecs.getincrementaldecoder("utf-8")("replace")
        self._stop = tuple(stop)
        self._pending = ""
        self._released: list[str] = []
        self.parser = ReasoningParser(starts_in_reasoning=in_reasoning)
        self.stopped = False

    @property
    def text(self) -> str:
        return "".join(self._released)

    def _release(self, text: str) -> list[Any]:
        if not text:
            return []
        self._released.append(text)
        return self.parser.feed(text)

    def push(self, data: bytes) -> list[Any]:
        self._pending += self._decoder.decode(data)
        if not self._stop:
            text, self._pending = self._pending, ""
            return self._release(text)
        hits = [i for i in (self._pending.find(s) for s in self._stop) if i >= 0]
        if hits:
            self.stopped = True
            text, self._pending = self._pending[:min(hits)], ""
            return self._release(text)
        hold = 0
        for s in self._stop:  # the longest tail of pending that begins a stop string
            for k in range(min(len(s) - 1, len(self._pending)), hold, -1):
                if s.startswith(self._pending[-k:]):
                    hold = k
                    break
        text = self._pending[:len(self._pending) - hold]
        self._pending = self._pending[len(self._pending) - hold:]
        return self._release(text)

    def finish(self) -> list[Any]:
        deltas = [] if self.stopped else self._release(self._pending + self._decoder.decode(b"", final=True))
        self._pending = ""
        return deltas + self.parser.finish()


# --- the model ------------------------------------------------------------------------------------------

class _Active:
    """The run behind the Model's current stream."""

    def __init__(self, run: Run):
        self.run, self.cancelled = run, False


class Model:
    """A loaded model: `generate` / `stream` over chat messages or a prompt with images.

    Keeps the previous request's sequence in the KV cache, so a follow-up that repeats the conversation
    evaluates only what is new (`Result.cached_tokens`). Loaded with ``parallel=1`` (the default): one request
    at a time, from one thread; a new request ends a stream left unfinished. With ``parallel=N``: up to N
    threads stream at once over one copy of the weights (`backends.scheduler`: one forward per token for all
    of them); a request beyond N waits for a sequence to free up; a new request ends the unfinished stream of
    its own thread only; each takes the sequence whose cached conversation shares the longest prefix with it.
    `close()` (or ``with``) frees the native memory.
    """

    def __init__(self, backend: Backend, resolved: ResolvedModel | None, options: LoadOptions):
        from .chat import resolve_template

        self._backend = backend
        self.resolved = resolved
        self.options = options
        entry = resolved.entry if resolved is not None else None
        self.chat_template = resolve_template(options.chat_template, backend.chat_template,
                                              entry.chat_template if entry is not None else None)
        # The registry entry's sampling (models.yaml `generation`), else SamplingParams' own defaults.
        self.sampling = (entry.generation if entry is not None else SamplingParams()).replace(seed=options.seed)
        self._active: dict[Any, _Active] = {}  # by thread (parallel > 1: the Thread, ids are reused), else under 0
        self._scheduler: Scheduler | None = None
        if getattr(backend, "max_sequences", 1) > 1:
            from .backends.scheduler import Scheduler

            self._scheduler = Scheduler(backend)  # type: ignore[arg-type] - a BaseBackend with sequences
            # The worker thread holds the scheduler and so the backend: a Model dropped without close() stops
            # it, so the native memory goes with the Model, as at parallel=1.
            weakref.finalize(self, self._scheduler.close)

    # --- facts --------------------------------------------------------------------------------------
    @property
    def path(self) -> Path:
        return self._backend.path

    @property
    def mmproj(self) -> Path | None:
        return self._backend.mmproj_path

    @property
    def n_ctx(self) -> int:
        return self._backend.n_ctx

    @property
    def has_vision(self) -> bool:
        # getattr: the scripted stand-ins of the tests give only path, n_ctx, template, prepare, start, close
        return getattr(self._backend, "has_vision", self._backend.mmproj_path is not None)

    @property
    def tiling(self) -> TilingConfig | None:
        """How images are cut into tiles (InternVL's rule and its limits); None without a vision tower."""
        return getattr(self._backend, "tiling", None) if self.has_vision else None

    @property
    def tokens_per_tile(self) -> int | None:
        """Context positions one image tile takes (256 for R1V); None without a vision tower."""
        return getattr(self._backend, "tokens_per_tile", None) if self.has_vision else None

    def __repr__(self) -> str:
        projector = f", mmproj={self.mmproj.name}" if self.mmproj else ""
        return f"Model({self.path.name}{projector}, n_ctx={self.n_ctx})"

    # --- prompts ------------------------------------------------------------------------------------
    def render(self, messages_or_prompt: str | Sequence[Mapping[str, Any]], images: Sequence[Any] | None = None,
               *, add_generation_prompt: bool = True) -> RenderedPrompt:
        """The prompt the model would see (``.text`` shows each image as ``<image>``)."""
        messages = normalize_messages(messages_or_prompt, images)
        return render_prompt(self.chat_template, messages, add_generation_prompt=add_generation_prompt,
                             **self._backend.special_texts)

    def tokenize(self, text: str, *, special: bool = True) -> list[int]:
        """Token ids of `text` (special tokens such as ``<|im_start|>`` parsed when `special`)."""
        return self._backend.tokenize(text, special=special)

    def detokenize(self, tokens: Sequence[int]) -> str:
        return self._backend.detokenize(tokens)

    # --- generation ---------------------------------------------------------------------------------
    def stream(self, messages_or_prompt: str | Sequence[Mapping[str, Any]], images: Sequence[Any] | None = None,
               sampling: SamplingParams | None = None, *, max_tiles: int | None = None,
               image_budget: float | None = None, **overrides: Any) -> Iterator[StreamChunk]:
        """Stream the answer as `StreamChunk` s; the last one carries the `Result`.

        `max_tiles` / `image_budget` (seconds) override the load options for this request's images.
        Everything that can fail before decoding (messages, template, images, context size) fails here, at
        the call, not at the first ``next()``."""
        params = (sampling or self.sampling).replace(**overrides) if overrides else (sampling or self.sampling)
        rendered = self.render(messages_or_prompt, images)
        key = self._cancel()
        tiling = {k: v for k, v in (("max_tiles", max_tiles), ("image_budget", image_budget)) if v is not None}
        if self._scheduler is None:
            prompt = self._backend.prepare(rendered.fragments, rendered.images, **tiling)
            run = self._backend.start(prompt, params)
        else:  # prepared between the steps of the streams running (the engine is the scheduler's)
            prompt = self._scheduler.call(self._backend.prepare, rendered.fragments, rendered.images, **tiling)
            run = self._scheduler.submit(prompt, params)
        active = self._active[key] = _Active(run)
        return self._chunks(active, rendered, params, key)

    def generate(self, messages_or_prompt: str | Sequence[Mapping[str, Any]], images: Sequence[Any] | None = None,
                 sampling: SamplingParams | None = None, *, max_tiles: int | None = None,
                 image_budget: float | None = None, **overrides: Any) -> Result:
        """The whole answer: a loop over `stream`."""
        result = None
        for chunk in self.stream(messages_or_prompt, images, sampling, max_tiles=max_tiles, image_budget=image_budget,
                                 **overrides):
            result = chunk.result or result
        assert result is not None
        return result

    def _cancel(self) -> Any:
        """End the unfinished stream of this thread (of the model, at parallel=1), if any: the KV cache keeps
        what it evaluated; its consumer gets a RuntimeError at the next chunk. Returns the stream key."""
        key = threading.current_thread() if self._scheduler is not None else 0
        active = self._active.pop(key, None)
        if active is not None:
            active.cancelled = True
            active.run.close()
        return key

    def _exclusive(self, fn: Any, *args: Any) -> Any:
        """`fn(*args)` on the engine once no other stream runs (parallel > 1), else at once."""
        if self._scheduler is None:
            return fn(*args)
        return self._scheduler.call(fn, *args, exclusive=True)

    def _chunks(self, active: _Active, rendered: RenderedPrompt, params: SamplingParams,
                key: Any) -> Iterator[StreamChunk]:
        run = active.run
        in_reasoning = rendered.starts_in_reasoning
        text = _TextAssembler(params.stop, in_reasoning)
        tokens: list[int] = []
        finish: FinishReason = "length"
        try:
            for token, piece, end in run:
                tokens.append(token)
                for delta in text.push(piece):
                    yield StreamChunk(delta.text, delta.kind, token)
                if text.stopped:
                    finish = "stop_string"
                    break
                if end:
                    finish = "stop"
            if active.cancelled:
                raise RuntimeError("this stream was ended by a newer request (or close()) on the same Model")
            run.close()
            for delta in text.finish():
                yield StreamChunk(delta.text, delta.kind, tokens[-1] if tokens else None)
            raw = text.text
            reasoning, content = split_reasoning(raw, starts_in_reasoning=in_reasoning)
            stats = run.stats
            result = Result(
                text=raw, reasoning=reasoning, content=content,
                rounds=parse_rounds(raw, starts_in_reasoning=in_reasoning), finish_reason=finish, tokens=tokens,
                prompt_tokens=stats.prompt_tokens, cached_tokens=stats.cached_tokens,
                completion_tokens=len(tokens), prefill_seconds=stats.prefill_seconds,
                image_seconds=stats.image_seconds, time_to_first_token=stats.time_to_first_token,
                decode_seconds=stats.decode_seconds, images=[ImageInfo(*i) for i in stats.images],
                seed=stats.seed, prompt=rendered.text, restored_tokens=stats.restored_tokens,
                estimated_prefill_seconds=stats.estimated_prefill_seconds,
            )
            kind: Kind = "reasoning" if text.parser.in_reasoning else "content"
            yield StreamChunk("", kind, None, finish, result)
        finally:
            run.close()
            if self._active.get(key) is active:
                del self._active[key]

    def logprobs(self, messages_or_prompt: str | Sequence[Mapping[str, Any]], tokens: Sequence[int],
                 images: Sequence[Any] | None = None) -> Any:
        """Teacher-forced next-token log-probabilities (numpy float32 [len(tokens), vocab]) of `tokens` as
        the answer to the prompt: row i is the distribution after the prompt and tokens[:i] (`r1v eval`)."""
        rendered = self.render(messages_or_prompt, images)
        self._cancel()

        def score() -> Any:
            prompt = self._backend.prepare(rendered.fragments, rendered.images)
            return self._backend.logprobs(prompt, tokens)

        return self._exclusive(score)

    def reset(self) -> None:
        """Forget the cached conversations (the next request evaluates its whole prompt). With parallel > 1 it
        waits until the other threads' streams are done."""
        self._cancel()
        self._exclusive(self._backend.reset)

    # --- lifetime -----------------------------------------------------------------------------------
    def close(self) -> None:
        """Free the native memory (weights, KV cache, vision tower). The Model cannot be used afterwards;
        streams still running in other threads end with an error."""
        for active in list(self._active.values()):
            active.cancelled = True
            active.run.close()
        self._active.clear()
        if self._scheduler is not None:
            self._scheduler.close()
        self._backend.close()

    def __enter__(self) -> Model:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# --- entry points ---------------------------------------------------------------------------------------

def load(source: str | Path, options: LoadOptions | None = None, **overrides: Any) -> Model:
    """Load a model: a .gguf file (its mmproj found beside it, or `mmproj=`), a directory, or a models.yaml
    name (downloaded through huggingface-hub, only the files the quant needs). Options: `LoadOptions` and/or
    keyword overrides of its fields."""
    from .files.resolve import resolve_model

    options = options or LoadOptions()
    if overrides:
        known = {f.name for f in dataclasses.fields(LoadOptions)}
        unknown = sorted(set(overrides) - known)
        if unknown:
            raise TypeError(f"unknown load option(s) {unknown}; known: {sorted(known)}")
        options = dataclasses.replace(options, **overrides)
    resolved = resolve_model(source, quant=options.quant, mmproj=options.mmproj, cache_dir=options.cache_dir,
                             offline=options.offline)
    backend: Backend
    if resolved.format == "gguf":
        from .backends.llamacpp.backend import LlamaCppBackend

        backend = LlamaCppBackend(resolved.path, resolved.mmproj, options)
    elif resolved.format in ("awq", "safetensors"):
        # torch (and triton on CUDA): the `awq` extra. An unquantized checkpoint runs on the same torch path,
        # in full precision: the reference that `r1v eval --reference` compares quantized models with.
        from .backends.awq import AWQBackend

        backend = AWQBackend(resolved.path, options)
    else:
        raise NotImplementedError(f"{resolved.path}: no backend runs {resolved.format!r} models")
    try:
        return Model(backend, resolved, options)
    except BaseException:
        backend.close()
        raise


def generate(model: Model | str | Path, messages_or_prompt: str | Sequence[Mapping[str, Any]],
             images: Sequence[Any] | None = None, *, options: LoadOptions | None = None,
             **sampling: Any) -> Result:
    """One answer: `model` is a loaded `Model`, or a source to `load` (and close afterwards)."""
    if isinstance(model, Model):
        return model.generate(messages_or_prompt, images, **sampling)
    with load(model, options) as loaded:
        return loaded.generate(messages_or_prompt, images, **sampling)
