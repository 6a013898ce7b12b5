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
from r1v.runtime.batch import BatchConfig, run_batch
from r1v.runtime.viewer import ViewerServer, load_results

CHROMIUM = Path("/usr/bin/chromium")
R1V4_OUTPUT = ("The picture has circles; I should crop the left half to count them.</think>\n"
               '<tool_call>{"name": "code", "arguments": {"code": "img.crop((0, 0, 160, 240))"}}</tool_call>\n'
               '<observation>{"result": "3 red circles", "type": "code"}</observation>\n'
               "<think>The crop shows 3 red circles and nothing else is red.</think>\n<answer>3</answer>")
SKYWORK_LINE = {"image": "", "question": "This is a text-only question",
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
    inputs.write_text(json.dumps({"image": "shapes.png", "question": "How many red circles are there?"}) + "\n"
                      + json.dumps({"image": "missing.png", "question": "What about this one?"}) + "\n")
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
    assert ours["answer"] == "3" and [r["kind"] for r in ours["rounds"]] == [
        "think", "tool_call", "observation", "think", "answer"]
    assert images[0] == [results.parent / "../shapes.png"] and ours["images"] == ["/image/0/0"]
    assert "image not found" in failed["error"]
    assert skywork["answer"] == "Hello." and [r["kind"] for r in skywork["rounds"]] == ["think", "answer"]


def test_server_gives_the_page_the_results_and_only_their_images(results: Path):
    with ViewerServer(results) as url:
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
    from r1v.runtime.serve.app import free_port

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
    finally:
        proc.terminate()
        proc.wait(timeout=10)
    missing = subprocess.run([sys.executable, "-m", "r1v", "view", str(results.parent / "nope.jsonl")],
                             capture_output=True, text=True)
    assert missing.returncode == 2 and "results file not found" in missing.stderr


def test_page_in_headless_chromium(results: Path, tmp_path: Path):
    if not CHROMIUM.exists():
        if os.environ.get("CI") == "true":  # scripts/setup.sh installs it there: missing is a failure
            pytest.fail(f"no Chromium at {CHROMIUM}: scripts/setup.sh should have installed it under CI=true")
        pytest.skip(f"no Chromium at {CHROMIUM} (Debian: apt-get install chromium, or R1V_INSTALL_CHROMIUM=1 "
                    "bash scripts/setup.sh)")
    sync_api = pytest.importorskip("playwright.sync_api")
    screenshot = tmp_path / "viewer.png"
    with ViewerServer(results) as url, sync_api.sync_playwright() as p:
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
            assert "image not found" in cards.nth(1).locator(".error").inner_text()
            assert cards.nth(2).locator(".final-answer").inner_text() == "Hello."
            assert page.locator("#stats").inner_text().replace("\n", " ").startswith("3 results")
            assert errors == []
            page.screenshot(path=str(screenshot), full_page=True)
        finally:
            browser.close()
    shot = Image.open(screenshot)
    assert shot.width == 1200 and shot.height >= 600
    assert len(shot.convert("RGB").resize((60, 60)).getcolors(3600)) > 20  # not a blank page
    if os.environ.get("R1V_SCREENSHOT"):
        shutil.copy(screenshot, os.environ["R1V_SCREENSHOT"])
