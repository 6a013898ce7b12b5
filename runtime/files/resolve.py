"""`resolve_model`: turn what a user typed (a GGUF file, a directory, a models.yaml name) into files on disk.

    ResolvedModel(format="gguf", path=<LLM .gguf>, mmproj=<projector .gguf or None>, ...)
    ResolvedModel(format="awq" | "safetensors", path=<checkpoint directory>, ...)

Order: an existing path; a name in `LOCAL_MODELS` (models the project builds itself, e.g. the demo model);
a models.yaml name, fetched with huggingface-hub's `snapshot_download` (only the files the entry and quant
need; the cache and offline mode honoured); anything else is a `ModelNotFoundError`.

Offline, huggingface-hub returns the whole cached snapshot folder without looking at `allow_patterns` (it
only uses them to check a cached tree listing for missing files), so files are chosen here among those the
patterns match, and a snapshot that lacks the chosen quant's files is reported as not available.
"""
from __future__ import annotations

import json
import os
import re
import shlex
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Literal

if TYPE_CHECKING:
    from .registry import ModelEntry, Registry

Format = Literal["gguf", "awq", "safetensors"]

# Models built locally rather than downloaded: name (lower case) -> function(quant) returning a path
# (a .gguf file or a directory), built on first call. Consulted before the hub. The demo model registers
# itself from r1v.micro (on `import r1v`); the runtime knows no model by name.
LOCAL_MODELS: dict[str, Callable[[str | None], Path]] = {}


def register_local_model(name: str, build: Callable[[str | None], Path]) -> None:
    """Make `name` resolve to `build(quant)` (a local .gguf file or model directory)."""
    LOCAL_MODELS[name.lower()] = build


class ModelNotFoundError(FileNotFoundError):
    """The source is not a model file, a model directory or a known model name."""


class ModelNotAvailable(FileNotFoundError):
    """A known model could not be found in the Hugging Face cache or downloaded; says how to fetch it."""

    def __init__(self, message: str, *, name: str = "", repo_id: str = "", cache_dir: str = "", command: str = ""):
        super().__init__(message)
        self.name, self.repo_id, self.cache_dir, self.command = name, repo_id, cache_dir, command


class AmbiguousModelError(ValueError):
    """Several files could be meant; the message lists them and says which option picks one."""


@dataclass(frozen=True)
class ResolvedModel:
    source: str
    format: Format
    path: Path  # the GGUF LLM file, or the checkpoint directory
    mmproj: Path | None
    entry: ModelEntry | None
    quant: str | None


# --- public entry point ----------------------------------------------------------------------------

def resolve_model(
    source: str | Path,
    *,
    quant: str | None = None,
    mmproj: str | Path | None = None,
    cache_dir: str | Path | None = None,
    offline: bool | None = None,
    registry: Registry | None = None,
) -> ResolvedModel:
    """Find the files of `source`: a .gguf file, a model directory, or a models.yaml / LOCAL_MODELS name.

    `quant` picks a GGUF file (e.g. "q4_k_m"); `mmproj` overrides the projector file found beside it.
    `cache_dir` defaults to huggingface-hub's cache (HF_HUB_CACHE / HF_HOME, read now); `offline`
    defaults to HF_HUB_OFFLINE."""
    text = str(source)
    path = Path(text).expanduser()
    if path.exists():
        return _resolve_path(path, text, quant, mmproj, entry=None)

    key = text.lower()
    if registry is None:
        from .registry import load_registry

        registry = load_registry()
    if key in LOCAL_MODELS:
        built = Path(LOCAL_MODELS[key](quant))
        entry = registry.models.get(key)
        return _resolve_path(built, text, quant, mmproj, entry=entry)
    entry = registry.models.get(key) or next((e for e in registry.models.values() if e.repo_id.lower() == key), None)
    if entry is not None:
        return _resolve_hub(entry, text, quant, mmproj, cache_dir, offline)

    names = sorted(set(registry.models) | set(LOCAL_MODELS))
    raise ModelNotFoundError(
        f"model {text!r} is neither an existing file or directory nor a known model name. "
        f"Give a .gguf file, a model directory, or one of: {', '.join(names)}"
    )


# --- the hub -----------------------------------------------------------------------------------------

