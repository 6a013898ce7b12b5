"""The FastAPI application behind `r1v serve`: `/v1/chat/completions`, `/v1/models`, `/health`.

Bodies are read and checked by hand (`protocol.parse_chat_request`) rather than through pydantic models, so every
refusal is OpenAI's error object with the offending field in `param`, and an oversized body is refused while it
is read (413) instead of after. Images are budgeted from their headers (`protocol.check_images`: pixels, context
positions) before a slot decodes any. A client that leaves while sending its body is not an error.
"""
from __future__ import annotations

import asyncio
import hmac
import json
import logging
import socket
import threading
import time
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any, AsyncIterator, Sequence

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from .protocol import (
    APIError, ImageLayout, ServerLimits, check_images, chunk_response, completion_id, completion_response,
    error_from_exception, parse_chat_request, timings, usage,
)
from .slots import ClientGone, Job, SlotPool

__all__ = ["ServerConfig", "ServerThread", "bind_socket", "create_app", "image_layout", "serve"]

log = logging.getLogger("r1v.serve")
CLIENT_CLOSED = 499  # nginx's status for "the client closed the connection"; nobody reads it


@dataclass(frozen=True)
class ServerConfig:
    """model_name: the id in /v1/models and responses (requests may name any model: one is served).
    api_key: required as ``Authorization: Bearer KEY`` on /v1/* when set. queue: requests that may wait for a
    slot (beyond them: 429). max_body_bytes: the largest request body (413 beyond). limits: images."""

    model_name: str = "r1v"
    api_key: str | None = None
    queue: int = 8
    max_body_bytes: int = 32 * 2**20
    limits: ServerLimits = field(default_factory=ServerLimits)

    def __post_init__(self) -> None:
        if self.queue < 0:
            raise ValueError(f"queue must be >= 0, got {self.queue}")
        if self.max_body_bytes < 1:
            raise ValueError(f"max_body_bytes must be >= 1, got {self.max_body_bytes}")
        if self.api_key is not None and not self.api_key:
            raise ValueError("api_key must not be empty (leave it unset for no key)")


# --- request helpers ------------------------------------------------------------------------------------

def _authorize(request: Request, key: str | None) -> None:
    if key is None:
        return
    header = request.headers.get("authorization", "")
    scheme, _, given = header.partition(" ")
    if scheme.lower() != "bearer" or not given:
        raise APIError(401, "no API key given: send 'Authorization: Bearer YOUR_KEY'", code="invalid_api_key")
    if not hmac.compare_digest(given.strip().encode(), key.encode()):
        raise APIError(401, "incorrect API key", code="invalid_api_key")


async def _read_body(request: Request, limit: int) -> bytes:
    def too_large(size: int | str) -> APIError:
        return APIError(413, f"the request body is {size} bytes, more than the limit of {limit} bytes",
                        code="request_too_large")

    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise too_large(declared)
    parts, size = [], 0
    async for part in request.stream():
        size += len(part)
        if size > limit:
            raise too_large(f"more than {limit}")
        parts.append(part)
    return b"".join(parts)


