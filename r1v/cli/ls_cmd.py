"""`r1v ls [--json]`: the models on disk and the space each takes, as `ollama list` and `hf cache scan` show them.

Three places: models r1v built itself (`$XDG_CACHE_HOME/r1v/<name>/...`, e.g. the demo's GGUF and AWQ files),
Hugging Face repositories in huggingface-hub's cache (models.yaml names and any other repo), and the prefix
cache (`r1v cache ls` lists its entries). `r1v rm NAME` removes one of them (r1v/cli/rm_cmd.py).
"""
from __future__ import annotations

import argparse
import json
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterator

from r1v.converters.inspect import human_size

PREFIX_CACHE = "prefix-cache"  # the name `r1v ls` gives the prefix cache, and `r1v rm` takes
# Folders of the r1v cache that hold no model but take space: listed as such, never scanned for model files.
SUPPORT_DIRS = {
    "llama.cpp-src": "llama.cpp source (r1v bench convert, tests)",
    "mmproj-reordered": "mmproj copies with llama.cpp's position-row order",
}


@dataclass
class Item:
    """One row of `r1v ls`: a model build, a hub repository or the prefix cache."""

    name: str  # what `r1v rm` takes: micro-r1v, micro-r1v:awq, Org/Repo, prefix-cache
    kind: str  # "built" | "hub" | "prefix-cache" | "support" (SUPPORT_DIRS)
    holds: str  # for people: formats and quants ("gguf Q4_K_M, Q8_0 + mmproj"), entries
    bytes: int
    modified: float  # newest file's mtime (unix seconds)
    path: Path
    quants: list[str] = field(default_factory=list)  # GGUF quants held (lower case), for `r1v rm NAME:QUANT`
    registry_name: str | None = None  # the models.yaml name of a hub repo

    def to_json(self) -> dict[str, Any]:
        return {**asdict(self), "path": str(self.path)}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_place_arguments(parser)
    parser.add_argument("--json", action="store_true", help="print JSON for scripts")


def add_place_arguments(parser: argparse.ArgumentParser) -> None:
    """Where to look (shared with `r1v rm`)."""
    parser.add_argument("--cache-dir", type=Path, default=None,
                        help="Hugging Face cache directory (default: huggingface-hub's, $HF_HUB_CACHE / $HF_HOME/hub)")
    parser.add_argument("--prefix-cache-dir", type=Path, default=None,
                        help="prefix cache directory (default $R1V_PREFIX_CACHE_DIR, else ~/.cache/r1v/prefix-cache)")


# --- where ------------------------------------------------------------------------------------------------

def r1v_cache_root() -> Path:
    """The folder r1v builds models into: $XDG_CACHE_HOME/r1v (as r1v.micro.files and the prefix cache use)."""
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "r1v"


def prefix_cache_dir(given: Path | None = None) -> Path:
    from r1v.runtime.backends.llamacpp.prefix_cache import default_cache_dir

    return given or default_cache_dir()


# --- what -------------------------------------------------------------------------------------------------

def inventory(cache_dir: Path | None = None, prefix_dir: Path | None = None) -> list[Item]:
    """Every model build, hub repository and the prefix cache, in that order (each by name)."""
    prefix = prefix_cache_dir(prefix_dir)
    root = r1v_cache_root()
    return [*built_items(root, skip=prefix), *hub_items(cache_dir), *prefix_items(prefix), *support_items(root)]


def built_items(root: Path, *, skip: Path | None = None) -> list[Item]:
    """The models r1v built under `root`: per model folder, one item for its GGUF files (every folder that holds
    them) and one per AWQ checkpoint directory (`NAME:awq`, or `NAME:awq-<dir>` when there are several)."""
    if not root.is_dir():
        return []
    items: list[Item] = []
    for model_dir in sorted(p for p in root.iterdir() if p.is_dir() and not p.is_symlink()):
        if model_dir.name in SUPPORT_DIRS or (skip is not None and model_dir.resolve() == skip.resolve()):
            continue
        checkpoints = sorted(p.parent for p in model_dir.rglob("config.json") if not _in_partial(p, model_dir))
        ggufs = [p for p in model_dir.rglob("*.gguf") if not any(c in p.parents for c in checkpoints)]
        for i, checkpoint in enumerate(checkpoints):
            suffix = "awq" if len(checkpoints) == 1 else f"awq-{checkpoint.name}"
            items.append(Item(f"{model_dir.name}:{suffix}", "built", f"{_checkpoint_kind(checkpoint)} checkpoint",
                              *_du(checkpoint), checkpoint))
        if ggufs:
            from r1v.runtime.files.resolve import gguf_quants

            size, modified = _du(model_dir, exclude=checkpoints)
            quants = gguf_quants(ggufs)
            folders = len({p.parent for p in ggufs})  # builds of older checkpoints or converters stay until removed
            holds = _gguf_holds(ggufs, quants) + (f" in {folders} folders" if folders > 1 else "")
            items.append(Item(model_dir.name, "built", holds, size, modified, model_dir, quants))
        elif not checkpoints and any(model_dir.iterdir()):  # leftovers (partial builds): still space to free
            items.append(Item(model_dir.name, "built", "no complete model (partial files)", *_du(model_dir), model_dir))
    return items


