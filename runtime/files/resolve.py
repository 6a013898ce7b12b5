"""`resolve_model`: turn what a user typed (a GGUF file, a directory, a models.yaml name) into files on disk.

    ResolvedModel(format="gguf", path=<LLM .gguf>, mmproj=<projector .gguf or None>, ...)
    ResolvedModel(format="awq" | "safetensors", path=<checkpoint directory>, ...)

Order: an existing path; a name in `LOCAL_MODELS` (models the project builds itself, e.g. the demo model);
a models.yaml name, fetched with huggingface-hub's `snapshot_download` (only the files the entry and quant
need; the cache and offline mode honoured); any other Hugging Face repo id `Org/Repo`, whose file list
(the Hub's, or offline the cache's) decides what to fetch; anything else is a `ModelNotFoundError`.
A name may end in `:QUANT` (`Org/Repo:Q4_K_M`, as Ollama and llama.cpp's `-hf` write it), the same as quant=.

Any repo: GGUF files are used when a quant is asked for or the repo holds no safetensors checkpoint; the quant
is the one asked for, else the repo's only one, else the first of `DEFAULT_QUANT_ORDER` it has; one vision
projector (mmproj) is fetched with it. Otherwise config.json is fetched first and must describe a Skywork-R1V /
InternVL-chat checkpoint (AWQ or not) before the weights are. `ResolvedModel.note` says what was picked.
`fetch_config` gets only config.json (and the tokenizer files) of any name, for `r1v plan` and `r1v inspect`.

Offline, huggingface-hub returns the whole cached snapshot folder without looking at `allow_patterns` (it
only uses them to check a cached tree listing for missing files), so files are chosen here among those the
patterns match, and a snapshot that lacks the chosen quant's files is reported as not available.
"""
from __future__ import annotations

import dataclasses
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
    note: str | None = None  # for people: which quant / projector / checkpoint of a repo was picked, and why


# The files of a checkpoint release (as models.yaml lists them): config, weights, tokenizer, template.
CHECKPOINT_FILES = ["*.json", "*.safetensors", "*.txt", "*.jinja", "tokenizer*"]
# What `r1v plan` needs (config.json) and what `r1v inspect` adds (tokenizer, template, generation config).
CONFIG_FILES = ["config.json"]
TOKENIZER_FILES = ["tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt", "special_tokens_map.json",
                   "added_tokens.json", "generation_config.json", "chat_template.jinja"]
# The quant a repo of several GGUF quants gives when none is asked for: Q4_K_M first (llama.cpp's and Ollama's
# usual default: 4.9 bits per weight, small loss), then larger k-quants, 8 bit, the other 4-bit types, 16 bit,
# and the smallest last.
DEFAULT_QUANT_ORDER = ("q4_k_m", "q4_k_s", "q5_k_m", "q5_k_s", "q6_k", "q8_0", "iq4_xs", "iq4_nl", "q4_0", "q4_1",
                       "bf16", "f16", "q3_k_l", "q3_k_m", "q3_k_s", "q2_k", "f32")


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
    """Find the files of `source`: a .gguf file, a model directory, a models.yaml / LOCAL_MODELS name, or any
    Hugging Face repo id ("Org/Repo"); a name may end in ":QUANT" ("Org/Repo:Q4_K_M").

    `quant` picks a GGUF file (e.g. "q4_k_m"); `mmproj` overrides the projector file found beside it.
    `cache_dir` defaults to huggingface-hub's cache (HF_HUB_CACHE / HF_HOME, read now); `offline`
    defaults to HF_HUB_OFFLINE."""
    text = str(source)
    path = Path(text).expanduser()
    if path.exists():
        return _resolve_path(path, text, quant, mmproj, entry=None)

    name, quant = _split_quant_tag(text, quant)
    if name != text and Path(name).expanduser().exists():  # "gguf-dir/:Q4_K_M" picks in a local directory too
        return _resolve_path(Path(name).expanduser(), text, quant, mmproj, entry=None)
    key = name.lower()
    if registry is None:
        from .registry import load_registry

        registry = load_registry()
    if key in LOCAL_MODELS:
        built = Path(LOCAL_MODELS[key](quant))
        entry = registry.models.get(key)
        return _resolve_path(built, text, quant, mmproj, entry=entry)
    entry = _registry_entry(registry, key)
    if entry is not None:
        return _resolve_hub(entry, text, quant, mmproj, cache_dir, offline)
    if _is_repo_id(name):
        return _resolve_repo(name, text, quant, mmproj, cache_dir, offline)

    names = sorted(set(registry.models) | set(LOCAL_MODELS))
    raise ModelNotFoundError(
        f"model {text!r} is neither an existing file or directory nor a known model name. "
        f"Give a .gguf file, a model directory, a Hugging Face repo id (Org/Repo[:QUANT]), or one of: {', '.join(names)}"
    )


