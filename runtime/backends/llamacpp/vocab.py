"""A llama.cpp model's vocabulary: tokenizing text, token pieces (cached), special-token texts and end tokens."""
from __future__ import annotations

import ctypes
from typing import Any, Sequence

from llama_cpp import llama_cpp as _ll

__all__ = ["LlamaVocab"]


class LlamaVocab:
    """The `llama_vocab` of a loaded model (valid while the model is)."""

    def __init__(self, model: Any):
        self._vocab = _ll.llama_model_get_vocab(model)
        self.n_tokens = int(_ll.llama_vocab_n_tokens(self._vocab))
        self.bos = int(_ll.llama_vocab_bos(self._vocab))
        self.eos = int(_ll.llama_vocab_eos(self._vocab))
        self.add_bos = bool(_ll.llama_vocab_get_add_bos(self._vocab)) and self.bos >= 0
        self._pieces: dict[int, bytes] = {}

    def token_text(self, token: int) -> str:
        """A token's text as the vocabulary stores it ("" for none, token -1)."""
        if token < 0:
            return ""
        text = _ll.llama_vocab_get_text(self._vocab, token)
        return text.decode("utf-8", "replace") if text else ""

    def tokenize(self, text: str, *, special: bool = True) -> list[int]:
        data = text.encode("utf-8")
        if not data:
            return []
        n_max = len(data) + 8
        buf = (_ll.llama_token * n_max)()
        n = _ll.llama_tokenize(self._vocab, data, len(data), buf, n_max, False, special)
        if n < 0:
            n_max = -n
            buf = (_ll.llama_token * n_max)()
            n = _ll.llama_tokenize(self._vocab, data, len(data), buf, n_max, False, special)
            if n < 0:
                raise RuntimeError(f"llama_tokenize failed ({n})")
        return list(buf[:n])

    def piece(self, token: int) -> bytes:
        """The bytes of one token as output text (control tokens such as end markers give b"")."""
        piece = self._pieces.get(token)
        if piece is None:
            buf = ctypes.create_string_buffer(64)
            n = _ll.llama_token_to_piece(self._vocab, token, buf, 64, 0, False)
            if n < 0:
                buf = ctypes.create_string_buffer(-n)
                n = _ll.llama_token_to_piece(self._vocab, token, buf, -n, 0, False)
            piece = self._pieces[token] = buf.raw[:n]
        return piece

    def detokenize(self, tokens: Sequence[int]) -> str:
        return b"".join(self.piece(t) for t in tokens).decode("utf-8", "replace")

    def is_end(self, token: int) -> bool:
        """An end-of-generation token (llama.cpp's set: EOS, EOT, ...)."""
        return bool(_ll.llama_vocab_is_eog(self._vocab, token))
