"""The prefix cache store: llama.cpp sequence states after a prompt prefix that holds images, kept in memory
and on disk, so that a later question about the same images - in this process or another - skips the vision
tower and the prefill of the image positions.

What is stored is opaque here (the backend's `llama_state_seq_get_data` bytes); this module keys, checks,
writes and evicts. A key is a SHA-256 over everything the state depends on (`PrefixHasher`): the GGUF and
mmproj file identities (`file_identity`), the context settings that change the numbers (batch sizes, flash
attention, llama.cpp version), and the prefix itself: token ids, and for each image its pixels' hash and
its tiling.

On disk (default ``$XDG_CACHE_HOME/r1v/prefix-cache``, or ``$R1V_PREFIX_CACHE_DIR``) one entry is one file
``<key>.r1vkv``::

    magic b"R1VKVSTA" | u32 format version | u32 header length | header (JSON) | payload

The header repeats the key and gives the payload's length and SHA-256, so a damaged, truncated or foreign
file (another model's, another format's) is detected, ignored with a `PrefixCacheWarning`, removed and
recomputed - never trusted. Entries are written to a temporary file in the same directory and renamed over
the final name (`os.replace`, atomic), so concurrent writers of the same entry leave one whole entry and a
reader never sees a partial one. The directory is bounded in bytes; least recently used entries go first
(a hit refreshes the file's mtime). Only regular files are read, never through a symbolic link and never larger
than the bound allows: a FIFO, device or link put where an entry belongs is ignored and removed, not opened
(a FIFO would block the reader forever).
"""
from __future__ import annotations

import errno
import hashlib
import json
import os
import secrets
import stat
import struct
import threading
import time
import warnings
from array import array
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Mapping

__all__ = [
    "DEFAULT_MAX_BYTES", "FORMAT_VERSION", "EntryInfo", "PrefixCacheWarning", "PrefixHasher", "PrefixStore",
    "default_cache_dir", "file_identity",
]

MAGIC = b"R1VKVSTA"
FORMAT_VERSION = 1
SUFFIX = ".r1vkv"
TMP_PREFIX = ".tmp-"
_PREAMBLE = struct.Struct("<8sII")  # magic, format version, header length
_MAX_HEADER = 1 << 20
DEFAULT_MAX_BYTES = 2 << 30  # 2 GiB on disk
DEFAULT_MEMORY_BYTES = 512 << 20  # states kept in this process
_STALE_TMP_SECONDS = 3600.0


class PrefixCacheWarning(UserWarning):
    """A cache entry could not be used (damaged, truncated, foreign, unreadable); it was ignored."""


def default_cache_dir() -> Path:
    """Where entries go by default: $R1V_PREFIX_CACHE_DIR, else the user cache directory."""
    if os.environ.get("R1V_PREFIX_CACHE_DIR"):
        return Path(os.environ["R1V_PREFIX_CACHE_DIR"])
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "r1v" / "prefix-cache"


_IDENTITIES: dict[tuple[str, int, int], str] = {}


def file_identity(path: str | os.PathLike[str], *, span: int = 1 << 20) -> str:
    """A model file's identity: its size and a SHA-256 of its first and last MiB (the GGUF header, tensor
    table and the first and last tensors' data). Independent of the file's name and location, so a copy or a
    re-download of the same file shares entries; any re-conversion changes it. Cached per (path, size, mtime)."""
    p = Path(path)
    st = p.stat()
    memo = (str(p.resolve()), st.st_size, st.st_mtime_ns)
    found = _IDENTITIES.get(memo)
    if found is None:
        h = hashlib.sha256()
        with open(p, "rb") as f:
            h.update(f.read(span))
            if st.st_size > span:
                f.seek(max(span, st.st_size - span))
                h.update(f.read(span))
        found = _IDENTITIES[memo] = f"{st.st_size}:{h.hexdigest()[:32]}"
    return found


