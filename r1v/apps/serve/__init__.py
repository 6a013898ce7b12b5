"""OpenAI-compatible serving of a loaded model: `/v1/chat/completions` (plain and SSE), `/v1/models`, `/health`.

    from . import ServerConfig, create_app, serve
    serve([r1v.load("model.gguf")], ServerConfig(model_name="r1v"), port=8000)

`protocol` is the wire format (pure Python, shared with `r1v batch`), `slots` runs generations in worker
threads with bounded admission, `app` is the FastAPI application. FastAPI and uvicorn (the `server` extra)
are imported by `app` only.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .protocol import APIError, ChatRequest, ServerLimits, completion_response, parse_chat_request

if TYPE_CHECKING:
    from .app import ServerConfig

__all__ = ["APIError", "ChatRequest", "ServerConfig", "ServerLimits", "completion_response", "create_app",
           "parse_chat_request", "serve"]


def __getattr__(name: str) -> Any:
    # FastAPI is an optional dependency: load it only when the server itself is asked for.
    if name in ("ServerConfig", "create_app", "serve"):
        from . import app

        return getattr(app, name)
    raise AttributeError(name)
