"""Chat messages in the OpenAI shape, and the prompt text a model sees for them.

    normalize_messages("What is shown?", images=["cat.png"])
    -> [{"role": "user", "content": [{"type": "image", "image": "cat.png"}, {"type": "text", "text": "What is shown?"}]}]

    render_prompt(template, messages) -> RenderedPrompt(text="<|im_start|>user\\n<image>\\nWhat is shown?<|im_end|>\\n"
                                                             "<|im_start|>assistant\\n<think>\\n", pieces=[...], images=[...])

Accepted message content: a string, or a list of parts -
``{"type": "text", "text": ...}``, ``{"type": "image_url", "image_url": {"url": <data: URL or path>}}`` (or the
url as a plain string), ``{"type": "image", "image": <path, bytes, PIL image or data: URL>}``. A plain string
prompt with ``images=`` becomes one user message with the images first, then the text: Skywork's scripts put
one ``<image>\\n`` per image before the question. ``images=`` with a message list goes the same way into the
last user message.

Rendering: every image part becomes ``<image>\\n`` (what the R1V chat templates write for it); the content
handed to the template is always a string, so any template that renders string content works (the GGUF
converter's templates also accept lists, this module does not rely on it). Internally each image renders as a
private sentinel so the text can be cut at exactly the images the caller gave: text a user types, even a
literal ``<image>``, stays text. Jinja runs sandboxed, like transformers and llama-cpp-python do.

Message text is data, the template's own text is structure: the text of system, user, tool and developer
messages renders between two private markers, so the rendered prompt knows where it landed
(`RenderedPrompt.fragments`), and the backends tokenize it with special tokens off - a user who types
``<|im_end|>``, ``<|im_start|>``, ``<img>`` or ``<IMG_CONTEXT>`` gets those characters as text, not the
control tokens that end a turn or open an image slot (as llama-server and vLLM treat message content). Only
the template's own ``<|im_start|>`` ... stay control tokens. Assistant turns are the model's own text (and
templates rewrite them, e.g. drop the reasoning), so they render as before. The sentinel and markers are
Unicode noncharacters (U+FDD0..U+FDD2), removed from message text on the way in.
"""
from __future__ import annotations

import functools
import re
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

__all__ = [
    "IMAGE_PLACEHOLDER", "RenderedPrompt", "message_images", "normalize_messages", "render_prompt",
    "resolve_template", "starts_in_reasoning",
]

IMAGE_PLACEHOLDER = "<image>"  # what the rendered prompt shows for each image (InternVL / Skywork convention)
_SENTINEL = "\ufdd0"  # stands for one image while the template renders; never left in any output
_OPEN, _CLOSE = "\ufdd1", "\ufdd2"  # around message text while the template renders (where it lands)
_PRIVATE = str.maketrans("", "", _SENTINEL + _OPEN + _CLOSE)
_ROLES = ("system", "user", "assistant", "tool", "developer")
_TEXT_ROLES = ("system", "user", "tool", "developer")  # whose text is never parsed for special tokens


@dataclass(frozen=True)
class RenderedPrompt:
    """The rendered prompt: ``pieces`` are the texts around the images (``len(images) + 1`` of them), ``text``
    joins them with ``<image>``. ``starts_in_reasoning``: the generation prompt the template appended leaves a
    ``<think>`` open (R1V templates force ``<think>\n``), so the output begins as reasoning."""

    pieces: list[str]
    images: list[Any] = field(default_factory=list)
    starts_in_reasoning: bool = False
    message_spans: list[list[tuple[int, int]]] = field(default_factory=list)  # per piece: [start, end) of message text

    @property
    def text(self) -> str:
        return IMAGE_PLACEHOLDER.join(self.pieces)

    @property
    def fragments(self) -> list[list[tuple[str, bool]]]:
        """Each piece as (text, parse_special) fragments: the template's text True, message text False."""
        out = []
        for i, piece in enumerate(self.pieces):
            spans = self.message_spans[i] if i < len(self.message_spans) else []
            parts, at = [], 0
            for start, end in spans:
                parts += [(piece[at:start], True)] if start > at else []
                parts.append((piece[start:end], False))
                at = end
            parts += [(piece[at:], True)] if at < len(piece) or not parts else []
            out.append(parts)
        return out


def starts_in_reasoning(prompt: str, open_tag: str = "<think>", close_tag: str = "</think>") -> bool:
    """Whether generation continues inside a reasoning block: the prompt's last ``<think>`` is not closed
    (R1V templates force ``<think>\\n`` at the end of the generation prompt)."""
    i = prompt.rfind(open_tag)
    return i >= 0 and prompt.rfind(close_tag) < i


# --- messages -------------------------------------------------------------------------------------------

def _image_part(source: Any) -> dict[str, Any]:
    return {"type": "image", "image": source}