class PrefixHasher:
    """Builds keys incrementally: the context once, then prefix segments (token ids, images) in order;
    `key()` at any point is the key of the prefix so far."""

    def __init__(self, context: Mapping[str, Any]):
        self._h = hashlib.sha256(MAGIC + struct.pack("<I", FORMAT_VERSION))
        self._h.update(json.dumps(context, sort_keys=True, default=str).encode())

    def tokens(self, ids: Iterable[int]) -> None:
        data = array("i", ids).tobytes()
        self._h.update(b"T" + struct.pack("<I", len(data)) + data)

    def image(self, key: Any) -> None:
        data = repr(key).encode()
        self._h.update(b"I" + struct.pack("<I", len(data)) + data)

    def key(self) -> str:
        return self._h.copy().hexdigest()


@dataclass(frozen=True)
class EntryInfo:
    """One entry on disk, as `r1v cache ls` shows it."""

    key: str
    path: Path
    size: int
    last_used: float
    created: float | None
    meta: dict[str, Any]


class _Bad(Exception):
    """Why an entry file cannot be used; `seen`: the stat of the name, when it is to be removed before reading."""

    def __init__(self, reason: str, seen: os.stat_result | None = None):
        super().__init__(reason)
        self.seen = seen


class PrefixStore:
    """States by key: an in-process LRU (`memory_bytes`) in front of a directory (`max_bytes`).

    `directory=None` keeps states in memory only. Thread-safe; many processes may share a directory."""

    def __init__(self, directory: str | os.PathLike[str] | None = None, *, max_bytes: int = DEFAULT_MAX_BYTES,
                 memory_bytes: int = DEFAULT_MEMORY_BYTES):
        self.directory = Path(directory) if directory is not None else None
        self.max_bytes = max_bytes
        self.memory_bytes = memory_bytes
        self._memory: OrderedDict[str, bytes | bytearray] = OrderedDict()
        self._memory_used = 0
        self._lock = threading.Lock()

    # --- reading ------------------------------------------------------------------------------------
    def get(self, key: str) -> bytes | bytearray | None:
        """The payload stored under `key` (memory first, then disk), or None. A disk entry that fails a check
        is removed with a `PrefixCacheWarning`."""
        with self._lock:
            payload = self._memory.get(key)
            if payload is not None:
                self._memory.move_to_end(key)
                return payload
        if self.directory is None:
            return None
        path = self.path_for(key)
        try:
            f, st = _open_entry(path, self._largest_entry())
        except FileNotFoundError:
            return None
        except _Bad as e:
            self._warn(path, str(e))
            _remove_if_same(path, e.seen)
            return None
        except OSError as e:
            self._warn(path, f"cannot be read ({e})")
            return None
        with f:
            try:
                header, payload = _read_entry(f, st.st_size)
                if header.get("key") != key:
                    raise _Bad(f"it belongs to another model or prompt (key {str(header.get('key'))[:16]}..., "
                               f"expected {key[:16]}...)")
            except _Bad as e:
                self._warn(path, str(e))
                _remove_if_same(path, st)
                return None
            except OSError as e:
                self._warn(path, f"cannot be read ({e})")
                return None
        try:
            os.utime(path)  # most recently used
        except OSError:
            pass
        self.remember(key, payload)
        return payload

    def contains(self, key: str) -> bool:
        with self._lock:
            if key in self._memory:
                return True
        return self.directory is not None and _is_regular(self.path_for(key))

    # --- writing ------------------------------------------------------------------------------------
    def put(self, key: str, payload: bytes | bytearray, meta: Mapping[str, Any] | None = None) -> Path | None:
        """`remember` then `write`."""
        self.remember(key, payload)
        return self.write(key, payload, meta)

    def write(self, key: str, payload: bytes | bytearray, meta: Mapping[str, Any] | None = None) -> Path | None:
        """Write an entry to disk (atomically; an entry already there is only touched), then evict down to
        `max_bytes`. Returns the entry's path, or None when there is no directory or it is larger than the
        bound."""
        if self.directory is None or len(payload) > self.max_bytes:
            return None
        path = self.path_for(key)
        if _is_regular(path):
            try:
                os.utime(path)
                return path
            except OSError:
                pass
        header = json.dumps({
            "key": key, "payload_bytes": len(payload), "payload_sha256": hashlib.sha256(payload).hexdigest(),
            "created": time.time(), "meta": dict(meta or {}),
        }).encode()
        self.directory.mkdir(parents=True, exist_ok=True)
        tmp = self.directory / f"{TMP_PREFIX}{os.getpid()}-{secrets.token_hex(6)}{SUFFIX}"
        try:
            with open(tmp, "wb") as f:
                f.write(_PREAMBLE.pack(MAGIC, FORMAT_VERSION, len(header)))
                f.write(header)
                f.write(payload)
            os.replace(tmp, path)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        self.evict()
        return path

    def remember(self, key: str, payload: bytes | bytearray) -> None:
        """Keep a payload in this process (LRU, up to `memory_bytes`; a larger one is not kept)."""
        if len(payload) > self.memory_bytes:
            return
        with self._lock:
            old = self._memory.pop(key, None)
            if old is not None:
                self._memory_used -= len(old)
            self._memory[key] = payload
            self._memory_used += len(payload)
            while self._memory_used > self.memory_bytes:
                _, dropped = self._memory.popitem(last=False)
                self._memory_used -= len(dropped)

    def discard(self, key: str) -> None:
        """Drop one entry (memory and disk): it passed its checks but could not be used."""
        with self._lock:
            old = self._memory.pop(key, None)
            if old is not None:
                self._memory_used -= len(old)
        if self.directory is not None:
            self.path_for(key).unlink(missing_ok=True)

    def forget_memory(self) -> None:
        with self._lock:
            self._memory.clear()
            self._memory_used = 0

    # --- the directory ------------------------------------------------------------------------------
    def path_for(self, key: str) -> Path:
        if self.directory is None:
            raise ValueError("this store keeps states in memory only")
        return self.directory / f"{key}{SUFFIX}"

    def _files(self) -> list[tuple[Path, os.stat_result]]:
        if self.directory is None or not self.directory.is_dir():
            return []
        found = []
        for path in self.directory.iterdir():
            if not path.name.endswith(SUFFIX):
                continue
            try:
                st = path.lstat()  # the name's own size: a link is not followed
            except FileNotFoundError:  # removed by another process meanwhile
                continue
            if stat.S_ISDIR(st.st_mode):  # not ours to remove
                continue
            if path.name.startswith(TMP_PREFIX):
                if time.time() - st.st_mtime > _STALE_TMP_SECONDS:  # a writer that died
                    path.unlink(missing_ok=True)
                continue
            found.append((path, st))
        return found

    def evict(self) -> int:
        """Remove least recently used entries until the directory holds at most `max_bytes`; bytes freed."""
        files = sorted(self._files(), key=lambda f: f[1].st_mtime)
        total = sum(st.st_size for _, st in files)
        freed = 0
        for path, st in files:
            if total <= self.max_bytes:
                break
            path.unlink(missing_ok=True)
            total -= st.st_size
            freed += st.st_size
        return freed

    def entries(self) -> list[EntryInfo]:
        """Entries on disk, most recently used first (headers read, payloads not checked)."""
        out = []
        for path, st in self._files():
            created, meta = None, {}
            try:
                f, _ = _open_entry(path, self._largest_entry())
                with f:
                    header = _read_header(f)
                created, meta = header.get("created"), dict(header.get("meta") or {})
            except (OSError, _Bad) as e:
                meta = {"error": str(e)}
            out.append(EntryInfo(path.name[:-len(SUFFIX)], path, st.st_size, st.st_mtime, created, meta))
        return sorted(out, key=lambda e: e.last_used, reverse=True)

    def total_bytes(self) -> int:
        return sum(st.st_size for _, st in self._files())

    def clear(self) -> tuple[int, int]:
        """Remove every entry (and leftover temporary files); (entries, bytes) removed."""
        self.forget_memory()
        n = size = 0
        if self.directory is None or not self.directory.is_dir():
            return 0, 0
        for path in self.directory.iterdir():
            if path.name.endswith(SUFFIX):
                try:
                    st = path.lstat()
                    if stat.S_ISDIR(st.st_mode):
                        continue
                    size += st.st_size
                    path.unlink()
                    n += not path.name.startswith(TMP_PREFIX)
                except FileNotFoundError:
                    pass
        return n, size

    def _largest_entry(self) -> int:
        """The most bytes an entry file of this store can have: `write` keeps no payload over `max_bytes`."""
        return _PREAMBLE.size + _MAX_HEADER + self.max_bytes

    @staticmethod
    def _warn(path: Path, reason: str) -> None:
        warnings.warn(f"prefix cache: ignoring {path}: {reason}; it will be recomputed", PrefixCacheWarning,
                      stacklevel=3)


