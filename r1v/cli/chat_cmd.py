"""`r1v chat MODEL`: an interactive conversation.

The conversation is kept and each turn reuses the KV cache for what it shares with the previous one; stderr
shows the prompt and cached token counts per turn. The answer, not the reasoning, goes into the history.
Ctrl-C while the model answers stops the answer and returns to the prompt: what it said so far stays in the
conversation (the image and question it answered too, so the next message can refer to them). On a terminal:
line editing and a history file (readline, `$XDG_CACHE_HOME/r1v/chat_history`), a "thinking…" line while the
reasoning is hidden (`--show-reasoning` streams it instead). `/help` lists the commands. Flags as
`r1v generate`.
"""
from __future__ import annotations

import argparse
import os
import signal
import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator, TextIO

from r1v.cli.generate_cmd import add_model_arguments, add_sampling_arguments

HELP = """\
Type a message and press Enter.
  /image PATH   attach an image to your next message (repeatable)
  /reset        start a new conversation
  /help         this text
  /exit         quit (also Ctrl-D, or Ctrl-C twice at the prompt)
Multi-line messages: end a line with \\ to go on on the next one, or put the message between two \"\"\" lines.
Ctrl-C while the model answers stops the answer; what it said so far stays in the conversation."""
BLOCK = '"""'
HISTORY_LENGTH = 1000


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_model_arguments(parser)
    parser.add_argument("--system", default=None, help="a system message to start the conversation with")
    parser.add_argument("--show-reasoning", action="store_true",
                        help='stream the reasoning (dimmed) instead of a "thinking…" line')
    add_sampling_arguments(parser)


# --- input ------------------------------------------------------------------------------------------------

class Discarded(Exception):
    """Ctrl-C at the prompt threw away text being typed: a new prompt, not a step towards exiting."""


def history_path() -> Path:
    """The chat's readline history: the user cache directory, as the other r1v caches."""
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "r1v" / "chat_history"


class LineReader:
    """Lines typed at a terminal (readline: editing, history kept in `history_path()`), or read from piped
    stdin (no prompts, no history). Calling it raises EOFError at the end of input and KeyboardInterrupt on
    Ctrl-C, as `input()` does."""

    def __init__(self, interactive: bool):
        self.interactive = interactive
        self._readline: Any = None
        if interactive:
            try:
                import readline  # makes input() editable; absent on some platforms (then plain input())
            except ImportError:
                return
            self._readline = readline
            readline.set_history_length(HISTORY_LENGTH)
            try:
                readline.read_history_file(history_path())
            except OSError:  # none yet, or unreadable: start empty
                pass

    def __call__(self, prompt: str) -> str:
        if self.interactive:
            try:
                return input(prompt)
            except KeyboardInterrupt:
                if self._readline is not None and self._readline.get_line_buffer():
                    raise Discarded from None
                raise
        line = sys.stdin.readline()
        if not line:
            raise EOFError
        return line.rstrip("\n")

    def close(self) -> None:
        """Save the history (written under a temporary name, then renamed)."""
        if self._readline is None:
            return
        path = history_path()
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            self._readline.write_history_file(tmp)
            os.replace(tmp, path)
        except OSError as e:
            print(f"r1v chat: could not save the history to {path}: {e.strerror or e}", file=sys.stderr)
        finally:
            tmp.unlink(missing_ok=True)