def _normalize_part(part: Any, where: str) -> dict[str, Any]:
    if isinstance(part, str):
        return {"type": "text", "text": part}
    if not isinstance(part, Mapping):
        raise ValueError(f"{where}: a content part must be a dict or a string, got {type(part).__name__}")
    kind = part.get("type")
    if kind in ("text", "input_text"):
        text = part.get("text")
        if not isinstance(text, str):
            raise ValueError(f"{where}: a text part needs a string 'text', got {type(text).__name__}")
        return {"type": "text", "text": text}
    if kind == "image_url":
        value = part.get("image_url")
        url = value.get("url") if isinstance(value, Mapping) else value
        if not isinstance(url, str) or not url:
            raise ValueError(f"{where}: an image_url part needs image_url.url (a data: URL or a file path)")
        return _image_part(url)
    if kind == "image":
        source = part.get("image")
        if source is None:
            source = part.get("url") or part.get("path")
        if source is None:
            raise ValueError(f"{where}: an image part needs 'image' (a path, bytes, a PIL image or a data: URL)")
        return _image_part(source)
    raise ValueError(f"{where}: unknown content part type {kind!r}; expected 'text', 'image_url' or 'image'")


def _normalize_message(message: Any, where: str) -> dict[str, Any]:
    if not isinstance(message, Mapping):
        raise ValueError(f"{where}: a message must be a dict with 'role' and 'content', got {type(message).__name__}")
    role = message.get("role")
    if not isinstance(role, str) or role not in _ROLES:
        raise ValueError(f"{where}: 'role' must be one of {', '.join(_ROLES)}, got {role!r}")
    content = message.get("content")
    out = {k: v for k, v in message.items() if k not in ("content", "reasoning_content")}
    if content is None:
        out["content"] = ""
    elif isinstance(content, str):
        out["content"] = content
    elif isinstance(content, (list, tuple)):
        out["content"] = [_normalize_part(p, f"{where}.content[{i}]") for i, p in enumerate(content)]
    else:
        raise ValueError(f"{where}: 'content' must be a string or a list of parts, got {type(content).__name__}")
    return out


def normalize_messages(messages_or_prompt: str | Sequence[Mapping[str, Any]],
                       images: Sequence[Any] | None = None) -> list[dict[str, Any]]:
    """Messages in one canonical form: content a string or a list of ``{"type": "text", "text"}`` /
    ``{"type": "image", "image": source}`` parts; other message keys are kept. `images` are put before the
    text of the (last) user message. Raises ValueError naming the offending message or part."""
    if isinstance(images, (str, bytes, Path)) or hasattr(images, "convert"):
        images = [images]  # one image given bare
    extra = [_image_part(source) for source in (images or ())]
    if isinstance(messages_or_prompt, str):
        content: str | list[dict[str, Any]] = extra + [{"type": "text", "text": messages_or_prompt}] if extra \
            else messages_or_prompt
        return [{"role": "user", "content": content}]
    if isinstance(messages_or_prompt, Mapping) or not isinstance(messages_or_prompt, Iterable):
        raise ValueError("expected a prompt string or a list of messages ({'role': ..., 'content': ...})")
    messages = [_normalize_message(m, f"messages[{i}]") for i, m in enumerate(messages_or_prompt)]
    if not messages:
        raise ValueError("no messages")
    if extra:
        users = [i for i, m in enumerate(messages) if m["role"] == "user"]
        if not users:
            raise ValueError("images= was given but there is no user message to attach them to")
        last = messages[users[-1]]
        content = last["content"]
        last["content"] = extra + ([{"type": "text", "text": content}] if isinstance(content, str) else content)
    return messages


def message_images(messages: Sequence[Mapping[str, Any]]) -> list[Any]:
    """The image sources of normalized messages, in prompt order."""
    return [p["image"] for m in messages if not isinstance(m["content"], str)
            for p in m["content"] if p["type"] == "image"]


# --- templates ------------------------------------------------------------------------------------------

def resolve_template(override: str | None = None, embedded: str | None = None, family: str | None = None) -> str:
    """The chat template to use: `override` (a bundled template name, a .jinja file, or Jinja text), else the
    model file's own (`embedded`), else the registry family's bundled template, else ``chatml-think``."""
    from r1v.converters.resources import chat_template

    if override:
        if "{{" in override or "{%" in override:
            return override
        path = Path(override).expanduser()
        if path.suffix == ".jinja" or path.is_file():
            try:
                return path.read_text(encoding="utf-8")
            except OSError as e:
                raise ValueError(f"chat template file {path}: {e.strerror or e}") from None
        try:
            return chat_template(override)
        except KeyError as e:
            raise ValueError(f"chat_template={override!r}: {e.args[0]}; or give a .jinja file or Jinja text") from None
    if embedded:
        return embedded
    return chat_template(family or "chatml-think")


