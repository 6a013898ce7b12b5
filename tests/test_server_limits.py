"""`r1v serve` under hostile input (issue 16): images budgeted before any is decoded, bodies that used to give 500s,
clients that leave mid-upload, a busy port.

Images: the pixels of a request's images together are checked from their headers (`ServerLimits.max_request_pixels`,
`--max-megapixels`), and their context positions are counted from their number, then from their sizes, before a
slot decodes any; `r1v serve micro-r1v` keeps its peak RSS under 1.5 GB under a 9000x9000 PNG, six decompression
bombs and 30,000 tiny images (3.9 GB, 2.4 GB and a decode of all 30,000 before). Bodies: JSON nested 100,000 deep,
a 5,000-digit seed, a NUL byte in a local image path, NaN or Infinity in a number field are 400s naming the field
where there is one.
"""
from __future__ import annotations

import base64
import io
import json
import math
import socket
import struct
import subprocess
import sys
import time
import zlib
from pathlib import Path
from typing import Sequence

import pytest
from PIL import ImageFile

httpx = pytest.importorskip("httpx")
pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

from r1v.runtime.image import TilingConfig  # noqa: E402
from r1v.apps.serve.app import free_port, image_layout  # noqa: E402
from r1v.apps.serve.protocol import (  # noqa: E402
    APIError, ImageLayout, ServerLimits, check_images, parse_chat_request,
)
from serve_process import serve_process  # noqa: E402

THREADS = ("--n-threads", "1", "--n-threads-batch", "1")  # 2 shared cores
PEAK_RSS_MB = 1500


