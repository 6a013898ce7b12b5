"""Continuous batching over one model copy (issue 20): `LoadOptions.parallel`, `backends.scheduler`, the llama.cpp
engine's several sequences, and `r1v serve` on one copy.

- The engine: one `_step_batch` of 4 sequences of different lengths gives each the logits of its own `_step`:
  bit-identical on Q8_0 (measured here: max |diff| 0.0; micro-r1v Q4_K_M 6.7e-6), within 5e-3 on F16 (measured
  1.5e-3 on logits up to ~4 and 1.6e-3 on micro-r1v's up to ~19: llama.cpp's CPU kernels are not batch-invariant
  for F16 weights - the matrix product of several rows takes another path than one row's).
- Outputs do not depend on batch mates: greedy tokens of 1, 2 and 4 concurrent requests (text and images) equal
  each request run alone on the single-sequence path, on the tiny GGUF (Q8_0 and F16) and on micro-r1v; a
  seeded sampled request and stop strings too (per stream).
- The scheduler: a request beyond `parallel` waits and is admitted when a stream ends or is closed; a long
  prompt is evaluated in spans of at most n_batch positions between the decode steps of the others; a
  follow-up takes the sequence holding its conversation; each sequence has the whole n_ctx window; the prefix
  cache restores a state saved from one sequence into another.
- `r1v serve --max-concurrency 2` shape: one model given to two slots answers concurrent requests as run alone.
"""
from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pytest
from PIL import Image

from r1v.converters.gguf import GGUFConversion
from r1v.runtime.api import ContextOverflowError, LoadOptions, Result, load
from r1v.runtime.backends.base import common_prefix
from r1v.testing.images import pattern_pixels

THREADS = dict(n_threads=1, n_threads_batch=1)  # 2 shared cores
GREEDY = dict(temperature=0, repetition_penalty=1.0)
TEXTS = ["Tell me about cats.", "What is 2+2? Think step by step.", "Hello there, how are you doing today?",
         "Count to ten, slowly please."]


@pytest.fixture(scope="module")
def png(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("batching") / "pattern.png"
    Image.fromarray(pattern_pixels(448, 448, 2, 0.08)).save(path)
    return path


@pytest.fixture(scope="module")
def q8(tiny_r1v_gguf: GGUFConversion) -> Path:
    return tiny_r1v_gguf.llm["q8_0"]  # mmproj-tiny-r1v-f16.gguf beside it


@pytest.fixture(scope="module")
def f16(tiny_r1v_gguf: GGUFConversion) -> Path:
    return tiny_r1v_gguf.llm["f16"]


def _requests(png: Path) -> list[tuple[str, list[Path]]]:
    """Four requests: an image and three texts (different lengths)."""
    return [("How many red circles are in the image?", [png]), *((t, []) for t in TEXTS[:3])]


def _concurrently(fns: list[Callable[[], Any]]) -> list[Any]:
    """Run the callables in threads that start together; their results (an exception is raised here)."""
    out: list[Any] = [None] * len(fns)
    barrier = threading.Barrier(len(fns))

    def run(i: int) -> None:
        barrier.wait()
        try:
            out[i] = fns[i]()
        except BaseException as e:  # noqa: BLE001 - re-raised below
            out[i] = e

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(fns))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    for value in out:
        if isinstance(value, BaseException):
            raise value
    return out


# --- options ---------------------------------------------------------------------------------------------------

def test_parallel_option_is_checked_and_one_keeps_the_single_sequence_path(q8):
    with pytest.raises(ValueError, match=r"^parallel must be >= 1, got 0$"):
        LoadOptions(parallel=0)
    with load(q8, n_ctx=256, **THREADS) as m:
        assert m._scheduler is None and len(m._backend.sequences) == 1
    with load(q8, n_ctx=256, parallel=3, **THREADS) as m:
        backend = m._backend
        assert m._scheduler is not None and [s.seq_id for s in backend.sequences] == [0, 1, 2]
        from llama_cpp import llama_cpp as _ll

        # each sequence has the window asked for (one KV stream of 256 cells each), the context 3 x 256
        assert backend.n_ctx == 256 and _ll.llama_n_ctx_seq(backend._ctx) == 256
        assert _ll.llama_n_ctx(backend._ctx) == 768 and _ll.llama_n_seq_max(backend._ctx) == 3


