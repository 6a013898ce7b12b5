"""`r1v serve`: the official `openai` client against a live server.

A tiny converted GGUF served by `r1v serve` in a subprocess (as a user runs it): non-streaming and streaming
answers equal to the same greedy generation run directly; an image sent as a data: URL; the reasoning split;
/v1/models and /health; wrong API key (401); malformed JSON and bad fields (400, the field named); bodies and
images over the limits (413); a burst beyond one slot + one queued request refused with 429 at once; a client
that disconnects mid-stream stops its generation and frees the slot. A scripted model served in-process checks
the exact reasoning/content split and how sampling fields reach `SamplingParams`.
"""
from __future__ import annotations

import base64
import io
import json
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
from r1v.testing.images import pattern_pixels
from PIL import Image

openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")
pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

from r1v.converters.gguf import GGUFConversion  # noqa: E402
from r1v.runtime.api import LoadOptions, Model, load  # noqa: E402
from r1v.apps.serve.app import ServerConfig, ServerThread, create_app, free_port  # noqa: E402
from serve_process import serve_process  # noqa: E402

KEY = "sk-test-r1v"
THREADS = dict(n_threads=1, n_threads_batch=1)  # 2 shared cores: llama.cpp's spinning threads stall oversubscribed
GREEDY = dict(temperature=0, repetition_penalty=1.0)
N_CTX = 4096
QUESTION = "How many red circles are in the image?"


def _png(width: int, height: int, seed: int = 0, noise: float = 0.08) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pattern_pixels(width, height, seed, noise)).save(buffer, format="PNG")
    return buffer.getvalue()


