"""`r1v rm NAME [--yes]`: remove a model r1v built, a Hugging Face repo from the cache (or one GGUF quant of
it), or the prefix cache; NAME as `r1v ls` shows it. Like `ollama rm` and `hf cache delete`.

Asks first unless --yes (and refuses to ask a stdin that is not a terminal). Never removes anything outside
the cache directories, and refuses while another process has the files open or mapped (llama.cpp maps a
GGUF for as long as a model is loaded). A hub repo goes through huggingface-hub's own cache deletion; one quant
of it removes that quant's files from every snapshot and the blobs no remaining file refers to.
"""
from __future__ import annotations

import argparse
import os
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from r1v.cli.ls_cmd import PREFIX_CACHE, Item, add_place_arguments, human_size


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("name", help="as `r1v ls` shows it: micro-r1v, micro-r1v:q4_k_m, micro-r1v:awq, Org/Repo, "
                                     "Org/Repo:Q8_0, a models.yaml name, or prefix-cache")
    parser.add_argument("--yes", "-y", action="store_true", help="remove without asking")
    add_place_arguments(parser)


class RemoveError(ValueError):
    """Nothing by that name, a path outside the caches, or files in use; the message says which."""


@dataclass
class Removal:
    what: str  # for people
    paths: list[Path]  # what goes: files, or folders with everything under them
    bytes: int
    root: Path  # the cache directory every path must lie inside
    execute: Callable[[], None]


# --- what NAME means ----------------------------------------------------------------------------------------

def plan_removal(name: str, items: list[Item]) -> Removal:
    """The removal `r1v rm NAME` makes among `items` (`r1v ls`'s); RemoveError when nothing matches."""
    from r1v.runtime.files.registry import load_registry

    key = name.lower()
    base, colon, tag = name.rpartition(":")
    if not colon or "/" in tag:
        base, tag = name, ""
    registry = load_registry()
    entry = registry.models.get(base.lower())
    repo_key = (entry.repo_id if entry is not None else base).lower()
    for item in items:
        if item.kind == PREFIX_CACHE and key == PREFIX_CACHE:
            return _prefix_removal(item)
        if item.kind in ("built", "support") and item.name.lower() == key:
            return _tree_removal(item)
        if item.kind == "built" and tag and item.name.lower() == base.lower() and tag.lower() in item.quants:
            return _quant_removal(item, tag.lower(), item.path.parent)  # the model's folder is in the r1v cache
        if item.kind == "hub" and item.name.lower() == repo_key:
            if not tag:
                return _hub_removal(item)
            if tag.lower() in item.quants:
                return _quant_removal(item, tag.lower(), item.path.parent)
            raise RemoveError(f"{item.name} holds no GGUF quant {tag!r}; it has: "
                              f"{', '.join(q.upper() for q in item.quants) or 'none'}")
    known = ", ".join(i.name + (f"[:{'|'.join(i.quants)}]" if i.quants else "") for i in items) or "nothing"
    raise RemoveError(f"no model {name!r} on disk; `r1v ls` shows: {known}")


def _tree_removal(item: Item) -> Removal:
    from r1v.cli.ls_cmd import r1v_cache_root

    def execute() -> None:
        shutil.rmtree(item.path)

    return Removal(f"{item.name} ({item.holds})", [item.path], item.bytes, r1v_cache_root(), execute)


def _hub_removal(item: Item) -> Removal:
    from huggingface_hub import scan_cache_dir

    cache = item.path.parent
    info = scan_cache_dir(cache)
    repo = next(r for r in info.repos if Path(r.repo_path) == item.path)
    strategy = info.delete_revisions(*(r.commit_hash for r in repo.revisions))
    return Removal(f"Hugging Face repo {item.name} ({item.holds})", [item.path], strategy.expected_freed_size, cache,
                   strategy.execute)


def _prefix_removal(item: Item) -> Removal:
    from r1v.runtime.backends.llamacpp.prefix_cache import PrefixStore

    files = sorted(p for p in item.path.iterdir() if p.is_file())

    def execute() -> None:
        PrefixStore(item.path).clear()

    return Removal(f"the prefix cache ({item.holds})", files, item.bytes, item.path, execute)