@contextmanager
def ctrl_c_in_the_main_thread() -> Iterator[None]:
    """Ctrl-C reaches the main thread whatever other threads run. The terminal's SIGINT goes to any thread that
    does not block it (numpy's BLAS pool, llama.cpp's workers, ...); Python then runs its handler only when the
    main thread wakes, and readline's wait for a key does not wake: the Ctrl-C was lost until the next key
    (seen: two thirds of runs under load). So Python's SIGINT handler only records it (the C handler writes it
    to the wakeup pipe, from whichever thread), and a forwarding thread sends SIGUSR1 to the main thread, whose
    handler raises KeyboardInterrupt there, as SIGINT would. Until that handler has run, the forwarder sends again
    every 0.2 s: a signal landing between readline's set-up and its wait for a key wakes nothing either."""
    if not hasattr(signal, "pthread_kill") or threading.current_thread() is not threading.main_thread():
        yield
        return
    main, handled, closing = threading.main_thread().ident, threading.Event(), threading.Event()
    read_end, write_end = os.pipe()
    os.set_blocking(write_end, False)

    def interrupt(signum: int, frame: Any) -> None:
        handled.set()
        raise KeyboardInterrupt

    previous = (signal.signal(signal.SIGINT, lambda *_: None), signal.signal(signal.SIGUSR1, interrupt),
                signal.set_wakeup_fd(write_end, warn_on_full_buffer=False))

    def forward() -> None:
        while True:
            received = os.read(read_end, 64)
            if not received or 0 in received:  # 0: closing
                return
            if signal.SIGINT in received:
                handled.clear()
                signal.pthread_kill(main, signal.SIGUSR1)
                while not handled.wait(0.2) and not closing.is_set():
                    signal.pthread_kill(main, signal.SIGUSR1)

    forwarder = threading.Thread(target=forward, name="r1v-chat-ctrl-c", daemon=True)
    forwarder.start()
    try:
        yield
    finally:
        closing.set()
        signal.set_wakeup_fd(previous[2])
        signal.signal(signal.SIGINT, previous[0])
        os.write(write_end, b"\0")
        forwarder.join(timeout=1)
        signal.signal(signal.SIGUSR1, previous[1])
        os.close(read_end)
        os.close(write_end)


def read_message(read: Callable[[str], str]) -> str:
    """One message: a line; a line ending in a backslash goes on on the next line; a line that starts with
    \"\"\" opens a block, closed by a line that ends with \"\"\" (Ollama's convention). Ctrl-C on a
    continuation line raises Discarded (the lines so far are thrown away)."""
    line = read("> ")

    def more() -> str:
        try:
            return read("... ")
        except KeyboardInterrupt:
            raise Discarded from None

    if line.lstrip().startswith(BLOCK):
        first = line.lstrip()[len(BLOCK):]
        if first.rstrip().endswith(BLOCK):  # """one line"""
            return first.rstrip()[:-len(BLOCK)]
        lines = [first] if first else []
        while True:
            line = more()
            if line.rstrip().endswith(BLOCK):
                lines.append(line.rstrip()[:-len(BLOCK)])
                return "\n".join(lines).rstrip("\n")
            lines.append(line)
    lines = []
    while line.endswith("\\"):
        lines.append(line[:-1])
        line = more()
    return "\n".join([*lines, line])


# --- output -----------------------------------------------------------------------------------------------

class ThinkingLine:
    """``thinking… 12 s`` on one terminal line while the model works and shows nothing (the prompt being
    evaluated, hidden reasoning), ticking each second; erased before text is printed. Nothing when `out` is not
    a terminal. Use as a context manager (the ticking thread runs inside it)."""

    def __init__(self, out: TextIO):
        self.out, self.on = out, out.isatty()
        self.start = time.monotonic()
        self.visible = False
        self._lock = threading.Lock()
        self._done = threading.Event()
        self._ticker: threading.Thread | None = None

    def __enter__(self) -> ThinkingLine:
        if self.on:
            self._ticker = threading.Thread(target=self._tick, name="r1v-chat-thinking", daemon=True)
            self._ticker.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._done.set()
        if self._ticker is not None:
            self._ticker.join(timeout=2)
        self.hide()

    def _tick(self) -> None:
        while not self._done.wait(1.0):
            with self._lock:
                if self.visible:
                    self._draw()

    def _draw(self) -> None:
        seconds = int(time.monotonic() - self.start)
        self.out.write("\rthinking…" + (f" {seconds} s" if seconds else "") + "\x1b[K")
        self.out.flush()

    def show(self) -> None:
        if self.on and not self.visible:
            with self._lock:
                self.visible = True
                self._draw()

    def hide(self) -> None:
        if not self.visible:
            return
        locked = self._lock.acquire(timeout=1)  # never wait on a lock a Ctrl-C left taken
        try:
            self.out.write("\r\x1b[K")
            self.out.flush()
            self.visible = False
        finally:
            if locked:
                self._lock.release()


