"""`r1v view OUT.jsonl`: a local web page of batch results - image, question, collapsible reasoning rounds
(think / tool call / observation / answer) and the answer.

Reads what `r1v batch` writes (the input's fields, Skywork's `response` and our parsed `r1v` fields), and
Skywork's own r1v4 result files (``{"image", "question", "response": {"full_response" | "error"}}``: their rounds
are parsed from `full_response`). An input field `answer` is the expected answer: the page shows it beside the
model's and marks each answered item correct or not, compared as `r1v eval` compares (`answers_match`). The file
is read again on each page load, so a batch still running shows its progress.

The server (standard library only) binds to localhost and serves only the page, the results and the images the
results name, and of those only the regular image files that resolve, links followed, under the image root (the
results file's folder unless given): a results file is data, and may name any path. Requests must carry a Host
header naming this server (localhost, 127.0.0.1, [::1] or the bound host, with its port), so a page whose DNS
name is rebound to 127.0.0.1 cannot read it.
"""
from __future__ import annotations

import dataclasses
import errno
import ipaddress
import json
import mimetypes
import os
import socket
import stat
import threading
import urllib.parse
from dataclasses import dataclass
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from importlib import resources
from pathlib import Path
from typing import Any

from .batch import OUTPUT_KEY
from .evaluation import answers_match
from r1v.runtime.reasoning import final_answer, parse_rounds, split_reasoning

__all__ = ["ViewerBindError", "ViewerServer", "load_results", "serve_viewer"]


class ViewerBindError(OSError):
    """The address cannot be listened on (a port in use, an address not on this machine)."""


def _page() -> bytes:
    return resources.files("r1v.apps").joinpath("viewer.html").read_bytes()


OUTSIDE_ROOT = "outside the image root"


class _Refused(Exception):
    """An image the server will not send; the message says why ("outside the image root", ...)."""

    def __init__(self, reason: str, status: HTTPStatus = HTTPStatus.FORBIDDEN):
        super().__init__(reason)
        self.status = status


def _image_file(path: Path, root: Path) -> Path:
    """The real file behind `path` when it may be served: under `root` once every link is followed, and named
    as an image. Raises _Refused."""
    try:
        real = path.resolve(strict=True)
    except FileNotFoundError:
        raise _Refused("not found", HTTPStatus.NOT_FOUND) from None
    except (OSError, RuntimeError) as e:  # a link loop, a path too long
        raise _Refused(f"cannot be read ({e})", HTTPStatus.NOT_FOUND) from None
    if not real.is_relative_to(root):
        raise _Refused(OUTSIDE_ROOT)
    if not (mimetypes.guess_type(real.name)[0] or "").startswith("image/"):
        raise _Refused("not an image")
    return real


def _read_image(path: Path, root: Path) -> tuple[bytes, str]:
    """The bytes and type of a servable image. Opened without following a link (one swapped in after the check
    is refused) and without blocking (a FIFO would hang the request), then read only when a regular file."""
    real = _image_file(path, root)
    try:
        fd = os.open(real, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0))
    except OSError as e:
        raise _Refused(f"cannot be read ({e.strerror})", HTTPStatus.NOT_FOUND) from None
    with open(fd, "rb") as f:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise _Refused("not a regular file")
        return f.read(), mimetypes.guess_type(real.name)[0] or "application/octet-stream"


def _image_error(path: Path, root: Path) -> str | None:
    """Why the page will get no image for `path`, or None."""
    try:
        real = _image_file(path, root)
        if not stat.S_ISREG(real.stat().st_mode):
            return "not a regular file"
    except _Refused as e:
        return str(e)
    except OSError as e:
        return f"cannot be read ({e.strerror})"
    return None


def _image_paths(value: Any, base: Path) -> list[Path]:
    """`value` (a path or a list of paths) taken relative to the results file's folder `base`."""
    paths = [value] if isinstance(value, str) else value if isinstance(value, list) else []
    return [base / p for p in paths if isinstance(p, str) and p.strip()]


def _expected(value: Any) -> str | None:
    """The input's expected `answer` as text, when it has one."""
    if isinstance(value, bool) or not isinstance(value, (str, int, float)) or str(value).strip() == "":
        return None
    return str(value)


def _view(record: dict[str, Any], n: int, base: Path, root: Path) -> tuple[dict[str, Any], list[Path]]:
    """What the page shows of one output line, and its image files. Our fields are under OUTPUT_KEY; Skywork's
    lines have only `response`, parsed here."""
    response = record.get("response") if isinstance(record.get("response"), dict) else {}
    ours = record.get(OUTPUT_KEY) if isinstance(record.get(OUTPUT_KEY), dict) else {}
    full = response.get("full_response") or ""
    rounds = ours.get("rounds")
    if rounds is None and full:
        # Skywork's full_response carries its tags (<think> ... </think>), so it does not start inside reasoning.
        rounds = [{k: v for k, v in dataclasses.asdict(r).items() if v is not None}
                  for r in parse_rounds(full, starts_in_reasoning=False)]
    answer = ours.get("answer")
    if answer is None and full:
        answer = final_answer(full, starts_in_reasoning=False)
    reasoning = ours.get("reasoning")
    if reasoning is None and full:
        reasoning = split_reasoning(full, starts_in_reasoning=False)[0]
    error = response.get("error")
    expected = _expected(record.get("answer"))
    # `r1v batch` names the image relative to the results file (image_path); Skywork's files sit beside their
    # inputs, so their `image` is relative to the results file too.
    images = _image_paths(ours.get("image_path") or record.get("image"), base)
    view = {
        "n": n,
        "index": ours.get("index", n),
        "id": record.get("id"),
        "question": record.get("question", ""),
        "image_names": [str(p.name) for p in images],
        "images": [f"/image/{n}/{k}" for k in range(len(images))],
        "image_errors": [_image_error(p, root) for p in images],
        "rounds": rounds or [],
        "reasoning": reasoning or "",
        "answer": answer or "",
        "expected": expected,
        "correct": None if expected is None or error else answers_match(str(answer or ""), expected),
        "error": error,
        "finish_reason": ours.get("finish_reason"),
        "usage": ours.get("usage"),
        "seconds": ours.get("seconds"),
    }
    return view, images


