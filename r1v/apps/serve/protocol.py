"""The OpenAI chat-completions wire format: a request body checked and turned into our types, a `Result` turned
back into a response. Pure Python (no web framework): `r1v batch` writes the same `raw_response` the server
sends.

Errors are `APIError` s carrying the HTTP status and OpenAI's error body
``{"error": {"message", "type", "param", "code"}}``, with `param` naming the offending field.

Images are checked in two steps: `parse_chat_request` checks where each comes from and its size in bytes;
`check_images` then budgets them before any pixel is decoded - how many fit the model's context (from the
count alone, then from each header's size), and their pixels together against `ServerLimits.max_request_pixels`.
"""
from __future__ import annotations

import json
import math
import time
import urllib.parse
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping

if TYPE_CHECKING:  # image.py (PIL, numpy) is imported only where images are checked
    from r1v.runtime.image import TilingConfig

__all__ = [
    "APIError", "ChatRequest", "ImageLayout", "ServerLimits", "check_images", "chunk_response", "completion_id",
    "completion_response", "error_from_exception", "parse_chat_request", "usage",
]

_MAX_STOP = 16  # OpenAI allows 4; llama.cpp and vLLM take more, and checking each costs little
_MAX_INT_CHARS = 40  # a JSON integer longer than this is refused while parsing (Python's own limit is 4300 digits)
_INT32_MAX = 2**31 - 1  # counts reach llama.cpp as int32


