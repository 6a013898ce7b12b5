"""resolve_model against real huggingface-hub code and a cache laid out exactly as huggingface-hub writes it.

No network: the hub cache is built in tmp_path, HF_HUB_OFFLINE=1 is set, and sockets refuse to connect.
"""
from __future__ import annotations

import hashlib
import json
import os
import socket
from pathlib import Path

import pytest
from huggingface_hub import constants, scan_cache_dir, try_to_load_from_cache
from huggingface_hub.errors import IncompleteSnapshotError, LocalEntryNotFoundError

import r1v.runtime.files.resolve as resolve
from r1v.runtime.files.registry import RegistryError, load_registry, parse_registry
from r1v.runtime.files.resolve import (
    LOCAL_MODELS,
    AmbiguousModelError,
    ModelNotAvailable,
    ModelNotFoundError,
    ResolvedModel,
    resolve_model,
)

GGUF_REPO = "Skywork/Skywork-R1V3-38B-GGUF"
COMMIT = "0123456789abcdef0123456789abcdef01234567"
GGUF_FILES = {
    "README.md": b"# Skywork-R1V3-38B-GGUF\n",
    "Skywork-R1V3-38B-Q4_K_M.gguf": b"GGUF\x03\x00\x00\x00 q4_k_m",
    "Skywork-R1V3-38B-Q8_0.gguf": b"GGUF\x03\x00\x00\x00 q8_0",
    "mmproj-Skywork-R1V3-38B-f16.gguf": b"GGUF\x03\x00\x00\x00 mmproj f16",
}


def _git_blob_sha1(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def make_hub_cache(
    cache: Path, repo_id: str, files: dict[str, bytes], *, commit: str = COMMIT,
    tree: dict[str, bytes] | None = None,
) -> Path:
    """Lay out `files` as huggingface-hub caches a model repo: blobs named by their etag (sha256 for LFS files,
    the git blob sha1 otherwise), refs/main holding the commit hash (no newline), snapshot entries as relative
    symlinks into blobs. `tree` also writes the tree listing (`trees/<commit>.json`) that snapshot_download
    keeps for the whole repo, which offline mode uses to notice missing files."""
    storage = cache / f"models--{repo_id.replace('/', '--')}"
    (storage / "blobs").mkdir(parents=True, exist_ok=True)
    (storage / "refs").mkdir(exist_ok=True)
    (storage / "refs" / "main").write_text(commit)
    snapshot = storage / "snapshots" / commit
    for rel, data in files.items():
        lfs = rel.endswith(".gguf")
        blob = storage / "blobs" / (hashlib.sha256(data).hexdigest() if lfs else _git_blob_sha1(data))
        blob.write_bytes(data)
        link = snapshot / rel
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))
    if tree is not None:
        listing = {}
        for rel, data in sorted(tree.items()):
            info = {"size": len(data), "blob_id": _git_blob_sha1(data)}
            if rel.endswith(".gguf"):
                info.update(lfs_sha256=hashlib.sha256(data).hexdigest(), lfs_size=len(data))
            listing[rel] = info
        (storage / "trees").mkdir(exist_ok=True)
        (storage / "trees" / f"{commit}.json").write_text(json.dumps({"format_version": 1, "files": listing}))
    return snapshot


@pytest.fixture(autouse=True)
def no_network(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*args, **kwargs):
        raise OSError("network access attempted in a test")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


