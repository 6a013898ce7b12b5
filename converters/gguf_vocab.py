"""The checkpoint's tokenizer as llama.cpp reads it: `tokenizer.ggml.*` keys of a qwen2 GGUF file.

A Qwen2 tokenizer is byte-level BPE ("gpt2" in llama.cpp): the token list padded to the model's vocab size,
one type per token, the merges, a pre-tokenizer name, the special token ids and the chat template.
Everything is read from the checkpoint's own files (tokenizer.json, or vocab.json + merges.txt, plus
tokenizer_config.json, generation_config.json and llm_config), never from memory of what Qwen uses:

- token types follow llama.cpp's converter (`get_vocab_base`): added tokens marked special, or that look
  special (`<|...|>`, `<｜...｜>`), are CONTROL; other added tokens (`<think>`, `<tool_call>`, ...) are
  USER_DEFINED; ids the tokenizer does not fill, up to the embedding table's rows, are UNUSED `[PAD{i}]`.
- BOS/EOS/PAD/UNK ids: generation_config, then llm_config, then tokenizer_config (stock llama.cpp drops a
  BOS that only llm_config carries; we keep it). EOT is `<|im_end|>` (or DeepSeek's end of sentence).
- the chat template is the checkpoint's, else the caller's, else the family's; it is checked with jinja2 to
  render what stock llama.cpp clients give it as r1v renders the same messages - content as a list of parts
  (llama-cpp-python's multimodal handler), a media marker where an image goes (`<__media__>`, with no
  newline after it: the model wants one after `</img>`) - and wrapped with a small preamble that joins the
  parts and adds the newline when it does not.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import gguf

from .resources import chat_template as family_chat_template

from .checkpoint import Checkpoint, added_token_entries, read_json, token_id
from .gguf_common import ConversionError

TokenType = gguf.TokenType

# llama.cpp pre-tokenizer names this project writes (both select LLAMA_VOCAB_PRE_TYPE_QWEN2 in llama-vocab.cpp).
PRE_TOKENIZERS = ("qwen2", "deepseek-r1-qwen")
# A token only the DeepSeek-R1 form of the Qwen tokenizer has (Skywork-R1V v1).
DEEPSEEK_MARKER = "<｜User｜>"
# Tokens every R1V / InternVL-chat tokenizer must hold: the image wrapper and placeholder.
REQUIRED_TOKENS = ("<img>", "</img>", "<IMG_CONTEXT>")
# End-of-turn tokens, first present wins: ChatML, then DeepSeek-R1.
EOT_TOKENS = ("<|im_end|>", "<｜end▁of▁sentence｜>")
DEFAULT_CHAT_TEMPLATE = "chatml-think"

# What stock llama.cpp clients hand a template where an image goes: a media marker (llama-cpp-python's
# MTMDChatHandler and llama-mtmd-cli: <__media__>; llama-server: <__media_XXXX__>), as a text part of a list
# or inside a string, with no newline after it. libmtmd turns the marker into <img>...</img>; the model was
# trained on <img>...</img> then a newline (r1v renders each image as "<image>\n"), so the template must add it.
MEDIA_MARKER = "<__media__>"
SERVER_MEDIA_MARKER = "<__media_r1v0__>"  # the shape of llama-server's random marker

# Makes any string-rendering template right for stock clients: each message's content becomes one string
# (list parts joined, an image part as <image>\n) with a newline after each media marker that lacks one.
# String-content messages without a marker pass through untouched (all their keys kept); others keep only
# role and content. The marker macro is the one the shipped templates (converters/chat_templates) carry.
LIST_CONTENT_PREAMBLE = """\
{#- r1v-edge: message content as one string, as the model was trained: list-of-parts content joined (an image
    part becomes <image>\\n), and a newline after each llama.cpp media marker (<__media...__>) that lacks one. -#}
{%- macro _r1v_media(text) -%}
{%- for piece in text.split('<__media') -%}
{%- if loop.first -%}{{- piece -}}
{%- else -%}
{%- set ends = piece.split('__>', 1) -%}
{#- a marker: <__media__> or <__media_NAME__>, NAME without spaces -#}
{%- if ends | length == 2 and (ends[0] == '' or (ends[0].startswith('_') and ' ' not in ends[0]
      and '\\n' not in ends[0])) -%}
{{- '<__media' + ends[0] + '__>' + ('' if ends[1].startswith('\\n') else '\\n') + ends[1] -}}
{%- else -%}{{- '<__media' + piece -}}{%- endif -%}
{%- endif -%}
{%- endfor -%}
{%- endmacro -%}
{%- set _r1v = namespace(messages=[]) -%}
{%- for _m in messages -%}
{%- if _m['content'] is none or (_m['content'] is string and '<__media' not in _m['content']) -%}
{%- set _r1v.messages = _r1v.messages + [_m] -%}
{%- else -%}
{%- set _text = namespace(s='') -%}
{%- if _m['content'] is string -%}{%- set _text.s = _m['content'] -%}
{%- else -%}
{%- for _p in _m['content'] -%}
{%- set _text.s = _text.s + (_p['text'] if _p['type'] == 'text' else '<image>\\n') -%}
{%- endfor -%}
{%- endif -%}
{%- set _r1v.messages = _r1v.messages + [{'role': _m['role'], 'content': _r1v_media(_text.s)}] -%}
{%- endif -%}
{%- endfor -%}
{%- set messages = _r1v.messages -%}
"""


@dataclass
class GGUFVocab:
    """Everything the tokenizer.ggml.* keys hold, ready to write."""

    tokens: list[str]
    types: list[int]
    merges: list[str]
    pre: str
    special_ids: dict[str, int] = field(default_factory=dict)  # bos / eos / eot / pad / unk
    add_bos: bool = False
    chat_template: str | None = None

    def token_id(self, token: str) -> int | None:
        try:
            return self.tokens.index(token)
        except ValueError:
            return None


def build_vocab(
    ckpt: Checkpoint, *, pre_tokenizer: str | None = None, chat_template: str | None = None
) -> GGUFVocab:
    """Read the checkpoint's tokenizer into a GGUFVocab padded to llm_config.vocab_size.

    `pre_tokenizer`: llama.cpp's name ("qwen2" or "deepseek-r1-qwen"); None picks by the tokenizer's tokens.
    `chat_template`: used only when the checkpoint carries none; a name in converters/chat_templates or Jinja text.
    """
    where = ckpt.tokenizer.tokenizer_json or ckpt.path / "vocab.json"
    vocab, added, merges = _read_tokenizer(ckpt)
    n_vocab = ckpt.config.llm.vocab_size
    by_id: dict[int, tuple[str, int]] = {}
    for token, token_id in vocab.items():
        by_id[token_id] = (token, TokenType.NORMAL)
    for token, (token_id, special) in added.items():
        control = special or _looks_special(token)
        by_id[token_id] = (token, TokenType.CONTROL if control else TokenType.USER_DEFINED)
    too_big = [i for i in by_id if not 0 <= i < n_vocab]
    if too_big:
        raise ConversionError(
            f"{where}: token id {max(too_big)} ({by_id[max(too_big)][0]!r}) is outside llm_config.vocab_size {n_vocab}"
        )
    tokens: list[str] = []
    types: list[int] = []
    for i in range(n_vocab):
        token, kind = by_id.get(i, (f"[PAD{i}]", TokenType.UNUSED))
        tokens.append(token)
        types.append(int(kind))
    _check_unique(tokens, where)
    ids = {t: i for i, t in enumerate(tokens)}
    missing = [t for t in REQUIRED_TOKENS if t not in ids]
    if missing:
        raise ConversionError(f"{where}: the tokenizer has no {', '.join(missing)} token; an R1V / InternVL-chat "
                              "tokenizer needs them for images")
    if not merges:
        raise ConversionError(f"{where}: no BPE merges found (tokenizer.json model.merges or merges.txt)")

    pre = pre_tokenizer or ("deepseek-r1-qwen" if DEEPSEEK_MARKER in ids else "qwen2")
    if pre not in PRE_TOKENIZERS:
        raise ConversionError(f"pre-tokenizer {pre!r} is not supported; choose from {', '.join(PRE_TOKENIZERS)}")

    return GGUFVocab(
        tokens=tokens,
        types=types,
        merges=merges,
        pre=pre,
        special_ids=_special_ids(ckpt, ids, n_vocab),
        add_bos=bool(ckpt.tokenizer.tokenizer_config.get("add_bos_token", False)),
        chat_template=resolve_chat_template(ckpt, chat_template),
    )


def add_vocab(writer: gguf.GGUFWriter, vocab: GGUFVocab) -> None:
    """Write the tokenizer.ggml.* keys (and tokenizer.chat_template)."""
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(vocab.pre)
    writer.add_token_list(vocab.tokens)
    writer.add_token_types(vocab.types)
    writer.add_token_merges(vocab.merges)
    adders = {
        "bos": writer.add_bos_token_id, "eos": writer.add_eos_token_id, "eot": writer.add_eot_token_id,
        "pad": writer.add_pad_token_id, "unk": writer.add_unk_token_id,
    }
    for kind, token_id in vocab.special_ids.items():
        adders[kind](token_id)
    writer.add_add_bos_token(vocab.add_bos)
    writer.add_add_eos_token(False)
    if vocab.chat_template:
        writer.add_chat_template(vocab.chat_template)


# --- reading the tokenizer files ---------------------------------------------------------------------------
def _read_tokenizer(ckpt: Checkpoint) -> tuple[dict[str, int], dict[str, tuple[int, bool]], list[str]]:
    """(base vocab token -> id, added token -> (id, special), merges as "a b" strings)."""
    files = ckpt.tokenizer
    vocab: dict[str, int] = {}
    added: dict[str, tuple[int, bool]] = {}
    merges: list[str] = []
    data: dict[str, Any] = {}
    if files.tokenizer_json is not None:
        data = read_json(files.tokenizer_json)
        model = data.get("model") or {}
        if model.get("type", "BPE") != "BPE":
            raise ConversionError(f"{files.tokenizer_json}: tokenizer model is {model.get('type')!r}; "
                                  "a Qwen2 byte-level BPE tokenizer is expected")
        vocab = _vocab_ids(model.get("vocab") or {}, files.tokenizer_json)
        merges = _merge_strings(model.get("merges") or [], files.tokenizer_json)
    if files.vocab_merges is not None:
        vocab_file, merges_file = files.vocab_merges
        if not vocab:
            vocab = _vocab_ids(read_json(vocab_file), vocab_file)
        if not merges:
            merges = _merges_txt(merges_file)
    for content, token_id, special in added_token_entries(ckpt.path, data, files.tokenizer_config):
        added.setdefault(content, (token_id, special))
    return vocab, added, merges


def _vocab_ids(vocab: Any, where: Path) -> dict[str, int]:
    if not isinstance(vocab, dict):
        raise ConversionError(f"{where}: the vocabulary is not a JSON object of token -> id")
    return {str(t): token_id(i, where, str(t)) for t, i in vocab.items()}


def _merge_strings(merges: list[Any], where: Path) -> list[str]:
    """tokenizer.json merges come as "a b" strings or (since transformers 4.45) as ["a", "b"] pairs."""
    if not merges or isinstance(merges[0], str):
        return [str(m) for m in merges]
    if isinstance(merges[0], list) and len(merges[0]) == 2:
        # llama.cpp splits on the first space after position 0; a space inside a part is written as U+0120
        # shifted by 256, as gguf-py's SpecialVocab does.
        return [" ".join("".join(chr(ord(c) + 256) if c == " " else c for c in part) for part in pair)
                for pair in merges]
    raise ConversionError(f"{where}: model.merges has an unknown format")


def _merges_txt(path: Path) -> list[str]:
    merges = []
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.startswith("#version") or not line.strip():
            continue
        parts = line.split()
        if len(parts) != 2:
            raise ConversionError(f"{path}: malformed merge line {line!r}")
        merges.append(f"{parts[0]} {parts[1]}")
    return merges


def _looks_special(token: str) -> bool:
    """llama.cpp's converter also marks added tokens that look like control tokens as CONTROL."""
    return (token.startswith("<|") and token.endswith("|>")) or (token.startswith("<｜") and token.endswith("｜>"))


def _check_unique(tokens: list[str], where: Path) -> None:
    seen: dict[str, int] = {}
    for i, token in enumerate(tokens):
        if token in seen:  # llama.cpp asserts one id per token text
            raise ConversionError(f"{where}: token {token!r} appears twice (ids {seen[token]} and {i})")
        seen[token] = i


# --- special token ids -------------------------------------------------------------------------------------
def _special_ids(ckpt: Checkpoint, ids: dict[str, int], n_vocab: int) -> dict[str, int]:
    gen = ckpt.generation_config
    llm_raw = ckpt.config.raw.get("llm_config") or {}
    tok_cfg = ckpt.tokenizer.tokenizer_config

    def pick(kind: str) -> int | None:
        for value in (gen.get(f"{kind}_token_id"), llm_raw.get(f"{kind}_token_id")):
            if isinstance(value, list):
                value = value[0] if value else None
            if value is not None:
                return int(value)
        content = tok_cfg.get(f"{kind}_token")
        if isinstance(content, dict):
            content = content.get("content")
        return ids.get(content) if isinstance(content, str) else None

    found = {kind: pick(kind) for kind in ("bos", "eos", "pad", "unk")}
    found["eot"] = next((ids[t] for t in EOT_TOKENS if t in ids), None)
    special = {kind: token_id for kind, token_id in found.items() if token_id is not None}
    for kind, token_id in special.items():
        if not 0 <= token_id < n_vocab:
            raise ConversionError(f"{ckpt.path}: {kind}_token_id {token_id} is outside the vocabulary ({n_vocab})")
    return special


# --- chat template -----------------------------------------------------------------------------------------
def resolve_chat_template(ckpt: Checkpoint, fallback: str | None = None) -> str:
    """The checkpoint's template, else `fallback` (a shipped template name or Jinja text), else the family's;
    made to render list-of-parts content and media markers as the model expects (`accept_list_content`)."""
    template = ckpt.tokenizer.chat_template
    if not template:
        template = fallback or DEFAULT_CHAT_TEMPLATE
        if "{{" not in template and "{%" not in template:
            try:
                template = family_chat_template(template)
            except KeyError as e:
                raise ConversionError(str(e.args[0])) from None
    return accept_list_content(template)


def accept_list_content(template: str) -> str:
    """`template` itself when it renders what stock clients give it (list-of-parts content, media markers) as
    r1v renders the same messages (`renders_stock_clients`); else the template behind LIST_CONTENT_PREAMBLE,
    which joins the parts and puts the newline after each marker first."""
    if renders_stock_clients(template):
        return template
    wrapped = LIST_CONTENT_PREAMBLE + template
    if not renders_stock_clients(wrapped):
        raise ConversionError("the chat template cannot render list-of-parts message content or llama.cpp media "
                              "markers as the model expects, even wrapped")
    return wrapped


def render_chat_template(template: str, messages: list[dict[str, Any]], add_generation_prompt: bool = True,
                         **extra: Any) -> str:
    """Render like transformers and llama-cpp-python do (sandboxed jinja2, trim_blocks, lstrip_blocks)."""
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message: str) -> None:
        raise ValueError(message)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    return env.from_string(template).render(
        messages=messages, add_generation_prompt=add_generation_prompt, raise_exception=raise_exception,
        bos_token="", eos_token="", **extra,
    )


