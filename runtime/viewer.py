"""`r1v view OUT.jsonl`: a local web page of batch results - image, question, collapsible reasoning rounds
(think / tool call / observation / answer) and the answer.

Reads what `r1v batch` writes, and Skywork's own r1v4 result files (``{"image", "question", "response":
{"full_response" | "error"}}``: their rounds are parsed from `full_response`). The file is read again on each
page load, so a batch still running shows its progress. The server (standard library only) binds to localhost
and serves only the page, the results and the images the results name.
"""
from __future__ import annotations

import dataclasses
import json
import mimetypes
import threading
import urllib.parse
from dataclasses import dataclass
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from importlib import resources
from pathlib import Path
from typing import Any

from .reasoning import final_answer, parse_rounds, split_reasoning

__all__ = ["ViewerServer", "load_results", "serve_viewer"]


def _page() -> bytes:
    return resources.files("r1v.runtime").joinpath("viewer.html").read_bytes()


def _image_paths(record: dict[str, Any], base: Path) -> list[Path]:
    """The item's images: `image_path` (relative to the results file, as `r1v batch` writes it), else `image`
    taken relative to the results file (Skywork's files, written beside their inputs)."""
    value = record.get("image_path") or record.get("image") or []
    paths = [value] if isinstance(value, str) else value if isinstance(value, list) else []
    return [base / p for p in paths if isinstance(p, str) and p.strip()]


def _view(record: dict[str, Any], n: int, base: Path) -> tuple[dict[str, Any], list[Path]]:
    """What the page shows of one output line, and its image files."""
    response = record.get("response") if isinstance(record.get("response"), dict) else {}
    full = response.get("full_response") or ""
    rounds = record.get("rounds")
    if rounds is None and full:
        # Skywork's full_response carries its tags (<think> ... </think>), so it does not start inside reasoning.
        rounds = [{k: v for k, v in dataclasses.asdict(r).items() if v is not None}
                  for r in parse_rounds(full, starts_in_reasoning=False)]
    answer = record.get("answer")
    if answer is None and full:
        answer = final_answer(full, starts_in_reasoning=False)
    reasoning = record.get("reasoning")
    if reasoning is None and full:
        reasoning = split_reasoning(full, starts_in_reasoning=False)[0]
    images = _image_paths(record, base)
    view = {
        "n": n,
        "index": record.get("index", n),
        "id": record.get("id"),
        "question": record.get("question", ""),
        "image_names": [str(p.name) for p in images],
        "images": [f"/image/{n}/{k}" for k in range(len(images))],
        "rounds": rounds or [],
        "reasoning": reasoning or "",
        "answer": answer or "",
        "error": response.get("error"),
        "finish_reason": record.get("finish_reason"),
        "usage": record.get("usage"),
        "seconds": record.get("seconds"),
    }
    return view, images


def load_results(path: Path) -> tuple[list[dict[str, Any]], list[list[Path]]]:
    """Views of each line of `path` and, in the same order, their image paths. A line that is not JSON shows as
    an error entry."""
    views: list[dict[str, Any]] = []
    images: list[list[Path]] = []
    base = path.parent
    with open(path, encoding="utf-8", errors="replace") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
                if not isinstance(record, dict):
                    raise ValueError("not a JSON object")
            except ValueError as e:
                record = {"question": f"(line {number})", "response": {"error": f"unreadable line: {e}"}}
            view, paths = _view(record, len(views), base)
            views.append(view)
            images.append(paths)
    return views, images


class _Handler(BaseHTTPRequestHandler):
    server: _Server

    def log_message(self, format: str, *args: Any) -> None:  # quiet: one page, a few requests
        pass

    def _send(self, status: int, body: bytes, content_type: str) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        self.send_header("X-Content-Type-Options", "nosniff")
        self.end_headers()
        self.wfile.write(body)

    def _error(self, status: HTTPStatus, message: str) -> None:
        self._send(status, json.dumps({"error": message}).encode(), "application/json")

    def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
        route = urllib.parse.urlparse(self.path).path
        if route in ("/", "/index.html"):
            return self._send(HTTPStatus.OK, _page(), "text/html; charset=utf-8")
        if route == "/api/results":
            try:
                views, images = load_results(self.server.results)
            except OSError as e:
                return self._error(HTTPStatus.NOT_FOUND, f"cannot read {self.server.results}: {e.strerror or e}")
            with self.server.lock:
                self.server.images = images
            body = {"file": str(self.server.results), "results": views}
            return self._send(HTTPStatus.OK, json.dumps(body, ensure_ascii=False).encode(), "application/json")
        parts = route.strip("/").split("/")
        if len(parts) == 3 and parts[0] == "image" and parts[1].isdigit() and parts[2].isdigit():
            return self._image(int(parts[1]), int(parts[2]))
        self._error(HTTPStatus.NOT_FOUND, f"no such page: {route}")

    def _image(self, n: int, k: int) -> None:
        with self.server.lock:
            if not self.server.images:  # the page asked for an image before the results (or after a restart)
                self.server.images = load_results(self.server.results)[1]
            images = self.server.images
        if n >= len(images) or k >= len(images[n]):
            return self._error(HTTPStatus.NOT_FOUND, f"no image {k} for result {n}")
        path = images[n][k]
        try:
            data = path.read_bytes()
        except OSError as e:
            return self._error(HTTPStatus.NOT_FOUND, f"cannot read {path.name}: {e.strerror or e}")
        kind = mimetypes.guess_type(path.name)[0] or "application/octet-stream"
        if not kind.startswith("image/"):
            return self._error(HTTPStatus.NOT_FOUND, f"{path.name} is not an image")
        self._send(HTTPStatus.OK, data, kind)


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, results: Path, host: str, port: int):
        super().__init__((host, port), _Handler)
        self.results = results
        self.images: list[list[Path]] = []
        self.lock = threading.Lock()


@dataclass(frozen=True)
class ViewerAddress:
    host: str
    port: int

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}/"


class ViewerServer:
    """The viewer in a background thread: ``with ViewerServer(path) as url: ...`` (port 0: any free port)."""

    def __init__(self, results: str | Path, host: str = "127.0.0.1", port: int = 0):
        results = Path(results)
        if not results.is_file():
            raise FileNotFoundError(f"results file not found: {results}")
        self._server = _Server(results, host, port)
        self.address = ViewerAddress(host, self._server.server_address[1])
        self._thread = threading.Thread(target=self._server.serve_forever, name="r1v-view", daemon=True)

    def __enter__(self) -> str:
        self._thread.start()
        return self.address.url

    def __exit__(self, *exc: object) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=10)


def serve_viewer(results: str | Path, host: str = "127.0.0.1", port: int = 8001, *, open_browser: bool = False) -> None:
    """Serve the page until interrupted."""
    results = Path(results)
    if not results.is_file():
        raise FileNotFoundError(f"results file not found: {results}")
    server = _Server(results, host, port)
    url = f"http://{host}:{server.server_address[1]}/"
    print(f"r1v view: {results} at {url} (Ctrl-C stops)", flush=True)
    if open_browser:
        import webbrowser

        webbrowser.open(url)
    try:
        server.serve_forever()
    finally:
        server.server_close()