@pytest.fixture
def hub(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A tmp HF_HOME whose hub cache holds the GGUF release; offline. Returns the cache directory."""
    home = tmp_path / "hf-home"
    cache = home / "hub"
    for var in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE", "TRANSFORMERS_OFFLINE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HF_HOME", str(home))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    make_hub_cache(cache, GGUF_REPO, GGUF_FILES)
    return cache


@pytest.fixture
def calls(monkeypatch: pytest.MonkeyPatch) -> list[dict]:
    """Records the arguments of every snapshot_download call; the real function still runs."""
    import huggingface_hub

    real = huggingface_hub.snapshot_download
    seen: list[dict] = []

    def spy(repo_id, **kwargs):
        seen.append({"repo_id": repo_id, **kwargs})
        return real(repo_id, **kwargs)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", spy)
    return seen


# --- the fake cache is a real one -------------------------------------------------------------------

def test_fake_cache_reads_as_huggingface_hub_cache(hub: Path) -> None:
    info = scan_cache_dir(hub)
    assert info.warnings == []
    (repo,) = info.repos
    assert repo.repo_id == GGUF_REPO and repo.repo_type == "model"
    (revision,) = repo.revisions
    assert revision.commit_hash == COMMIT and revision.refs == frozenset({"main"})
    assert {f.file_name for f in revision.files} == set(GGUF_FILES)
    cached = try_to_load_from_cache(GGUF_REPO, "Skywork-R1V3-38B-Q8_0.gguf", cache_dir=hub)
    assert Path(cached).read_bytes() == GGUF_FILES["Skywork-R1V3-38B-Q8_0.gguf"]


# --- registry names through the hub cache -------------------------------------------------------------

def test_registry_name_offline_q4(hub: Path, calls: list[dict]) -> None:
    # cache directory and offline mode come from HF_HOME / HF_HUB_OFFLINE as set now, after import
    r = resolve_model("Skywork-R1V3-38B-GGUF", quant="Q4_K_M")
    snapshot = hub / "models--Skywork--Skywork-R1V3-38B-GGUF" / "snapshots" / COMMIT
    assert isinstance(r, ResolvedModel)
    assert r.format == "gguf" and r.quant == "q4_k_m"
    assert r.path == snapshot / "Skywork-R1V3-38B-Q4_K_M.gguf"
    assert r.mmproj == snapshot / "mmproj-Skywork-R1V3-38B-f16.gguf"
    assert r.path.read_bytes() == GGUF_FILES["Skywork-R1V3-38B-Q4_K_M.gguf"]  # symlink into blobs
    assert r.entry is not None and r.entry.repo_id == GGUF_REPO and r.source == "Skywork-R1V3-38B-GGUF"
    entry = load_registry().get("skywork-r1v3-38b-gguf")
    (call,) = calls
    assert call["repo_id"] == GGUF_REPO
    assert call["allow_patterns"] == entry.allow_patterns("q4_k_m")
    assert call["local_files_only"] is True
    assert Path(call["cache_dir"]) == hub


def test_registry_name_default_quant_and_q8(hub: Path) -> None:
    assert resolve_model("skywork-r1v3-38b-gguf").path.name == "Skywork-R1V3-38B-Q4_K_M.gguf"
    r = resolve_model("skywork-r1v3-38b-gguf", quant="q8_0", cache_dir=hub)
    assert r.path.name == "Skywork-R1V3-38B-Q8_0.gguf" and r.quant == "q8_0"
    assert r.mmproj is not None and r.mmproj.name == "mmproj-Skywork-R1V3-38B-f16.gguf"
    # the repo id is accepted as a name too
    assert resolve_model(GGUF_REPO, quant="q8_0").path == r.path


def test_offline_argument_and_explicit_cache_dir(hub: Path, calls: list[dict], monkeypatch) -> None:
    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.setenv("HF_HOME", str(hub.parent / "elsewhere"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    r = resolve_model("skywork-r1v3-38b-gguf", quant="q8_0", cache_dir=hub, offline=True)
    assert r.path.name == "Skywork-R1V3-38B-Q8_0.gguf"
    assert calls[-1]["local_files_only"] is True and Path(calls[-1]["cache_dir"]) == hub


def test_huggingface_hub_offline_constant_honoured(hub: Path, calls: list[dict], monkeypatch) -> None:
    # HF_HUB_OFFLINE set before huggingface_hub was imported lives only in its constants
    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    resolve_model("skywork-r1v3-38b-gguf")
    assert calls[-1]["local_files_only"] is True


def test_uncached_model_offline_says_how_to_fetch(hub: Path) -> None:
    with pytest.raises(ModelNotAvailable) as info:
        resolve_model("skywork-r1v3-38b-awq")
    e = info.value
    assert isinstance(e, FileNotFoundError)
    assert isinstance(e.__cause__, LocalEntryNotFoundError)
    message = str(e)
    assert "'skywork-r1v3-38b-awq'" in message and "Skywork/Skywork-R1V3-38B-AWQ" in message
    assert str(hub) in message and "HF_HUB_OFFLINE" in message
    command = (
        "hf download Skywork/Skywork-R1V3-38B-AWQ --include '*.json' --include '*.safetensors' "
        f"--include '*.txt' --include '*.jinja' --include 'tokenizer*' --cache-dir {hub}"
    )
    assert command in message
    assert e.command == command and e.repo_id == "Skywork/Skywork-R1V3-38B-AWQ" and e.cache_dir == str(hub)
    assert not (hub / "models--Skywork--Skywork-R1V3-38B-AWQ").exists()  # nothing was fetched or created


def test_online_failure_is_wrapped_with_cause(hub: Path, monkeypatch) -> None:
    # offline=False makes snapshot_download ask the Hub; huggingface-hub's own offline switch refuses the call
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(ModelNotAvailable) as info:
        resolve_model("skywork-r1v3-38b-awq", offline=False, cache_dir=hub)
    assert "download failed" in str(info.value) and "OfflineModeIsEnabled" in str(info.value)
    assert isinstance(info.value.__cause__, LocalEntryNotFoundError)
    assert "hf download Skywork/Skywork-R1V3-38B-AWQ" in str(info.value)


def test_allow_patterns_decide_completeness_of_cached_snapshot(tmp_path: Path, monkeypatch) -> None:
    """With the repo's tree listing cached, offline snapshot_download checks the files the patterns select:
    a snapshot holding Q4_K_M but not Q8_0 is complete for q4_k_m and incomplete for q8_0."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    cache = tmp_path / "hub"
    cached = {k: v for k, v in GGUF_FILES.items() if "Q8_0" not in k}
    make_hub_cache(cache, GGUF_REPO, cached, tree=GGUF_FILES)
    r = resolve_model("skywork-r1v3-38b-gguf", quant="q4_k_m", cache_dir=cache)
    assert r.path.name == "Skywork-R1V3-38B-Q4_K_M.gguf" and r.mmproj is not None
    with pytest.raises(ModelNotAvailable) as info:
        resolve_model("skywork-r1v3-38b-gguf", quant="q8_0", cache_dir=cache)
    assert isinstance(info.value.__cause__, IncompleteSnapshotError)
    assert "--include '*[Qq]8_0*.gguf'" in str(info.value)


def test_quant_missing_from_snapshot_without_tree_listing(tmp_path: Path, monkeypatch) -> None:
    # no tree listing: huggingface-hub returns the snapshot folder as is; resolution notices the gap
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    cache = tmp_path / "hub"
    make_hub_cache(cache, GGUF_REPO, {k: v for k, v in GGUF_FILES.items() if "Q8_0" not in k})
    with pytest.raises(ModelNotAvailable, match=r"no GGUF file for quant 'q8_0'") as info:
        resolve_model("skywork-r1v3-38b-gguf", quant="q8_0", cache_dir=cache)
    assert "hf download Skywork/Skywork-R1V3-38B-GGUF --include '*.md'" in str(info.value)


REGISTRY_YAML = f"""
models:
  r1v3-gguf-text:
    repo_id: {GGUF_REPO}
    family: skywork_chat
    format: gguf
    chat_template: chatml-think
    pre_tokenizer: qwen2
    files: ["*.md"]
    default_quant: q4_k_m
    quants:
      q4_k_m: ["*Q4_K_M.gguf"]
"""


def test_files_outside_the_patterns_are_not_used(hub: Path, calls: list[dict]) -> None:
    # the snapshot folder holds an mmproj, but this entry's patterns do not ask for one: text-only
    registry = parse_registry(REGISTRY_YAML, "test.yaml")
    r = resolve_model("r1v3-gguf-text", registry=registry)
    assert r.path.name == "Skywork-R1V3-38B-Q4_K_M.gguf" and r.mmproj is None
    assert calls[-1]["allow_patterns"] == ["*.md", "*Q4_K_M.gguf"]


def test_bad_quant_for_registry_entries(hub: Path) -> None:
    with pytest.raises(RegistryError, match="q4_k_m"):
        resolve_model("skywork-r1v3-38b-gguf", quant="q2_k")
    with pytest.raises(ValueError, match="no quant types"):
        resolve_model("skywork-r1v3-38b-awq", quant="q4_k_m")


def test_unknown_name_lists_known_names(hub: Path) -> None:
    with pytest.raises(ModelNotFoundError) as info:
        resolve_model("skywork-r9v-1t")
    assert isinstance(info.value, FileNotFoundError)
    message = str(info.value)
    assert "'skywork-r9v-1t'" in message
    for name in load_registry().models:
        assert name in message


# --- local files and directories -----------------------------------------------------------------------

def _touch(directory: Path, *names: str) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    for name in names:
        (directory / name).write_bytes(b"GGUF" + name.encode())


def test_gguf_file_finds_mmproj_beside_it(tmp_path: Path) -> None:
    _touch(tmp_path, "tiny-q4_k_m.gguf", "tiny-q8_0.gguf", "mmproj-tiny-f16.gguf", "mmproj-tiny-q8_0.gguf")
    r = resolve_model(tmp_path / "tiny-q4_k_m.gguf")
    assert (r.format, r.quant, r.entry) == ("gguf", "q4_k_m", None)
    assert r.path == tmp_path / "tiny-q4_k_m.gguf" and r.mmproj == tmp_path / "mmproj-tiny-f16.gguf"
    # same quant first
    assert resolve_model(str(tmp_path / "tiny-q8_0.gguf")).mmproj == tmp_path / "mmproj-tiny-q8_0.gguf"
    # mmproj-<stem>.gguf before anything else
    _touch(tmp_path, "mmproj-tiny-q4_k_m.gguf")
    assert resolve_model(tmp_path / "tiny-q4_k_m.gguf").mmproj == tmp_path / "mmproj-tiny-q4_k_m.gguf"
    # given explicitly
    _touch(tmp_path / "other", "proj.gguf")
    r = resolve_model(tmp_path / "tiny-q4_k_m.gguf", mmproj=tmp_path / "other" / "proj.gguf")
    assert r.mmproj == tmp_path / "other" / "proj.gguf"
    with pytest.raises(ModelNotFoundError, match="mmproj file"):
        resolve_model(tmp_path / "tiny-q4_k_m.gguf", mmproj=tmp_path / "missing.gguf")


def test_gguf_file_mmproj_choice(tmp_path: Path) -> None:
    _touch(tmp_path / "a", "m-q4_k_m.gguf")  # text-only
    assert resolve_model(tmp_path / "a" / "m-q4_k_m.gguf").mmproj is None
    _touch(tmp_path / "b", "m-q4_k_m.gguf", "mmproj-model-q8_0.gguf")  # the only one
    assert resolve_model(tmp_path / "b" / "m-q4_k_m.gguf").mmproj == tmp_path / "b" / "mmproj-model-q8_0.gguf"
    _touch(tmp_path / "c", "m-q4_k_m.gguf", "mmproj-m-q8_0.gguf", "mmproj-m-f32.gguf")  # nothing decides
    with pytest.raises(AmbiguousModelError, match="mmproj-m-f32.gguf, mmproj-m-q8_0.gguf"):
        resolve_model(tmp_path / "c" / "m-q4_k_m.gguf")
    _touch(tmp_path / "d", "m-Q4_K_M.gguf", "m-mmproj-f16.gguf", "other-mmproj-Q4_K_M.gguf")  # same name first
    assert resolve_model(tmp_path / "d" / "m-Q4_K_M.gguf").mmproj == tmp_path / "d" / "m-mmproj-f16.gguf"


def test_directory_of_ggufs(tmp_path: Path) -> None:
    _touch(tmp_path, "tiny-q4_k_m.gguf", "tiny-q8_0.gguf", "mmproj-tiny-f16.gguf")
    with pytest.raises(AmbiguousModelError) as info:
        resolve_model(tmp_path)
    assert "tiny-q4_k_m.gguf" in str(info.value) and "tiny-q8_0.gguf" in str(info.value)
    assert "q4_k_m, q8_0" in str(info.value)
    r = resolve_model(tmp_path, quant="Q8_0")
    assert r.path == tmp_path / "tiny-q8_0.gguf" and r.mmproj == tmp_path / "mmproj-tiny-f16.gguf"
    with pytest.raises(ModelNotFoundError, match="no GGUF file for quant 'q6_k'; it has: tiny-q4_k_m.gguf"):
        resolve_model(tmp_path, quant="q6_k")
    (tmp_path / "tiny-q8_0.gguf").unlink()
    assert resolve_model(tmp_path).path == tmp_path / "tiny-q4_k_m.gguf"


def test_split_gguf_counts_once(tmp_path: Path) -> None:
    _touch(tmp_path, "big-Q8_0-00001-of-00002.gguf", "big-Q8_0-00002-of-00002.gguf")
    r = resolve_model(tmp_path)
    assert r.path.name == "big-Q8_0-00001-of-00002.gguf" and r.quant == "q8_0"


def _config(directory: Path, **extra) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    config = {"architectures": ["SkyworkR1VChatModel"], "model_type": "skywork_chat", **extra}
    (directory / "config.json").write_text(json.dumps(config))


def test_awq_directory(tmp_path: Path) -> None:
    _config(tmp_path, architectures=["InternVLChatModel"], model_type="internvl_chat",
            quantization_config={"quant_method": "awq", "bits": 4, "group_size": 128})
    (tmp_path / "model.safetensors").write_bytes(b"")
    r = resolve_model(tmp_path)
    assert (r.format, r.path, r.mmproj, r.quant) == ("awq", tmp_path, None, None)
    with pytest.raises(ValueError, match="GGUF models only"):
        resolve_model(tmp_path, mmproj=tmp_path / "x.gguf")


def test_checkpoint_directory(tiny_300m: Path) -> None:
    r = resolve_model(tiny_300m)
    assert (r.format, r.path, r.mmproj) == ("safetensors", tiny_300m, None)


def test_checkpoint_directory_checks(tmp_path: Path) -> None:
    _config(tmp_path / "noweights")
    with pytest.raises(ModelNotFoundError, match="no .safetensors"):
        resolve_model(tmp_path / "noweights")
    _config(tmp_path / "sharded")
    index = {"weight_map": {"a": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors"}}
    (tmp_path / "sharded" / "model.safetensors.index.json").write_text(json.dumps(index))
    (tmp_path / "sharded" / "model-00001-of-00002.safetensors").write_bytes(b"")
    with pytest.raises(ModelNotFoundError, match="model-00002-of-00002.safetensors"):
        resolve_model(tmp_path / "sharded")
    _config(tmp_path / "llama", architectures=["LlamaForCausalLM"], model_type="llama")
    with pytest.raises(ModelNotFoundError, match="not a Skywork-R1V"):
        resolve_model(tmp_path / "llama")
    # a checkpoint directory that also holds converted GGUF files: quant= asks for them
    _config(tmp_path / "both")
    (tmp_path / "both" / "model.safetensors").write_bytes(b"")
    _touch(tmp_path / "both", "both-q4_k_m.gguf")
    assert resolve_model(tmp_path / "both").format == "safetensors"
    assert resolve_model(tmp_path / "both", quant="q4_k_m").format == "gguf"


def test_not_a_model(tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("hi")
    with pytest.raises(ModelNotFoundError, match="not a .gguf file"):
        resolve_model(tmp_path / "notes.txt")
    with pytest.raises(ModelNotFoundError, match="holds no GGUF model"):
        resolve_model(tmp_path)
    with pytest.raises(ModelNotFoundError, match="neither an existing file"):
        resolve_model(tmp_path / "missing.gguf")


# --- names built locally ------------------------------------------------------------------------------

def test_local_models_hook(tmp_path: Path, hub: Path, calls: list[dict], monkeypatch) -> None:
    asked: list[str | None] = []

    def build(quant: str | None) -> Path:
        asked.append(quant)
        _touch(tmp_path / "micro", "micro-r1v-q8_0.gguf", "micro-r1v-f16.gguf", "mmproj-micro-r1v-f16.gguf")
        return tmp_path / "micro"

    monkeypatch.setitem(LOCAL_MODELS, "micro-r1v", build)
    r = resolve_model("Micro-R1V", quant="q8_0")
    assert asked == ["q8_0"] and calls == []  # consulted before the hub
    assert r.path.name == "micro-r1v-q8_0.gguf" and r.mmproj.name == "mmproj-micro-r1v-f16.gguf"
    assert r.source == "Micro-R1V"
    with pytest.raises(ModelNotFoundError, match="micro-r1v"):  # listed among known names
        resolve_model("nano-r1v")
    # it also wins over a registry entry of the same name
    monkeypatch.setitem(LOCAL_MODELS, "skywork-r1v3-38b-gguf", lambda q: tmp_path / "micro" / "micro-r1v-f16.gguf")
    r = resolve_model("skywork-r1v3-38b-gguf")
    assert r.path.name == "micro-r1v-f16.gguf" and r.entry is not None and r.entry.repo_id == GGUF_REPO
    assert calls == []


def test_register_local_model(monkeypatch) -> None:
    monkeypatch.setattr(resolve, "LOCAL_MODELS", {})
    resolve.register_local_model("Demo", lambda q: Path("/nowhere"))
    assert list(resolve.LOCAL_MODELS) == ["demo"]