def _quant_removal(item: Item, quant: str, root: Path) -> Removal:
    """One GGUF quant: its LLM files (all shards) in every folder of `item`, with a folder's projectors when no
    LLM file is left beside them; in a hub repo also each blob that no remaining snapshot file points to."""
    from r1v.runtime.files.resolve import gguf_quants, is_projector

    files = [p for p in _walk(item.path) if p.name.lower().endswith(".gguf")]
    doomed = [p for p in files if not is_projector(p) and gguf_quants([p]) == [quant]]
    for folder in {p.parent for p in doomed}:
        left = [p for p in files if p.parent == folder and not is_projector(p) and p not in doomed]
        if not left:
            doomed += [p for p in files if p.parent == folder and is_projector(p)]
    blobs: list[Path] = []
    if item.kind == "hub":  # snapshot entries are symlinks into blobs/
        kept = {os.path.realpath(p) for p in _walk(item.path / "snapshots") if p not in doomed}
        blobs = sorted({Path(os.path.realpath(p)) for p in doomed if p.is_symlink()} - {Path(k) for k in kept})
    size = sum(p.lstat().st_size for p in [*doomed, *blobs] if not p.is_symlink())

    def execute() -> None:
        for path in [*doomed, *blobs]:
            path.unlink()

    names = ", ".join(sorted({p.name for p in doomed}))
    return Removal(f"{quant.upper()} of {item.name}: {names}", sorted(doomed) + blobs, size, root, execute)


def _walk(directory: Path) -> list[Path]:
    return sorted(Path(base) / n for base, _, names in os.walk(directory) for n in names)


# --- safety -------------------------------------------------------------------------------------------------

def check_inside(removal: Removal) -> None:
    """Every path lies strictly inside the removal's cache directory, its own name not followed through a
    symlink (a link is removed, never what it points to outside)."""
    root = os.path.realpath(removal.root)
    for path in removal.paths:
        where = os.path.join(os.path.realpath(path.parent), path.name)
        if os.path.commonpath([root, where]) != root or where == root:
            raise RemoveError(f"refusing to remove {path}: it is not inside the cache directory {removal.root}")


def users(paths: list[Path]) -> dict[int, str]:
    """Other processes that map or hold open a file at or under `paths` (Linux /proc; {} elsewhere):
    pid -> command line."""
    targets = [os.path.realpath(p) for p in paths]
    prefixes = tuple(t + os.sep for t in targets)
    wanted = set(targets)

    def hit(name: str) -> bool:
        return name in wanted or name.startswith(prefixes)

    found: dict[int, str] = {}
    proc = Path("/proc")
    if not proc.is_dir():
        return found
    for pid_dir in proc.iterdir():
        if not pid_dir.name.isdigit() or int(pid_dir.name) == os.getpid():
            continue
        try:
            names = [line.split(None, 5)[5].strip() for line in (pid_dir / "maps").read_text().splitlines()
                     if len(line.split(None, 5)) == 6]
            names += [os.readlink(fd) for fd in (pid_dir / "fd").iterdir()]
        except OSError:  # gone, or another user's process
            continue
        if any(hit(n) for n in names):
            try:
                found[int(pid_dir.name)] = (pid_dir / "cmdline").read_bytes().replace(b"\0", b" ").decode().strip()
            except OSError:
                found[int(pid_dir.name)] = "?"
    return found


# --- the command ----------------------------------------------------------------------------------------------

def run(args: argparse.Namespace) -> int:
    from r1v.cli.ls_cmd import inventory

    removal = plan_removal(args.name, inventory(args.cache_dir, args.prefix_cache_dir))
    check_inside(removal)
    busy = users(removal.paths)
    if busy:
        procs = "; ".join(f"pid {pid} ({cmd[:80]})" for pid, cmd in sorted(busy.items()))
        raise RemoveError(f"{removal.what} is in use by {procs}: stop it first")
    print(f"remove {removal.what}: {human_size(removal.bytes)}")
    for path in removal.paths[:10]:
        print(f"    {path}")
    if len(removal.paths) > 10:
        print(f"    ... and {len(removal.paths) - 10} more")
    if not args.yes:
        if not sys.stdin.isatty():
            raise RemoveError("not removing: stdin is not a terminal to ask on; pass --yes")
        if input("Remove? [y/N] ").strip().lower() not in ("y", "yes"):
            print("kept")
            return 1
    removal.execute()
    print(f"removed {removal.what}, freed {human_size(removal.bytes)}")
    return 0