_KINDS = {stat.S_IFIFO: "a FIFO", stat.S_IFCHR: "a character device", stat.S_IFBLK: "a block device",
          stat.S_IFSOCK: "a socket", stat.S_IFDIR: "a directory", stat.S_IFLNK: "a symbolic link"}


def _is_regular(path: Path) -> bool:
    try:
        return stat.S_ISREG(path.lstat().st_mode)
    except OSError:
        return False


def _open_entry(path: Path, max_size: int) -> tuple[Any, os.stat_result]:
    """Open an entry file for reading: a regular file of at most `max_size` bytes, the name itself (a link is
    not followed: O_NOFOLLOW) and without waiting on a FIFO swapped in meanwhile (O_NONBLOCK, which changes
    nothing for a regular file). Anything else raises _Bad(reason, lstat of the name) before a byte is read."""
    seen = path.lstat()  # FileNotFoundError: no entry
    if not stat.S_ISREG(seen.st_mode):
        raise _Bad(f"not a regular file but {_KINDS.get(stat.S_IFMT(seen.st_mode), 'a special file')}", seen)
    if seen.st_size > max_size:
        raise _Bad(f"{seen.st_size} bytes, more than an entry of this cache can have ({max_size})", seen)
    flags = os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_BINARY", 0)
    try:
        fd = os.open(path, flags)
    except OSError as e:
        if e.errno == errno.ELOOP:  # replaced by a link since the lstat
            raise _Bad("not a regular file but a symbolic link", path.lstat()) from None
        raise
    st = os.fstat(fd)
    if (st.st_ino, st.st_dev) != (seen.st_ino, seen.st_dev) or not stat.S_ISREG(st.st_mode) or st.st_size > max_size:
        os.close(fd)
        raise _Bad("replaced while it was being opened", st)
    return os.fdopen(fd, "rb"), st