def _uniform_png(width: int, height: int, channels: int = 4) -> bytes:
    """A one-colour PNG written row by row: a 9000x9000 RGBA image in ~0.3 MB without holding its pixels."""
    color_type = {1: 0, 3: 2, 4: 6}[channels]
    row = b"\x00" + bytes((200, 30, 30, 128)[:channels]) * width  # filter byte 0, then the pixels
    z = zlib.compressobj(6)
    idat = b"".join(z.compress(row) for _ in range(height)) + z.flush()

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, color_type, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def _data_url(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode()


def _body(urls: Sequence[str] = (), text: str = "hi", **fields: object) -> dict:
    content = [{"type": "image_url", "image_url": {"url": u}} for u in urls] + [{"type": "text", "text": text}]
    return {"messages": [{"role": "user", "content": content}], **fields}


def _refused(body: object, limits: ServerLimits = ServerLimits(), layout: ImageLayout | None = None) -> APIError:
    raw = body if isinstance(body, (bytes, str)) else json.dumps(body)
    with pytest.raises(APIError) as e:
        check_images(parse_chat_request(raw, limits), limits, layout)
    return e.value


# --- numbers and JSON (the wire format alone) -----------------------------------------------------------

@pytest.mark.parametrize("name, value, shown", [
    ("repetition_penalty", math.inf, "Infinity"),
    ("repetition_penalty", -math.inf, "-Infinity"),
    ("repetition_penalty", math.nan, "NaN"),
    ("repeat_penalty", math.inf, "Infinity"),
    ("temperature", math.nan, "NaN"),
    ("top_p", math.nan, "NaN"),
    ("min_p", math.nan, "NaN"),
])
def test_non_finite_numbers_are_400_naming_the_field(name: str, value: float, shown: str):
    error = _refused(_body(**{name: value}))  # json.dumps writes NaN / Infinity, as Python's json reads them
    assert (error.status, error.param) == (400, name)
    assert error.message == f"'{name}' must be a finite number, got {shown}"


def test_an_overflowing_float_literal_is_refused():
    error = _refused(b'{"messages": [{"role": "user", "content": "hi"}], "repetition_penalty": 1e999}')
    assert (error.status, error.param, error.message) == (
        400, "repetition_penalty", "'repetition_penalty' must be a finite number, got Infinity")


def test_huge_integers_are_400():
    error = _refused('{"messages": [{"role": "user", "content": "hi"}], "seed": ' + "9" * 5000 + "}")
    assert (error.status, error.param, error.code) == (400, None, "invalid_json")
    assert "5000-character integer" in error.message
    for name, value, words in [("seed", 2**64, "<= 18446744073709551615"), ("seed", -(2**63) - 1, ">= "),
                               ("top_k", 2**31, "<= 2147483647"), ("max_tokens", 2**40, "<= 2147483647")]:
        error = _refused(_body(**{name: value}))
        assert (error.status, error.param) == (400, name) and words in error.message, error.message
    assert parse_chat_request(_body(seed=2**64 - 1)).sampling["seed"] == 2**64 - 1  # any 64-bit seed is fine


def test_deeply_nested_json_is_400():
    error = _refused("[" * 100_000 + "]" * 100_000)
    assert (error.status, error.code) == (400, "invalid_json") and "nested too deeply" in error.message
    deep = json.dumps(_body()).replace('"hi"', "[" * 900 + "]" * 900)  # under the parser's limit: a bad field
    assert _refused(deep).status == 400
    error = _refused('{"messages": [{"role": "user", "content": "hi"}], "temperature": ' + "[" * 900 + "]" * 900 + "}")
    assert (error.param, error.message) == ("temperature", "'temperature' must be a number, got an array of 1 item(s)")


def test_nul_byte_or_overlong_local_image_path_is_400(tmp_path: Path):
    param = "messages[0].content[0].image_url.url"
    rooted = ServerLimits(allow_local_images=True, local_image_root=tmp_path)
    anywhere = ServerLimits(allow_local_images=True)
    for url, limits in [("a\x00b.png", rooted), ("file:///tmp/a%00b.png", anywhere), ("file:///tmp/a%00b.png", rooted),
                        ("a\x00b.png", anywhere), ("x" * 5000 + ".png", rooted), ("/tmp/" + "x" * 300, anywhere)]:
        error = _refused(_body([url]), limits)
        assert (error.status, error.param, error.code) == (400, param, "invalid_image_url"), (url[:20], error.message)


# --- images budgeted before decoding --------------------------------------------------------------------

MICRO = ImageLayout(n_ctx=8192, tokens_per_tile=64, tiling=TilingConfig(image_size=224))  # micro-r1v's


@pytest.fixture()
def no_decoding(monkeypatch: pytest.MonkeyPatch) -> None:
    """Any pixel decoded fails the test: the checks must read headers only."""
    def load(self: ImageFile.ImageFile) -> None:
        raise AssertionError(f"decoded a {self.size} image")

    monkeypatch.setattr(ImageFile.ImageFile, "load", load)


def test_image_size_reads_the_header_only(no_decoding, tmp_path: Path):
    from r1v.runtime.image import ImageError, image_size

    png = _uniform_png(9000, 7000)
    (tmp_path / "a.png").write_bytes(png)
    for source in (png, _data_url(png), tmp_path / "a.png", str(tmp_path / "a.png"), io.BytesIO(png)):
        assert image_size(source) == (9000, 7000)
    with pytest.raises(ImageError, match="9000x7000 = 63000000 pixels, more than the limit of 1000000 pixels"):
        image_size(png, TilingConfig(max_pixels=1_000_000))
    with pytest.raises(ImageError, match="cannot decode image"):
        image_size(b"not an image")


def test_image_count_alone_refuses_before_any_header_is_read(no_decoding):
    # 30,000 parts that are not even images: the count is enough, nothing is opened.
    error = _refused(_body(["data:image/png;base64,AAAA"] * 30_000), layout=MICRO)
    assert (error.status, error.code, error.param) == (400, "context_length_exceeded", "messages")
    assert error.message.startswith("the request's 30000 image(s) take at least 1980000 context positions, but the "
                                    "context window is 8192 tokens (n_ctx)")


@pytest.mark.slow
def test_pixels_of_all_images_together_are_budgeted_from_headers(no_decoding):
    big = _data_url(_uniform_png(9000, 9000))
    error = _refused(_body([big]))
    assert (error.status, error.code, error.param) == (413, "image_too_large", "messages[0].content[0].image_url.url")
    assert error.message == ("messages[0].content[0].image_url.url: image is 9000x9000 = 81000000 pixels, more than "
                             "the limit of 16000000 pixels per request (r1v serve --max-megapixels); refused before "
                             "decoding")
    three = _data_url(_uniform_png(3000, 2000, 1))  # 6 Mpx each: two fit 16 Mpx, the third does not
    check_images(parse_chat_request(_body([three] * 2)), ServerLimits(), MICRO)
    error = _refused(_body([three] * 3))
    assert (error.status, error.param) == (413, "messages[0].content[2].image_url.url")
    assert "with the 2 image(s) before it, 18000000 pixels" in error.message
    assert _refused(_body([three]), ServerLimits(max_request_pixels=5_000_000)).status == 413


def test_positions_are_counted_from_header_sizes(no_decoding):
    layout = ImageLayout(n_ctx=1000, tokens_per_tile=64, tiling=TilingConfig(image_size=224))
    image = _data_url(_uniform_png(1000, 700, 3))  # grid 3x2 + thumbnail: 7 tiles, 450 positions with <img></img>
    assert layout.positions(1000, 700) == 7 * 64 + 2
    check_images(parse_chat_request(_body([image] * 2)), ServerLimits(), layout)  # 900 < 1000
    error = _refused(_body([image] * 3), layout=layout)
    assert (error.status, error.code) == (400, "context_length_exceeded")
    assert error.message.startswith("the request's 3 image(s) take 1350 context positions")
    unknown = ImageLayout(n_ctx=1000, tokens_per_tile=64)  # libmtmd's tiling or an image budget: one tile each
    assert unknown.positions(1000, 700) == 66


def test_an_unreadable_image_is_400_naming_it(no_decoding):
    error = _refused(_body([_data_url(_uniform_png(8, 8)), "data:image/png;base64,iVBORw0KGgo="]))
    assert (error.status, error.code, error.param) == (400, "invalid_image", "messages[0].content[1].image_url.url")
    assert "cannot decode image" in error.message


@pytest.fixture(scope="module")
def micro():
    from r1v.runtime.api import load

    with load("micro-r1v", n_threads=1, n_threads_batch=1) as model:
        yield model


@pytest.mark.parametrize("size", [(224, 224), (448, 224), (1000, 700), (50, 3000)])
def test_layout_counts_what_the_model_lays_out(micro, size: tuple[int, int]):
    """The count the server refuses by is the backend's own: tiles from the real layout, never more positions than
    the prompt really takes (a request that fits is never refused)."""
    layout = image_layout(micro)
    assert (layout.n_ctx, layout.tokens_per_tile, layout.tiling) == (micro.n_ctx, 64, micro._backend.tiling)
    png = _uniform_png(*size, 3)
    text_only = micro.generate("q", max_tokens=1, temperature=0).prompt_tokens
    result = micro.generate([{"role": "user", "content": [{"type": "image", "image": png},
                                                          {"type": "text", "text": "q"}]}], max_tokens=1, temperature=0)
    assert layout.positions(*size) == result.images[0].tiles * 64 + 2
    assert layout.positions(*size) <= result.prompt_tokens - text_only


# --- the server itself: `r1v serve micro-r1v` with default limits ----------------------------------------

@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("serve-limits")
    (root / "images").mkdir()
    with serve_process("micro-r1v", free_port(), root / "server.log", *THREADS, "--log-level", "warning",
                       "--allow-local-images", "--local-image-root", str(root / "images")) as server:
        yield server


def _post(url: str, body: object) -> httpx.Response:
    content = body if isinstance(body, (bytes, str)) else json.dumps(body)
    return httpx.post(url + "/v1/chat/completions", content=content, timeout=300,
                      headers={"Content-Type": "application/json"})


@pytest.mark.slow
def test_hostile_images_keep_the_servers_peak_rss_under_1_5_gb(served):
    cases = [
        ("one 9000x9000 RGBA PNG", _body([_data_url(_uniform_png(9000, 9000))], max_tokens=1), 413),
        ("six 81 Mpx bombs", _body([_data_url(_uniform_png(9000, 9000, 1))] * 6, max_tokens=1), 413),
        ("30,000 1x1 images", _body([_data_url(_uniform_png(1, 1, 3))] * 30_000, max_tokens=1), 400),
        ("16 Mpx RGBA, admitted", _body([_data_url(_uniform_png(4000, 4000))], max_tokens=1), 200),
    ]
    peaks = []
    for name, body, status in cases:
        response = _post(served.url, body)
        assert response.status_code == status, (name, response.text[:300])
        peaks.append((name, round(served.peak_rss_mb())))
    print(peaks)
    assert peaks[-1][1] < PEAK_RSS_MB, peaks
    assert httpx.get(served.url + "/health").json()["status"] == "ok"


@pytest.mark.parametrize("body, param, words", [
    ("[" * 100_000 + "]" * 100_000, None, "nested too deeply"),
    ('{"messages": [{"role": "user", "content": "hi"}], "seed": ' + "1" * 5000 + "}", None, "5000-character"),
    ('{"messages": [{"role": "user", "content": "hi"}], "repetition_penalty": Infinity}', "repetition_penalty",
     "finite"),
    ('{"messages": [{"role": "user", "content": "hi"}], "temperature": NaN}', "temperature", "finite"),
    (json.dumps(_body(["a\x00b.png"])), "messages[0].content[0].image_url.url", "NUL byte"),
    (json.dumps(_body(["file:///a%00b.png"])), "messages[0].content[0].image_url.url", "NUL byte"),
])
def test_bodies_that_gave_500_are_400(served, body: str, param: str | None, words: str):
    response = _post(served.url, body)
    assert response.status_code == 400, response.text[:300]
    error = response.json()["error"]
    assert (error["type"], error["param"]) == ("invalid_request_error", param) and words in error["message"]


@pytest.mark.slow
def test_a_client_leaving_during_upload_is_quiet(served):
    logged = served.log.read_text()
    port = int(served.url.rsplit(":", 1)[1])
    for _ in range(3):
        with socket.create_connection(("127.0.0.1", port)) as client:
            client.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json"
                           b"\r\nContent-Length: 100000\r\n\r\n{\"messages\": [")
            time.sleep(0.2)  # the server is reading the body when the client goes
    time.sleep(0.5)
    assert httpx.get(served.url + "/health").json()["status"] == "ok"
    new = served.log.read_text()[len(logged):]
    assert "Traceback" not in new and "ClientDisconnect" not in new, new[-2000:]


def test_a_busy_port_is_reported_before_the_model_loads(tmp_path: Path):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        start = time.monotonic()
        done = subprocess.run([sys.executable, "-m", "r1v", "serve", "micro-r1v", "--port", str(port), *THREADS],
                              capture_output=True, text=True, timeout=120)
    assert done.returncode == 2, done.stderr[-2000:]
    assert done.stderr == (f"r1v serve: error: cannot listen on 127.0.0.1:{port}: Address already in use (another "
                           "server is listening there: stop it or choose another --port)\n")
    assert time.monotonic() - start < 60