async def _watch_disconnect(request: Request, gone: asyncio.Event) -> None:
    """Set `gone` when the client disconnects (call after the body was read: it consumes `receive`)."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            gone.set()
            return


def _client_error(error: Exception) -> APIError:
    api_error = error_from_exception(error)
    if api_error.status >= 500:
        log.error("request failed", exc_info=error)
    return api_error


def _event(data: Any) -> str:
    return f"data: {json.dumps(data, ensure_ascii=False)}\n\n"


def image_layout(model: Any) -> ImageLayout | None:
    """How `model` lays out images, for counting their positions before decoding; None when it takes none or
    does not say (the pixel budget still applies)."""
    tiling, per_tile = model.tiling, model.tokens_per_tile
    if tiling is None or not per_tile:
        return None
    options = model.options
    # Only InternVL tiling without a time budget gives the tiles from the size alone; otherwise count one per image.
    exact = getattr(options, "tiling", "internvl") == "internvl" and getattr(options, "image_budget", None) is None
    return ImageLayout(model.n_ctx, per_tile, tiling if exact else None)


# --- the application ------------------------------------------------------------------------------------

def create_app(models: Sequence[Any], config: ServerConfig = ServerConfig()) -> FastAPI:
    """The application over loaded `models`, one generation slot each: copies of the same model, or one model
    loaded with parallel=N given N times (its streams batched over one copy)."""
    pool = SlotPool(models, config.queue)
    started = int(time.time())
    layout = image_layout(models[0])

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        yield
        await asyncio.get_running_loop().run_in_executor(None, pool.close)

    app = FastAPI(title="r1v-edge", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.pool = pool

    @app.exception_handler(APIError)
    async def api_error(_: Request, error: APIError) -> JSONResponse:
        return JSONResponse(error.body(), status_code=error.status, headers=error.headers)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_: Request, error: StarletteHTTPException) -> JSONResponse:
        code = {404: "not_found", 405: "method_not_allowed"}.get(error.status_code)
        body = APIError(error.status_code, str(error.detail), code=code).body()
        return JSONResponse(body, status_code=error.status_code, headers=getattr(error, "headers", None))

    @app.exception_handler(Exception)
    async def server_error(_: Request, error: Exception) -> JSONResponse:
        log.exception("unhandled error", exc_info=error)
        return JSONResponse(error_from_exception(error).body(), status_code=500)

    @app.get("/health")
    async def health() -> dict[str, Any]:
        stats = pool.stats()
        return {"status": "shutting_down" if pool.closed else "ok", "model": config.model_name,
                "slots": stats.__dict__}

    @app.get("/v1/models")
    async def list_models(request: Request) -> dict[str, Any]:
        _authorize(request, config.api_key)
        first = models[0]
        meta = {"n_ctx": first.n_ctx, "vision": first.has_vision, "file": first.path.name}
        return {"object": "list", "data": [{"id": config.model_name, "object": "model", "created": started,
                                            "owned_by": "r1v-edge", "meta": meta}]}

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        _authorize(request, config.api_key)
        try:
            body = await _read_body(request, config.max_body_bytes)
        except ClientDisconnect:  # the client left while sending: nobody to answer, nothing to log
            return Response(status_code=CLIENT_CLOSED)
        chat = parse_chat_request(body, config.limits)
        del body  # the parsed request holds what is needed
        if chat.images:  # reads headers only, but may base64-decode megabytes: off the event loop
            await asyncio.to_thread(check_images, chat, config.limits, layout)
        gone = asyncio.Event()
        watcher = asyncio.ensure_future(_watch_disconnect(request, gone))
        try:
            job = await pool.submit(chat.messages, chat.sampling, gone)
        except ClientGone:
            watcher.cancel()
            return Response(status_code=CLIENT_CLOSED)
        except Exception as e:
            watcher.cancel()
            raise _client_error(e) from None
        if chat.stream:
            return StreamingResponse(_sse(job, watcher, config.model_name, chat.include_usage),
                                     media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        try:
            result = None
            async for chunk in job.chunks():
                result = chunk.result or result
        except Exception as e:
            raise _client_error(e) from None
        finally:
            job.cancel()
            job.finish()
            watcher.cancel()
        if result is None:  # cancelled: the client left
            return Response(status_code=CLIENT_CLOSED)
        return JSONResponse({**completion_response(result, model=config.model_name), "timings": timings(result)})

    return app


async def _sse(job: Job, watcher: asyncio.Future, model: str, include_usage: bool) -> AsyncIterator[str]:
    """OpenAI's stream: a role chunk, one chunk per piece of text (`reasoning_content` or `content`), a chunk
    with the finish reason, the usage chunk if asked for, ``[DONE]``. An error mid-way is sent as an error
    event (the status line has gone already). Leaving early - the client disconnected - stops the job."""
    id, created = completion_id(), int(time.time())
    try:
        yield _event(chunk_response(id, created, model, {"role": "assistant", "content": ""}))
        result = None
        async for chunk in job.chunks():
            if chunk.text:
                key = "reasoning_content" if chunk.kind == "reasoning" else "content"
                yield _event(chunk_response(id, created, model, {key: chunk.text}))
            result = chunk.result or result
        if result is None:
            return  # cancelled
        yield _event(chunk_response(id, created, model, {}, result.finish_reason))
        if include_usage:
            yield _event(chunk_response(id, created, model, None, usage=usage(result)))
        yield "data: [DONE]\n\n"
    except Exception as e:
        yield _event(_client_error(e).body())
    finally:
        job.cancel()
        job.finish()
        watcher.cancel()


# --- running it -----------------------------------------------------------------------------------------

def serve(models: Sequence[Any], config: ServerConfig = ServerConfig(), *, host: str = "127.0.0.1",
          port: int = 8000, log_level: str = "info", sock: socket.socket | None = None) -> None:
    """Serve until interrupted (uvicorn; Ctrl-C stops it, running generations are cancelled). `sock`: a socket
    already bound (`bind_socket`), so that a busy port was found before the models were loaded."""
    import uvicorn

    server = uvicorn.Server(uvicorn.Config(create_app(models, config), host=host, port=port, log_level=log_level,
                                           timeout_graceful_shutdown=5))
    try:
        server.run(sockets=[sock] if sock is not None else None)
    except KeyboardInterrupt:  # uvicorn re-raises the Ctrl-C it handled; uvicorn.run swallows it likewise
        pass
    if not server.started:
        raise SystemExit(3)  # as uvicorn.run: the reason is in the log already


def bind_socket(host: str, port: int) -> socket.socket:
    """A TCP socket bound to host:port as uvicorn binds one (SO_REUSEADDR; IPv6 for a host with ':'); raises
    OSError when the address is taken or not this machine's."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
    except BaseException:
        sock.close()
        raise
    sock.set_inheritable(True)
    return sock


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


class ServerThread:
    """uvicorn in a background thread (tests, benchmarks): ``with ServerThread(app) as url: ...``."""

    def __init__(self, app: Any, host: str = "127.0.0.1", port: int | None = None, log_level: str = "warning"):
        import uvicorn

        self.port = port or free_port(host)
        self.url = f"http://{host}:{self.port}"
        self.server = uvicorn.Server(uvicorn.Config(app, host=host, port=self.port, log_level=log_level,
                                                    timeout_graceful_shutdown=5))
        self.thread = threading.Thread(target=self.server.run, name="r1v-serve", daemon=True)

    def __enter__(self) -> str:
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError(f"the server did not start on {self.url}")
            time.sleep(0.02)
        return self.url

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)