@functools.lru_cache(maxsize=16)
def _compile(template: str):
    from jinja2 import TemplateError
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message: str) -> None:
        raise ValueError(f"chat template: {message}")

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    try:
        return env.from_string(template)
    except TemplateError as e:
        raise ValueError(f"chat template does not compile: {e}") from None


def _whole(text: str) -> str:
    """Message text between the markers, whitespace included: tokenized as one run, as in the whole prompt."""
    return f"{_OPEN}{text}{_CLOSE}" if text else text


def _inner(text: str) -> str:
    """The markers inside the surrounding whitespace: for a template that trims message text."""
    core = text.strip()
    if not core:
        return text
    start = len(text) - len(text.lstrip())
    return f"{text[:start]}{_OPEN}{core}{_CLOSE}{text[start + len(core):]}"


def _content_text(content: str | list[dict[str, Any]], role: str, mark: Callable[[str], str] | None) -> str:
    def text(t: str) -> str:
        t = t.translate(_PRIVATE)
        return mark(t) if mark is not None and role in _TEXT_ROLES else t

    if isinstance(content, str):
        return text(content)
    return "".join(text(p["text"]) if p["type"] == "text" else _SENTINEL + "\n" for p in content)


def _split_rendered(text: str) -> tuple[list[str], list[list[tuple[int, int]]]]:
    """The rendered text cut at the image sentinels, without markers, and where message text lies in each
    piece (adjacent spans merged: two text parts in a row are one text). ValueError if the markers do not
    pair up: the template cut a message's text or moved part of it."""
    pieces, spans, current, mine, open_at = [], [], [], [], None
    length = 0
    for chunk in filter(None, re.split(f"([{_SENTINEL}{_OPEN}{_CLOSE}])", text)):
        if chunk == _OPEN:
            if open_at is not None:
                raise ValueError("the chat template rendered a message's text inside another's")
            open_at = length
        elif chunk == _CLOSE:
            if open_at is None:
                raise ValueError("the chat template cut a message's text (a template must render each message's "
                                 "content once, whole)")
            if mine and mine[-1][1] == open_at:
                open_at = mine.pop()[0]
            if length > open_at:
                mine.append((open_at, length))
            open_at = None
        elif chunk == _SENTINEL:
            if open_at is not None:
                raise ValueError("the chat template rendered an image inside a message's text")
            pieces.append("".join(current))
            spans.append(mine)
            current, mine, length = [], [], 0
        else:
            current.append(chunk)
            length += len(chunk)
    if open_at is not None:
        raise ValueError("the chat template cut a message's text (a template must render each message's content "
                         "once, whole)")
    pieces.append("".join(current))
    spans.append(mine)
    return pieces, spans


def render_prompt(template: str, messages: Sequence[Mapping[str, Any]], *, add_generation_prompt: bool = True,
                  bos_token: str = "", eos_token: str = "", **extra: Any) -> RenderedPrompt:
    """Render normalized `messages` with the Jinja chat `template`; each image part becomes ``<image>\\n``."""
    from jinja2 import TemplateError

    images = message_images(messages)

    def render(generation_prompt: bool, mark: Callable[[str], str] | None = None) -> str:
        flat = [{**m, "content": _content_text(m["content"], m["role"], mark)} for m in messages]
        try:
            return _compile(template).render(messages=flat, add_generation_prompt=generation_prompt,
                                             bos_token=bos_token, eos_token=eos_token, **extra)
        except TemplateError as e:
            raise ValueError(f"chat template failed to render: {e}") from None

    # Where message text lands: rendered between markers, which must leave the text as the template renders
    # it without them (markers around leading/trailing whitespace change what a trimming template does, so
    # those go inside it there). A template that changes the text some other way gets the marked text.
    plain = render(add_generation_prompt).split(_SENTINEL)
    found: tuple[list[str], list[list[tuple[int, int]]]] | None = None
    error: ValueError | None = None
    for mark in (_whole, _inner):
        try:
            marked = _split_rendered(render(add_generation_prompt, mark))
        except ValueError as e:  # the template cut the markers apart
            error = error or e
            continue
        if marked[0] == plain:
            found = marked
            break
        found = found or marked
    if found is None:
        raise error
    pieces, spans = found
    if len(pieces) != len(images) + 1:
        raise ValueError(f"the chat template rendered {len(pieces) - 1} image placeholders for {len(images)} images "
                         "(a template must render each message's content once)")
    # Only what the generation prompt adds decides where the output starts: a <think> left unclosed in an
    # earlier turn of the conversation does not.
    text = IMAGE_PLACEHOLDER.join(pieces)
    tail = text
    if add_generation_prompt:
        without = render(False).replace(_SENTINEL, IMAGE_PLACEHOLDER)
        tail = text[len(without):] if text.startswith(without) else text
    return RenderedPrompt(pieces, images, starts_in_reasoning(tail), spans)