def test_a_model_dropped_without_close_stops_its_scheduler(q8):
    import gc
    import weakref

    m = load(q8, n_ctx=256, parallel=2, **THREADS)
    assert m.generate("hi", max_tokens=2, temperature=0).completion_tokens == 2
    worker, backend = m._scheduler._thread, weakref.ref(m._backend)
    del m
    gc.collect()
    worker.join(timeout=10)
    assert not worker.is_alive()  # before: the worker kept the scheduler, the backend and its memory for good
    gc.collect()
    assert backend() is None


# --- the engine: a batched step against single steps --------------------------------------------------------

def _step_logits(path: Path, batched: bool) -> np.ndarray:
    """Logits [3 steps, 4 sequences, vocab]: 4 prompts of different lengths prefilled, then 3 steps of all of
    them, one `_step_batch` each or one `_step` per sequence."""
    with load(path, n_ctx=256, parallel=4, prefix_cache=False, **THREADS) as m:
        backend = m._backend
        for sequence, text in zip(backend.sequences, TEXTS):
            prompt = backend.prepare([m.render(text).text], [])
            for span in backend.prompt_spans(backend.request(prompt, m.sampling, sequence), 0):
                backend._evaluate_span(sequence, prompt, span, {})
        rows = []
        for token in (100, 101, 102):
            if batched:
                handles = backend._step_batch([(s, token) for s in backend.sequences])
                rows.append([backend._logits_row(h) for h in handles])
            else:
                rows.append([backend._logits_row(backend._step(s, token)) for s in backend.sequences])
        lengths = [len(s.positions) for s in backend.sequences]
        assert len(set(lengths)) == 4  # sequences of different lengths stepped together
        return np.array(rows)


@pytest.mark.parametrize("quant, tolerance", [("q8_0", 0.0), ("f16", 5e-3)])
def test_batched_step_gives_each_sequence_its_own_logits(tiny_r1v_gguf, quant, tolerance):
    path = tiny_r1v_gguf.llm[quant]
    alone, batched = _step_logits(path, batched=False), _step_logits(path, batched=True)
    assert np.abs(alone - batched).max() <= tolerance
    assert (alone.argmax(-1) == batched.argmax(-1)).all()


# --- outputs do not depend on batch mates -------------------------------------------------------------------

def _alone(path: Path, requests: list[tuple[str, list[Path]]], **params: Any) -> list[Result]:
    with load(path, n_ctx=2048, **THREADS) as m:
        return [m.generate(text, images, **params) for text, images in requests]


@pytest.mark.parametrize("quant", ["q8_0", "f16"])
def test_greedy_tokens_of_1_2_4_concurrent_requests_equal_each_alone(tiny_r1v_gguf, png, quant):
    path = tiny_r1v_gguf.llm[quant]
    requests = _requests(png)
    params = dict(**GREEDY, max_tokens=24)
    alone = [r.tokens for r in _alone(path, requests, **params)]
    with load(path, n_ctx=2048, parallel=4, **THREADS) as m:
        for k in (1, 2, 4):
            m.reset()
            results = _concurrently([lambda t=t, i=i: m.generate(t, i, **params) for t, i in requests[:k]])
            assert [r.tokens for r in results] == alone[:k], k
            assert results[0].images and results[0].images[0].tiles == 1  # the image request went through