def load_results(path: Path, image_root: Path | None = None) -> tuple[list[dict[str, Any]], list[list[Path]]]:
    """Views of each line of `path` and, in the same order, their image paths. A line that is not JSON shows as
    an error entry. `image_root` (default: the results file's folder) decides which images the views may show."""
    views: list[dict[str, Any]] = []
    images: list[list[Path]] = []
    base = path.parent
    root = Path(image_root or base).resolve()
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
            view, paths = _view(record, len(views), base, root)
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
        if not self.server.host_allowed(self.headers.get("Host")):
            return self._error(HTTPStatus.FORBIDDEN, "this server answers only requests addressed to it "
                                                     f"(Host {self.server.address.host}:{self.server.address.port})")
        route = urllib.parse.urlparse(self.path).path
        if route in ("/", "/index.html"):
            return self._send(HTTPStatus.OK, _page(), "text/html; charset=utf-8")
        if route == "/api/results":
            try:
                views, images = load_results(self.server.results, self.server.image_root)
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
                self.server.images = load_results(self.server.results, self.server.image_root)[1]
            images = self.server.images
        if n >= len(images) or k >= len(images[n]):
            return self._error(HTTPStatus.NOT_FOUND, f"no image {k} for result {n}")
        path = images[n][k]
        try:
            data, kind = _read_image(path, self.server.image_root)
        except _Refused as e:
            return self._error(e.status, f"{path.name}: {e}")
        self._send(HTTPStatus.OK, data, kind)


@dataclass(frozen=True)
class ViewerAddress:
    host: str
    port: int

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}/"


_EVERY_INTERFACE = ("", "0.0.0.0", "::")


def _host_names(host: str) -> frozenset[str]:
    """The host names a browser may use for a server bound to `host`, lower case, IPv6 without brackets."""
    names = {"localhost", "127.0.0.1", "::1", host}
    if host in _EVERY_INTERFACE:  # also this machine's own names
        names |= {socket.gethostname(), socket.getfqdn()}
    return frozenset(name.lower() for name in names if name)


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, results: Path, host: str, port: int, image_root: str | Path | None = None):
        root = Path(image_root or results.parent).resolve()
        if not root.is_dir():
            raise FileNotFoundError(f"image root not found: {image_root}")
        try:
            super().__init__((host, port), _Handler)
        except OSError as e:  # the usual cause: the port is taken
            hint = " (--port 0 picks a free port)" if e.errno == errno.EADDRINUSE else ""
            raise ViewerBindError(f"cannot listen on {host}:{port}: {e.strerror or e}{hint}") from None
        self.results = results
        self.image_root = root
        self.address = ViewerAddress(host, self.server_address[1])
        self.names = _host_names(host)
        self.images: list[list[Path]] = []
        self.lock = threading.Lock()

    def host_allowed(self, value: str | None) -> bool:
        """Whether a request's Host header names this server (DNS rebinding sends the attacker's name)."""
        if not value or any(c in value for c in "@/?#\\ \t"):  # a bare host[:port], nothing else
            return False
        try:
            parts = urllib.parse.urlsplit("//" + value)
            name, port = parts.hostname, parts.port or 80  # browsers leave out only the default port
        except ValueError:  # a port that is not a number, a broken [IPv6]
            return False
        if not name or port != self.address.port:
            return False
        if name in self.names:
            return True
        if self.address.host in _EVERY_INTERFACE:  # an address literal is no DNS name that could be rebound
            try:
                ipaddress.ip_address(name)
                return True
            except ValueError:
                return False
        return False


class ViewerServer:
    """The viewer in a background thread: ``with ViewerServer(path) as url: ...`` (port 0: any free port).
    Images are served from under `image_root` (default: the results file's folder)."""

    def __init__(self, results: str | Path, host: str = "127.0.0.1", port: int = 0, *,
                 image_root: str | Path | None = None):
        results = Path(results)
        if not results.is_file():
            raise FileNotFoundError(f"results file not found: {results}")
        self._server = _Server(results, host, port, image_root)
        self.address = self._server.address
        self._thread = threading.Thread(target=self._server.serve_forever, name="r1v-view", daemon=True)

    def __enter__(self) -> str:
        self._thread.start()
        return self.address.url

    def __exit__(self, *exc: object) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=10)


def serve_viewer(results: str | Path, host: str = "127.0.0.1", port: int = 8001, *, open_browser: bool = False,
                 image_root: str | Path | None = None) -> None:
    """Serve the page until interrupted. ViewerBindError when the address cannot be listened on."""
    results = Path(results)
    if not results.is_file():
        raise FileNotFoundError(f"results file not found: {results}")
    server = _Server(results, host, port, image_root)
    url = server.address.url
    print(f"r1v view: {results} at {url} (Ctrl-C stops)", flush=True)
    views = load_results(results, server.image_root)[0]
    outside = sum(error == OUTSIDE_ROOT for view in views for error in view["image_errors"])
    if outside:
        print(f"r1v view: {outside} image{'s' if outside > 1 else ''} outside {server.image_root} "
              "will not be shown (--image-root DIR serves the images under DIR)", flush=True)
    if open_browser:
        import webbrowser

        webbrowser.open(url)
    try:
        server.serve_forever()
    finally:
        server.server_close()