def fetch_config(
    source: str | Path,
    *,
    tokenizer: bool = False,
    cache_dir: str | Path | None = None,
    offline: bool | None = None,
    registry: Registry | None = None,
) -> Path:
    """A local path holding `source`'s config.json (and with `tokenizer`, its tokenizer files), downloading
    only those files for a models.yaml name or a repo id: enough for `r1v plan` ("does it fit my card?") and
    `r1v inspect` without the weights. A GGUF release is answered by its base model's config (models.yaml
    `base`). An existing path is returned as it is."""
    text = str(source)
    path = Path(text).expanduser()
    if path.exists():
        return path
    name, _ = _split_quant_tag(text, None)  # the quant does not change the config
    if registry is None:
        from .registry import load_registry

        registry = load_registry()
    entry = _registry_entry(registry, name.lower())
    if entry is not None and entry.format == "gguf" and entry.base is not None:
        entry = registry.models[entry.base]  # GGUF releases carry no config.json
    repo_id = entry.repo_id if entry is not None else name
    if not _is_repo_id(repo_id):
        where = " (built locally: give its checkpoint directory)" if name.lower() in LOCAL_MODELS else ""
        raise ModelNotFoundError(
            f"model {text!r}{where} is neither an existing file or directory nor a models.yaml name or Hugging Face "
            f"repo id (Org/Repo); known names: {', '.join(sorted(registry.models))}"
        )
    patterns = CONFIG_FILES + (TOKENIZER_FILES if tokenizer else [])
    label = entry.name if entry is not None else repo_id
    snapshot = _snapshot(repo_id, label, patterns, hub_cache_dir(cache_dir), offline)
    if not (snapshot / "config.json").is_file():
        raise ModelNotFoundError(
            f"Hugging Face repo {repo_id} has no config.json (a GGUF-only release?): `r1v plan` and `r1v inspect` "
            "read a checkpoint's config.json; give the original checkpoint's repo id or a local config.json"
        )
    return snapshot


def _split_quant_tag(text: str, quant: str | None) -> tuple[str, str | None]:
    """"Org/Repo:Q4_K_M" -> ("Org/Repo", "Q4_K_M"); a tag and a different quant= disagree: ValueError."""
    name, colon, tag = text.rpartition(":")
    if not colon or not name or any(c in tag for c in "/\\"):
        return text, quant
    if not _QUANT_TAG.match(tag):
        raise ValueError(f"model {text!r}: {tag!r} after ':' is not a GGUF quant type (e.g. Q4_K_M, Q8_0, F16)")
    if quant is not None and quant.lower() != tag.lower():
        raise ValueError(f"model {text!r} asks for quant {tag!r} but quant={quant!r} was given too; give one")
    return name, quant or tag


def _registry_entry(registry: Registry, key: str) -> ModelEntry | None:
    return registry.models.get(key) or next((e for e in registry.models.values() if e.repo_id.lower() == key), None)