def _read_header(f: Any) -> dict[str, Any]:
    preamble = f.read(_PREAMBLE.size)
    if len(preamble) < _PREAMBLE.size:
        raise _Bad("truncated: shorter than the entry header")
    magic, version, n = _PREAMBLE.unpack(preamble)
    if magic != MAGIC:
        raise _Bad("not a prefix cache entry (wrong magic)")
    if version != FORMAT_VERSION:
        raise _Bad(f"format version {version}, this r1v reads version {FORMAT_VERSION}")
    if n > _MAX_HEADER:
        raise _Bad(f"damaged header (length {n})")
    raw = f.read(n)
    if len(raw) < n:
        raise _Bad("truncated inside the entry header")
    try:
        header = json.loads(raw)
        if not isinstance(header, dict):
            raise ValueError("not an object")
    except ValueError as e:
        raise _Bad(f"damaged header ({e})") from None
    return header


def _read_entry(f: Any, file_size: int) -> tuple[dict[str, Any], bytes]:
    header = _read_header(f)
    size = header.get("payload_bytes")
    if not isinstance(size, int) or size < 0:
        raise _Bad("damaged header (payload size)")
    offset = f.tell()
    if file_size < offset + size:
        raise _Bad(f"truncated: {file_size - offset} of {size} payload bytes")
    if file_size > offset + size:
        raise _Bad(f"{file_size - offset - size} bytes more than the header declares")
    payload = f.read(size)
    if len(payload) != size:
        raise _Bad(f"truncated: {len(payload)} of {size} payload bytes")
    if hashlib.sha256(payload).hexdigest() != header.get("payload_sha256"):
        raise _Bad("checksum mismatch: the payload is damaged")
    return header, payload


def _remove_if_same(path: Path, seen: os.stat_result | None) -> None:
    """Remove a bad entry unless another process has meanwhile replaced it with a new file."""
    if seen is None:
        return
    try:
        now = path.lstat()
        if (now.st_ino, now.st_dev) == (seen.st_ino, seen.st_dev):
            path.unlink()
    except OSError:
        pass