def test_sampling_seed_and_stop_strings_stay_per_stream(q8, png):
    requests = _requests(png)
    seeded = dict(temperature=0.9, top_p=0.95, seed=1234, max_tokens=20)
    greedy = dict(**GREEDY, max_tokens=20)
    with load(q8, n_ctx=2048, **THREADS) as m:
        sampled_alone = m.generate(requests[1][0], **seeded)
        free_text = m.generate(requests[2][0], **greedy).text
    stop = free_text[len(free_text) // 2:][:3]  # a string in the middle of the greedy answer
    with load(q8, n_ctx=2048, **THREADS) as m:
        stopped_alone = m.generate(requests[2][0], stop=[stop], **greedy)
    assert stopped_alone.finish_reason == "stop_string" and stop not in stopped_alone.text
    with load(q8, n_ctx=2048, parallel=3, **THREADS) as m:
        sampled, stopped, plain = _concurrently([
            lambda: m.generate(requests[1][0], **seeded),
            lambda: m.generate(requests[2][0], stop=[stop], **greedy),
            lambda: m.generate(requests[2][0], **greedy)])
    assert sampled.tokens == sampled_alone.tokens and sampled.seed == 1234
    assert stopped.text == stopped_alone.text and stopped.finish_reason == "stop_string"
    assert plain.text == free_text and plain.finish_reason == "length"


def test_micro_r1v_answers_equal_alone_when_batched():
    from r1v.micro import demo_image_path, demo_question
    from r1v.micro.files import micro_gguf

    path = micro_gguf("q8_0", progress=False)
    question, image = demo_question()["question"], demo_image_path()
    requests = [(question, [image]), ("What colour is the largest shape?", [image]), (question, []),
                ("How many shapes are there?", [image])]
    params = dict(**GREEDY, max_tokens=48)
    alone = _alone(path, requests, **params)
    with load(path, n_ctx=2048, parallel=4, **THREADS) as m:
        for k in (2, 4):
            m.reset()
            results = _concurrently([lambda t=t, i=i: m.generate(t, i, **params) for t, i in requests[:k]])
            assert [r.tokens for r in results] == [r.tokens for r in alone[:k]], k


# --- the scheduler ---------------------------------------------------------------------------------------------

def test_request_beyond_parallel_waits_until_a_stream_is_closed(q8):
    with load(q8, n_ctx=4096, parallel=2, **THREADS) as m:
        m._backend._is_end = lambda token: False  # the tiny model's answers run to max_tokens
        holders = []

        def hold(text: str) -> None:  # a thread per stream: a new request ends its own thread's stream only
            stream = m.stream(text, **GREEDY, max_tokens=4000)  # seconds of decoding: busy while checked
            next(stream)
            holders.append(stream)

        for text in TEXTS[:2]:
            t = threading.Thread(target=hold, args=(text,))
            t.start()
            t.join()
        third: dict[str, Any] = {}
        started = threading.Event()

        def run_third() -> None:
            started.set()
            third["result"] = m.generate(TEXTS[2], **GREEDY, max_tokens=4)
            third["at"] = time.monotonic()

        worker = threading.Thread(target=run_third)
        worker.start()
        started.wait()
        time.sleep(0.2)
        assert "result" not in third and len(m._scheduler._waiting) == 1  # both sequences busy: it waits
        closed_at = time.monotonic()
        holders[0].close()  # cancelled: its sequence is free at the next iteration
        worker.join(timeout=60)
        assert third["result"].completion_tokens == 4 and third["at"] > closed_at
        assert len(next(holders[1]).text) >= 0  # the other stream runs on
        holders[1].close()


def test_long_prompt_is_prefilled_in_spans_between_the_others_steps(q8):
    long_prompt = "word " * 60 + "How many words?"  # ~330 tokens: 11 spans of 32
    with load(q8, n_ctx=1024, n_batch=32, parallel=2, **THREADS) as m:
        backend = m._backend
        trace: list[tuple[str, Any]] = []
        evaluate, step_batch = backend._evaluate_prompt_span, backend._step_batch

        def traced_evaluate(request, span, embeddings):
            trace.append(("span", (request.sequence.seq_id, span.end - span.start)))
            return evaluate(request, span, embeddings)

        def traced_steps(steps):
            trace.append(("step", tuple(s.seq_id for s, _ in steps)))
            return step_batch(steps)

        backend._evaluate_prompt_span, backend._step_batch = traced_evaluate, traced_steps
        backend._is_end = lambda token: False  # the tiny model's answers run to max_tokens
        short = m.stream(TEXTS[0], **GREEDY, max_tokens=600)
        next(short)  # decoding on its sequence; the long one joins from another thread
        results = _concurrently([lambda: m.generate(long_prompt, **GREEDY, max_tokens=3), lambda: list(short)])
        assert results[0].completion_tokens == 3 and results[1][-1].result.completion_tokens == 600
    seq_long = next(v[0] for kind, v in trace if kind == "span" and v[1] == 32)
    spans = [i for i, (kind, v) in enumerate(trace) if kind == "span" and v[0] == seq_long]
    assert len(spans) >= 10 and all(trace[i][1][1] <= 32 for i in spans)
    between = [v for kind, v in trace[spans[0]:spans[-1]] if kind == "step"]
    assert len(between) >= len(spans) - 1  # the short stream stepped between the long prompt's spans


def test_follow_up_takes_the_sequence_holding_its_conversation(q8):
    with load(q8, n_ctx=1024, parallel=2, **THREADS) as m:
        first = [{"role": "user", "content": "Tell me about cats: their history, their habits, their food, " * 2}]
        other = [{"role": "user", "content": "Something else entirely: a long question about dogs and birds."}]
        a = m.generate(first, **GREEDY, max_tokens=8)
        o = m.generate(other, **GREEDY, max_tokens=8)  # the unused sequence, not the one holding `first`
        follow_up = first + [a.message, {"role": "user", "content": "And their whiskers?"}]
        backend = m._backend
        items = [backend.prepare(m.render(msgs).fragments, []).items for msgs in (first, other, follow_up)]
        held = [items[0] + a.tokens[:-1], items[1] + o.tokens[:-1]]  # each sequence: its prompt and answer
        shared = [common_prefix(h, items[2]) for h in held]
        assert shared[0] > len(items[2]) / 2 > shared[1] > 0  # `other` shares the template's first tokens
        again = m.generate(first, **GREEDY, max_tokens=8)  # its sequence is now the most recently used one
        assert again.tokens == a.tokens and again.cached_tokens == len(items[0]) - 1
        b = m.generate(follow_up, **GREEDY, max_tokens=4)
        assert b.cached_tokens == shared[0]  # not the least recently used sequence: the one holding `first`


def test_each_sequence_has_the_whole_window(q8):
    prompt, too_long = "word " * 6, "word " * 20  # ~44 and ~114 positions
    with load(q8, n_ctx=64, **THREADS) as m:
        m._backend._is_end = lambda token: False  # the tiny model's answers run to the window's end
        alone = m.generate(prompt, **GREEDY, max_tokens=1000)
        with pytest.raises(ContextOverflowError) as refused_alone:
            m.generate(too_long, **GREEDY)
    assert alone.finish_reason == "length" and alone.prompt_tokens + alone.completion_tokens == 64
    with load(q8, n_ctx=64, parallel=2, **THREADS) as m:
        m._backend._is_end = lambda token: False
        both = _concurrently([lambda: m.generate(prompt, **GREEDY, max_tokens=1000)] * 2)
        with pytest.raises(ContextOverflowError) as refused:
            m.generate(too_long, **GREEDY)
    assert [r.tokens for r in both] == [alone.tokens] * 2  # 2 x 64 positions at once, each to its window's end
    assert str(refused.value) == str(refused_alone.value) and refused.value.n_ctx == 64


def test_prefix_cache_restores_into_another_sequence(q8, png, tmp_path):
    options = dict(n_ctx=2048, parallel=2, prefix_cache_dir=tmp_path / "cache", **THREADS)
    question = "How many red circles are in the image?"
    with load(q8, **options) as m:
        saved = m.generate(question, [png], **GREEDY, max_tokens=8)
        m._backend.wait_for_writes()
    assert saved.restored_tokens == 0
    with load(q8, **options) as m:
        m._backend._is_end = lambda token: False  # the tiny model's answers run to max_tokens
        busy = m.stream(TEXTS[0], **GREEDY, max_tokens=1500)  # sequence 0 taken...
        holder = threading.Thread(target=next, args=(busy,))
        holder.start()
        holder.join()
        restored = _concurrently([lambda: m.generate(question, [png], **GREEDY, max_tokens=8)])[0]
        images = [any(isinstance(p, tuple) for p in s.positions) for s in m._backend.sequences]
        busy.close()
    assert images == [False, True]
    assert restored.restored_tokens > 0 and restored.tokens == saved.tokens  # ...so restored into sequence 1
    with load(q8, **{**options, "parallel": 1}) as m:  # another stream count: another key, computed afresh
        assert m.generate(question, [png], **GREEDY, max_tokens=8).restored_tokens == 0


# --- r1v serve on one copy ---------------------------------------------------------------------------------------

def test_server_slots_share_one_batched_model(q8, png):
    httpx = pytest.importorskip("httpx")
    pytest.importorskip("fastapi")
    from r1v.apps.serve.app import ServerConfig, ServerThread, create_app

    questions = TEXTS[:2]
    alone = [r.content for r in _alone(q8, [(q, []) for q in questions], **GREEDY, max_tokens=16)]
    with load(q8, n_ctx=2048, parallel=2, **THREADS) as m:
        with ServerThread(create_app([m, m], ServerConfig(queue=0))) as url:
            def ask(q: str) -> httpx.Response:
                body = {"model": "r1v", "messages": [{"role": "user", "content": q}], "temperature": 0,
                        "repetition_penalty": 1.0, "max_tokens": 16}
                return httpx.post(f"{url}/v1/chat/completions", json=body, timeout=120)

            answers = _concurrently([lambda q=q: ask(q) for q in questions])
            health = httpx.get(f"{url}/health").json()
    assert [a.status_code for a in answers] == [200, 200]
    assert [a.json()["choices"][0]["message"]["content"] for a in answers] == alone
    assert health["slots"]["slots"] == 2 and health["slots"]["completed"] == 2
    for a in answers:  # llama-server's timings beside the usage (the load test reads the decode rate there)
        timings, used = a.json()["timings"], a.json()["usage"]
        assert timings["predicted_n"] == used["completion_tokens"] - 1 and timings["predicted_per_second"] > 0
        assert timings["prompt_n"] + timings["cache_n"] == used["prompt_tokens"]


def test_measuring_image_rates_leaves_running_streams_alone(q8, png, tmp_path):
    """A request's image budget measures this machine's rates on first use: with several sequences in a context
    of its own, not by emptying the one whose other streams are running."""
    with load(q8, n_ctx=1024, **THREADS) as m:
        m._backend._is_end = lambda token: False  # long enough to be running while the rates are measured
        alone = m.generate(TEXTS[1], **GREEDY, max_tokens=600).tokens
    with load(q8, n_ctx=1024, parallel=2, prefix_cache_dir=tmp_path, **THREADS) as m:
        m._backend._is_end = lambda token: False
        assert m._backend._rates is None
        running: dict[str, Any] = {}

        def first_token() -> None:
            running["stream"] = m.stream(TEXTS[1], **GREEDY, max_tokens=600)
            running["tokens"] = [next(running["stream"]).token_id]

        t = threading.Thread(target=first_token)
        t.start()
        t.join()
        budgeted = _concurrently([lambda: m.generate("How many?", [png], image_budget=60.0, **GREEDY,
                                                     max_tokens=2)])[0]
        rest = [c for c in running["stream"]]
    assert m._backend._rates is not None and budgeted.estimated_prefill_seconds is not None
    assert rest[-1].result.tokens == alone


@pytest.mark.slow
def test_bench_sweep_serves_each_way_in_its_own_process(q8, capsys):
    pytest.importorskip("httpx")
    pytest.importorskip("fastapi")
    from r1v.bench.serve import sweep, sweep_table

    rows = sweep(q8, clients=(1, 2), rounds=1, max_tokens=4, threads=2, n_ctx=256)
    assert [(r.mode, r.clients, r.threads_per_copy) for r in rows] == \
        [("batched", 1, 2), ("batched", 2, 2), ("copies", 1, 2), ("copies", 2, 1)]
    assert all(r.report.ok == r.clients and r.report.errors == 0 and r.peak_rss_mb > 0 for r in rows)
    table = sweep_table(rows).splitlines()
    assert len(table) == 6 and table[2].startswith("| batched | 1 | 2 |") and table[2].count("| 1.00 |") == 2
    assert all(r.report.stream_decode_tokens_per_second > 0 and r.report.first_token_p50_ms > 0 for r in rows)