def _is_repo_id(name: str) -> bool:
    """"Org/Repo" is a Hugging Face repo id; a path-like text (./x, /x, ~/x, a/b/c, x.gguf) is not, and a
    malformed id ("Org/Re po", "Org/a--b") is a ModelNotFoundError that says why."""
    if name.count("/") != 1 or name.startswith((".", "/", "~")) or name.lower().endswith((".gguf", ".json")):
        return False
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(name)
    except HFValidationError as e:
        raise ModelNotFoundError(f"model {name!r} is no existing path and not a valid Hugging Face repo id: {e}") from None
    return True


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
    if entry.quants:
        quant = (quant or entry.default_quant or "").lower()
    elif quant is not None:
        raise ValueError(
            f"model {entry.name!r} is a {entry.format} release and has no quant types; drop quant={quant!r}"
        )
    patterns = entry.allow_patterns(quant)  # RegistryError (a ValueError) names the known quants
    cache = hub_cache_dir(cache_dir)
    snapshot = _snapshot(entry.repo_id, entry.name, patterns, cache, offline)
    try:
        return _resolve_dir(snapshot, source, quant, mmproj, entry=entry, patterns=patterns, expect=entry.format)
    except ModelNotFoundError as e:
        raise _not_available(entry.repo_id, entry.name, patterns, cache, offline,
                             f"the cached snapshot is incomplete: {e}") from e


def _not_available(
    repo_id: str, name: str, patterns: list[str], cache: Path, offline: bool | None, reason: str,
) -> ModelNotAvailable:
    command = download_command(repo_id, patterns, cache)
    how = f"Fetch it with:\n    {command}"
    if hub_offline(offline):
        switch = "pass offline=False" if offline else "unset HF_HUB_OFFLINE"
        how += f"\nor {switch} to let r1v download it."
    label = f"model {name!r} (Hugging Face repo {repo_id})" if name != repo_id else f"Hugging Face repo {repo_id}"
    return ModelNotAvailable(f"{label} is not available: {reason}. Cache directory: {cache}. {how}",
                             name=name, repo_id=repo_id, cache_dir=str(cache), command=command)


