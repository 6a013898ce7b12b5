"""`r1v view`: the results page, its JSON and images, and the page itself in headless Chromium.

The results file is written by `run_batch` (a scripted R1V4-style model: think / tool call / observation /
answer) plus a line in Skywork's own result format and a failed item. Chromium (Debian's `chromium`, driven by
Playwright) loads the page, opens a collapsed reasoning round and takes a screenshot (kept at $R1V_SCREENSHOT
when set); the test skips where no Chromium is installed.
"""
from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from PIL import Image, ImageDraw

from r1v.runtime.api import LoadOptions, Model
from r1v.apps.batch import BatchConfig, run_batch
from r1v.apps.viewer import ViewerServer, load_results

CHROMIUM = Path("/usr/bin/chromium")
R1V4_OUTPUT = ("The picture has circles; I should crop the left half to count them.</think>\n"
               '<tool_call>{"name": "code", "arguments": {"code": "img.crop((0, 0, 160, 240))"}}</tool_call>\n'
               '<observation>{"result": "3 red circles", "type": "code"}</observation>\n'
               "<think>The crop shows 3 red circles and nothing else is red.</think>\n<answer>3</answer>")
SKYWORK_LINE = {"image": "", "question": "This is a text-only question", "answer": "Goodbye.",
                "response": {"full_response": "<think>\nPlain text.\n</think>\n<answer>\nHello.\n</answer>",
                             "raw_response": {}}}


class _ScriptedBackend:
    path, mmproj_path, n_ctx, chat_template = Path("scripted.gguf"), Path("mmproj.gguf"), 4096, None
    special_texts = {"bos_token": "", "eos_token": ""}

    def prepare(self, pieces, images):
        return None

    def start(self, prompt, params):
        from r1v.runtime.backends.prompt import RunStats

        class Run:
            stats = RunStats(prompt_tokens=281)

            def __iter__(self):
                yield 100, R1V4_OUTPUT.encode(), False
                yield 101, b"", True

            def close(self):
                pass

        return Run()

    def close(self):
        pass


def _shapes(path: Path) -> Path:
    image = Image.new("RGB", (320, 240), "white")
    draw = ImageDraw.Draw(image)
    for x, y in ((40, 60), (110, 150), (60, 180)):
        draw.ellipse((x, y, x + 40, y + 40), fill=(220, 40, 40))
    draw.rectangle((200, 50, 280, 130), fill=(40, 90, 220))
    image.save(path)
    return path


@pytest.fixture()
def results(tmp_path: Path) -> Path:
    _shapes(tmp_path / "shapes.png")
    inputs = tmp_path / "cases.jsonl"
    inputs.write_text(json.dumps({"image": "shapes.png", "question": "How many red circles are there?", "answer": "3."})
                      + "\n" + json.dumps({"image": "missing.png", "question": "What about this one?", "answer": "2"})
                      + "\n")
    out = tmp_path / "out" / "results.jsonl"
    run_batch(Model(_ScriptedBackend(), None, LoadOptions()), BatchConfig(inputs, out, progress=False),
              out=io.StringIO())
    with open(out, "a") as f:
        f.write(json.dumps(SKYWORK_LINE) + "\n")
    return out


def _get(url: str) -> tuple[int, bytes, str]:
    try:
        with urllib.request.urlopen(url, timeout=10) as response:
            return response.status, response.read(), response.headers["Content-Type"]
    except urllib.error.HTTPError as e:
        return e.code, e.read(), e.headers["Content-Type"]


def test_results_are_read_from_both_formats(results: Path):
    views, images = load_results(results)
    ours, failed, skywork = views
    assert (ours["answer"], ours["expected"], ours["correct"]) == ("3", "3.", True)  # as `r1v eval` compares
    assert (failed["expected"], failed["correct"]) == ("2", None)  # failed: not graded
    assert (skywork["expected"], skywork["correct"]) == ("Goodbye.", False)  # Skywork's lines keep the input too
    assert [r["kind"] for r in ours["rounds"]] == [
        "think", "tool_call", "observation", "think", "answer"]
    assert images[0] == [results.parent / "../shapes.png"] and ours["images"] == ["/image/0/0"]
    assert ours["image_errors"] == ["outside the image root"]  # by default, the results file's folder
    assert load_results(results, image_root=results.parent.parent)[0][0]["image_errors"] == [None]
    assert "image not found" in failed["error"]
    assert skywork["answer"] == "Hello." and [r["kind"] for r in skywork["rounds"]] == ["think", "answer"]