def _data_url(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode()


@pytest.fixture(scope="module")
def gguf(tiny_r1v_gguf: GGUFConversion) -> Path:
    return tiny_r1v_gguf.llm["f16"]


@pytest.fixture(scope="module")
def local(gguf: Path):
    """The same model loaded here: what the server's answers must equal."""
    with load(gguf, n_ctx=N_CTX, **THREADS) as model:
        yield model


@pytest.fixture(scope="module")
def server(gguf: Path, tmp_path_factory: pytest.TempPathFactory):
    """`r1v serve` in a subprocess: one slot, one queued request, small body/image limits."""
    log = tmp_path_factory.mktemp("serve-log") / "server.log"
    with serve_process(str(gguf), free_port(), log, "--api-key", KEY, "--served-model-name", "tiny-r1v",
                       "--max-concurrency", "1", "--queue", "1", "--n-ctx", str(N_CTX), "--n-threads", "1",
                       "--n-threads-batch", "1", "--max-body-mb", "1", "--max-image-mb", "0.25",
                       "--log-level", "warning", startup_s=120) as served:
        yield served.url


@pytest.fixture()
def client(server: str):
    with openai.OpenAI(base_url=server + "/v1", api_key=KEY, max_retries=0, timeout=120) as c:
        yield c


def _health(url: str) -> dict[str, Any]:
    return httpx.get(url + "/health", timeout=5).json()["slots"]


def _wait_idle(url: str, timeout: float = 30) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        slots = _health(url)
        if slots["busy"] == 0 and slots["waiting"] == 0:
            return slots
        assert time.monotonic() < deadline, f"the server stayed busy: {slots}"
        time.sleep(0.05)


# --- answers --------------------------------------------------------------------------------------------

def test_non_streaming_answer_equals_direct_generation(client, local: Model):
    response = client.chat.completions.create(
        model="tiny-r1v", messages=[{"role": "user", "content": QUESTION}], max_tokens=24, temperature=0,
        extra_body={"repetition_penalty": 1.0})
    expected = local.generate(QUESTION, max_tokens=24, **GREEDY)
    message = response.choices[0].message
    assert response.object == "chat.completion" and response.model == "tiny-r1v"
    assert message.role == "assistant"
    assert (message.reasoning_content, message.content) == (expected.reasoning, expected.content)
    assert expected.reasoning  # the prompt forces <think>: a tiny model's output is reasoning
    assert response.choices[0].finish_reason == {"stop": "stop", "stop_string": "stop"}.get(
        expected.finish_reason, expected.finish_reason)
    assert response.usage.prompt_tokens == expected.prompt_tokens
    assert response.usage.completion_tokens == expected.completion_tokens == 24
    assert response.usage.total_tokens == expected.prompt_tokens + 24


def test_streaming_deltas_join_to_the_same_answer(client, local: Model):
    stream = client.chat.completions.create(
        model="tiny-r1v", messages=[{"role": "user", "content": QUESTION}], max_tokens=24, temperature=0,
        stream=True, stream_options={"include_usage": True}, extra_body={"repetition_penalty": 1.0})
    chunks = list(stream)
    expected = local.generate(QUESTION, max_tokens=24, **GREEDY)
    deltas = [c.choices[0].delta for c in chunks if c.choices]
    assert deltas[0].role == "assistant"
    reasoning = "".join(getattr(d, "reasoning_content", None) or "" for d in deltas)
    content = "".join(d.content or "" for d in deltas)
    assert (reasoning, content) == (expected.reasoning, expected.content)
    assert sum(1 for d in deltas if getattr(d, "reasoning_content", None)) > 1  # streamed piece by piece
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes == ["length"]
    assert not chunks[-1].choices and chunks[-1].usage.completion_tokens == 24
    assert len({c.id for c in chunks}) == 1


def test_image_as_data_url(client, local: Model):
    png = _png(448, 448, seed=3, noise=0.0)  # smooth: a small file, under the server's 0.25 MB image limit
    content = [{"type": "image_url", "image_url": {"url": _data_url(png)}}, {"type": "text", "text": QUESTION}]
    response = client.chat.completions.create(
        model="tiny-r1v", messages=[{"role": "user", "content": content}], max_tokens=12, temperature=0,
        extra_body={"repetition_penalty": 1.0})
    expected = local.generate(QUESTION, images=[png], max_tokens=12, **GREEDY)
    text_only = local.generate(QUESTION, max_tokens=1, **GREEDY)
    assert response.usage.prompt_tokens == expected.prompt_tokens >= text_only.prompt_tokens + 256  # one tile
    assert response.choices[0].message.reasoning_content == expected.reasoning


def test_models_and_health(client, server: str):
    models = client.models.list()
    assert [m.id for m in models.data] == ["tiny-r1v"]
    health = httpx.get(server + "/health").json()  # no key needed: for load balancers and probes
    assert health["status"] == "ok" and health["slots"]["slots"] == 1 and health["slots"]["queue"] == 1


# --- refusals -------------------------------------------------------------------------------------------

def test_wrong_or_missing_api_key_is_401(server: str):
    with openai.OpenAI(base_url=server + "/v1", api_key="sk-wrong", max_retries=0) as wrong:
        with pytest.raises(openai.AuthenticationError) as e:
            wrong.chat.completions.create(model="x", messages=[{"role": "user", "content": "hi"}])
    assert e.value.status_code == 401 and e.value.code == "invalid_api_key"
    missing = httpx.post(server + "/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}]})
    assert missing.status_code == 401 and missing.json()["error"]["type"] == "invalid_request_error"
    assert httpx.get(server + "/v1/models").status_code == 401


@pytest.mark.parametrize("body, param, words", [
    (b'{"messages": [{"role": "user", "content": "hi"}', None, "not valid JSON"),
    (b'[1, 2]', None, "JSON object"),
    (b'{"model": "x"}', "messages", "non-empty list"),
    (b'{"messages": [{"role": "wizard", "content": "hi"}]}', "messages", "role"),
    (b'{"messages": [{"role": "user", "content": "hi"}], "temperature": "hot"}', "temperature", "number"),
    (b'{"messages": [{"role": "user", "content": "hi"}], "top_p": 0}', "top_p", "(0.0, 1.0]"),
    (b'{"messages": [{"role": "user", "content": "hi"}], "max_tokens": 0}', "max_tokens", ">= 1"),
    (b'{"messages": [{"role": "user", "content": "hi"}], "stop": ["", "x"]}', "stop", "empty"),
    (b'{"messages": [{"role": "user", "content": "hi"}], "n": 2}', "n", "must be 1"),
    (b'{"messages": [{"role": "user", "content": "hi"}], "frequency_penalty": 0.5}', "frequency_penalty",
     "repetition_penalty"),
    (b'{"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "https://x/y.png"}}]}]}',
     "messages[0].content[0].image_url.url", "not fetched"),
    (b'{"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "/etc/hostname"}}]}]}',
     "messages[0].content[0].image_url.url", "--allow-local-images"),
    (b'{"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "data:image/png;base64,'
     b'iVBORw0KGgo="}}]}]}', "messages[0].content[0].image_url.url", "cannot decode image"),
])
def test_malformed_requests_are_400_naming_the_field(server: str, body: bytes, param: str | None, words: str):
    response = httpx.post(server + "/v1/chat/completions", content=body, timeout=30,
                          headers={"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"})
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["type"] == "invalid_request_error" and error["param"] == param and words in error["message"]


def test_openai_client_sees_bad_request(client):
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="x", messages=[{"role": "user", "content": "hi"}], temperature=5)
    assert e.value.status_code == 400 and e.value.param == "temperature"


def test_context_overflow_is_400(client):
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="x", messages=[{"role": "user", "content": "word " * 5000}])
    assert e.value.code == "context_length_exceeded"


