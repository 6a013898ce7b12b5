"""The prefix cache inside a llama.cpp context: where a prompt's cacheable prefixes end (after each image),
restoring the longest saved one (`llama_state_seq_set_data`), and keeping the state after a prompt's last image
(`llama_state_seq_get_data`), written to disk by a background thread. The store of entries: `prefix_cache`."""
from __future__ import annotations

import ctypes
import dataclasses
import threading
import warnings
from typing import Any, Mapping

from llama_cpp import llama_cpp as _ll

from ..prompt import ImageSlot, Prompt
from .prefix_cache import PrefixCacheWarning, PrefixHasher, PrefixStore

__all__ = ["PrefixState"]


class PrefixState:
    """The sequences of `ctx` against `store` (a state saved from one sequence restores into any). `context`: everything besides the prompt that the saved numbers
    depend on (model files, library version, batch sizes...); `meta`: names written beside each entry."""

    def __init__(self, ctx: Any, store: PrefixStore, context: Mapping[str, Any], meta: Mapping[str, Any]):
        self._ctx, self._memory = ctx, _ll.llama_get_memory(ctx)
        self.store, self.context, self._meta = store, dict(context), dict(meta)
        self._writers: list[threading.Thread] = []

    def points(self, segments: list[list[int] | ImageSlot]) -> list[tuple[int, str]]:
        """(end of an image, key of the prefix up to there), for each image of a prompt."""
        hasher, pos, points = PrefixHasher(self.context), 0, []
        for segment in segments:
            if isinstance(segment, ImageSlot):
                hasher.image(dataclasses.astuple(segment.key))  # the fields, as keys were tuples before ImageKey
                pos += segment.n_positions
                points.append((pos, hasher.key()))
            else:
                hasher.tokens(segment)
                pos += len(segment)
        return points

    def restore(self, seq_id: int, prompt: Prompt, keep: int) -> int:
        """Restore the longest saved prefix of `prompt` longer than `keep` into sequence `seq_id`: the positions
        it then holds (`keep`, untouched, when none is saved; 0 when a saved one failed to load and the sequence
        was emptied)."""
        for end, key in reversed(prompt.prefix_points):
            if end <= keep:
                break
            payload = self.store.get(key)
            if payload is None:
                continue
            _ll.llama_memory_seq_rm(self._memory, seq_id, -1, -1)
            if isinstance(payload, bytearray):  # saved by this process: no copy either way
                data = (ctypes.c_uint8 * len(payload)).from_buffer(payload)
            else:
                data = ctypes.cast(ctypes.c_char_p(payload), ctypes.POINTER(ctypes.c_uint8))
            read = _ll.llama_state_seq_set_data(self._ctx, data, len(payload), seq_id)
            del data
            if read == len(payload) and _ll.llama_memory_seq_pos_max(self._memory, seq_id) == end - 1:
                return end
            warnings.warn(f"prefix cache: llama.cpp could not restore entry {key[:16]}... ({read} of "
                          f"{len(payload)} bytes read); it will be recomputed", PrefixCacheWarning, stacklevel=3)
            self.store.discard(key)
            _ll.llama_memory_seq_rm(self._memory, seq_id, -1, -1)
            keep = 0
        return keep

    def save(self, seq_id: int, prompt: Prompt, end: int, key: str) -> None:
        """Keep the state of sequence `seq_id`'s positions 0 .. end-1 (all it holds now) and write it to disk in
        the background."""
        size = int(_ll.llama_state_seq_get_size(self._ctx, seq_id))
        payload = bytearray(size)
        view = (ctypes.c_uint8 * size).from_buffer(payload)
        written = int(_ll.llama_state_seq_get_data(self._ctx, view, size, seq_id))
        del view
        if written <= 0:
            return
        if written < size:
            del payload[written:]
        self.store.remember(key, payload)
        meta = {**self._meta, "positions": end, "images": sum(1 for p, _ in prompt.prefix_points if p <= end)}
        self._writers = [t for t in self._writers if t.is_alive()]
        writer = threading.Thread(target=self._write_entry, args=(key, payload, meta), name="r1v-prefix-cache")
        writer.start()
        self._writers.append(writer)

    def _write_entry(self, key: str, payload: bytes | bytearray, meta: dict[str, Any]) -> None:
        try:
            self.store.write(key, payload, meta)
        except OSError as e:
            warnings.warn(f"prefix cache: could not write an entry to {self.store.directory} ({e})",
                          PrefixCacheWarning, stacklevel=1)

    def wait_for_writes(self) -> None:
        """Block until the entries being written in the background are on disk."""
        for writer in self._writers:
            writer.join()
        self._writers.clear()