def answer(model: Any, messages: list[dict[str, Any]], args: argparse.Namespace) -> tuple[dict[str, Any], Any]:
    """Stream the answer to `messages`; Ctrl-C stops it. Returns the assistant message for the history and
    the Result (None when stopped: the message then holds the answer text shown so far, without reasoning).
    ValueError (context overflow, unreadable image) comes from `model.stream`, before anything is shown."""
    from r1v.cli.generate_cmd import Printer, sampling_overrides

    printer = Printer(sys.stdout, args.show_reasoning)
    content: list[str] = []
    result = stream = None
    with ThinkingLine(sys.stderr) as thinking:
        try:
            thinking.show()
            stream = model.stream(messages, **sampling_overrides(args))
            for chunk in stream:
                if chunk.text and (chunk.kind == "content" or args.show_reasoning):
                    thinking.hide()
                elif chunk.kind == "reasoning" and not args.show_reasoning and \
                        (not printer.wrote_any or printer.last.endswith("\n")):
                    thinking.show()  # hidden reasoning (again, in R1V4-style rounds), on a line of its own
                printer.chunk(chunk.text, chunk.kind)
                if chunk.kind == "content":
                    content.append(chunk.text)
                result = chunk.result or result
        except KeyboardInterrupt:
            result = None  # stopped: between two tokens, or while the prompt was evaluated
        finally:
            thinking.hide()
            printer.end()
            if stream is not None:
                stream.close()  # the KV cache keeps what was evaluated; the next turn reuses its common prefix
    if result is not None:
        return result.message, result
    return {"role": "assistant", "content": "".join(content).strip()}, None


# --- the conversation -------------------------------------------------------------------------------------

def run(args: argparse.Namespace) -> int:
    with ctrl_c_in_the_main_thread():
        return _converse(args)


def _converse(args: argparse.Namespace) -> int:
    from r1v.cli.generate_cmd import load_options, report
    from r1v.runtime.api import load
    from r1v.runtime.backends.llamacpp.mtmd import MtmdError
    from r1v.runtime.image import ImageError, load_image

    interactive = sys.stdin.isatty()
    start = [{"role": "system", "content": args.system}] if args.system else []
    try:
        model = load(args.model, **load_options(args))
    except (NotImplementedError, MtmdError, RuntimeError) as e:
        print(f"r1v chat: error: {e}", file=sys.stderr)
        return 2
    reader = LineReader(interactive)
    with model:
        print(f"{model!r}. /help lists the commands; Ctrl-D exits.", file=sys.stderr)
        messages: list[dict[str, Any]] = list(start)
        images: list[Any] = []
        turn = 0
        interrupted = False  # the last input was a Ctrl-C at the prompt
        try:
            while True:
                try:
                    text = read_message(reader)
                except EOFError:
                    if interactive:
                        print(file=sys.stderr)
                    break
                except Discarded:
                    interrupted = False
                    print(file=sys.stderr)
                    continue
                except KeyboardInterrupt:  # at an empty prompt
                    if interrupted:
                        print(file=sys.stderr)
                        break
                    interrupted = True
                    print("\n(Ctrl-C again or Ctrl-D to exit)", file=sys.stderr)
                    continue
                interrupted = False
                command, _, rest = text.strip().partition(" ")
                if command in ("/exit", "/quit", "/bye"):
                    break
                if command in ("/help", "/?"):
                    print(HELP, file=sys.stderr)
                    continue
                if command == "/reset":
                    messages, images, turn = list(start), [], 0
                    model.reset()
                    print("(new conversation)", file=sys.stderr)
                    continue
                if command == "/image":
                    path = rest.strip()
                    try:
                        load_image(path)  # refuse a bad file now, not after the question is typed
                    except ImageError as e:
                        print(f"r1v chat: {e}", file=sys.stderr)
                        continue
                    images.append(path)
                    print(f"(image {len(images)} attached: {path})", file=sys.stderr)
                    continue
                if command.startswith("/") and "\n" not in text and command != "/":
                    print(f"unknown command {command}; /help lists the commands", file=sys.stderr)
                    continue
                if not text.strip() and not images:
                    continue
                content = [{"type": "image", "image": p} for p in images] + [{"type": "text", "text": text}]
                messages.append({"role": "user", "content": content if images else text})
                images = []
                turn += 1
                try:
                    reply, result = answer(model, messages, args)
                except ValueError as e:  # context overflow, unreadable image: the turn is dropped, the chat goes on
                    messages.pop()
                    turn -= 1
                    print(f"r1v chat: {e}", file=sys.stderr)
                    continue
                messages.append(reply)
                if result is None:
                    print(f"[turn {turn}] stopped; the answer so far stays in the conversation", file=sys.stderr)
                    continue
                print(f"[turn {turn}] ", end="", file=sys.stderr)
                report(result, args.show_reasoning)
        finally:
            reader.close()
    return 0