class APIError(Exception):
    """An error answered to the client: HTTP `status` and the OpenAI error object."""

    def __init__(self, status: int, message: str, *, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, headers: Mapping[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.headers = dict(headers or {})

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def _bad(param: str | None, message: str, code: str | None = None) -> APIError:
    return APIError(400, message, param=param, code=code)


@dataclass(frozen=True)
class ServerLimits:
    """What a request may carry. `max_image_bytes`: the largest image file (bytes); `max_request_pixels`: the
    pixels of all of a request's images together, read from their headers before any is decoded (decoding
    costs about 3 bytes a pixel held, up to ~45 a pixel while an image with alpha is converted);
    `allow_local_images`: image_url parts may name files on the server (paths or file:// URLs), under
    `local_image_root` if set."""

    max_image_bytes: int = 20 * 2**20
    max_request_pixels: int = 16_000_000
    allow_local_images: bool = False
    local_image_root: Path | None = None

    def __post_init__(self) -> None:
        if self.max_image_bytes < 1:
            raise ValueError(f"max_image_bytes must be >= 1, got {self.max_image_bytes}")
        if self.max_request_pixels < 1:
            raise ValueError(f"max_request_pixels must be >= 1, got {self.max_request_pixels}")


@dataclass(frozen=True)
class ChatRequest:
    """A checked `/v1/chat/completions` request: messages in the runtime's form (images as data: URLs or
    checked paths), `sampling` as `SamplingParams` overrides (only what the client set)."""

    messages: list[dict[str, Any]]
    sampling: dict[str, Any] = field(default_factory=dict)
    stream: bool = False
    include_usage: bool = False
    model: str | None = None
    images: tuple[tuple[str, str], ...] = ()  # (param, source) of each image, in order, for `check_images`


# --- scalar fields --------------------------------------------------------------------------------------

def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _shown(value: Any) -> str:
    """A short JSON rendering of a client's value for an error message; never the whole of a big or deep one."""
    if isinstance(value, str):
        return json.dumps(value[:40]) + ("..." if len(value) > 40 else "")
    if isinstance(value, list):
        return f"an array of {len(value)} item(s)"
    if isinstance(value, Mapping):
        return f"an object of {len(value)} key(s)"
    return json.dumps(value)  # a number (NaN, Infinity as Python's json writes them), true/false or null


def _number(body: Mapping[str, Any], name: str, lo: float, hi: float | None = None, *,
            lo_open: bool = False) -> float | None:
    value = body.get(name)
    if value is None:
        return None
    if not _is_number(value):
        raise _bad(name, f"'{name}' must be a number, got {_shown(value)}")
    # Python's json reads NaN, Infinity and 1e999 (inf): none is a usable setting, and NaN passes every range test.
    if not math.isfinite(value):
        raise _bad(name, f"'{name}' must be a finite number, got {_shown(value)}")
    if value < lo or (lo_open and value == lo) or (hi is not None and value > hi):
        left = "(" if lo_open else "["
        right = f"{hi}]" if hi is not None else "inf)"
        raise _bad(name, f"'{name}' must be in {left}{lo}, {right}, got {value}")
    return float(value)


def _integer(body: Mapping[str, Any], name: str, lo: int | None = None, hi: int = _INT32_MAX) -> int | None:
    value = body.get(name)
    if value is None:
        return None
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if not isinstance(value, int) or isinstance(value, bool):
        raise _bad(name, f"'{name}' must be an integer, got {_shown(value)}")
    if lo is not None and value < lo:
        raise _bad(name, f"'{name}' must be >= {lo}, got {value}")
    if value > hi:
        raise _bad(name, f"'{name}' must be <= {hi}, got {value}")
    return value


def _boolean(body: Mapping[str, Any], name: str) -> bool | None:
    value = body.get(name)
    if value is not None and not isinstance(value, bool):
        raise _bad(name, f"'{name}' must be true or false, got {_shown(value)}")
    return value


def _stop(body: Mapping[str, Any]) -> tuple[str, ...] | None:
    value = body.get("stop")
    if value is None:
        return None
    stops = [value] if isinstance(value, str) else value
    if not isinstance(stops, list) or not all(isinstance(s, str) for s in stops):
        raise _bad("stop", "'stop' must be a string or a list of strings")
    if len(stops) > _MAX_STOP:
        raise _bad("stop", f"'stop' takes at most {_MAX_STOP} strings, got {len(stops)}")
    if any(not s for s in stops):
        raise _bad("stop", "'stop' strings must not be empty")
    return tuple(stops)


def _sampling(body: Mapping[str, Any]) -> dict[str, Any]:
    """SamplingParams overrides from the OpenAI fields and the usual extensions (vLLM / llama.cpp names)."""
    for name in ("frequency_penalty", "presence_penalty"):
        # OpenAI's penalties are additive; the runtime has the multiplicative repetition penalty
        # (transformers, vLLM): mapping one onto the other would silently change what the client asked for.
        if _number(body, name, -2.0, 2.0):
            raise _bad(name, f"'{name}' is not supported (only 0); use 'repetition_penalty' "
                             "(multiplicative, 1.0 = off, as in vLLM)", code="unsupported_parameter")
    out: dict[str, Any] = {
        "temperature": _number(body, "temperature", 0.0, 2.0),
        "top_p": _number(body, "top_p", 0.0, 1.0, lo_open=True),
        "min_p": _number(body, "min_p", 0.0, 1.0),
        "seed": _integer(body, "seed", -(2**63), 2**64 - 1),  # any 64-bit seed; the backends reduce it
        "stop": _stop(body),
    }
    top_k = _integer(body, "top_k", -1)
    out["top_k"] = None if top_k is None else max(top_k, 0)  # vLLM's -1 and llama.cpp's 0 both mean off
    penalty_name = "repetition_penalty" if body.get("repetition_penalty") is not None else "repeat_penalty"
    out["repetition_penalty"] = _number(body, penalty_name, 0.0, lo_open=True)
    max_tokens = _integer(body, "max_completion_tokens", 1)
    out["max_tokens"] = max_tokens if max_tokens is not None else _integer(body, "max_tokens", 1)
    return {k: v for k, v in out.items() if v is not None}


def _refuse_unsupported(body: Mapping[str, Any]) -> None:
    n = _integer(body, "n", 1)
    if n is not None and n != 1:
        raise _bad("n", f"'n' must be 1 (one choice per request), got {n}", code="unsupported_parameter")
    if body.get("logprobs") or body.get("top_logprobs"):
        raise _bad("logprobs", "'logprobs' is not supported", code="unsupported_parameter")
    if body.get("tools") or body.get("functions"):
        name = "tools" if body.get("tools") else "functions"
        raise _bad(name, f"'{name}' (function calling) is not supported", code="unsupported_parameter")
    fmt = body.get("response_format")
    if fmt is not None and not (isinstance(fmt, Mapping) and fmt.get("type") == "text"):
        raise _bad("response_format", "only response_format {'type': 'text'} is supported",
                   code="unsupported_parameter")


# --- images ---------------------------------------------------------------------------------------------

def _too_large(param: str, size: int, limit: int) -> APIError:
    return APIError(413, f"{param}: image is {size} bytes, more than the limit of {limit} bytes", param=param,
                    code="image_too_large")


def _image_source(url: str, param: str, limits: ServerLimits) -> str:
    """The image source for the runtime: a data: URL whose payload fits, or a checked local file path."""
    if url[:5].lower() == "data:":
        header, sep, payload = url.partition(",")
        if not sep:
            raise _bad(param, f"{param}: malformed data: URL (no ',' before the payload)", code="invalid_image")
        base64 = "base64" in header.lower()
        size = len(payload) * 3 // 4 if base64 else len(payload)  # decoded size, closely enough to refuse early
        if size > limits.max_image_bytes:
            raise _too_large(param, size, limits.max_image_bytes)
        return url
    scheme = url.split("://", 1)[0].lower() if "://" in url else ""
    if scheme and scheme != "file":
        raise _bad(param, f"{param}: {scheme} URLs are not fetched; send the image inline as a data: URL "
                          "(data:image/png;base64,...)", code="invalid_image_url")
    if not limits.allow_local_images:
        raise _bad(param, f"{param}: must be a data: URL (data:image/png;base64,...); local file paths are accepted "
                          "only when the server runs with --allow-local-images", code="invalid_image_url")
    try:
        path = _local_image(url, scheme, param, limits.local_image_root)
        size = path.stat().st_size
    except (OSError, ValueError) as e:  # a name too long, a NUL byte (%00 in a file: URL), a file gone meanwhile
        reason = getattr(e, "strerror", None) or e
        raise _bad(param, f"{param}: cannot use {_shown(url)} as an image file: {reason}",
                   code="invalid_image_url") from None
    if size > limits.max_image_bytes:
        raise _too_large(param, size, limits.max_image_bytes)
    return str(path)


def _local_image(url: str, scheme: str, param: str, root: Path | None) -> Path:
    """The checked path of a local image: a regular file, under `root` when one is set."""
    path = Path(urllib.parse.unquote(urllib.parse.urlparse(url).path) if scheme == "file" else url).expanduser()
    if "\0" in str(path):
        raise ValueError("the path contains a NUL byte")
    if root is not None:
        root = root.resolve()
        path = (root / path).resolve()
        if not path.is_relative_to(root):
            raise _bad(param, f"{param}: {url} is outside the allowed image folder", code="invalid_image_url")
    if not path.is_file():
        raise _bad(param, f"{param}: no such image file: {url}", code="invalid_image_url")
    return path


def _messages(body: Mapping[str, Any], limits: ServerLimits,
              images: list[tuple[str, str]]) -> list[dict[str, Any]]:
    """The messages in the runtime's form; appends (param, source) of each image to `images`."""
    from r1v.runtime.chat import normalize_messages

    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise _bad("messages", "'messages' must be a non-empty list of {'role', 'content'} objects")
    out: list[dict[str, Any]] = []
    for i, message in enumerate(messages):
        content = message.get("content") if isinstance(message, Mapping) else None
        if isinstance(content, list):
            parts = []
            for j, part in enumerate(content):
                if isinstance(part, Mapping) and part.get("type") == "image_url":
                    value = part.get("image_url")
                    url = value.get("url") if isinstance(value, Mapping) else value
                    param = f"messages[{i}].content[{j}].image_url.url"
                    if not isinstance(url, str) or not url:
                        raise _bad(param, f"{param}: an image_url part needs image_url.url (a data: URL)")
                    part = {"type": "image", "image": _image_source(url, param, limits)}
                    images.append((param, part["image"]))
                elif isinstance(part, Mapping) and part.get("type") == "image":
                    raise _bad(f"messages[{i}].content[{j}].type",
                               f"messages[{i}].content[{j}]: use an 'image_url' part for images")
                parts.append(part)
            message = {**message, "content": parts}
        out.append(message)
    try:
        return normalize_messages(out)
    except ValueError as e:
        raise _bad("messages", str(e)) from None


@dataclass(frozen=True)
class ImageLayout:
    """How the served model lays an image out in its context, to count positions from header sizes alone.
    `tiling`: InternVL tiling, which gives each image's tiles exactly; None when the tiles are not known before
    decoding (libmtmd's own tiling, or an image time budget that may lower them): then one tile per image is
    counted, a lower bound. `tags`: the positions around each image (``<img>``, ``</img>``)."""

    n_ctx: int
    tokens_per_tile: int
    tiling: TilingConfig | None = None
    tags: int = 2

    def positions(self, width: int, height: int) -> int:
        from r1v.runtime.image import image_tiles

        tiles = image_tiles(width, height, self.tiling) if self.tiling is not None else 1
        return tiles * self.tokens_per_tile + self.tags


def _context_exceeded(n_images: int, positions: int, n_ctx: int, how: str) -> APIError:
    return APIError(400, f"the request's {n_images} image(s) take {how}{positions} context positions, but the "
                         f"context window is {n_ctx} tokens (n_ctx), which leaves no room for the text and an answer; "
                         "send fewer or smaller images", param="messages", code="context_length_exceeded")


def check_images(request: ChatRequest, limits: ServerLimits, layout: ImageLayout | None = None) -> None:
    """Refuse a request's images before any is decoded: when even their count at one tile each cannot fit the
    context (400 context_length_exceeded, no image opened); then image by image from the header alone: an
    unreadable one (400 invalid_image), pixels beyond `limits.max_request_pixels` together (413 image_too_large),
    positions beyond the context (400). The backend decodes only what passed. Reads each image's bytes once
    (base64 decoded, a file read) and keeps nothing."""
    from r1v.runtime.image import ImageError, image_size

    images = request.images
    if not images:
        return
    if layout is not None:
        least = len(images) * (layout.tokens_per_tile + layout.tags)
        if least >= layout.n_ctx:
            raise _context_exceeded(len(images), least, layout.n_ctx, "at least ")
    pixels = positions = 0
    for i, (param, source) in enumerate(images):
        try:
            width, height = image_size(source)
        except ImageError as e:
            raise _bad(param, f"{param}: {e}", code="invalid_image") from None
        pixels += width * height
        if pixels > limits.max_request_pixels:
            sofar = f"; with the {i} image(s) before it, {pixels} pixels" if i else ""
            raise APIError(413, f"{param}: image is {width}x{height} = {width * height} pixels{sofar}, more than the "
                                f"limit of {limits.max_request_pixels} pixels per request (r1v serve "
                                "--max-megapixels); refused before decoding", param=param, code="image_too_large")
        if layout is not None:
            positions += layout.positions(width, height)
            if positions >= layout.n_ctx:
                raise _context_exceeded(i + 1, positions, layout.n_ctx, "at least " if layout.tiling is None else "")


# --- requests -------------------------------------------------------------------------------------------

def parse_chat_request(body: bytes | str | Mapping[str, Any], limits: ServerLimits = ServerLimits()) -> ChatRequest:
    """Check a `/v1/chat/completions` body (raw JSON or already parsed). Raises APIError (400, 413)."""
    if isinstance(body, (bytes, str)):
        body = _json(body)
    if not isinstance(body, Mapping):
        raise _bad(None, "the request body must be a JSON object")
    model = body.get("model")
    if model is not None and not isinstance(model, str):
        raise _bad("model", "'model' must be a string")
    _refuse_unsupported(body)
    stream = bool(_boolean(body, "stream"))
    options = body.get("stream_options")
    if options is not None and not isinstance(options, Mapping):
        raise _bad("stream_options", "'stream_options' must be an object")
    include_usage = bool(_boolean(options or {}, "include_usage"))
    images: list[tuple[str, str]] = []
    messages = _messages(body, limits, images)
    return ChatRequest(messages, _sampling(body), stream, include_usage, model, tuple(images))


def _parse_int(text: str) -> int:
    if len(text) > _MAX_INT_CHARS:
        raise _bad(None, f"the request body has a {len(text)}-character integer ({text[:12]}...); integers of more "
                         f"than {_MAX_INT_CHARS} characters are refused", code="invalid_json")
    return int(text)


def _json(body: bytes | str) -> Any:
    try:
        return json.loads(body, parse_int=_parse_int)
    except RecursionError:  # json's decoder recurses once per level of [ or {
        raise _bad(None, "the request body is not valid JSON: arrays or objects nested too deeply",
                   code="invalid_json") from None
    except (ValueError, UnicodeDecodeError) as e:  # JSONDecodeError is a ValueError
        raise _bad(None, f"the request body is not valid JSON: {e}", code="invalid_json") from None


# --- responses ------------------------------------------------------------------------------------------

def completion_id() -> str:
    return f"chatcmpl-{uuid.uuid4().hex}"


def finish_reason(reason: str | None) -> str | None:
    """Ours → OpenAI's: a stop string ends the output as the end token does."""
    return "stop" if reason == "stop_string" else reason


def usage(result: Any) -> dict[str, Any]:
    return {
        "prompt_tokens": result.prompt_tokens,
        "completion_tokens": result.completion_tokens,
        "total_tokens": result.prompt_tokens + result.completion_tokens,
        "prompt_tokens_details": {"cached_tokens": result.cached_tokens},
    }


def timings(result: Any) -> dict[str, Any]:
    """llama-server's `timings` of an answer (prompt: the evaluated positions, cached ones apart; predicted: the
    output tokens after the first, over first to last token), for load tests and clients that read them."""
    evaluated = result.prompt_tokens - result.cached_tokens - result.restored_tokens
    decoded = max(result.completion_tokens - 1, 0)
    return {"cache_n": result.cached_tokens + result.restored_tokens, "prompt_n": evaluated,
            "prompt_ms": 1000 * result.prefill_seconds, "prompt_per_second": result.prefill_tokens_per_second,
            "predicted_n": decoded, "predicted_ms": 1000 * result.decode_seconds,
            "predicted_per_second": result.decode_tokens_per_second}


def completion_response(result: Any, *, model: str, id: str | None = None, created: int | None = None) -> dict[str, Any]:
    """A `chat.completion` object for a `Result`: the answer in `content`, the reasoning in `reasoning_content`
    (the field DeepSeek's API, vLLM and llama.cpp use), usage counts."""
    message = {"role": "assistant", "content": result.content, "reasoning_content": result.reasoning}
    return {
        "id": id or completion_id(),
        "object": "chat.completion",
        "created": int(time.time()) if created is None else created,
        "model": model,
        "choices": [{"index": 0, "message": message, "logprobs": None,
                     "finish_reason": finish_reason(result.finish_reason)}],
        "usage": usage(result),
    }


def chunk_response(id: str, created: int, model: str, delta: dict[str, Any] | None,
                   finish: str | None = None, usage: dict[str, Any] | None = None) -> dict[str, Any]:
    """A `chat.completion.chunk`: one delta, or (delta None) the closing usage-only chunk with no choices."""
    chunk: dict[str, Any] = {"id": id, "object": "chat.completion.chunk", "created": created, "model": model}
    chunk["choices"] = [] if delta is None else [{"index": 0, "delta": delta, "logprobs": None,
                                                  "finish_reason": finish_reason(finish)}]
    if usage is not None:
        chunk["usage"] = usage
    return chunk


def error_from_exception(error: BaseException) -> APIError:
    """The client's view of an exception from loading images, rendering or generating."""
    from r1v.runtime.options import ContextOverflowError, NoProjectorError

    if isinstance(error, APIError):
        return error
    if isinstance(error, ContextOverflowError):
        return APIError(400, str(error), param="messages", code="context_length_exceeded")
    if isinstance(error, NoProjectorError):
        return APIError(400, str(error), param="messages", code="images_not_supported")
    if isinstance(error, ValueError):  # ImageError is one
        return APIError(400, str(error), param="messages")
    return APIError(500, f"internal error: {type(error).__name__}: {error}", type="server_error")