def _snapshot(repo_id: str, name: str, patterns: list[str], cache: Path, offline: bool | None) -> Path:
    """huggingface-hub's snapshot folder of `repo_id` with the files `patterns` select (downloaded unless
    offline); ModelNotAvailable says how to fetch them."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import IncompleteSnapshotError, LocalEntryNotFoundError

    local_only = hub_offline(offline)

    def not_available(reason: str) -> ModelNotAvailable:
        return _not_available(repo_id, name, patterns, cache, offline, reason)

    try:
        return Path(snapshot_download(repo_id, allow_patterns=patterns, cache_dir=cache, local_files_only=local_only))
    except IncompleteSnapshotError as e:
        raise not_available(f"the cached snapshot lacks files ({e})") from e
    except LocalEntryNotFoundError as e:
        if local_only:
            raise not_available("it is not in the cache and downloads are off") from e
        raise not_available(f"the download failed ({_cause(e)})") from e
    except Exception as e:  # network, authentication, repository errors: keep the cause
        raise not_available(f"the download failed ({type(e).__name__}: {e})") from e


# --- any repository --------------------------------------------------------------------------------------

@dataclass(frozen=True)
class RepoChoice:
    """What to fetch from a repository that models.yaml does not describe."""

    format: Literal["gguf", "checkpoint"]
    files: list[str]  # exact repo paths (GGUF) or patterns (a checkpoint's CHECKPOINT_FILES)
    quant: str | None
    note: str


def choose_repo_files(repo_id: str, files: list[str], quant: str | None, *, mmproj_given: bool = False) -> RepoChoice:
    """Pick among a repository's files (paths relative to its root): a GGUF quant (exactly `quant`, else the
    only one, else the first of DEFAULT_QUANT_ORDER) with one vision projector, or a safetensors checkpoint."""
    ggufs = [f for f in files if _is_gguf(Path(f))]
    llms = [f for f in ggufs if not _is_mmproj(Path(f))]
    checkpoint = "config.json" in files and any(f.endswith(".safetensors") for f in files)
    if not llms and not checkpoint:
        if quant:
            raise ModelNotFoundError(f"Hugging Face repo {repo_id} has no GGUF files, so no quant {quant!r}"
                                     + _repo_listing(files))
        raise ModelNotFoundError(f"Hugging Face repo {repo_id} holds neither GGUF files nor a safetensors checkpoint "
                                 "(config.json + *.safetensors)" + _repo_listing(files))
    if not llms or (checkpoint and not quant):
        if quant:
            raise ModelNotFoundError(f"Hugging Face repo {repo_id} is a safetensors checkpoint without GGUF files; "
                                     f"drop the quant {quant!r}")
        return RepoChoice("checkpoint", list(CHECKPOINT_FILES), None,
                          f"{repo_id}: the safetensors checkpoint ({', '.join(CHECKPOINT_FILES)})")

    by_quant: dict[str, list[str]] = {}
    for f in llms:
        by_quant.setdefault((_quant_of(Path(f)) or "").lower(), []).append(f)
    spelled = {q: (_quant_of(Path(fs[0])) or "") for q, fs in by_quant.items() if q}
    has = ", ".join(spelled[q] for q in sorted(spelled)) or "no quant named in the file names"
    if quant:
        why = "as asked"
        if quant.lower() not in by_quant:
            raise ModelNotFoundError(f"Hugging Face repo {repo_id} has no GGUF file for quant {quant!r}; it has: {has}")
        chosen = quant.lower()
    elif len(by_quant) == 1:
        chosen, why = next(iter(by_quant)), "the only one"
    else:
        chosen = next((q for q in DEFAULT_QUANT_ORDER if q in by_quant), "")
        if not chosen:
            raise AmbiguousModelError(f"Hugging Face repo {repo_id} holds several GGUF quants ({has}) and none of the "
                                      f"default order; add one: {repo_id}:QUANT")
        why = "by the default order " + " > ".join(q.upper() for q in DEFAULT_QUANT_ORDER[:4]) + " > ..."
    picked = by_quant[chosen]
    names = _first_shards([Path(f) for f in picked])
    note = f"{repo_id}: picked {spelled.get(chosen) or 'the GGUF'} ({', '.join(n.as_posix() for n in names)}) {why}"
    others = [spelled[q] for q in sorted(spelled) if q != chosen]
    if others:
        note += f"; the repo also has {', '.join(others)}"
    wanted = list(picked)
    projectors = [Path(f) for f in ggufs if _is_mmproj(Path(f))]
    if not mmproj_given and projectors and len(names) == 1:
        projector = _pick_mmproj(names[0], projectors)
        if projector is not None:
            wanted.append(projector.as_posix())
            note += f"; projector {projector.as_posix()}"
    return RepoChoice("gguf", sorted(wanted), chosen or None, note)


def _resolve_repo(
    repo_id: str, source: str, quant: str | None, mmproj: str | Path | None,
    cache_dir: str | Path | None, offline: bool | None,
) -> ResolvedModel:
    cache = hub_cache_dir(cache_dir)
    choice = choose_repo_files(repo_id, repo_files(repo_id, cache, offline, quant), quant,
                               mmproj_given=mmproj is not None)
    expect: str | None = None
    if choice.format == "checkpoint":  # config.json first: no weights fetched for a model r1v cannot run
        snapshot = _snapshot(repo_id, repo_id, CONFIG_FILES, cache, offline)
        config_path = snapshot / "config.json"
        config = _read_json(config_path)
        expect = _checkpoint_format(config)
        if expect is None:
            what = config.get("architectures") or config.get("model_type")
            raise ModelNotFoundError(f"Hugging Face repo {repo_id}: {config_path} is not a Skywork-R1V / InternVL-chat "
                                     f"checkpoint ({what}); r1v runs only those")
    snapshot = _snapshot(repo_id, repo_id, choice.files, cache, offline)
    try:
        resolved = _resolve_dir(snapshot, source, choice.quant, mmproj, entry=None, patterns=choice.files,
                                expect=expect)
    except ModelNotFoundError as e:
        raise _not_available(repo_id, repo_id, choice.files, cache, offline,
                             f"the cached snapshot is incomplete: {e}") from e
    note = choice.note if expect is None else f"{repo_id}: the {expect} checkpoint"
    return dataclasses.replace(resolved, note=note)


def repo_files(
    repo_id: str, cache_dir: str | Path | None = None, offline: bool | None = None, quant: str | None = None,
) -> list[str]:
    """The paths of a repository's files: the Hub's listing; offline, or when the Hub cannot be reached, the
    listing huggingface-hub cached with the snapshot (`trees/<commit>.json`), else the cached snapshot's files.
    `quant` only shapes the fetch command suggested when neither is there."""
    from huggingface_hub import HfApi
    from huggingface_hub.errors import GatedRepoError, HfHubHTTPError, OfflineModeIsEnabled, RepositoryNotFoundError

    cache = hub_cache_dir(cache_dir)
    cause: Exception | None = None
    if not hub_offline(offline):
        try:
            return sorted(HfApi().list_repo_files(repo_id))
        except GatedRepoError as e:
            raise ModelNotAvailable(f"Hugging Face repo {repo_id} is gated: accept its terms on the Hub and log in "
                                    f"(`hf auth login`) ({e})", repo_id=repo_id, cache_dir=str(cache)) from e
        except RepositoryNotFoundError as e:
            raise ModelNotFoundError(f"there is no Hugging Face repo {repo_id!r} (or it is private: `hf auth login`), "
                                     "and no file or directory of that name") from e
        except (HfHubHTTPError, OfflineModeIsEnabled, OSError) as e:  # the Hub unreachable: the cache may answer
            cause = e
        except Exception as e:  # the HTTP client's own connection errors (httpx), not OSErrors
            cause = e
    cached = _cached_repo_files(repo_id, cache)
    if cached is None:
        reason = ("it is not in the cache and downloads are off" if cause is None
                  else f"its file list could not be fetched ({type(cause).__name__}: {cause})")
        patterns = [_quant_glob(quant), "*mmproj*.gguf"] if quant else []  # without a quant: the whole repo
        raise _not_available(repo_id, repo_id, patterns, cache, offline, reason) from cause
    return cached


def _cached_repo_files(repo_id: str, cache: Path) -> list[str] | None:
    from huggingface_hub import get_cached_repo_tree
    from huggingface_hub.errors import CachedRepoTreeNotFoundError

    try:
        return sorted(f.path for f in get_cached_repo_tree(repo_id, cache_dir=cache))
    except CachedRepoTreeNotFoundError:
        pass
    storage = cache / f"models--{repo_id.replace('/', '--')}"
    try:
        commit = (storage / "refs" / "main").read_text().strip()
    except OSError:
        return None
    snapshot = storage / "snapshots" / commit
    if not snapshot.is_dir():
        return None
    return sorted(p.relative_to(snapshot).as_posix() for p in snapshot.rglob("*") if p.is_file())


def _quant_glob(quant: str) -> str:
    """A case-insensitive glob of a quant's GGUF files: q4_k_m -> *[Qq]4_[Kk]_[Mm]*.gguf (as models.yaml writes)."""
    return "*" + "".join(f"[{c.upper()}{c.lower()}]" if c.isalpha() else c for c in quant) + "*.gguf"


