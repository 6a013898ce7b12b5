"""Splitting R1V outputs into reasoning and answer, streamed or whole; R1V4-style tool rounds.

Skywork-R1V2/R1V3 prompts end with ``<think>\\n`` (the chat template forces the tag open), so a
generation normally starts *inside* the reasoning and looks like ``…reasoning…</think>\\n\\nanswer``.
Models do not always follow that script, and the rules below say what happens when they don't:

* Starting in reasoning (the default), everything up to the first ``</think>`` is reasoning.  If the
  output begins with ``<think>`` anyway (possibly after whitespace) that tag is dropped: the model
  re-opened the block the prompt had opened, it did not start a second one.  The whitespace before
  it stays in the reasoning text.
* After ``</think>`` everything is content, except a later ``<think>…</think>`` block, which is
  reasoning again (models that think in several rounds).  A ``<think>`` that is never closed makes
  the rest of the output reasoning.
* Inside reasoning, ``<think>`` is literal text: blocks do not nest, the first ``</think>`` closes
  the block whatever came before it.  ``<think>`` is only dropped at the very start (see above).
* Whitespace right after a ``</think>`` that ends a reasoning block is dropped from the content
  (Skywork's outputs put ``\\n\\n`` there); only those characters, up to the first other character.
* A ``</think>`` met in content (no block open) is dropped; nothing else changes.  Tags never appear
  in the emitted text; text that only resembles a tag (``<thinking>``, ``</thinkers``, ``a < b``)
  is passed through.

:class:`ReasoningParser` applies these rules to a token stream and :func:`split_reasoning` to a
whole text; for any fragmentation of a text, joining the parser's deltas gives exactly what
:func:`split_reasoning` returns.

R1V4-style agentic outputs interleave ``<think>``, ``<tool_call>{json}</tool_call>``,
``<observation>`` and ``<answer>`` blocks; :func:`parse_rounds` cuts them into :class:`Round` s and
:func:`final_answer` picks out what an evaluator compares.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Literal, Optional

__all__ = [
    "Delta",
    "ReasoningParser",
    "Round",
    "final_answer",
    "parse_rounds",
    "split_reasoning",
]

THINK_OPEN = "<think>"
THINK_CLOSE = "</think>"

# Parser states.
_PRELUDE = "prelude"  # starts in reasoning, only whitespace seen so far: a <think> here is dropped
_REASONING = "reasoning"
_CONTENT = "content"


@dataclass(frozen=True)
class Delta:
    """A piece of streamed output: ``kind`` says which side of ``</think>`` it belongs to."""

    kind: Literal["reasoning", "content"]
    text: str


def _check_tags(open_tag: str, close_tag: str) -> None:
    if not open_tag or not close_tag:
        raise ValueError("reasoning tags must be non-empty")
    # With neither tag inside the other, a tag that completes can never be part of an earlier,
    # longer tag still being held back, so the streaming parser and split_reasoning agree.
    if open_tag in close_tag or close_tag in open_tag:
        raise ValueError(f"reasoning tags {open_tag!r} and {close_tag!r} must not contain each other")


def _held_length(buf: str, tags: tuple[str, ...]) -> int:
    """Length of the longest suffix of ``buf`` that is a proper prefix of one of ``tags``."""
    longest = min(len(buf), max(len(t) for t in tags) - 1)
    for k in range(longest, 0, -1):
        suffix = buf[-k:]
        if any(len(t) > k and t.startswith(suffix) for t in tags):
            return k
    return 0


class ReasoningParser:
    """Incremental reasoning/content splitter for a stream of text fragments.

    ``feed`` returns what can be decided now; it holds back only the shortest suffix that could
    still turn into a tag (``"</thi"`` while in reasoning, ``"<"`` in content, ...), never more.
    ``finish`` flushes that suffix as literal text and ends the stream.  Whitespace after
    ``</think>`` is dropped as it arrives, not held.

    >>> p = ReasoningParser()
    >>> p.feed("Let me look.</th") + p.feed("ink>\\n\\nIt is a cat.") + p.finish()
    [Delta(kind='reasoning', text='Let me look.'), Delta(kind='content', text='It is a cat.')]
    """

    def __init__(
        self,
        starts_in_reasoning: bool = True,
        open_tag: str = THINK_OPEN,
        close_tag: str = THINK_CLOSE,
    ) -> None:
        _check_tags(open_tag, close_tag)
        self.open_tag = open_tag
        self.close_tag = close_tag
        self._state = _PRELUDE if starts_in_reasoning else _CONTENT
        self._strip = False  # dropping whitespace that follows a </think>
        self._buf = ""
        self._finished = False

    @property
    def in_reasoning(self) -> bool:
        """True while text would be emitted as reasoning (e.g. a stream that ended mid-thought)."""
        return self._state != _CONTENT

    @property
    def held(self) -> str:
        """Text received but not yet emitted: a possible beginning of a tag."""
        return self._buf

    def feed(self, text: str) -> list[Delta]:
        """Take the next fragment; return the deltas it settles (same-kind pieces merged)."""
        if self._finished:
            raise RuntimeError("ReasoningParser.feed() after finish()")
        out: list[Delta] = []
        self._buf += text
        self._drain(out)
        return out

    def finish(self) -> list[Delta]:
        """End of stream: emit the held text as literal text of the current kind."""
        if self._finished:
            raise RuntimeError("ReasoningParser.finish() called twice")
        self._finished = True
        out: list[Delta] = []
        self._emit(out, self._buf)
        self._buf = ""
        return out

    def _emit(self, out: list[Delta], text: str) -> None:
        if not text:
            return
        kind = "content" if self._state == _CONTENT else "reasoning"
        if out and out[-1].kind == kind:
            out[-1] = Delta(kind, out[-1].text + text)
        else:
            out.append(Delta(kind, text))

    def _close_block(self) -> None:
        self._state = _CONTENT
        self._strip = True

    def _drain(self, out: list[Delta]) -> None:
        buf = self._buf
        open_tag, close_tag = self.open_tag, self.close_tag
        while buf:
            if self._state == _PRELUDE:
                rest = buf.lstrip()
                self._emit(out, buf[: len(buf) - len(rest)])
                buf = rest
                if not buf:
                    break
                if buf.startswith(open_tag):  # the model re-opened the forced block: drop the tag
                    buf = buf[len(open_tag):]
                    self._state = _REASONING
                elif buf.startswith(close_tag):
                    buf = buf[len(close_tag):]
                    self._close_block()
                elif open_tag.startswith(buf) or close_tag.startswith(buf):
                    break  # could still become either tag
                else:
                    self._state = _REASONING
            elif self._state == _REASONING:
                j = buf.find(close_tag)
                if j >= 0:
                    self._emit(out, buf[:j])
                    buf = buf[j + len(close_tag):]
                    self._close_block()
                    continue
                keep = _held_length(buf, (close_tag,))
                self._emit(out, buf[: len(buf) - keep])
                buf = buf[len(buf) - keep:]
                break
            else:  # _CONTENT
                if self._strip:
                    buf = buf.lstrip()
                    if not buf:
                        break
                    self._strip = False
                jo, jc = buf.find(open_tag), buf.find(close_tag)
                if jo >= 0 and (jc < 0 or jo < jc):
                    self._emit(out, buf[:jo])
                    buf = buf[jo + len(open_tag):]
                    self._state = _REASONING
                    continue
                if jc >= 0:  # stray close tag: dropped
                    self._emit(out, buf[:jc])
                    buf = buf[jc + len(close_tag):]
                    continue
                keep = _held_length(buf, (open_tag, close_tag))
                self._emit(out, buf[: len(buf) - keep])
                buf = buf[len(buf) - keep:]
                break
        self._buf = buf


def split_reasoning(
    text: str,
    starts_in_reasoning: bool = True,
    open_tag: str = THINK_OPEN,
    close_tag: str = THINK_CLOSE,
) -> tuple[str, str]:
    """Whole-text version of :class:`ReasoningParser`: ``(reasoning, content)``.

    All reasoning blocks are joined into one string, all content pieces into the other.

    >>> split_reasoning("The image shows 3 cats.\\n</think>\\n\\nThree.")
    ('The image shows 3 cats.\\n', 'Three.')
    """
    _check_tags(open_tag, close_tag)
    reasoning: list[str] = []
    content: list[str] = []
    pos = 0
    in_reasoning = starts_in_reasoning
    if starts_in_reasoning:
        start = len(text) - len(text.lstrip())
        if text.startswith(open_tag, start):
            reasoning.append(text[:start])
            pos = start + len(open_tag)
    n = len(text)
    while pos < n:
        if in_reasoning:
            j = text.find(close_tag, pos)
            if j < 0:
                reasoning.append(text[pos:])
                break
            reasoning.append(text[pos:j])
            pos = j + len(close_tag)
            in_reasoning = False
            while pos < n and text[pos].isspace():
                pos += 1
        else:
            jo, jc = text.find(open_tag, pos), text.find(close_tag, pos)
            if jo < 0 and jc < 0:
                content.append(text[pos:])
                break
            if jo >= 0 and (jc < 0 or jo < jc):
                content.append(text[pos:jo])
                pos = jo + len(open_tag)
                in_reasoning = True
            else:  # stray close tag: dropped
                content.append(text[pos:jc])
                pos = jc + len(close_tag)
    return "".join(reasoning), "".join(content)


# ---------------------------------------------------------------- R1V4-style rounds

RoundKind = Literal["think", "tool_call", "observation", "answer", "text"]

_ROUND_TAGS = ("think", "tool_call", "observation", "answer")
_ROUND_TAG_RE = re.compile(r"<(/?)(" + "|".join(_ROUND_TAGS) + r")>")


@dataclass(frozen=True)
class Round:
    """One block of an R1V4-style output.

    ``text`` is the block's body with surrounding whitespace stripped.  For ``tool_call`` rounds
    ``tool_call`` is the parsed call (a dict with ``"name"`` and ``"arguments"``) or ``None`` with
    ``error`` saying why the body could not be used.
    """

    kind: RoundKind
    text: str
    tool_call: Optional[dict] = None
    error: Optional[str] = None


def _tool_call_round(body: str) -> Round:
    try:
        call = json.loads(body)
    except json.JSONDecodeError as e:
        return Round("tool_call", body, error=f"invalid tool call JSON: {e}")
    if not isinstance(call, dict) or not isinstance(call.get("name"), str):
        return Round("tool_call", body, error="tool call must be a JSON object with a string 'name'")
    call.setdefault("arguments", {})
    return Round("tool_call", body, tool_call=call)


def parse_rounds(text: str, starts_in_reasoning: bool = True) -> list[Round]:
    """Cut an R1V4-style output into rounds, in order.

    Blocks are ``<think>``, ``<tool_call>{json}</tool_call>``, ``<observation>`` and ``<answer>``;
    each ends at its own closing tag only (other tags inside a block are literal text) or, when
    never closed, at the end of the text.  Text between blocks becomes ``"text"`` rounds
    (whitespace-only text is dropped); stray closing tags are dropped.  With
    ``starts_in_reasoning`` the output is taken to begin inside an implicit think block, as in
    :func:`split_reasoning` (a leading ``<think>`` is not a second block; an empty implicit block
    gives no round).
    """
    rounds: list[Round] = []
    pending: list[str] = []  # text between blocks, merged across dropped stray tags

    def flush_text() -> None:
        body = "".join(pending).strip()
        pending.clear()
        if body:
            rounds.append(Round("text", body))

    pos = 0
    if starts_in_reasoning and not text.lstrip().startswith(THINK_OPEN):
        j = text.find(THINK_CLOSE)
        end = len(text) if j < 0 else j
        if text[:end].strip():
            rounds.append(Round("think", text[:end].strip()))
        pos = len(text) if j < 0 else j + len(THINK_CLOSE)
    while pos < len(text):
        m = _ROUND_TAG_RE.search(text, pos)
        if m is None:
            pending.append(text[pos:])
            break
        pending.append(text[pos : m.start()])
        pos = m.end()
        if m.group(1):  # stray closing tag
            continue
        flush_text()
        kind = m.group(2)
        j = text.find(f"</{kind}>", pos)
        end = len(text) if j < 0 else j
        body = text[pos:end].strip()
        pos = len(text) if j < 0 else j + len(kind) + 3
        rounds.append(_tool_call_round(body) if kind == "tool_call" else Round(kind, body))
    flush_text()
    return rounds


def final_answer(text: str, *, starts_in_reasoning: bool = True) -> str:
    """What an evaluator compares: the last ``<answer>`` block's body, else the content after the
    last ``</think>``; stripped.

    An ``<answer>`` that is never closed runs to the end of the text.  With no ``</think>`` at all
    the whole text is split by :func:`split_reasoning`, so a model that never stopped thinking
    (``starts_in_reasoning=True``) has answered ``""``.  A ``<think>`` opened after the last
    ``</think>`` and never closed is not part of the answer.
    """
    i = text.rfind("<answer>")
    if i >= 0:
        body = text[i + len("<answer>"):]
        j = body.find("</answer>")
        return (body if j < 0 else body[:j]).strip()
    j = text.rfind(THINK_CLOSE)
    if j >= 0:
        return split_reasoning(text[j + len(THINK_CLOSE):], starts_in_reasoning=False)[1].strip()
    return split_reasoning(text, starts_in_reasoning=starts_in_reasoning)[1].strip()
