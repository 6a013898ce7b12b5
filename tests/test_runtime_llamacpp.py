"""`r1v.load()` + `Model.generate/stream` on the llama.cpp backend, against the torch reference, on a tiny
"300m"-variant checkpoint converted by the project (F16 LLM + F16 mmproj).

Greedy tokens equal the reference's for a text prompt and for image prompts (one tile; 2x1 tiles + thumbnail,
cut by our InternVL tiling and encoded tile by tile by libmtmd); streaming equals the whole result; the
reasoning split, stop strings, UTF-8 across tokens, seeds, max_tokens; the second chat turn reuses the KV cache
and answers as a fresh model does; clear errors before any decoding; the `r1v generate` / `r1v chat` commands.
"""
from __future__ import annotations

import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

import r1v
from r1v.converters.gguf import GGUFConversion
from r1v.runtime.api import ContextOverflowError, LoadOptions, Model, NoProjectorError, SamplingParams, load
from r1v.runtime.image import ImageError, prepare_image
from r1v.runtime.backends.llamacpp.llama_params import open_llama
from r1v.runtime.reasoning import split_reasoning
from r1v.runtime.files.resolve import ModelNotFoundError
from r1v.testing.images import pattern_pixels

torch = pytest.importorskip("torch")
from r1v.runtime.model import R1VModel  # noqa: E402

# One thread each: on 2 cores shared with other jobs, llama.cpp's spinning threads stall when oversubscribed.
THREADS = dict(n_threads=1, n_threads_batch=1)
GREEDY = dict(temperature=0, repetition_penalty=1.0)  # plain argmax, as the reference decodes
QUESTIONS = ["How many red circles are in the image?", "How many shapes?", "What colour is the second object?"]
STEPS = 32


def _image(width: int, height: int, seed: int = 0) -> Image.Image:
    """A smooth pattern plus noise (as tests/test_gguf_mmproj.py): structure for attention to see."""
    return Image.fromarray(pattern_pixels(width, height, seed))


@dataclass
class Files:
    ckpt: Path
    llm: Path
    mmproj: Path
    text_only: Path  # the LLM alone in a directory: no projector beside it
    png: Path  # a 896x448 PNG


@pytest.fixture(scope="module")
def files(tiny_r1v: Path, tiny_r1v_gguf: GGUFConversion, tmp_path_factory: pytest.TempPathFactory) -> Files:
    """The shared tiny-r1v model (tests/tiny_models.py: seed 8, no near-ties on the greedy paths below)."""
    root = tmp_path_factory.mktemp("runtime")
    (root / "text-only").mkdir()
    text_only = Path(shutil.copy(tiny_r1v_gguf.llm["f16"], root / "text-only"))
    png = root / "wide.png"
    _image(896, 448, seed=6).save(png)
    return Files(tiny_r1v, tiny_r1v_gguf.llm["f16"], tiny_r1v_gguf.mmproj, text_only, png)


@pytest.fixture(scope="module")
def model(files: Files):
    with load(files.llm, n_ctx=2048, **THREADS) as m:
        yield m


@pytest.fixture(scope="module")
def reference(files: Files):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield R1VModel.from_checkpoint(files.ckpt, dtype=torch.float32)
    finally:
        torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def tokenizer(files: Files):
    from tokenizers import Tokenizer

    return Tokenizer.from_file(str(files.ckpt / "tokenizer.json"))


def _reference_ids(tokenizer, question: str, tiles: list[int]) -> list[int]:
    """The prompt as InternVL-chat builds it, by hand: one <image> per image before the question, each
    replaced by <img> + <IMG_CONTEXT> x 256 per tile + </img>; ChatML with the forced <think>."""
    images = "".join("<img>" + "<IMG_CONTEXT>" * 256 * n + "</img>\n" for n in tiles)
    text = f"<|im_start|>user\n{images}{question}<|im_end|>\n<|im_start|>assistant\n<think>\n"
    return tokenizer.encode(text, add_special_tokens=False).ids