def test_oversized_body_and_image_are_413(server: str):
    headers = {"Authorization": f"Bearer {KEY}"}
    big = {"messages": [{"role": "user", "content": "x" * (2 * 2**20)}]}
    response = httpx.post(server + "/v1/chat/completions", json=big, headers=headers, timeout=30)
    assert response.status_code == 413 and response.json()["error"]["code"] == "request_too_large"
    image = _data_url(os.urandom(300_000))  # decodes to 300 kB > the 0.25 MB image limit, body < 1 MB
    content = [{"type": "image_url", "image_url": {"url": image}}, {"type": "text", "text": "hi"}]
    response = httpx.post(server + "/v1/chat/completions", headers=headers, timeout=30,
                          json={"messages": [{"role": "user", "content": content}]})
    assert response.status_code == 413
    assert response.json()["error"]["param"] == "messages[0].content[0].image_url.url"


def test_404_has_the_openai_shape(server: str):
    response = httpx.get(server + "/v1/nothing")
    assert response.status_code == 404 and response.json()["error"]["code"] == "not_found"


# --- capacity and disconnects ---------------------------------------------------------------------------

@pytest.mark.slow
def test_burst_beyond_capacity_is_refused_with_429_at_once(client, server: str):
    """One slot + one queued: of 8 simultaneous long requests, the rest are refused promptly, not queued."""
    _wait_idle(server)

    def ask(_: int) -> tuple[Any, float]:
        start = time.perf_counter()
        try:
            client.chat.completions.create(model="x", messages=[{"role": "user", "content": QUESTION}],
                                           max_tokens=1500, temperature=0, extra_body={"repetition_penalty": 1.0})
            return 200, time.perf_counter() - start
        except openai.RateLimitError as e:
            assert e.code == "rate_limit_exceeded" and e.response.headers["retry-after"] == "1"
            return 429, time.perf_counter() - start

    with ThreadPoolExecutor(8) as pool:
        outcomes = list(pool.map(ask, range(8)))
    statuses = sorted(s for s, _ in outcomes)
    ok = [t for s, t in outcomes if s == 200]
    refused = [t for s, t in outcomes if s == 429]
    assert set(statuses) == {200, 429} and len(ok) >= 1 and len(refused) >= 4, statuses
    assert max(refused) < min(ok), (refused, ok)  # refusals come before the first answer is done
    slots = _wait_idle(server)
    assert slots["refused"] >= len(refused)


def test_client_disconnect_mid_stream_stops_generation_and_frees_the_slot(client, server: str):
    before = _wait_idle(server)
    stream = client.chat.completions.create(
        model="x", messages=[{"role": "user", "content": QUESTION}], max_tokens=N_CTX, temperature=0, stream=True,
        extra_body={"repetition_penalty": 1.0})
    received = [chunk for chunk, _ in zip(stream, range(4))]
    assert len(received) == 4 and _health(server)["busy"] == 1
    stream.close()  # the client goes away with thousands of tokens still to generate
    after = _wait_idle(server, timeout=10)
    assert after["cancelled"] == before["cancelled"] + 1 and after["completed"] == before["completed"]
    # the slot serves the next request
    response = client.chat.completions.create(model="x", messages=[{"role": "user", "content": "hi"}], max_tokens=2,
                                              temperature=0)  # greedy: a sampled end token would end it early
    assert response.usage.completion_tokens == 2


# --- the split and the sampling fields, exactly (a scripted model in-process) ---------------------------

class _ScriptedBackend:
    """Stands in for llama.cpp: yields the scripted pieces, the last with the end flag; records the params."""

    path, mmproj_path, n_ctx, chat_template = Path("scripted.gguf"), None, 4096, None
    special_texts = {"bos_token": "", "eos_token": ""}

    def __init__(self, pieces: list[bytes]):
        self.pieces, self.params = pieces, []

    def prepare(self, pieces, images):
        return None

    def start(self, prompt, params):
        from r1v.runtime.backends.prompt import RunStats

        self.params.append(params)
        backend = self

        class Run:
            stats = RunStats(prompt_tokens=10)

            def __iter__(self):
                n = len(backend.pieces)
                for i, piece in enumerate(backend.pieces[:params.max_tokens]):
                    yield 100 + i, piece, i == n - 1

            def close(self):
                pass

        return Run()

    def close(self):
        pass


@pytest.fixture(scope="module")
def scripted():
    backend = _ScriptedBackend([b"Let me", b" look.</th", b"ink>\n\nIt is ", b"\xe4\xb8", b"\xad", b"\xe6\x96\x87!",
                                b""])
    app = create_app([Model(backend, None, LoadOptions())], ServerConfig(model_name="scripted"))
    with ServerThread(app) as url:
        with openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0) as c:
            yield c, backend


