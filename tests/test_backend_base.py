"""The one request loop (`runtime/backends/base.py`, issue 18 item 1).

- On a small numpy engine under `BaseBackend` (no model files): `Run` iterates the loop's public generator
  (`start` -> `generate(Request)`); generation stops at the end token, at `max_tokens` and at the context's end;
  the overflow checks and their words; the longest common prefix is kept and only the rest evaluated; image
  embeddings encoded once and kept (LRU by `ImageKey`); spans per segment or across segments give the same
  cache; teacher-forced `logprobs`.
- On the llama.cpp and the AWQ backend of one tiny checkpoint: both are `Backend` s (runtime_checkable) and
  `BaseBackend` s, lay a prompt out to the same positions with the same `ImageKey` (different when the layout
  differs, the same when only max_tiles differs but not the grid), refuse an overflow with the same words, stop
  at the context's end alike, and run requests through the public loop.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import pytest
from PIL import Image

from r1v.runtime.backends.base import Backend, BaseBackend, Request, SequenceState
from r1v.runtime.backends.prompt import ImageKey, ImageSlot, Prompt, Run, RunStats, Span, spans
from r1v.runtime.image import TilingConfig
from r1v.runtime.options import ContextOverflowError, LoadOptions, SamplingParams

GREEDY = SamplingParams(temperature=0, repetition_penalty=1.0)

# --- a numpy engine: after token t comes t + 1 ('z' is followed by the end token), after an image position 'a' ---
V, IMG, END_IMG, END = 131, 128, 129, 130
SPECIAL = {"<img>": IMG, "</img>": END_IMG, "<end>": END}
PEAK = 4.0


def _next(value: float) -> int:
    if value < 0:  # an image position
        return ord("a")
    return END if value == ord("z") else (int(value) + 1) % 128


def _row(value: float) -> np.ndarray:
    row = np.zeros(V, np.float32)
    row[_next(value)] = PEAK
    return row


class _Greedy:
    seed = None

    def sample(self, logits: np.ndarray) -> int:
        return int(np.argmax(logits))

    def close(self) -> None:
        pass


class Toy(BaseBackend):
    """Characters are tokens; the "KV cache" holds a value per position (the token, or -1 for an image)."""

    def __init__(self, n_ctx: int = 64, n_batch: int = 3, image_cache: int = 4, across_segments: bool = False):
        super().__init__("toy.bin", None, LoadOptions(image_cache=image_cache))
        self.across_segments = across_segments
        self.n_ctx, self.n_batch, self.n_vocab = n_ctx, n_batch, V
        self.chat_template, self.special_texts = None, {"bos_token": "", "eos_token": ""}
        self.tiling, self.tokens_per_tile = TilingConfig(image_size=32, max_tiles=4), 2
        self.cache: list[float] = []
        self.evaluated: list[tuple[int, int]] = []  # the spans, as (start, end)
        self.encoded: list[ImageKey] = []
        self.open = True
        self._read_image_tags()

    @property
    def has_vision(self) -> bool:
        return True

    def tokenize(self, text: str, *, special: bool = True) -> list[int]:
        self._live()
        ids, i = [], 0
        while i < len(text):
            tag = next((t for t in SPECIAL if special and text.startswith(t, i)), None)
            ids.append(SPECIAL[tag] if tag else ord(text[i]) % 128)
            i += len(tag) if tag else 1
        return ids

    def piece(self, token: int) -> bytes:
        return bytes([token]) if token < 128 else b""

    def detokenize(self, tokens: Sequence[int]) -> str:
        return b"".join(map(self.piece, tokens)).decode()

    def _is_open(self) -> bool:
        return self.open

    def _encode_image(self, slot: ImageSlot) -> np.ndarray:
        self.encoded.append(slot.key)
        return np.full((slot.n_positions, 4), -1.0, np.float32)

    def _evaluate_span(self, sequence: SequenceState, prompt: Prompt, span: Span,
                       embeddings: dict[int, Any]) -> np.ndarray | None:
        for i, a, b in span.parts:
            segment = prompt.segments[i]
            self.cache.extend(embeddings[i][a:b, 0] if isinstance(segment, ImageSlot) else segment[a:b])
        self.evaluated.append((span.start, span.end))
        sequence.positions.extend(prompt.items[span.start:span.end])
        return _row(self.cache[-1]) if span.logits else None

    def _step(self, sequence: SequenceState, token: int) -> np.ndarray:
        self.cache.append(token)
        sequence.positions.append(token)
        return _row(token)

    def _score_tokens(self, sequence: SequenceState, tokens: list[int]) -> np.ndarray:
        self.cache.extend(tokens)
        sequence.positions.extend(tokens)
        return np.stack([_row(t) for t in tokens])

    def _logits_row(self, logits: np.ndarray) -> np.ndarray:
        return logits

    def _sampler(self, params: SamplingParams, prompt: Prompt) -> _Greedy:
        return _Greedy()

    def _is_end(self, token: int) -> bool:
        return token == END

    def _truncate_cache(self, sequence: SequenceState, keep: int) -> int:
        del self.cache[keep:]
        return keep

    def close(self) -> None:
        self.open = False
        super().close()


def _picture(width: int, height: int, seed: int = 0) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 255, (height, width, 3), dtype=np.uint8))


def _tokens(run: Any) -> list[int]:
    return [token for token, _, _ in run]


def test_run_iterates_the_public_loop_and_stops_at_the_end_token():
    toy = Toy()
    prompt = toy.prepare(["uv"], [])
    run = toy.start(prompt, GREEDY)
    assert isinstance(run, Run) and run.stats.prompt_tokens == 2
    out = list(run)
    assert [t for t, _, _ in out] == [*map(ord, "wxyz"), END]
    assert [end for _, _, end in out] == [False] * 4 + [True]
    assert b"".join(piece for _, piece, _ in out) == b"wxyz"
    stats = run.stats
    assert stats.cached_tokens == 0 and stats.seed is None
    assert 0 <= stats.image_seconds <= stats.prefill_seconds <= stats.time_to_first_token
    # The same through a Request handed to the loop by name (what `start` does), and a Run of any steps.
    toy.reset()
    request = Request(toy.sequence, prompt, GREEDY, 3, RunStats.of(prompt))
    assert _tokens(toy.generate(request)) == list(map(ord, "wxy")) and request.sampler is None
    assert _tokens(Run(iter([(7, b"", True)]), RunStats())) == [7]


def test_the_token_limit_is_max_tokens_or_the_end_of_the_context():
    toy = Toy(n_ctx=8)
    prompt = toy.prepare(["a"], [])
    assert _tokens(toy.start(prompt, GREEDY.replace(max_tokens=3))) == list(map(ord, "bcd"))
    assert _tokens(toy.start(prompt, GREEDY)) == list(map(ord, "bcdefgh"))  # 1 + 7 positions: the context is full
    assert len(toy.sequence.positions) == 7  # the last token is sampled, never evaluated


def test_a_prompt_that_leaves_no_room_is_refused_with_its_numbers():
    toy = Toy(n_ctx=8)
    assert _tokens(toy.start(toy.prepare(["abcdefg"], []), GREEDY)) == [ord("h")]  # n_ctx - 1 positions run
    with pytest.raises(ContextOverflowError) as err:
        toy.start(toy.prepare(["abcdefgh"], []), GREEDY)
    assert str(err.value) == (
        "the prompt is 8 tokens, but the context window is 8 tokens (n_ctx), which leaves no room for an answer; "
        "load with a larger n_ctx, shorten the conversation, or use fewer or smaller images (max_tiles)")
    assert (err.value.prompt_tokens, err.value.n_ctx) == (8, 8)
    with pytest.raises(ContextOverflowError, match=r"^the prompt is 9 tokens, 2 of them for images, but"):
        toy.start(toy.prepare(["abc", "de"], [_picture(32, 32)]), GREEDY)
    with pytest.raises(ContextOverflowError, match=r"^scoring needs 9 positions, but the context window is 8 "
                                                   r"tokens \(n_ctx\)$"):
        toy.logprobs(toy.prepare(["abcde"], []), [1, 2, 3, 4, 5])
    toy.close()
    with pytest.raises(RuntimeError, match="the model toy.bin is closed"):
        toy.prepare(["a"], [])


def test_the_longest_common_prefix_is_kept_and_only_the_rest_evaluated():
    toy = Toy()
    first = toy.prepare(["abc"], [])
    assert _tokens(toy.start(first, GREEDY.replace(max_tokens=4))) == list(map(ord, "defg"))
    assert toy.sequence.positions == list(map(ord, "abcdef"))  # prompt and output, but the last token
    toy.evaluated.clear()
    run = toy.start(toy.prepare(["abcdq"], []), GREEDY.replace(max_tokens=1))
    assert _tokens(run) == [ord("r")] and run.stats.cached_tokens == 4 and toy.evaluated == [(4, 5)]
    assert toy.cache == list(map(ord, "abcdq"))
    toy.evaluated.clear()
    run = toy.start(toy.prepare(["abcdq"], []), GREEDY.replace(max_tokens=1))  # the same prompt again:
    assert run.stats.prompt_tokens == 5 and _tokens(run) == [ord("r")]
    assert run.stats.cached_tokens == 4 and toy.evaluated == [(4, 5)]  # its last position is evaluated again


def test_image_embeddings_are_encoded_once_and_kept_by_image_key():
    toy = Toy(image_cache=1)
    a, b = _picture(32, 32, seed=1), _picture(32, 32, seed=2)
    prompt_a = toy.prepare(["x", "y"], [a])
    key_a = prompt_a.segments[1].key
    assert _tokens(toy.start(prompt_a, GREEDY.replace(max_tokens=1))) == [ord("z")]
    assert _tokens(toy.start(prompt_a, GREEDY.replace(max_tokens=1))) == [ord("z")]  # in the kept prefix
    toy.reset()
    assert _tokens(toy.start(prompt_a, GREEDY.replace(max_tokens=1))) == [ord("z")]  # from the image cache
    assert toy.encoded == [key_a]
    toy.start(toy.prepare(["x", "y"], [b]), GREEDY.replace(max_tokens=1)).close()  # not iterated: nothing runs
    assert toy.encoded == [key_a]
    assert _tokens(toy.start(toy.prepare(["x", "y"], [b]), GREEDY.replace(max_tokens=1))) == [ord("z")]
    toy.reset()
    toy.logprobs(prompt_a, [ord("z")])  # b took a's place in a cache of one
    assert [k.digest for k in toy.encoded] == [key_a.digest, toy.encoded[1].digest, key_a.digest]
    assert toy.encoded[1] != key_a


def test_image_key_is_the_pixels_and_the_layout():
    toy = Toy()
    wide, other = _picture(64, 32, seed=3), _picture(64, 32, seed=4)

    def key(image: Image.Image, **tiles: Any) -> ImageKey:
        return toy.prepare(["", ""], [image], **tiles).segments[1].key

    assert key(wide) == key(wide.copy()) == key(wide, max_tiles=2) == key(wide, max_tiles=3)  # grid (2, 1)
    assert key(wide) == ImageKey(key(wide).digest, "internvl", (2, 1), True)
    assert key(wide, max_tiles=1) == ImageKey(key(wide).digest, "internvl", (1, 1), True)
    assert key(other).digest != key(wide).digest
    slot = toy.prepare(["", ""], [wide]).segments[1]
    assert (slot.grid, slot.tiles, slot.n_positions) == ((2, 1), 3, 6)  # 2 tiles + thumbnail, 2 positions each
    with pytest.raises(ValueError, match="max_tiles must be >= 1, got 0"):
        toy.prepare(["", ""], [wide], max_tiles=0)
    with pytest.raises(ValueError, match="2 text pieces for 0 images"):
        toy.prepare(["", ""], [])


@pytest.mark.parametrize("across", [False, True])
def test_spans_per_segment_or_across_segments_fill_the_same_cache(across: bool):
    toy = Toy(n_batch=3, across_segments=across)
    prompt = toy.prepare(["ab", "cdefg"], [_picture(32, 32)])  # [a b <img>] [image: 2] [</img> c d e f g]
    assert prompt.n_positions == 11
    expected = {False: [(0, 3), (3, 5), (5, 8), (8, 11)], True: [(0, 3), (3, 6), (6, 9), (9, 11)]}[across]
    assert [(s.start, s.end) for s in spans(prompt, 0, 3, across_segments=across)] == expected
    kept = {False: [(4, 5), (5, 8), (8, 11)], True: [(4, 7), (7, 10), (10, 11)]}[across]
    assert [(s.start, s.end) for s in spans(prompt, 4, 3, across_segments=across)] == kept
    assert [s.logits for s in spans(prompt, 4, 3, across_segments=across)] == [False, False, True]
    assert _tokens(toy.start(prompt, GREEDY.replace(max_tokens=2))) == list(map(ord, "hi"))
    assert toy.evaluated == expected
    assert toy.cache == [*map(ord, "ab"), IMG, -1.0, -1.0, END_IMG, *map(ord, "cdefg"), ord("h")]


def test_logprobs_are_teacher_forced_and_normalized():
    toy = Toy(n_batch=2)
    prompt = toy.prepare(["ab"], [])
    got = toy.logprobs(prompt, [ord("c"), ord("q"), ord("x")])
    assert got.shape == (3, V) and got.dtype == np.float32
    assert np.allclose(np.exp(got.astype(np.float64)).sum(-1), 1.0)
    assert list(got.argmax(-1)) == [ord("c"), ord("d"), ord("r")]  # after ab, abc, abcq
    top = PEAK - math.log(math.exp(PEAK) + V - 1)
    assert got[0, ord("c")] == pytest.approx(top) and got[0, 0] == pytest.approx(-math.log(math.exp(PEAK) + V - 1))
    assert toy.sequence.positions == list(map(ord, "abcq"))
    assert toy.logprobs(prompt, []).shape == (0, V)


# --- the two backends of one tiny checkpoint -----------------------------------------------------------------
@pytest.fixture(scope="module")
def both(tiny_r1v_gguf, tiny_r1v_awq: Path) -> dict[str, Path]:
    """A GGUF pair and an AWQ checkpoint (RTN, the vision tower kept) converted from the same tiny checkpoint
    (the session's tiny_r1v: InternViT-300M flavour, 448-pixel tiles of 256 positions): the same tokenizer and
    image layout."""
    return {"llamacpp": tiny_r1v_gguf.llm["f16"], "awq": tiny_r1v_awq}


def _load(path: Path, n_ctx: int):
    from r1v.runtime.api import load

    if path.suffix == ".gguf":
        return load(path, n_ctx=n_ctx, n_threads=1, n_threads_batch=1, prefix_cache=False)
    return load(path, n_ctx=n_ctx, device="cpu", kernel="torch", n_threads=1)


@pytest.mark.slow
def test_both_backends_lay_prompts_out_alike_and_share_the_loop(both: dict[str, Path]):
    wide = _picture(896, 448, seed=5)  # ratio 2: grid (2, 1) for max_tiles 2 and 3
    models = {name: _load(path, 2048) for name, path in both.items()}
    try:
        backends = {name: m._backend for name, m in models.items()}
        for backend in backends.values():
            assert isinstance(backend, Backend) and isinstance(backend, BaseBackend)
        assert not isinstance(object(), Backend)

        def layout(backend: BaseBackend, **tiles: Any) -> Prompt:
            return backend.prepare(["Describe ", " briefly."], [wide], **tiles)

        llama, awq = backends["llamacpp"], backends["awq"]
        assert layout(llama).items == layout(awq).items  # the same tokens and image keys, position by position
        keys = {name: {m: layout(b, max_tiles=m).segments[1].key for m in (1, 2, 3)} for name, b in backends.items()}
        assert keys["llamacpp"] == keys["awq"]
        assert keys["awq"][2] == keys["awq"][3] == ImageKey(keys["awq"][2].digest, "internvl", (2, 1), True)
        assert keys["awq"][1] == ImageKey(keys["awq"][2].digest, "internvl", (1, 1), True)

        for name, model in models.items():  # a request through the public loop, as Model runs it
            backend = backends[name]
            params = GREEDY.replace(max_tokens=5)
            prompt = backend.prepare(["Hello ", " there"], [wide], max_tiles=2)
            backend.reset()
            started = _tokens(backend.start(prompt, params))
            backend.reset()
            request = Request(backend.sequence, prompt, params, 5, RunStats.of(prompt))
            assert _tokens(backend.generate(request)) == started and len(started) == 5, name
            assert request.stats.prompt_tokens == prompt.n_positions and prompt.image_positions == 3 * 256
    finally:
        for model in models.values():
            model.close()


@pytest.mark.slow
def test_both_backends_refuse_an_overflow_with_the_same_words_and_stop_at_the_context(both: dict[str, Path]):
    models = {name: _load(path, 64) for name, path in both.items()}
    try:
        errors: dict[str, list[str]] = {}
        for name, model in models.items():
            errors[name] = []
            for args in (("word " * 80, None), ("x", [_picture(448, 448)])):
                with pytest.raises(ContextOverflowError) as err:
                    model.generate(*args, max_tokens=2, temperature=0)
                errors[name].append(str(err.value))
            with pytest.raises(ContextOverflowError) as err:
                model.logprobs("hi", list(range(100)))
            errors[name].append(str(err.value))
            result = model.generate("Hi", max_tokens=500, temperature=0, repetition_penalty=1.0)
            assert result.finish_reason == "length" and result.prompt_tokens + result.completion_tokens == 64, name
        assert errors["llamacpp"] == errors["awq"]
        assert errors["awq"][1].startswith("the prompt is 274 tokens, 256 of them for images, but the context "
                                           "window is 64 tokens (n_ctx)")
    finally:
        for model in models.values():
            model.close()