def support_items(root: Path) -> list[Item]:
    """The r1v cache's folders that are not models (SUPPORT_DIRS), by their folder name."""
    return [Item(name, "support", holds, *_du(root / name), root / name)
            for name, holds in SUPPORT_DIRS.items() if (root / name).is_dir() and not (root / name).is_symlink()]


def hub_items(cache_dir: Path | None = None) -> list[Item]:
    """Model repositories in huggingface-hub's cache, with their models.yaml name when they have one."""
    from huggingface_hub import scan_cache_dir
    from huggingface_hub.errors import CacheNotFound

    from r1v.runtime.files.registry import load_registry
    from r1v.runtime.files.resolve import gguf_quants, hub_cache_dir

    cache = hub_cache_dir(cache_dir)
    try:
        info = scan_cache_dir(cache)
    except CacheNotFound:
        return []
    names = {e.repo_id.lower(): e.name for e in load_registry().models.values()}
    items = []
    for repo in sorted(info.repos, key=lambda r: r.repo_id.lower()):
        if repo.repo_type != "model":
            continue
        files = sorted({f.file_path.relative_to(rev.snapshot_path).as_posix() for rev in repo.revisions
                        for f in rev.files})
        ggufs = [Path(f) for f in files if f.lower().endswith(".gguf")]
        quants = gguf_quants(ggufs)
        parts = [_gguf_holds(ggufs, quants)] if ggufs else []
        if "config.json" in files:
            parts.append("safetensors checkpoint" if any(f.endswith(".safetensors") for f in files) else "config.json")
        revisions = len(repo.revisions)
        if revisions > 1:
            parts.append(f"{revisions} revisions")
        items.append(Item(repo.repo_id, "hub", ", ".join(parts) or "no model files", repo.size_on_disk,
                          repo.last_modified, Path(repo.repo_path), quants, names.get(repo.repo_id.lower())))
    return items


def prefix_items(directory: Path) -> list[Item]:
    from r1v.runtime.backends.llamacpp.prefix_cache import PrefixStore

    if not directory.is_dir():
        return []
    entries = PrefixStore(directory).entries()
    if not entries:
        return []
    return [Item(PREFIX_CACHE, PREFIX_CACHE, f"{len(entries)} entr{'y' if len(entries) == 1 else 'ies'} (r1v cache ls)",
                 sum(e.size for e in entries), max(e.last_used for e in entries), directory)]


def _checkpoint_kind(directory: Path) -> str:
    try:
        config = json.loads((directory / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return "unreadable"
    method = (config.get("quantization_config") or {}).get("quant_method") if isinstance(config, dict) else None
    return str(method).lower() if method else "safetensors"


def _gguf_holds(ggufs: list[Path], quants: list[str]) -> str:
    from r1v.runtime.files.resolve import is_projector

    text = "gguf " + (", ".join(q.upper() for q in quants) or "(quant not named)")
    return text + (" + mmproj" if any(is_projector(p) for p in ggufs) else "")


def _in_partial(path: Path, root: Path) -> bool:
    return any(part.endswith(".partial") for part in path.relative_to(root).parts)


def _du(directory: Path, exclude: list[Path] = ()) -> tuple[int, float]:
    """(bytes, newest mtime) of the files under `directory` (symlinks not followed), skipping `exclude` trees."""
    size, newest = 0, 0.0
    for path in _files(directory):
        if any(e == path or e in path.parents for e in exclude):
            continue
        st = path.lstat()
        size += st.st_size
        newest = max(newest, st.st_mtime)
    return size, newest


def _files(directory: Path) -> Iterator[Path]:
    for base, dirs, names in os.walk(directory):  # os.walk does not follow symlinked folders
        for name in names:
            yield Path(base) / name


# --- showing ----------------------------------------------------------------------------------------------

def format_items(items: list[Item]) -> str:
    if not items:
        return "no models on disk (r1v builds, Hugging Face cache, prefix cache)"
    rows = [(i.name + (f" ({i.registry_name})" if i.registry_name else ""), i.kind, human_size(i.bytes),
             time.strftime("%Y-%m-%d %H:%M", time.localtime(i.modified)) if i.modified else "-", i.holds, str(i.path))
            for i in items]
    header = ("NAME", "WHERE", "SIZE", "MODIFIED", "HOLDS", "PATH")
    widths = [max(len(r[c]) for r in [header, *rows]) for c in range(5)]
    lines = ["  ".join(cell.rjust(widths[c]) if c == 2 else cell.ljust(widths[c]) if c < 5 else cell
                       for c, cell in enumerate(r)) for r in [header, *rows]]
    lines.append(f"total {human_size(sum(i.bytes for i in items))} in {len(items)} item{'s' * (len(items) != 1)}")
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    items = inventory(args.cache_dir, args.prefix_cache_dir)
    if args.json:
        print(json.dumps({"items": [i.to_json() for i in items], "total_bytes": sum(i.bytes for i in items)},
                         indent=2))
    else:
        print(format_items(items))
    return 0