def _reference_greedy(reference, tokenizer, question: str, images: list[Image.Image], steps: int = STEPS):
    prepared = [prepare_image(img) for img in images]
    ids = _reference_ids(tokenizer, question, [p.num_tiles for p in prepared])
    pixels = torch.from_numpy(np.concatenate([p.pixel_values for p in prepared])) if prepared else None
    return ids, reference.greedy(ids, pixels, max_new_tokens=steps, stop_ids=reference.eos_token_ids).tolist()


def _common_prefix(a: list[Any], b: list[Any]) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


# --- parity with the torch reference --------------------------------------------------------------------

def test_text_prompt_greedy_matches_reference(model: Model, reference, tokenizer):
    ids, expected = _reference_greedy(reference, tokenizer, QUESTIONS[0], [])
    result = model.generate(QUESTIONS[0], max_tokens=STEPS, **GREEDY)
    assert result.prompt_tokens == len(ids)
    assert result.tokens == expected
    assert result.finish_reason == ("stop" if expected[-1] in reference.eos_token_ids else "length")
    assert result.images == []


IMAGE_CASES = {  # id: (question, [(width, height, seed)], [(grid, tiles)])
    "448x448": (QUESTIONS[1], [(448, 448, 5)], [((1, 1), 1)]),
    "896x448-2x1+thumbnail": (QUESTIONS[2], [(896, 448, 6)], [((2, 1), 3)]),
    "two-images": (QUESTIONS[1], [(448, 448, 5), (896, 448, 6)], [((1, 1), 1), ((2, 1), 3)]),  # margin 0.0097
}


@pytest.mark.parametrize("case", IMAGE_CASES)
def test_image_prompt_greedy_matches_reference(model: Model, reference, tokenizer, files: Files, case):
    """Tiles cut by our InternVL tiling, each encoded by libmtmd, fed as embedding batches: the same tokens
    as the torch model on InternVL's own preprocessing. The wide image goes in as a PNG path."""
    question, specs, layout = IMAGE_CASES[case]
    images = [_image(w, h, seed=s) for w, h, s in specs]
    ids, expected = _reference_greedy(reference, tokenizer, question, images)
    sources = [str(files.png) if img.size == (896, 448) else img for img in images]
    result = model.generate(question, images=sources, max_tokens=STEPS, **GREEDY)
    assert result.images == layout
    n_text = len(model.tokenize(model.render(question).text))
    assert result.prompt_tokens == len(ids) == n_text + sum(2 + 256 * tiles + 1 for _, tiles in layout)
    assert result.tokens == expected


@pytest.mark.slow
def test_libmtmd_tiling_matches_libmtmds_own_evaluation(files: Files):
    """tiling="llamacpp": libmtmd's grid (3x2 + overview for 1000x500, where InternVL picks 2x1); our
    embedding batches give the same greedy tokens as libmtmd's own helper (mtmd_helper_eval_chunk_single)."""
    import llama_cpp

    from r1v.runtime.backends.llamacpp.mtmd import MtmdContext

    image, question, steps = _image(1000, 500, seed=7), "Describe it.", 16
    # flash_attn=False as llama_cpp.Llama's default: with llama.cpp's "auto" (on for CPU) the logits differ in
    # the last digits and step 4 of this prompt, a near-tie, flips.
    with load(files.llm, tiling="llamacpp", n_ctx=4096, flash_attn=False, **THREADS) as ours:
        result = ours.generate(question, images=[image], max_tokens=steps, **GREEDY)
        prompt_text = ours.render(question, images=[image]).text
    assert result.images == [((3, 2), 7)]

    llama = open_llama(files.llm, n_ctx=4096, n_threads=1, n_threads_batch=1, verbose=False)
    try:
        with MtmdContext(files.mmproj, llama, n_threads=1) as ctx, \
                ctx.tokenize(prompt_text.replace("<image>", ctx.marker), [np.asarray(image)]) as prompt:
            llama.reset()
            ctx.eval_into_llama(llama, prompt)
            assert prompt.n_tokens == result.prompt_tokens
            theirs = []
            sampler = llama_cpp.llama_sampler_init_greedy()
            for _ in range(steps):
                theirs.append(llama_cpp.llama_sampler_sample(sampler, llama.ctx, -1))
                llama.eval([theirs[-1]])
            llama_cpp.llama_sampler_free(sampler)
    finally:
        llama.close()
    assert result.tokens == theirs


