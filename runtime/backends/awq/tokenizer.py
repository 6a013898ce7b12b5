"""The checkpoint's own tokenizer (tokenizer.json through the `tokenizers` library) with the llama.cpp backend's
meaning: `tokenize(text, special)` parses special tokens only when asked; `piece(id)` is a token's output bytes,
empty for control tokens (special added tokens such as <|im_end|>), the text of non-special added tokens
(<think>), and the raw bytes of byte-level BPE tokens (so UTF-8 split across tokens is joined by the caller).
"""
from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path
from typing import Sequence

from r1v.converters.checkpoint import TokenizerFiles
from r1v.converters.errors import CheckpointError

__all__ = ["AWQTokenizer"]


@lru_cache(maxsize=1)
def _byte_decoder() -> dict[str, int]:
    """GPT-2's bytes_to_unicode, inverted: the printable character byte-level BPE uses for each byte."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + \
        list(range(ord("®"), ord("ÿ") + 1))
    chars = printable[:]
    n = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + n)
            n += 1
    return {chr(c): b for b, c in zip(printable, chars)}


def _uses_byte_level(spec: dict) -> bool:
    decoder = spec.get("decoder") or {}
    kinds = [decoder.get("type")] + [d.get("type") for d in decoder.get("decoders") or []]
    return "ByteLevel" in kinds


class AWQTokenizer:
    def __init__(self, files: TokenizerFiles, path: Path):
        from tokenizers import Tokenizer

        if files.tokenizer_json is None:
            raise CheckpointError(f"{path}: the AWQ backend reads tokenizer.json (this checkpoint has only "
                                  "vocab.json + merges.txt)")
        self._tok = Tokenizer.from_file(str(files.tokenizer_json))
        spec = json.loads(files.tokenizer_json.read_text(encoding="utf-8"))
        self._byte_level = _uses_byte_level(spec)
        self._added = {int(t["id"]): (t["content"], bool(t.get("special"))) for t in spec.get("added_tokens") or []}
        for token_id, entry in (files.tokenizer_config.get("added_tokens_decoder") or {}).items():
            self._added.setdefault(int(token_id), (entry["content"], bool(entry.get("special"))))
        self.n_vocab = self._tok.get_vocab_size(with_added_tokens=True)
        self._pieces: dict[int, bytes] = {}

    def tokenize(self, text: str, *, special: bool = True) -> list[int]:
        if not text:
            return []
        if special:
            return self._tok.encode(text, add_special_tokens=False).ids
        before = self._tok.encode_special_tokens
        self._tok.encode_special_tokens = True  # special tokens' text is split like any other text
        try:
            return self._tok.encode(text, add_special_tokens=False).ids
        finally:
            self._tok.encode_special_tokens = before

    def token_id(self, text: str) -> int | None:
        return self._tok.token_to_id(text)

    def piece(self, token: int) -> bytes:
        piece = self._pieces.get(token)
        if piece is None:
            piece = self._pieces[token] = self._piece(token)
        return piece

    def _piece(self, token: int) -> bytes:
        added = self._added.get(token)
        if added is not None:
            content, special = added
            return b"" if special else content.encode("utf-8")
        text = self._tok.id_to_token(token)
        if text is None:
            return b""
        if self._byte_level:
            table = _byte_decoder()
            if all(c in table for c in text):
                return bytes(table[c] for c in text)
        return self._tok.decode([token], skip_special_tokens=False).encode("utf-8")

    def detokenize(self, tokens: Sequence[int]) -> str:
        return b"".join(self.piece(t) for t in tokens).decode("utf-8", "replace")