def test_server_gives_the_page_the_results_and_only_their_images(results: Path):
    with ViewerServer(results, image_root=results.parent.parent) as url:
        status, page, kind = _get(url)
        assert status == 200 and kind.startswith("text/html") and b"r1v results" in page
        status, body, _ = _get(url + "api/results")
        data = json.loads(body)
        assert status == 200 and len(data["results"]) == 3 and data["file"] == str(results)
        status, png, kind = _get(url + "image/0/0")
        assert status == 200 and kind == "image/png" and png == (results.parent.parent / "shapes.png").read_bytes()
        for path in ("image/1/0", "image/0/1", "image/7/0", "image/../../etc/passwd", "nothing"):
            assert _get(url + path)[0] == 404, path


def test_view_command_serves_until_stopped(results: Path):
    from r1v.apps.serve.app import free_port

    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "r1v", "view", str(results), "--port", str(port)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                status, body, _ = _get(f"http://127.0.0.1:{port}/api/results")
                break
            except OSError:
                assert proc.poll() is None and time.monotonic() < deadline, proc.stderr.read()
                time.sleep(0.1)
        assert status == 200 and len(json.loads(body)["results"]) == 3
        assert proc.stdout.readline() == f"r1v view: {results} at http://127.0.0.1:{port}/ (Ctrl-C stops)\n"
        assert proc.stdout.readline() == (f"r1v view: 1 image outside {results.parent} will not be shown "
                                          "(--image-root DIR serves the images under DIR)\n")
    finally:
        proc.terminate()
        proc.wait(timeout=10)
    missing = subprocess.run([sys.executable, "-m", "r1v", "view", str(results.parent / "nope.jsonl")],
                             capture_output=True, text=True)
    assert missing.returncode == 2 and "results file not found" in missing.stderr


@pytest.mark.slow
def test_page_in_headless_chromium(results: Path, tmp_path: Path):
    if not CHROMIUM.exists():
        if os.environ.get("CI") == "true":  # scripts/setup.sh installs it there: missing is a failure
            pytest.fail(f"no Chromium at {CHROMIUM}: scripts/setup.sh should have installed it under CI=true")
        pytest.skip(f"no Chromium at {CHROMIUM} (Debian: apt-get install chromium, or R1V_INSTALL_CHROMIUM=1 "
                    "bash scripts/setup.sh)")
    sync_api = pytest.importorskip("playwright.sync_api")
    screenshot = tmp_path / "viewer.png"
    with ViewerServer(results, image_root=results.parent.parent) as url, sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), args=[
            "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
            "--disable-component-update", "--disable-sync"])
        try:
            page = browser.new_page(viewport={"width": 1200, "height": 1000})
            errors: list[str] = []
            page.on("pageerror", lambda e: errors.append(str(e)))
            page.goto(url)
            page.wait_for_selector("body[data-loaded=true]", timeout=15000)
            cards = page.locator("section.result")
            assert cards.count() == 3
            first = cards.nth(0)
            assert first.locator(".question").inner_text() == "How many red circles are there?"
            image = first.locator("img.input-image")
            image.wait_for()
            page.wait_for_function("() => document.querySelector('img.input-image').complete")
            assert image.evaluate("img => [img.naturalWidth, img.naturalHeight]") == [320, 240]
            rounds = first.locator("details.round")
            assert rounds.count() == 5
            assert rounds.nth(1).locator("summary").inner_text() == "Round 2 · tool call · code"
            assert not rounds.nth(0).evaluate("d => d.open")  # collapsed until clicked
            rounds.nth(0).locator("summary").click()
            rounds.nth(2).locator("summary").click()
            assert rounds.nth(0).evaluate("d => d.open")
            assert "crop the left half" in rounds.nth(0).locator("pre").inner_text()
            assert first.locator(".final-answer").inner_text() == "3"
            assert first.locator(".expected").inner_text() == "expected: 3."
            assert first.locator(".mark").inner_text() == "✓ correct"
            assert "correct" in first.get_attribute("class").split()
            assert cards.nth(1).locator(".mark").count() == 0  # failed: not graded
            assert "image not found" in cards.nth(1).locator(".error").inner_text()
            assert cards.nth(2).locator(".final-answer").inner_text() == "Hello."
            assert cards.nth(2).locator(".mark").inner_text() == "✗ incorrect"
            assert "incorrect" in cards.nth(2).get_attribute("class").split()
            assert page.locator("#stats").inner_text().replace("\n", " ").startswith("3 results")
            assert page.locator("#stats span").nth(3).inner_text() == "1/2 correct"  # the failed one is not graded
            assert errors == []
            page.screenshot(path=str(screenshot), full_page=True)
        finally:
            browser.close()
    shot = Image.open(screenshot)
    assert shot.width == 1200 and shot.height >= 600
    assert len(shot.convert("RGB").resize((60, 60)).getcolors(3600)) > 20  # not a blank page
    if os.environ.get("R1V_SCREENSHOT"):
        shutil.copy(screenshot, os.environ["R1V_SCREENSHOT"])