def stock_client_cases(question: str = "PART-TWO") -> list[tuple[Any, str]]:
    """(message content a stock client sends, the string content r1v renders for it) pairs: text parts, and
    "image then question" as llama-cpp-python's MTMDChatHandler (marker as a text part), llama-mtmd-cli
    (marker glued to the text) and llama-server (its own marker shape, glued) send it."""
    cases: list[tuple[Any, str]] = [
        ([{"type": "text", "text": "PART-ONE"}, {"type": "text", "text": " " + question}], "PART-ONE " + question),
    ]
    for marker in (MEDIA_MARKER, SERVER_MEDIA_MARKER):
        expected = f"{marker}\n{question}"  # r1v: "<image>\n" + question, the marker where the image goes
        cases.append(([{"type": "text", "text": marker}, {"type": "text", "text": question}], expected))
        cases.append((marker + question, expected))
        cases.append((expected, expected))
    return cases


def renders_stock_clients(template: str) -> bool:
    """True when `template` renders every `stock_client_cases` content exactly as the string r1v renders."""
    try:
        return all(render_chat_template(template, [{"role": "user", "content": given}])
                   == render_chat_template(template, [{"role": "user", "content": expected}])
                   for given, expected in stock_client_cases())
    except Exception:  # noqa: BLE001 - any template error means "does not handle it"
        return False