def hub_cache_dir(cache_dir: str | Path | None = None) -> Path:
    """The huggingface-hub cache directory, following its environment variables as they are now
    (huggingface_hub.constants reads them once, at import)."""
    if cache_dir is not None:
        return Path(cache_dir).expanduser()
    env = os.environ
    for var in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE"):
        if env.get(var):
            return Path(os.path.expandvars(env[var])).expanduser()
    if env.get("HF_HOME"):
        return Path(os.path.expandvars(env["HF_HOME"])).expanduser() / "hub"
    from huggingface_hub import constants

    return Path(constants.HF_HUB_CACHE)


def hub_offline(offline: bool | None = None) -> bool:
    """`offline`, or HF_HUB_OFFLINE (as set now, or when huggingface_hub was imported)."""
    if offline is not None:
        return offline
    from huggingface_hub import constants

    value = os.environ.get("HF_HUB_OFFLINE") or os.environ.get("TRANSFORMERS_OFFLINE") or ""
    return value.strip().upper() in {"1", "ON", "YES", "TRUE"} or bool(constants.HF_HUB_OFFLINE)


def download_command(repo_id: str, patterns: list[str], cache_dir: str | Path) -> str:
    """The shell command that fetches the same files into the same cache."""
    argv = ["hf", "download", repo_id]
    for pattern in patterns:
        argv += ["--include", pattern]
    argv += ["--cache-dir", str(cache_dir)]
    return " ".join(shlex.quote(a) for a in argv)


def _resolve_hub(
    entry: ModelEntry, source: str, quant: str | None, mmproj: str | Path | None,
    cache_dir: str | Path | None, offline: bool | None,
) -> ResolvedModel:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import IncompleteSnapshotError, LocalEntryNotFoundError

    if entry.quants:
        quant = (quant or entry.default_quant or "").lower()
    elif quant is not None:
        raise ValueError(
            f"model {entry.name!r} is a {entry.format} release and has no quant types; drop quant={quant!r}"
        )
    patterns = entry.allow_patterns(quant)  # RegistryError (a ValueError) names the known quants
    cache = hub_cache_dir(cache_dir)
    local_only = hub_offline(offline)
    command = download_command(entry.repo_id, patterns, cache)

    def not_available(reason: str) -> ModelNotAvailable:
        how = f"Fetch it with:\n    {command}"
        if local_only:
            switch = "pass offline=False" if offline else "unset HF_HUB_OFFLINE"
            how += f"\nor {switch} to let r1v download it."
        return ModelNotAvailable(
            f"model {entry.name!r} (Hugging Face repo {entry.repo_id}) is not available: {reason}. "
            f"Cache directory: {cache}. {how}",
            name=entry.name, repo_id=entry.repo_id, cache_dir=str(cache), command=command,
        )

    try:
        snapshot = snapshot_download(
            entry.repo_id, allow_patterns=patterns, cache_dir=cache, local_files_only=local_only
        )
    except IncompleteSnapshotError as e:
        raise not_available(f"the cached snapshot lacks files ({e})") from e
    except LocalEntryNotFoundError as e:
        if local_only:
            raise not_available("it is not in the cache and downloads are off") from e
        raise not_available(f"the download failed ({_cause(e)})") from e
    except Exception as e:  # network, authentication, repository errors: keep the cause
        raise not_available(f"the download failed ({type(e).__name__}: {e})") from e

    try:
        return _resolve_dir(
            Path(snapshot), source, quant, mmproj, entry=entry, patterns=patterns, expect=entry.format
        )
    except ModelNotFoundError as e:
        raise not_available(f"the cached snapshot is incomplete: {e}") from e


def _cause(error: BaseException) -> str:
    cause = error.__cause__ or error
    return f"{type(cause).__name__}: {cause}"


# --- local files ---------------------------------------------------------------------------------------

def _resolve_path(
    path: Path, source: str, quant: str | None, mmproj: str | Path | None, *, entry: ModelEntry | None
) -> ResolvedModel:
    if path.is_dir():
        return _resolve_dir(path, source, quant, mmproj, entry=entry)
    if not path.is_file():
        raise ModelNotFoundError(f"model {source!r}: {path} does not exist")
    if not _is_gguf(path):
        raise ModelNotFoundError(f"model {source!r}: {path} is not a .gguf file or a model directory")
    if _is_mmproj(path):
        raise ModelNotFoundError(f"model {source!r}: {path.name} is a vision projector (mmproj); give the LLM .gguf")
    siblings = sorted(p for p in path.parent.iterdir() if p.is_file() and _is_gguf(p))
    return _gguf_result(path, siblings, source, mmproj, entry=entry)


