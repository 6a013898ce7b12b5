"""The prefix cache (`r1v.runtime.backends.llamacpp.prefix_cache` and the llama.cpp backend's use of it).

Greedy outputs with the cache - restored in the same process after other requests, and from disk in a new
model - are token for token those of a model without it, for one image, two images and a second chat turn;
damaged, truncated and foreign entries are ignored with a warning and recomputed; concurrent writers leave one
valid entry; the directory stays within its size bound (LRU); `r1v cache ls|clear`.
"""
from __future__ import annotations

import hashlib
import json
import multiprocessing
import os
import shutil
import threading
import warnings
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from r1v.converters.gguf import GGUFConversion
from r1v.runtime.api import Model, load
from r1v.runtime.backends.llamacpp.prefix_cache import FORMAT_VERSION, SUFFIX, PrefixCacheWarning, PrefixStore, file_identity
from r1v.testing.images import pattern_pixels

THREADS = dict(n_threads=1, n_threads_batch=1, n_ctx=2048)
GREEDY = dict(temperature=0, repetition_penalty=1.0, max_tokens=16)


def _image(width: int, height: int, seed: int = 0) -> Image.Image:
    return Image.fromarray(pattern_pixels(width, height, seed))


@dataclass
class Files:
    llm: Path
    other_llm: Path  # the same checkpoint's LLM in Q8_0: another model file, same projector


@pytest.fixture(scope="module")
def files(tiny_r1v_gguf: GGUFConversion) -> Files:
    """The runtime tests' model (tests/tiny_models.py; seed 8: no near-ties on its greedy paths)."""
    return Files(tiny_r1v_gguf.llm["f16"], tiny_r1v_gguf.llm["q8_0"])


@pytest.fixture(scope="module")
def plain(files: Files):
    """The reference: no prefix cache."""
    with load(files.llm, prefix_cache=False, **THREADS) as m:
        yield m


def _cached(path: Path, cache: Path) -> Model:
    return load(path, prefix_cache_dir=cache, **THREADS)


def _entries(cache: Path) -> list[Path]:
    return sorted(p for p in cache.glob(f"*{SUFFIX}") if not p.name.startswith("."))


def _fresh(model: Model, *args, **kw):
    model.reset()
    return model.generate(*args, **GREEDY, **kw)


def _settle(model: Model) -> None:
    model._backend.wait_for_writes()


WIDE = _image(896, 448, seed=6)  # 2x1 + thumbnail: 3 tiles
SQUARE = _image(448, 448, seed=5)


@pytest.mark.parametrize("images", [[WIDE], [SQUARE, WIDE]], ids=["one-image", "two-images"])
def test_outputs_equal_without_cache_in_process_and_from_disk(plain: Model, files: Files, tmp_path: Path, images):
    questions = ["How many red circles are in the image?", "What colour is the second object?"]
    expected = [_fresh(plain, q, images=images).tokens for q in questions]
    with _cached(files.llm, tmp_path) as model:
        first = model.generate(questions[0], images=images, **GREEDY)
        assert first.restored_tokens == 0 and first.tokens == expected[0]
        _settle(model)
        assert len(_entries(tmp_path)) == 1
        model.generate("Something else entirely.", **GREEDY)  # the live KV cache no longer holds the image
        second = model.generate(questions[1], images=images, **GREEDY)
        assert second.cached_tokens < 10 and second.restored_tokens >= 256 * sum(i.tiles for i in first.images)
        assert second.tokens == expected[1]
    with _cached(files.llm, tmp_path) as model:  # a new model: from disk
        again = model.generate(questions[1], images=images, **GREEDY)
        assert again.cached_tokens == 0 and again.restored_tokens == second.restored_tokens + second.cached_tokens
        assert again.tokens == expected[1]
    assert len(_entries(tmp_path)) == 1


def test_multi_turn_restores_the_image_prefix(plain: Model, files: Files, tmp_path: Path):
    turn1 = [{"role": "user", "content": [{"type": "image", "image": WIDE},
                                          {"type": "text", "text": "How many shapes?"}]}]
    first = _fresh(plain, turn1)
    turn2 = turn1 + [first.message, {"role": "user", "content": "And which is largest?"}]
    expected = _fresh(plain, turn2).tokens
    with _cached(files.llm, tmp_path) as model:
        assert model.generate(turn1, **GREEDY).tokens == first.tokens
    with _cached(files.llm, tmp_path) as model:  # another process comes back to the conversation
        second = model.generate(turn2, **GREEDY)
        assert second.restored_tokens >= 3 * 256 and second.tokens == expected
        third = model.generate(turn2 + [second.message, {"role": "user", "content": "Why?"}], **GREEDY)
        assert third.cached_tokens > second.restored_tokens and third.restored_tokens == 0  # the live KV cache
    turn3 = turn2 + [second.message, {"role": "user", "content": "Why?"}]
    assert _fresh(plain, turn3).tokens == third.tokens


