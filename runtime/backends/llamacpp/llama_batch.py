"""A llama.cpp `llama_batch` owned by Python, filled from numpy: token ids or input embeddings of one sequence,
or one decode step of several sequences (`set_steps`: a token each, mixed sequence ids).

libmtmd feeds image embeddings to the LLM the same way (an embedding batch, positions continuing the text's,
no logits); owning the batch lets the runtime feed embeddings from its own image tiling. Each fill writes only
tokens/embeddings, positions and output flags, vectorized, and the rows' sequence ids where they change.
"""
from __future__ import annotations

import weakref
from typing import Any, Sequence

import numpy as np

from llama_cpp import llama_cpp as _ll

__all__ = ["LlamaBatch", "DecodeError", "decode"]

_DECODE_ERRORS = {
    1: "no room in the KV cache for the batch (the context is full)",
    2: "aborted",
    -1: "invalid batch",
}


class DecodeError(RuntimeError):
    """llama_decode failed; the KV cache may hold part of the batch."""


class LlamaBatch:
    """Room for `capacity` tokens (``n_embd == 0``) or `capacity` embeddings of width `n_embd`; each row belongs
    to one sequence (`seq_id` until a fill names another)."""

    def __init__(self, capacity: int, n_embd: int = 0, seq_id: int = 0):
        if capacity < 1:
            raise ValueError(f"batch capacity must be >= 1, got {capacity}")
        self.capacity, self.n_embd = capacity, n_embd
        batch = _ll.llama_batch_init(capacity, n_embd, 1)
        self._batch = batch
        self._finalizer = weakref.finalize(self, _ll.llama_batch_free, batch)
        self._pos = np.ctypeslib.as_array(batch.pos, shape=(capacity,))
        self._logits = np.ctypeslib.as_array(batch.logits, shape=(capacity,))
        np.ctypeslib.as_array(batch.n_seq_id, shape=(capacity,))[:] = 1
        self._row_seq = [seq_id] * capacity  # what each row's seq_id array holds (llama.cpp allocates each apart)
        for i in range(capacity):
            batch.seq_id[i][0] = seq_id
        if n_embd:
            self._embd = np.ctypeslib.as_array(batch.embd, shape=(capacity, n_embd))
            self._token = None
        else:
            self._token = np.ctypeslib.as_array(batch.token, shape=(capacity,))
            self._embd = None

    @property
    def struct(self) -> Any:
        """The llama_batch struct, for llama_decode."""
        if not self._finalizer.alive:
            raise RuntimeError("the batch is freed")
        return self._batch

    def _finish(self, n: int, pos0: int, logits_last: bool, logits_all: bool = False) -> None:
        self._pos[:n] = np.arange(pos0, pos0 + n, dtype=self._pos.dtype)
        self._logits[:n] = int(logits_all)
        if logits_last:
            self._logits[n - 1] = 1
        self._batch.n_tokens = n

    def _sequences(self, seq_ids: Sequence[int]) -> None:
        """Rows 0.. belong to these sequences (written only where a row's id changes)."""
        rows, seq = self._row_seq, self._batch.seq_id
        for i, seq_id in enumerate(seq_ids):
            if rows[i] != seq_id:
                rows[i] = seq_id
                seq[i][0] = seq_id

    def _sequence(self, seq_id: int, n: int) -> None:
        if any(s != seq_id for s in self._row_seq[:n]):
            self._sequences([seq_id] * n)

    def set_tokens(self, tokens: Sequence[int], pos0: int, logits_last: bool = False, logits_all: bool = False,
                   seq_id: int = 0) -> None:
        n = len(tokens)
        if self._token is None or not 1 <= n <= self.capacity:
            raise ValueError(f"cannot put {n} tokens in a batch of {self.capacity} (embedding batch: {self.n_embd})")
        self._token[:n] = tokens
        self._sequence(seq_id, n)
        self._finish(n, pos0, logits_last, logits_all)

    def set_token(self, token: int, pos: int, seq_id: int = 0) -> None:
        """One token with logits: the decode step's batch, without numpy's per-call overhead."""
        if self._token is None:
            raise ValueError("an embedding batch takes no token ids")
        batch = self._batch
        batch.token[0] = token
        batch.pos[0] = pos
        batch.logits[0] = 1
        if self._row_seq[0] != seq_id:
            self._sequences([seq_id])
        batch.n_tokens = 1

    def set_steps(self, tokens: Sequence[int], positions: Sequence[int], seq_ids: Sequence[int]) -> None:
        """One decode step of several sequences: row i is `tokens[i]` at `positions[i]` of sequence `seq_ids[i]`,
        each with logits (batch row i)."""
        n = len(tokens)
        if self._token is None or not 1 <= n <= self.capacity or len(positions) != n or len(seq_ids) != n:
            raise ValueError(f"cannot put {n} steps ({len(positions)} positions, {len(seq_ids)} sequence ids) in a "
                             f"batch of {self.capacity} (embedding batch: {self.n_embd})")
        self._token[:n] = tokens
        self._pos[:n] = positions
        self._logits[:n] = 1
        self._sequences(seq_ids)
        self._batch.n_tokens = n

    def set_embeddings(self, embeddings: np.ndarray, pos0: int, logits_last: bool = False, seq_id: int = 0) -> None:
        n = len(embeddings)
        if self._embd is None or not 1 <= n <= self.capacity or embeddings.shape[1:] != (self.n_embd,):
            raise ValueError(f"cannot put embeddings of shape {embeddings.shape} in a batch of {self.capacity} "
                             f"x {self.n_embd}")
        self._embd[:n] = embeddings
        self._sequence(seq_id, n)
        self._finish(n, pos0, logits_last)

    def free(self) -> None:
        self._finalizer()


def decode(ctx: Any, batch: LlamaBatch) -> None:
    """llama_decode, raising DecodeError on failure - also for a batch larger than the context's n_batch, which
    llama.cpp would not report but abort the process on (GGML_ASSERT n_tokens_all <= n_batch)."""
    struct = batch.struct
    n_batch = int(_ll.llama_n_batch(ctx))
    if struct.n_tokens > n_batch:
        raise DecodeError(f"a batch of {struct.n_tokens} positions for a context that takes at most {n_batch} per "
                          "llama_decode call (n_batch); split it")
    rc = _ll.llama_decode(ctx, struct)
    if rc != 0:
        raise DecodeError(f"llama_decode failed ({rc}): {_DECODE_ERRORS.get(rc, 'error')}")