# --- streaming, reasoning split, sampling ------------------------------------------------------------------

def test_stream_yields_exactly_the_result(model: Model):
    sampling = dict(temperature=0.8, seed=11, max_tokens=24)
    model.reset()  # the same cache state for both runs (see test_seed_reproducibility)
    chunks = list(model.stream(QUESTIONS[2], images=[_image(700, 350)], **sampling))
    *body, last = chunks
    result = last.result
    assert last.text == "" and last.finish_reason == result.finish_reason == "length" and result is not None
    assert all(c.finish_reason is None and c.result is None and c.text for c in body)
    reasoning = "".join(c.text for c in body if c.kind == "reasoning")
    content = "".join(c.text for c in body if c.kind == "content")
    assert (reasoning, content) == (result.reasoning, result.content) == split_reasoning(result.text)
    assert {c.token_id for c in body} <= set(result.tokens)
    model.reset()
    again = model.generate(QUESTIONS[2], images=[_image(700, 350)], **sampling)
    assert (again.text, again.tokens) == (result.text, result.tokens)
    assert result.images == [((2, 1), 3)] and result.completion_tokens == 24


def test_chunk_kinds_follow_the_prompt(files: Files):
    """A template without the forced <think>: the output starts as content, not reasoning."""
    plain = "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}" \
            "<|im_start|>assistant\n"
    with load(files.llm, chat_template=plain, n_ctx=512, **THREADS) as m:
        chunks = list(m.stream(QUESTIONS[0], max_tokens=12, **GREEDY))
    result = chunks[-1].result
    assert {c.kind for c in chunks} == {"content"}
    assert result.reasoning == "" and result.content == result.text == "".join(c.text for c in chunks)


def test_seed_reproducibility(model: Model):
    """Same seed, same prompt, same cache state: the same tokens. (A prompt served from the KV cache is
    evaluated in other batch sizes, which changes the last digits of the logits; on this random model's flat
    distributions that can change a sampled token under top_p < 1, which sorts by probability.)"""
    kw = dict(temperature=0.9, top_p=0.95, max_tokens=24)
    model.reset()
    first = model.generate(QUESTIONS[0], seed=1234, **kw)
    model.reset()
    assert model.generate(QUESTIONS[0], seed=1234, **kw).tokens == first.tokens
    assert first.seed == 1234
    others = [model.generate(QUESTIONS[0], seed=s, **kw).tokens for s in (1, 2, 3)]
    assert any(o != first.tokens for o in others)
    unseeded = model.generate(QUESTIONS[0], **kw)
    assert unseeded.seed is not None and unseeded.seed != 0xFFFFFFFF  # the seed llama.cpp drew is reported