def _damage_truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[:len(data) // 2])


def _damage_flip(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[-100] ^= 0xFF
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("damage,message", [(_damage_flip, "checksum"), (_damage_truncate, "truncated")],
                         ids=["corrupted", "truncated"])
def test_damaged_entry_is_ignored_and_recomputed(plain: Model, files: Files, tmp_path: Path, damage, message):
    question = "How many shapes?"
    expected = _fresh(plain, question, images=[WIDE]).tokens
    with _cached(files.llm, tmp_path) as model:
        model.generate(question, images=[WIDE], **GREEDY)
    (entry,) = _entries(tmp_path)
    damage(entry)
    with _cached(files.llm, tmp_path) as model:
        with pytest.warns(PrefixCacheWarning, match=message):
            result = model.generate(question, images=[WIDE], **GREEDY)
        assert result.restored_tokens == 0 and result.tokens == expected
        _settle(model)
    # recomputed and written again: the next process restores it without a warning
    with _cached(files.llm, tmp_path) as model, warnings.catch_warnings():
        warnings.simplefilter("error", PrefixCacheWarning)
        result = model.generate(question, images=[WIDE], **GREEDY)
        assert result.restored_tokens > 0 and result.tokens == expected


def test_entry_of_another_model_is_ignored(plain: Model, files: Files, tmp_path: Path):
    """Another model's entry under this model's key (a copied or renamed file): the header's key says so."""
    question = "How many shapes?"
    expected = _fresh(plain, question, images=[WIDE]).tokens
    ours, theirs = tmp_path / "ours", tmp_path / "theirs"
    with _cached(files.llm, ours) as model:
        model.generate(question, images=[WIDE], **GREEDY)
    with _cached(files.other_llm, theirs) as other:
        other.generate(question, images=[WIDE], **GREEDY)
    (our_entry,), (their_entry,) = _entries(ours), _entries(theirs)
    assert our_entry.name != their_entry.name  # the model file is part of the key
    shutil.copyfile(their_entry, our_entry)
    with _cached(files.llm, ours) as model:
        with pytest.warns(PrefixCacheWarning, match="another model"):
            result = model.generate(question, images=[WIDE], **GREEDY)
        assert result.restored_tokens == 0 and result.tokens == expected


@contextmanager
def _unblocking(fifo: Path, seconds: float = 20.0):
    """A reader blocked on `fifo` (the bug: open() of a FIFO waits for a writer forever) is released after
    `seconds` by a writer that opens and closes it, so that the test fails instead of hanging. Yields a list
    that holds True if that was needed."""
    done, hung = threading.Event(), []

    def watch() -> None:
        if not done.wait(seconds):
            hung.append(True)
            try:
                os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))  # succeeds only while a reader waits
            except OSError:
                pass

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    try:
        yield hung
    finally:
        done.set()
        watcher.join()


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="no FIFOs on this platform")
def test_fifo_in_place_of_an_entry_neither_hangs_nor_is_used(plain: Model, files: Files, tmp_path: Path):
    """A FIFO where the entry belongs: generate warns, recomputes and answers (before: open() blocked forever)."""
    question = "How many shapes?"
    expected = _fresh(plain, question, images=[WIDE]).tokens
    with _cached(files.llm, tmp_path) as model:
        model.generate(question, images=[WIDE], **GREEDY)
    (entry,) = _entries(tmp_path)
    entry.unlink()
    os.mkfifo(entry)
    with _cached(files.llm, tmp_path) as model, _unblocking(entry) as hung:
        with pytest.warns(PrefixCacheWarning, match="not a regular file but a FIFO"):
            result = model.generate(question, images=[WIDE], **GREEDY)
        _settle(model)
    assert not hung, "generate blocked on the FIFO"
    assert result.restored_tokens == 0 and result.tokens == expected
    assert entry.is_file()  # the FIFO was removed and the entry written again


def test_prefix_cache_off_writes_nothing(files: Files, tmp_path: Path):
    with load(files.llm, prefix_cache=False, prefix_cache_dir=tmp_path, **THREADS) as model:
        model.generate("How many?", images=[SQUARE], **GREEDY)
        model.reset()
        assert model.generate("How many?", images=[SQUARE], **GREEDY).restored_tokens == 0
    assert not any(tmp_path.iterdir())


# --- the store ----------------------------------------------------------------------------------------------

def _writer(directory: str, key: str, payload: bytes, rounds: int, barrier) -> None:
    store = PrefixStore(directory)
    barrier.wait()
    for _ in range(rounds):
        store.path_for(key).unlink(missing_ok=True)  # so that every round really writes
        store.write(key, payload, {"pid": os.getpid()})