def test_reasoning_and_content_are_split(scripted):
    client, _ = scripted
    message = client.chat.completions.create(model="scripted", messages=[{"role": "user", "content": "q"}]
                                             ).choices[0].message
    assert (message.reasoning_content, message.content) == ("Let me look.", "It is 中文!")
    chunks = list(client.chat.completions.create(model="scripted", messages=[{"role": "user", "content": "q"}],
                                                 stream=True))
    pieces = [(k, v) for c in chunks if c.choices for k, v in (c.choices[0].delta.model_dump(exclude_none=True)
                                                               .items()) if k in ("reasoning_content", "content") and v]
    assert pieces == [("reasoning_content", "Let me"), ("reasoning_content", " look."), ("content", "It is "),
                      ("content", "中"), ("content", "文!")]
    assert chunks[-1].choices[0].finish_reason == "stop"


def test_sampling_fields_reach_the_model(scripted):
    client, backend = scripted
    client.chat.completions.create(
        model="scripted", messages=[{"role": "user", "content": "q"}], temperature=0.3, top_p=0.8, seed=7,
        max_completion_tokens=5, stop=["END", "STOP"], frequency_penalty=0, presence_penalty=0,
        extra_body={"top_k": 20, "min_p": 0.05, "repetition_penalty": 1.2})
    p = backend.params[-1]
    assert (p.temperature, p.top_p, p.top_k, p.min_p, p.repetition_penalty, p.seed, p.max_tokens, p.stop) == (
        0.3, 0.8, 20, 0.05, 1.2, 7, 5, ("END", "STOP"))
    client.chat.completions.create(model="scripted", messages=[{"role": "user", "content": "q"}], max_tokens=3,
                                   extra_body={"top_k": -1})
    assert (backend.params[-1].max_tokens, backend.params[-1].top_k) == (3, 0)
    defaults = backend.params[-1]
    assert defaults.temperature == 0.6 and defaults.repetition_penalty == 1.05  # the model's, when not given


def test_protocol_is_json_all_the_way(scripted):
    """The SSE body is data: lines of JSON ending with [DONE]; the no-key server needs no Authorization."""
    client, _ = scripted
    url = str(client.base_url).rstrip("/")
    with httpx.stream("POST", url + "/chat/completions", json={"messages": [{"role": "user", "content": "q"}],
                                                               "stream": True}) as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        lines = [line for line in response.iter_lines() if line]
    assert lines[-1] == "data: [DONE]"
    assert all(json.loads(line[len("data: "):])["object"] == "chat.completion.chunk" for line in lines[:-1])


# --- the wire format without a server ------------------------------------------------------------------

def test_local_images_only_when_allowed_and_under_the_root(tmp_path: Path):
    from r1v.apps.serve.protocol import APIError, ServerLimits, parse_chat_request

    (tmp_path / "img").mkdir()
    image = tmp_path / "img" / "a.png"
    image.write_bytes(_png(32, 32))
    (tmp_path / "secret.png").write_bytes(_png(32, 32))

    def body(url: str) -> dict:
        return {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}},
                                                          {"type": "text", "text": "q"}]}]}

    with pytest.raises(APIError, match="--allow-local-images"):
        parse_chat_request(body(str(image)))
    anywhere = ServerLimits(allow_local_images=True)
    for url in (str(image), image.as_uri()):
        parts = parse_chat_request(body(url), anywhere).messages[0]["content"]
        assert parts[0] == {"type": "image", "image": str(image)}
    rooted = ServerLimits(allow_local_images=True, local_image_root=tmp_path / "img")
    assert parse_chat_request(body("a.png"), rooted).messages[0]["content"][0]["image"] == str(image.resolve())
    with pytest.raises(APIError, match="outside the allowed image folder") as e:
        parse_chat_request(body("../secret.png"), rooted)
    assert e.value.status == 400 and e.value.param == "messages[0].content[0].image_url.url"
    with pytest.raises(APIError, match="image is") as e:
        parse_chat_request(body(str(image)), ServerLimits(max_image_bytes=10, allow_local_images=True))
    assert e.value.status == 413


def test_serving_batch_and_viewer_do_not_import_torch():
    code = ("import sys, r1v.apps.serve.app, r1v.apps.batch, r1v.apps.viewer, r1v.cli.serve_cmd, "
            "r1v.cli.batch_cmd, r1v.cli.view_cmd, r1v.bench.serve\n"
            "heavy = [m for m in ('torch', 'transformers') if m in sys.modules]\nassert not heavy, heavy\n")
    subprocess.run([sys.executable, "-c", code], check=True)