def test_stop_string_and_max_tokens(model: Model):
    full = model.generate(QUESTIONS[0], max_tokens=STEPS, **GREEDY)
    assert full.finish_reason == "length" and full.completion_tokens == STEPS
    text = full.text
    start = next(i for i in range(len(text) // 2, len(text) - 3)
                 if text.find(text[i:i + 3]) == i and "\ufffd" not in text[i:i + 3])
    stop = text[start:start + 3]
    chunks = list(model.stream(QUESTIONS[0], max_tokens=STEPS, stop=["never appears", stop], **GREEDY))
    result = chunks[-1].result
    assert result.finish_reason == "stop_string"
    assert result.text == text[:start]
    assert "".join(c.text for c in chunks) == split_reasoning(text[:start])[0]
    assert result.tokens == full.tokens[:len(result.tokens)] and len(result.tokens) < STEPS
    short = model.generate(QUESTIONS[0], max_tokens=5, **GREEDY)
    assert (short.finish_reason, short.completion_tokens, short.tokens) == ("length", 5, full.tokens[:5])


def test_sampling_defaults_and_validation(model: Model):
    assert (model.sampling.temperature, model.sampling.top_p, model.sampling.repetition_penalty) == (0.6, 0.95, 1.05)
    with pytest.raises(TypeError, match="unknown sampling parameter"):
        model.generate("x", temprature=0)
    with pytest.raises(ValueError, match="top_p"):
        model.generate("x", top_p=0)
    with pytest.raises(TypeError, match="unknown load option"):
        load("whatever.gguf", n_ctxx=5)


# --- multi-turn: the KV cache ------------------------------------------------------------------------------

def test_second_turn_reuses_the_cache_and_matches_a_fresh_model(model: Model, files: Files):
    turn1 = [{"role": "user", "content": QUESTIONS[0]}]
    first = model.generate(turn1, max_tokens=12, **GREEDY)
    # the assistant turn as the model wrote it, so the shared prefix runs into the generated tokens
    turn2 = turn1 + [{"role": "assistant", "content": "<think>\n" + first.text},
                     {"role": "user", "content": "And the squares?"}]
    in_cache = model.tokenize(model.render(turn1).text) + first.tokens[:-1]  # the last token is never evaluated
    expected = _common_prefix(in_cache, model.tokenize(model.render(turn2).text))
    second = model.generate(turn2, max_tokens=12, **GREEDY)
    assert second.cached_tokens == expected > first.prompt_tokens
    with load(files.llm, n_ctx=2048, **THREADS) as fresh:
        again = fresh.generate(turn2, max_tokens=12, **GREEDY)
    assert again.cached_tokens == 0
    assert again.tokens == second.tokens


def test_follow_up_about_an_image_does_not_evaluate_it_again(model: Model, files: Files):
    turn1 = [{"role": "user", "content": [{"type": "image", "image": str(files.png)},
                                          {"type": "text", "text": QUESTIONS[2]}]}]
    first = model.generate(turn1, max_tokens=8, **GREEDY)
    turn2 = turn1 + [first.message, {"role": "user", "content": "Why?"}]
    second = model.generate(turn2, max_tokens=8, **GREEDY)
    assert second.cached_tokens > 3 * 256  # the image's 3 tiles are in the kept prefix
    assert second.cached_tokens == first.prompt_tokens - 2  # all but "<think>\n" of the first prompt
    with load(files.llm, n_ctx=2048, **THREADS) as fresh:
        assert fresh.generate(turn2, max_tokens=8, **GREEDY).tokens == second.tokens


# --- errors: clear, and before any decoding ------------------------------------------------------------------

@pytest.mark.slow
def test_context_overflow_is_raised_before_decoding(model: Model, files: Files):
    with load(files.llm, n_ctx=64, **THREADS) as small:
        assert small.n_ctx == 64  # the window asked for (llama.cpp pads its KV cache to 256 cells, not its batch)
        long_prompt = "count " * 300
        with pytest.raises(ContextOverflowError) as err:
            small.stream(long_prompt)  # raised by the call itself, before the first token
        assert err.value.n_ctx == 64 and err.value.prompt_tokens > 64
        assert str(err.value.prompt_tokens) in str(err.value) and "64 tokens (n_ctx)" in str(err.value)
        # fits, but prompt + max_tokens does not: max_tokens is capped and the output ends with "length"
        capped = small.generate(QUESTIONS[0], max_tokens=10_000, **GREEDY)
        assert capped.finish_reason == "length"
        assert capped.completion_tokens == small.n_ctx - capped.prompt_tokens
    with pytest.raises(ContextOverflowError, match="of them for images"):
        model.generate("q", images=[_image(2000, 2000)])  # 3x3 + thumbnail = 2560 image tokens > 2048
    assert model.generate("q", max_tokens=2, **GREEDY).completion_tokens == 2  # still usable


def test_image_without_mmproj_says_how_to_give_one(files: Files):
    with load(files.text_only, n_ctx=256, **THREADS) as text_only:
        assert text_only.mmproj is None and not text_only.has_vision
        assert text_only.generate("Hi", max_tokens=2, **GREEDY).completion_tokens == 2
        with pytest.raises(NoProjectorError) as err:
            text_only.generate("What is this?", images=[_image(448, 448)])
    message = str(err.value)
    assert files.text_only.name in message and "mmproj" in message and "mmproj=" in message


def test_corrupt_image_and_unknown_model(model: Model, tmp_path: Path):
    with pytest.raises(ImageError, match="cannot decode image"):
        model.generate("q", images=[b"\x89PNG\r\n\x1a\n this is not a png"])
    with pytest.raises(ImageError, match="missing.png"):
        model.generate("q", images=[str(tmp_path / "missing.png")])
    with pytest.raises(ModelNotFoundError, match="no-such-model-r1v"):
        r1v.load("no-such-model-r1v")


def test_unquantized_checkpoint_runs_on_the_torch_path(files: Files, reference, tokenizer):
    """A safetensors checkpoint directory loads too (the torch backend in full precision, the reference of
    `r1v eval`): the same greedy tokens as the torch model, for text and for an image."""
    ids, expected = _reference_greedy(reference, tokenizer, QUESTIONS[0], [])
    image = _image(448, 448, seed=5)
    _, expected_image = _reference_greedy(reference, tokenizer, QUESTIONS[1], [image])
    with load(files.ckpt, n_ctx=2048, n_threads=1) as m:
        assert m.generate(QUESTIONS[0], max_tokens=STEPS, **GREEDY).tokens == expected
        assert m.generate(QUESTIONS[1], images=[image], max_tokens=STEPS, **GREEDY).tokens == expected_image


def test_closed_model_refuses(files: Files):
    m = load(files.llm, LoadOptions(n_ctx=256, **THREADS))
    stream = m.stream(QUESTIONS[0], max_tokens=20)
    next(stream)
    m.close()
    with pytest.raises(RuntimeError, match="ended by a newer request"):
        list(stream)  # the native memory is gone: the stream ends cleanly, it does not touch it
    with pytest.raises(RuntimeError, match="closed"):
        m.generate("q")


def test_a_new_request_ends_an_unfinished_stream(model: Model):
    never_started = model.stream(QUESTIONS[0], max_tokens=4)  # noqa: F841 - dropped without iterating
    abandoned = model.stream(QUESTIONS[0], max_tokens=20, **GREEDY)
    next(abandoned)
    result = model.generate(QUESTIONS[0], max_tokens=6, **GREEDY)
    assert result.completion_tokens == 6
    with pytest.raises(RuntimeError, match="ended by a newer request"):
        next(abandoned)
    model.reset()
    assert model.generate(QUESTIONS[0], max_tokens=6, **GREEDY).tokens == result.tokens


# --- the stream assembly, with scripted tokens ---------------------------------------------------------------

class _ScriptedBackend:
    """Stands in for llama.cpp: yields the given (token, bytes) pieces; the last may be an end token."""

    path, mmproj_path, n_ctx, chat_template = Path("scripted.gguf"), None, 4096, None
    special_texts = {"bos_token": "", "eos_token": ""}

    def __init__(self, pieces: list[bytes], end: bool):
        self.pieces, self.end = pieces, end

    def prepare(self, pieces, images):
        return None

    def start(self, prompt, params):
        from r1v.runtime.backends.llamacpp.backend import RunStats

        backend = self

        class Run:
            stats = RunStats(prompt_tokens=10)

            def __iter__(self):
                n = len(backend.pieces)
                for i, piece in enumerate(backend.pieces[:params.max_tokens]):
                    yield 100 + i, piece, backend.end and i == n - 1

            def close(self):
                pass

        return Run()

    def close(self):
        pass


def _scripted(pieces: list[bytes], end: bool = True) -> Model:
    return Model(_ScriptedBackend(pieces, end), None, LoadOptions())


def test_utf8_split_across_tokens_and_think_tag_split_across_tokens():
    pieces = [b"Let me", b" look.</th", b"ink>\n\nIt is ", b"\xe4\xb8", b"\xad", b"\xe6\x96\x87!", b""]
    chunks = list(_scripted(pieces).stream("q"))
    result = chunks[-1].result
    assert result.text == "Let me look.</think>\n\nIt is 中文!"
    assert (result.reasoning, result.content) == ("Let me look.", "It is 中文!")
    assert [(c.kind, c.text) for c in chunks[:-1]] == [
        ("reasoning", "Let me"), ("reasoning", " look."), ("content", "It is "), ("content", "中"),
        ("content", "文!")]
    assert [c.token_id for c in chunks[:-1]] == [100, 101, 102, 104, 105]  # 103 held half a character
    assert result.finish_reason == "stop" and chunks[-1].kind == "content"


def test_stop_string_split_across_tokens_is_held_back():
    pieces = [b"</think>The answer is 4", b"2. ST", b"OP and more", b" text"]
    chunks = list(_scripted(pieces, end=False).stream("q", stop=["STOP"]))
    result = chunks[-1].result
    assert result.finish_reason == "stop_string" and result.text == "</think>The answer is 42. "
    assert "".join(c.text for c in chunks) == "The answer is 42. "
    assert "ST" not in "".join(c.text for c in chunks[:2])  # never shown, then taken back
    assert result.completion_tokens == 3


def test_held_back_prefix_that_is_not_a_stop_is_released():
    chunks = list(_scripted([b"a S", b"Tx", b" end"], end=False).stream("q", stop=["STOP"], max_tokens=3))
    result = chunks[-1].result
    assert result.text == "a STx end" and result.finish_reason == "length"
    assert "".join(c.text for c in chunks) == "a STx end"


def test_unclosed_think_and_rounds():
    text = "<tool_call>{\"name\": \"zoom\", \"arguments\": {\"x\": 1}}</tool_call>"
    chunks = list(_scripted([b"thinking ", b"hard</think>", text.encode(), b"<answer>4</answer>"]).stream("q"))
    result = chunks[-1].result
    assert [r.kind for r in result.rounds] == ["think", "tool_call", "answer"]
    assert result.rounds[1].tool_call == {"name": "zoom", "arguments": {"x": 1}}
    unclosed = _scripted([b"still ", b"thinking"], end=False).generate("q")
    assert (unclosed.reasoning, unclosed.content, unclosed.finish_reason) == ("still thinking", "", "length")


def test_sampling_params_normalise_stop():
    assert SamplingParams(stop="x").stop == ("x",)
    with pytest.raises(ValueError, match="stop"):
        SamplingParams(stop=[""])


# --- the command line ------------------------------------------------------------------------------------

def _r1v(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "r1v", *args], capture_output=True, input=stdin, text=True,
                          encoding="utf-8", errors="replace")