def _repo_listing(files: list[str]) -> str:
    return f"; it has: {', '.join(files[:20])}{', ...' if len(files) > 20 else ''}" if files else "; it is empty"


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
_QUANT_TAG = re.compile(r"^(?:i?q\d[a-z0-9_]*|bf16|f16|f32)$", re.IGNORECASE)
_SHARD = re.compile(r"-(\d{5})-of-(\d{5})$")


def _list_files(directory: Path, patterns: list[str] | None) -> list[Path]:
    """Files in `directory` (recursively for a hub snapshot, where `patterns` say which ones count)."""
    if patterns is None:
        return sorted(p for p in directory.iterdir() if p.is_file())
    from huggingface_hub.utils import filter_repo_objects

    relative = sorted(p.relative_to(directory).as_posix() for p in directory.rglob("*") if p.is_file())
    return [directory / r for r in filter_repo_objects(relative, allow_patterns=patterns)]


def gguf_quants(paths: list[Path]) -> list[str]:
    """The quant types (lower case, sorted) the names of LLM GGUF files among `paths` carry; projectors skipped."""
    return sorted({(_quant_of(p) or "").lower() for p in paths if _is_gguf(p) and not _is_mmproj(p)} - {""})


def is_projector(path: Path) -> bool:
    """A GGUF file named as a vision projector (mmproj)."""
    return _is_gguf(path) and _is_mmproj(path)


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
    "CHECKPOINT_FILES", "DEFAULT_QUANT_ORDER", "LOCAL_MODELS", "AmbiguousModelError", "ModelNotAvailable",
    "ModelNotFoundError", "RepoChoice", "ResolvedModel", "choose_repo_files", "download_command", "fetch_config",
    "gguf_quants", "hub_cache_dir", "hub_offline", "is_projector", "register_local_model", "repo_files",
    "resolve_model",
]