def _results_file(folder: Path, images: list[str]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "results.jsonl"
    path.write_text("".join(json.dumps({"question": f"q{i}", "r1v": {"index": i, "image_path": image, "answer": "1"},
                                        "response": {"full_response": "1"}}) + "\n"
                            for i, image in enumerate(images)))
    return path


@pytest.mark.slow
def test_images_are_served_only_from_under_the_root_without_symlinks_out(tmp_path: Path):
    secret = tmp_path / "secret.txt"
    secret.write_text("root:x:0:0:secret\n")
    _shapes(tmp_path / "outside.png")
    root = tmp_path / "run"
    (root / "imgs").mkdir(parents=True)
    png = _shapes(root / "imgs" / "a.png")
    (root / "imgs" / "link.png").symlink_to(secret)  # the case: imgs/link.png -> /etc/passwd
    (root / "imgs" / "out.png").symlink_to(tmp_path / "outside.png")  # a real image, but outside
    (root / "imgs" / "in.png").symlink_to(png)  # a link that stays inside is fine
    os.mkfifo(root / "imgs" / "fifo.png")  # reading it would hang the request
    results = _results_file(root, ["imgs/a.png", "imgs/link.png", "imgs/out.png", "../outside.png", str(secret),
                                   "imgs/in.png", "imgs/fifo.png", "imgs/none.png"])
    views, _ = load_results(results)
    assert [v["image_errors"] for v in views] == [
        [None], ["outside the image root"], ["outside the image root"], ["outside the image root"],
        ["outside the image root"], [None], ["not a regular file"], ["not found"]]
    with ViewerServer(results) as url:
        assert _get(url + "image/0/0")[:2] == (200, png.read_bytes())
        assert _get(url + "image/5/0")[:2] == (200, png.read_bytes())
        for n in (1, 2, 3, 4):
            status, body, _ = _get(url + f"image/{n}/0")
            assert (status, json.loads(body)["error"].split(": ", 1)[1]) == (403, "outside the image root"), n
        assert _get(url + "image/6/0")[0] == 403
        assert _get(url + "image/7/0")[0] == 404
    with ViewerServer(results, image_root=tmp_path) as url:  # an explicit root takes in what lies under it...
        assert _get(url + "image/3/0")[:2] == (200, (tmp_path / "outside.png").read_bytes())
        assert _get(url + "image/2/0")[0] == 200
        status, body, _ = _get(url + "image/4/0")  # ...but never what is not an image
        assert (status, json.loads(body)["error"]) == (403, "secret.txt: not an image")
    with pytest.raises(FileNotFoundError, match="image root not found: .*nowhere"):
        ViewerServer(results, image_root=tmp_path / "nowhere")


def test_foreign_host_headers_are_refused(results: Path):
    import http.client

    def get(port: int, host: str | None) -> int:
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        connection.putrequest("GET", "/api/results", skip_host=True)
        if host is not None:
            connection.putheader("Host", host)
        connection.endheaders()
        status = connection.getresponse().status
        connection.close()
        return status

    with ViewerServer(results) as url:
        port = int(url.rstrip("/").rsplit(":", 1)[1])
        for host in (f"127.0.0.1:{port}", f"localhost:{port}", f"LocalHost:{port}", f"[::1]:{port}"):
            assert get(port, host) == 200, host
        # DNS rebinding: a page from evil.example whose name now resolves to 127.0.0.1
        for host in (f"evil.example:{port}", "evil.example", f"127.0.0.1:{port + 1}", "127.0.0.1", None,
                     f"localhost.evil.example:{port}", f"127.0.0.1:{port}@evil.example"):
            assert get(port, host) == 403, host