def _resolve_dir(
    directory: Path, source: str, quant: str | None, mmproj: str | Path | None, *,
    entry: ModelEntry | None, patterns: list[str] | None = None, expect: str | None = None,
) -> ResolvedModel:
    files = _list_files(directory, patterns)
    ggufs = [p for p in files if _is_gguf(p)]
    config_path = directory / "config.json"
    config = _read_json(config_path) if config_path in files else None

    if expect in ("awq", "safetensors"):
        if config is None:
            raise ModelNotFoundError(f"{directory} has no config.json" + _listing(directory, files))
        return _checkpoint_result(directory, files, config, source, mmproj, entry=entry, expect=expect)
    if expect is None and config is not None and not (quant and ggufs):
        # a checkpoint directory; one that also holds GGUF files gives them when a quant is asked for
        if _checkpoint_format(config) is not None or not ggufs:
            return _checkpoint_result(directory, files, config, source, mmproj, entry=entry)

    llms = [p for p in ggufs if not _is_mmproj(p)]
    if quant:
        chosen = [p for p in llms if (_quant_of(p) or "").lower() == quant.lower()]
        if not chosen:
            has = _names(directory, llms) if llms else "no GGUF model"
            raise ModelNotFoundError(f"{directory} has no GGUF file for quant {quant!r}; it has: {has}")
    elif not llms:
        raise ModelNotFoundError(f"{directory} holds no GGUF model and no checkpoint" + _listing(directory, files))
    else:
        chosen = llms
    chosen = _first_shards(chosen)
    if len(chosen) > 1:
        quants = sorted({q.lower() for q in map(_quant_of, chosen) if q})
        hint = f"pass quant= one of {', '.join(quants)}" if quants and not quant else "pass the file's path"
        raise AmbiguousModelError(f"{directory} holds several GGUF models: {_names(directory, chosen)}; {hint}")
    return _gguf_result(chosen[0], ggufs, source, mmproj, entry=entry)


def _gguf_result(
    llm: Path, ggufs: list[Path], source: str, mmproj: str | Path | None, *, entry: ModelEntry | None
) -> ResolvedModel:
    if mmproj is not None:
        projector: Path | None = Path(mmproj).expanduser()
        if not projector.is_file():
            raise ModelNotFoundError(f"mmproj file {projector} does not exist")
    else:
        projector = _pick_mmproj(llm, [p for p in ggufs if _is_mmproj(p)])
    quant = _quant_of(llm)
    return ResolvedModel(source, "gguf", llm, projector, entry, quant.lower() if quant else None)


def _pick_mmproj(llm: Path, candidates: list[Path]) -> Path | None:
    """`mmproj-<stem>.gguf` beside the LLM; else among the candidates those of the same model name, then
    of the same quant, then f16, then the only one. None when there is none (text-only)."""
    exact = llm.with_name(f"mmproj-{llm.name}")
    if exact in candidates:
        return exact
    if not candidates:
        return None
    base, quant = _split_quant(_unshard(llm.stem))
    pool = [c for c in candidates if _split_quant(_mmproj_stem(c))[0].lower() == base.lower()] or candidates
    if len(pool) == 1:
        return pool[0]
    for wanted in (quant, "f16"):
        same = [c for c in pool if wanted and (_split_quant(_mmproj_stem(c))[1] or "").lower() == wanted.lower()]
        if len(same) == 1:
            return same[0]
    raise AmbiguousModelError(
        f"several vision projectors could go with {llm.name}: {', '.join(sorted(c.name for c in pool))}; pass mmproj="
    )


# --- checkpoint directories --------------------------------------------------------------------------