@pytest.mark.slow
def test_concurrent_writers_leave_one_valid_entry(tmp_path: Path):
    key = hashlib.sha256(b"the same prefix").hexdigest()
    payload = np.random.default_rng(0).bytes(4 << 20)
    ctx = multiprocessing.get_context("spawn")
    barrier = ctx.Barrier(2)
    procs = [ctx.Process(target=_writer, args=(str(tmp_path), key, payload, 8, barrier)) for _ in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
        assert p.exitcode == 0
    assert [p.name for p in tmp_path.iterdir()] == [f"{key}{SUFFIX}"]  # no temporary files left
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert PrefixStore(tmp_path).get(key) == payload


def test_store_checks_version_magic_and_evicts_lru(tmp_path: Path):
    store = PrefixStore(tmp_path, memory_bytes=0)
    keys = [hashlib.sha256(bytes([i])).hexdigest() for i in range(4)]
    for i, key in enumerate(keys[:3]):
        store.put(key, bytes([i]) * 1000, {"i": i})
        os.utime(store.path_for(key), (1000 + i, 1000 + i))
    store.max_bytes = store.total_bytes() + 100  # room for three entries, not four
    assert store.get(keys[0]) == bytes([0]) * 1000  # a hit makes it the most recently used
    store.put(keys[3], b"\x03" * 1000)
    assert {e.key for e in store.entries()} == {keys[0], keys[2], keys[3]}  # keys[1] was least recently used
    assert store.total_bytes() <= store.max_bytes

    path = store.path_for(keys[2])
    data = bytearray(path.read_bytes())
    data[8:12] = (FORMAT_VERSION + 1).to_bytes(4, "little")
    path.write_bytes(bytes(data))
    with pytest.warns(PrefixCacheWarning, match="format version"):
        assert store.get(keys[2]) is None
    assert not path.exists()
    store.path_for(keys[3]).write_bytes(b"GGUF" + bytes(100))
    with pytest.warns(PrefixCacheWarning, match="not a prefix cache entry"):
        assert store.get(keys[3]) is None
    assert store.get(hashlib.sha256(b"never stored").hexdigest()) is None


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="no FIFOs on this platform")
def test_store_opens_only_regular_files_never_through_links(tmp_path: Path):
    """FIFO, link to a valid entry, link to a FIFO, directory, oversized file: each is ignored with a warning
    naming what it is, before a byte is read; `get`, `contains`, `entries` and `clear` never block on them."""
    outside = PrefixStore(tmp_path / "outside")
    store = PrefixStore(tmp_path / "store", memory_bytes=0, max_bytes=4096)
    keys = [hashlib.sha256(bytes([i])).hexdigest() for i in range(6)]
    real = outside.put(keys[1], b"x" * 100)
    os.mkfifo(tmp_path / "outside" / "pipe")
    store.directory.mkdir()
    os.mkfifo(store.path_for(keys[0]))
    store.path_for(keys[1]).symlink_to(real)  # a valid entry, but behind a link
    store.path_for(keys[2]).symlink_to(tmp_path / "outside" / "pipe")
    store.path_for(keys[3]).mkdir()
    with open(store.path_for(keys[4]), "wb") as f:  # a sparse file: larger than any entry of a 4 KiB store
        f.truncate(1 << 30)
    cases = [(keys[0], "not a regular file but a FIFO"), (keys[1], "not a regular file but a symbolic link"),
             (keys[2], "not a regular file but a symbolic link"), (keys[3], "not a regular file but a directory"),
             (keys[4], f"{1 << 30} bytes, more than an entry of this cache can have")]
    for key, message in cases:
        with _unblocking(store.path_for(key), 10.0) as hung, pytest.warns(PrefixCacheWarning, match=message):
            assert store.get(key) is None
        assert not hung, f"get() blocked on {message}"
        assert not store.contains(key)
    assert not store.path_for(keys[0]).exists() and not store.path_for(keys[1]).is_symlink()  # removed
    assert real.is_file() and (tmp_path / "outside" / "pipe").exists()  # what the links pointed at is untouched
    os.mkfifo(store.path_for(keys[5]))
    with _unblocking(store.path_for(keys[5]), 10.0) as hung:
        listed = {e.key: e.meta for e in store.entries()}
    assert not hung and "FIFO" in listed[keys[5]]["error"]
    assert store.clear()[0] == 1 and store.path_for(keys[3]).is_dir()  # the FIFO removed, the directory left
    store.put(keys[0], b"y" * 100)  # and a valid entry is written and read as before
    assert PrefixStore(store.directory).get(keys[0]) == b"y" * 100


def test_file_identity_follows_content_not_name(files: Files, tmp_path: Path):
    copy = Path(shutil.copy(files.llm, tmp_path / "renamed.gguf"))
    assert file_identity(copy) == file_identity(files.llm) != file_identity(files.other_llm)


def test_cache_command_lists_and_clears(files: Files, tmp_path: Path, capsys):
    from r1v.cli import main

    with _cached(files.llm, tmp_path) as model:
        model.generate("How many?", images=[WIDE], **GREEDY)
    assert main(["cache", "ls", "--dir", str(tmp_path), "--json"]) == 0
    listing = json.loads(capsys.readouterr().out)
    (entry,) = listing["entries"]
    assert entry["model"] == files.llm.name and entry["images"] == 1 and entry["positions"] > 3 * 256
    assert listing["total_bytes"] == entry["bytes"] > 0
    assert main(["cache", "ls", "--dir", str(tmp_path)]) == 0
    assert files.llm.name in capsys.readouterr().out
    assert main(["cache", "clear", "--dir", str(tmp_path)]) == 0
    assert "removed 1 entr" in capsys.readouterr().out
    assert _entries(tmp_path) == []