@pytest.mark.slow
def test_generate_command_streams_the_answer(model: Model, files: Files):
    flags = ["--temperature", "0", "--repetition-penalty", "1", "--max-tokens", "8", "--threads", "1",
             "--n-threads-batch", "1", "--n-ctx", "2048"]
    run = _r1v("generate", str(files.llm), "--image", str(files.png), "--prompt", QUESTIONS[2], "--show-reasoning",
               *flags)
    assert run.returncode == 0, run.stderr
    expected = model.generate(QUESTIONS[2], images=[str(files.png)], max_tokens=8, **GREEDY)
    assert run.stdout.startswith("<think>\n") and "</think>" in run.stdout
    assert run.stdout.replace("\r\n", "\n")[len("<think>\n"):].startswith(expected.reasoning.replace("\r\n", "\n")[:5])
    assert f"prompt {expected.prompt_tokens} tokens" in run.stderr and "tok/s" in run.stderr
    assert "finish: length" in run.stderr
    hidden = _r1v("generate", str(files.llm), "--prompt", QUESTIONS[0], *flags)
    assert hidden.returncode == 0 and hidden.stdout.strip() == "" and "still reasoning" in hidden.stderr
    missing = _r1v("generate", str(files.llm), "--image", "nope.png", "--prompt", "q", *flags)
    assert missing.returncode == 2 and "nope.png" in missing.stderr and "Traceback" not in missing.stderr


def test_chat_command_keeps_the_conversation(model: Model, files: Files):
    n = model.generate(QUESTIONS[2], images=[str(files.png)], max_tokens=1).prompt_tokens
    script = f"/image {files.png}\n{QUESTIONS[2]}\nWhy?\n/reset\nHello\n/exit\n"
    run = _r1v("chat", str(files.llm), "--temperature", "0", "--max-tokens", "4", "--threads", "1",
               "--n-threads-batch", "1", "--n-ctx", "2048", stdin=script)
    assert run.returncode == 0, run.stderr
    turns = [line for line in run.stderr.splitlines() if line.startswith("[turn")]
    assert len(turns) == 3 and turns[0].startswith(f"[turn 1] prompt {n} tokens:")
    assert f"{n - 2} cached" in turns[1]  # the whole first prompt but "<think>\n", image included
    assert turns[2].startswith("[turn 1]") and "(new conversation)" in run.stderr