def _checkpoint_result(
    directory: Path, files: list[Path], config: dict[str, Any], source: str, mmproj: str | Path | None, *,
    entry: ModelEntry | None, expect: str | None = None,
) -> ResolvedModel:
    config_path = directory / "config.json"
    fmt = _checkpoint_format(config)
    if fmt is None:
        what = config.get("architectures") or config.get("model_type")
        raise ModelNotFoundError(f"{config_path} is not a Skywork-R1V / InternVL-chat checkpoint ({what})")
    if expect is not None and fmt != expect:
        raise ModelNotFoundError(f"{config_path} describes a {fmt} checkpoint; the registry says {expect}")
    if mmproj is not None:
        raise ValueError(f"mmproj= applies to GGUF models only; {directory} is a {fmt} checkpoint")
    _check_weights(directory, files)
    return ResolvedModel(source, fmt, directory, None, entry, None)


def _checkpoint_format(config: dict[str, Any]) -> Format | None:
    quantization = config.get("quantization_config") or {}
    if isinstance(quantization, dict) and str(quantization.get("quant_method", "")).lower() == "awq":
        return "awq"
    from r1v.converters.families import FAMILIES

    archs = config.get("architectures") or []
    model_type = config.get("model_type")
    for family in FAMILIES:
        if any(a in family.architectures for a in archs) or model_type in family.model_types:
            return "safetensors"
    return None


def _check_weights(directory: Path, files: list[Path]) -> None:
    index = directory / "model.safetensors.index.json"
    if index in files:
        shards = sorted(set((_read_json(index).get("weight_map") or {}).values()))
        missing = [s for s in shards if not (directory / s).is_file()]
        if missing:
            raise ModelNotFoundError(f"{directory} lacks weight shards listed in {index.name}: {', '.join(missing)}")
    elif not any(p.suffix == ".safetensors" for p in files):
        raise ModelNotFoundError(f"{directory} has config.json but no .safetensors weights")


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise ModelNotFoundError(f"cannot read {path}: {e}") from None
    if not isinstance(data, dict):
        raise ModelNotFoundError(f"{path}: expected a JSON object")
    return data


# --- file names ----------------------------------------------------------------------------------------

_QUANT = re.compile(r"^(?:(?P<base>.+?)[-._])?(?P<quant>i?q\d[a-z0-9_]*|bf16|f16|f32)$", re.IGNORECASE)
_SHARD = re.compile(r"-(\d{5})-of-(\d{5})$")


def _list_files(directory: Path, patterns: list[str] | None) -> list[Path]:
    """Files in `directory` (recursively for a hub snapshot, where `patterns` say which ones count)."""
    if patterns is None:
        return sorted(p for p in directory.iterdir() if p.is_file())
    from huggingface_hub.utils import filter_repo_objects

    relative = sorted(p.relative_to(directory).as_posix() for p in directory.rglob("*") if p.is_file())
    return [directory / r for r in filter_repo_objects(relative, allow_patterns=patterns)]


def _is_gguf(path: Path) -> bool:
    return path.name.lower().endswith(".gguf")


def _is_mmproj(path: Path) -> bool:
    return "mmproj" in path.name.lower()


def _unshard(stem: str) -> str:
    return _SHARD.sub("", stem)


def _split_quant(stem: str) -> tuple[str, str | None]:
    match = _QUANT.match(stem)
    return (match["base"] or "", match["quant"]) if match else (stem, None)


def _quant_of(path: Path) -> str | None:
    return _split_quant(_unshard(path.name[: -len(".gguf")]))[1]


def _mmproj_stem(path: Path) -> str:
    stem = re.sub("mmproj", "", path.name[: -len(".gguf")], flags=re.IGNORECASE)
    return re.sub(r"[-_.]{2,}", "-", stem).strip("-_.")


def _first_shards(paths: list[Path]) -> list[Path]:
    """Split GGUF files (`-00001-of-00003`) count once, by their first shard (llama.cpp loads the rest)."""
    out = []
    for p in paths:
        match = _SHARD.search(p.name[: -len(".gguf")])
        if match is None or int(match[1]) == 1:
            out.append(p)
    return out


def _names(directory: Path, paths: list[Path]) -> str:
    return ", ".join(p.relative_to(directory).as_posix() for p in paths)


def _listing(directory: Path, files: list[Path]) -> str:
    return f" (files: {_names(directory, files[:20])}{', ...' if len(files) > 20 else ''})" if files else " (empty)"


__all__ = [
    "LOCAL_MODELS", "AmbiguousModelError", "ModelNotAvailable", "ModelNotFoundError", "ResolvedModel",
    "download_command", "hub_cache_dir", "hub_offline", "register_local_model", "resolve_model",
]
