"""Any Hugging Face repo by name (`Org/Repo`, `Org/Repo:Q4_K_M`), not only models.yaml names; `r1v plan` and
`r1v inspect` of a name fetch only config.json (and the tokenizer files).

No network: repos live in a hub cache laid out as huggingface-hub writes it (test_resolve.make_hub_cache), read
offline through huggingface-hub's own code; the online path runs against a recorded file list and a download
function that copies the files it is asked for into that cache, so the tests see exactly what was requested.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from huggingface_hub import constants
from huggingface_hub.utils import filter_repo_objects
from test_resolve import COMMIT, calls, make_hub_cache, no_network  # noqa: F401  (no_network: autouse, sockets refuse; calls: a fixture)

from r1v.cli import main as cli_main
from r1v.runtime.files.registry import load_registry
from r1v.runtime.files.resolve import (
    CHECKPOINT_FILES,
    CONFIG_FILES,
    TOKENIZER_FILES,
    AmbiguousModelError,
    ModelNotAvailable,
    ModelNotFoundError,
    choose_repo_files,
    fetch_config,
    resolve_model,
)

REPO = "Someone/R1V-Mix-GGUF"
G = b"GGUF\x03\x00\x00\x00"
MIX = {
    "README.md": b"# a community quant set\n",
    "R1V-Mix-Q2_K.gguf": G + b"q2_k",
    "R1V-Mix-Q4_K_M.gguf": G + b"q4_k_m",
    "R1V-Mix-Q8_0.gguf": G + b"q8_0",
    "mmproj-R1V-Mix-f16.gguf": G + b"mmproj f16",
    "mmproj-R1V-Mix-f32.gguf": G + b"mmproj f32",
}


@pytest.fixture
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty hub cache as HF_HOME/hub; offline."""
    home = tmp_path / "hf-home"
    for var in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE", "TRANSFORMERS_OFFLINE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HF_HOME", str(home))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    (home / "hub").mkdir(parents=True)
    return home / "hub"


@pytest.fixture
def hub_online(cache: Path, monkeypatch: pytest.MonkeyPatch):
    """Online mode against fake remote repos: `remote[repo_id] = {path: bytes}`. The Hub's file list comes from
    it, and a download writes the files its allow_patterns select into the cache (as huggingface-hub would).
    Returns (remote, requests): requests records ("list", repo) and ("download", repo, patterns)."""
    import huggingface_hub

    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    remote: dict[str, dict[str, bytes]] = {}
    requests: list[tuple] = []

    def list_repo_files(self, repo_id, **kwargs):
        requests.append(("list", repo_id))
        return sorted(remote[repo_id])

    def snapshot_download(repo_id, *, allow_patterns=None, cache_dir=None, local_files_only=False, **kwargs):
        assert local_files_only is False
        requests.append(("download", repo_id, list(allow_patterns)))
        files = remote[repo_id]
        wanted = set(filter_repo_objects(sorted(files), allow_patterns=allow_patterns))
        snapshot = Path(cache_dir) / f"models--{repo_id.replace('/', '--')}" / "snapshots" / COMMIT
        new = {k: v for k, v in files.items() if k in wanted and not (snapshot / k).exists()}
        return str(make_hub_cache(Path(cache_dir), repo_id, new))

    monkeypatch.setattr(huggingface_hub.HfApi, "list_repo_files", list_repo_files)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    return remote, requests


def _snapshot(cache: Path, repo_id: str) -> Path:
    return cache / f"models--{repo_id.replace('/', '--')}" / "snapshots" / COMMIT


# --- GGUF repos --------------------------------------------------------------------------------------------

def test_any_gguf_repo_default_quant_offline(cache: Path, calls: list[dict]) -> None:
    make_hub_cache(cache, REPO, MIX, tree=MIX)
    r = resolve_model(REPO)
    snapshot = _snapshot(cache, REPO)
    assert (r.format, r.quant, r.entry) == ("gguf", "q4_k_m", None)
    assert r.path == snapshot / "R1V-Mix-Q4_K_M.gguf" and r.path.read_bytes() == MIX["R1V-Mix-Q4_K_M.gguf"]
    assert r.mmproj == snapshot / "mmproj-R1V-Mix-f16.gguf"  # f16 before f32 when no projector has the quant
    assert r.note == (f"{REPO}: picked Q4_K_M (R1V-Mix-Q4_K_M.gguf) by the default order Q4_K_M > Q4_K_S > Q5_K_M > "
                      "Q5_K_S > ...; the repo also has Q2_K, Q8_0; projector mmproj-R1V-Mix-f16.gguf")
    (call,) = calls  # only the chosen LLM file and its projector, by exact name
    assert call["allow_patterns"] == ["R1V-Mix-Q4_K_M.gguf", "mmproj-R1V-Mix-f16.gguf"]
    assert call["local_files_only"] is True and Path(call["cache_dir"]) == cache


def test_quant_tag_and_quant_option(cache: Path, calls: list[dict]) -> None:
    make_hub_cache(cache, REPO, MIX, tree=MIX)
    tagged = resolve_model(f"{REPO}:Q8_0")
    assert tagged.path.name == "R1V-Mix-Q8_0.gguf" and tagged.quant == "q8_0" and tagged.source == f"{REPO}:Q8_0"
    assert "picked Q8_0 (R1V-Mix-Q8_0.gguf) as asked" in tagged.note
    assert resolve_model(REPO, quant="q8_0").path == tagged.path  # quant= is the same, in any case
    assert resolve_model(f"{REPO}:q8_0", quant="Q8_0").path == tagged.path
    assert calls[0]["allow_patterns"] == ["R1V-Mix-Q8_0.gguf", "mmproj-R1V-Mix-f16.gguf"]
    with pytest.raises(ValueError, match=r"asks for quant 'Q8_0' but quant='q4_k_m' was given too"):
        resolve_model(f"{REPO}:Q8_0", quant="q4_k_m")
    # the tag works for models.yaml names and repo ids of the registry too
    registry_repo = "Skywork/Skywork-R1V3-38B-GGUF"
    make_hub_cache(cache, registry_repo, {"R-Q8_0.gguf": G + b"8", "mmproj-R-f16.gguf": G + b"p"})
    assert resolve_model(f"{registry_repo}:Q8_0").path.name == "R-Q8_0.gguf"
    assert resolve_model("skywork-r1v3-38b-gguf:Q8_0").entry.name == "skywork-r1v3-38b-gguf"


def test_quant_tag_on_a_local_directory(tmp_path: Path) -> None:
    for name, data in MIX.items():
        (tmp_path / name).write_bytes(data)
    r = resolve_model(f"{tmp_path}:q2_k")
    assert (r.path, r.mmproj) == (tmp_path / "R1V-Mix-Q2_K.gguf", tmp_path / "mmproj-R1V-Mix-f16.gguf")
    with pytest.raises(AmbiguousModelError, match="pass quant= one of q2_k, q4_k_m, q8_0"):
        resolve_model(tmp_path)


def test_explicit_mmproj_fetches_no_projector(cache: Path, calls: list[dict], tmp_path: Path) -> None:
    make_hub_cache(cache, REPO, MIX, tree=MIX)
    projector = tmp_path / "mine.gguf"
    projector.write_bytes(G)
    r = resolve_model(REPO, quant="Q2_K", mmproj=projector)
    assert r.path.name == "R1V-Mix-Q2_K.gguf" and r.mmproj == projector
    assert calls[-1]["allow_patterns"] == ["R1V-Mix-Q2_K.gguf"]


def test_missing_quant_lists_what_the_repo_has(cache: Path, calls: list[dict]) -> None:
    make_hub_cache(cache, REPO, MIX, tree=MIX)
    with pytest.raises(ModelNotFoundError) as info:
        resolve_model(f"{REPO}:Q5_K_M")
    assert str(info.value) == f"Hugging Face repo {REPO} has no GGUF file for quant 'Q5_K_M'; it has: Q2_K, Q4_K_M, Q8_0"
    assert calls == []  # decided from the file list: nothing fetched


def test_listed_but_not_cached_quant_offline_says_how_to_fetch(cache: Path) -> None:
    # the cached tree listing knows Q8_0; the snapshot holds only Q4_K_M and the f16 projector
    make_hub_cache(cache, REPO, {k: v for k, v in MIX.items() if "Q8_0" not in k}, tree=MIX)
    assert resolve_model(REPO).path.name == "R1V-Mix-Q4_K_M.gguf"
    with pytest.raises(ModelNotAvailable) as info:
        resolve_model(f"{REPO}:Q8_0")
    assert e_command(info.value) == (f"hf download {REPO} --include R1V-Mix-Q8_0.gguf --include mmproj-R1V-Mix-f16.gguf "
                                     f"--cache-dir {cache}")
    assert "unset HF_HUB_OFFLINE" in str(info.value)


def e_command(error: ModelNotAvailable) -> str:
    assert error.command in str(error)
    return error.command


def test_uncached_repo_offline(cache: Path) -> None:
    with pytest.raises(ModelNotAvailable) as info:
        resolve_model("Someone/Elsewhere-GGUF:Q4_K_M")
    assert "Hugging Face repo Someone/Elsewhere-GGUF is not available: it is not in the cache and downloads are off" \
        in str(info.value)
    assert e_command(info.value) == (f"hf download Someone/Elsewhere-GGUF --include '*[Qq]4_[Kk]_[Mm]*.gguf' "
                                     f"--include '*mmproj*.gguf' --cache-dir {cache}")


def test_snapshot_without_tree_listing(cache: Path) -> None:
    # a cache written by an older huggingface-hub (no trees/): the snapshot's own files are the listing
    make_hub_cache(cache, REPO, {"R1V-Mix-Q8_0.gguf": MIX["R1V-Mix-Q8_0.gguf"]})
    r = resolve_model(REPO)
    assert r.path.name == "R1V-Mix-Q8_0.gguf" and r.mmproj is None
    assert "picked Q8_0 (R1V-Mix-Q8_0.gguf) the only one" in r.note


@pytest.mark.parametrize(("files", "quant", "picked", "why"), [
    (["a-Q8_0.gguf", "a-F16.gguf", "a-Q2_K.gguf"], None, ["a-Q8_0.gguf"], "by the default order"),
    (["a-BF16.gguf", "a-F32.gguf"], None, ["a-BF16.gguf"], "by the default order"),
    (["x.gguf"], None, ["x.gguf"], "the only one"),
    (["Q4_K_M/a-Q4_K_M-00001-of-00002.gguf", "Q4_K_M/a-Q4_K_M-00002-of-00002.gguf", "a-Q8_0.gguf"], None,
     ["Q4_K_M/a-Q4_K_M-00001-of-00002.gguf", "Q4_K_M/a-Q4_K_M-00002-of-00002.gguf"], "by the default order"),
    (["a-IQ2_XXS.gguf", "a-q6_k.gguf"], "Q6_K", ["a-q6_k.gguf"], "as asked"),
])
def test_choose_repo_files_order(files: list[str], quant: str | None, picked: list[str], why: str) -> None:
    choice = choose_repo_files("o/r", ["README.md", *files], quant)
    assert choice.format == "gguf" and choice.files == picked and why in choice.note


def test_choose_repo_files_errors() -> None:
    with pytest.raises(AmbiguousModelError, match=r"several GGUF quants \(IQ1_S, IQ2_XXS\) and none of the default "
                                                  r"order; add one: o/r:QUANT"):
        choose_repo_files("o/r", ["a-IQ1_S.gguf", "a-IQ2_XXS.gguf"], None)
    with pytest.raises(ModelNotFoundError, match=r"^Hugging Face repo o/r holds neither GGUF files nor a safetensors "
                                                 r"checkpoint \(config.json \+ \*.safetensors\); it has: README.md, "
                                                 r"model.bin$"):
        choose_repo_files("o/r", ["README.md", "model.bin"], None)
    with pytest.raises(ModelNotFoundError, match="has no GGUF files, so no quant 'Q4_K_M'"):
        choose_repo_files("o/r", ["README.md"], "Q4_K_M")
    with pytest.raises(ModelNotFoundError, match="is a safetensors checkpoint without GGUF files; drop the quant"):
        choose_repo_files("o/r", ["config.json", "model.safetensors"], "Q4_K_M")
    # a checkpoint repo that also holds GGUF files: the checkpoint, unless a quant is asked for
    both = ["config.json", "model.safetensors", "m-Q4_K_M.gguf"]
    assert choose_repo_files("o/r", both, None).files == CHECKPOINT_FILES
    assert choose_repo_files("o/r", both, "q4_k_m").files == ["m-Q4_K_M.gguf"]


def test_bad_names(cache: Path) -> None:
    with pytest.raises(ModelNotFoundError, match=r"'Some one/Repo' is no existing path and not a valid Hugging Face "
                                                 r"repo id: Repo id must use alphanumeric chars"):
        resolve_model("Some one/Repo")
    with pytest.raises(ModelNotFoundError, match="Cannot have -- or .."):
        resolve_model("Org/a--b")
    with pytest.raises(ValueError, match=r"'latest' after ':' is not a GGUF quant type \(e.g. Q4_K_M, Q8_0, F16\)"):
        resolve_model(f"{REPO}:latest")
    # path-like texts are missing files, not repo ids
    for text in ("./Org/Repo", "models/x.gguf", "a/b/c"):
        with pytest.raises(ModelNotFoundError, match="neither an existing file or directory") as info:
            resolve_model(text)
        assert "Org/Repo[:QUANT]" in str(info.value)


# --- checkpoint repos --------------------------------------------------------------------------------------

def _checkpoint_files(directory: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir()) if p.is_file()}


def test_any_checkpoint_repo_config_first(cache: Path, calls: list[dict], tiny_300m: Path) -> None:
    files = _checkpoint_files(tiny_300m)
    make_hub_cache(cache, "Someone/tiny-r1v", files, tree=files)
    r = resolve_model("Someone/tiny-r1v")
    assert (r.format, r.path, r.mmproj, r.quant) == ("safetensors", _snapshot(cache, "Someone/tiny-r1v"), None, None)
    assert r.note == "Someone/tiny-r1v: the safetensors checkpoint"
    assert [c["allow_patterns"] for c in calls] == [CONFIG_FILES, CHECKPOINT_FILES]


def test_any_awq_repo(cache: Path, calls: list[dict], tiny_300m: Path) -> None:
    files = _checkpoint_files(tiny_300m)
    config = json.loads(files["config.json"])
    config["quantization_config"] = {"quant_method": "awq", "bits": 4, "group_size": 128, "version": "gemm"}
    files["config.json"] = json.dumps(config).encode()
    files["R1V-Q4_K_M.gguf"] = G + b"also converted"  # GGUF files beside a checkpoint: used only when asked for
    make_hub_cache(cache, "Someone/tiny-r1v-AWQ", files, tree=files)
    r = resolve_model("Someone/tiny-r1v-AWQ")
    assert (r.format, r.note) == ("awq", "Someone/tiny-r1v-AWQ: the awq checkpoint")
    assert [c["allow_patterns"] for c in calls] == [CONFIG_FILES, CHECKPOINT_FILES]
    assert resolve_model("Someone/tiny-r1v-AWQ:Q4_K_M").path.name == "R1V-Q4_K_M.gguf"


def test_checkpoint_repo_of_another_model_fetches_only_config(cache: Path, hub_online) -> None:
    remote, requests = hub_online
    remote["Meta/Llama"] = {"config.json": json.dumps({"architectures": ["LlamaForCausalLM"]}).encode(),
                            "model.safetensors": b"big", "tokenizer.json": b"{}"}
    with pytest.raises(ModelNotFoundError, match=r"^Hugging Face repo Meta/Llama: .*config.json is not a Skywork-R1V / "
                                                 r"InternVL-chat checkpoint \(\['LlamaForCausalLM'\]\); r1v runs only "
                                                 r"those$"):
        resolve_model("Meta/Llama")
    assert requests == [("list", "Meta/Llama"), ("download", "Meta/Llama", ["config.json"])]
    assert not (_snapshot(cache, "Meta/Llama") / "model.safetensors").exists()


def test_online_gguf_repo_downloads_one_quant(cache: Path, hub_online) -> None:
    remote, requests = hub_online
    remote[REPO] = MIX
    r = resolve_model(f"{REPO}:Q2_K")
    assert r.path.name == "R1V-Mix-Q2_K.gguf" and r.mmproj.name == "mmproj-R1V-Mix-f16.gguf"
    assert requests == [("list", REPO), ("download", REPO, ["R1V-Mix-Q2_K.gguf", "mmproj-R1V-Mix-f16.gguf"])]
    assert sorted(p.name for p in _snapshot(cache, REPO).iterdir()) == ["R1V-Mix-Q2_K.gguf", "mmproj-R1V-Mix-f16.gguf"]


def test_online_repo_not_found(cache: Path, hub_online, monkeypatch) -> None:
    import huggingface_hub
    from huggingface_hub.errors import RepositoryNotFoundError
    from httpx2 import Request, Response  # huggingface-hub's own HTTP client

    def missing(self, repo_id, **kwargs):
        request = Request("GET", f"https://huggingface.co/api/models/{repo_id}")
        raise RepositoryNotFoundError("404 Client Error", response=Response(404, request=request))

    monkeypatch.setattr(huggingface_hub.HfApi, "list_repo_files", missing)
    with pytest.raises(ModelNotFoundError, match=r"^there is no Hugging Face repo 'No/Such' \(or it is private: "
                                                 r"`hf auth login`\), and no file or directory of that name$"):
        resolve_model("No/Such")


def test_online_hub_unreachable_falls_back_to_the_cache(cache: Path, hub_online, monkeypatch) -> None:
    import huggingface_hub
    from httpx2 import ConnectError

    def unreachable(self, repo_id, **kwargs):
        raise ConnectError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(huggingface_hub.HfApi, "list_repo_files", unreachable)
    with pytest.raises(ModelNotAvailable, match=r"its file list could not be fetched \(ConnectError: \[Errno -3\] "
                                                r"Temporary failure in name resolution\)"):
        resolve_model(f"{REPO}:Q8_0")
    make_hub_cache(cache, REPO, MIX, tree=MIX)  # cached before: the cached listing answers
    monkeypatch.setattr(huggingface_hub, "snapshot_download", lambda repo_id, **kw: str(_snapshot(cache, repo_id)))
    assert resolve_model(f"{REPO}:Q8_0").path == _snapshot(cache, REPO) / "R1V-Mix-Q8_0.gguf"


# --- config.json only: r1v plan / r1v inspect ----------------------------------------------------------------

def test_fetch_config_requests_only_config(cache: Path, hub_online, tiny_300m: Path) -> None:
    remote, requests = hub_online
    remote["Skywork/Skywork-R1V3-38B"] = _checkpoint_files(tiny_300m)
    path = fetch_config("skywork-r1v3-38b")
    assert requests == [("download", "Skywork/Skywork-R1V3-38B", ["config.json"])]
    assert sorted(p.name for p in path.iterdir()) == ["config.json"]
    # a GGUF release is answered by its base checkpoint's config; the quant tag changes nothing
    assert fetch_config("Skywork/Skywork-R1V3-38B-GGUF:Q8_0") == path
    assert requests[-1] == ("download", "Skywork/Skywork-R1V3-38B", ["config.json"])
    # inspect adds the tokenizer files, never weights
    fetch_config("Skywork/Skywork-R1V3-38B", tokenizer=True)
    assert requests[-1] == ("download", "Skywork/Skywork-R1V3-38B", CONFIG_FILES + TOKENIZER_FILES)
    assert not any(p.suffix == ".safetensors" for p in path.iterdir())


def test_fetch_config_errors(cache: Path, hub_online) -> None:
    remote, _ = hub_online
    remote[REPO] = MIX
    with pytest.raises(ModelNotFoundError, match=rf"^Hugging Face repo {REPO} has no config.json \(a GGUF-only "
                                                 r"release\?\)"):
        fetch_config(REPO)
    with pytest.raises(ModelNotFoundError, match="neither an existing file or directory nor a models.yaml name"):
        fetch_config("no-such-model")


def _cache_checkpoint_config(cache: Path, repo_id: str, checkpoint: Path) -> None:
    files = {k: v for k, v in _checkpoint_files(checkpoint).items() if not k.endswith(".safetensors")
             and k != "model.safetensors.index.json"}
    make_hub_cache(cache, repo_id, files)


def test_cli_plan_and_inspect_by_name_offline(cache: Path, tiny_300m: Path, capsys) -> None:
    _cache_checkpoint_config(cache, "Someone/tiny-r1v", tiny_300m)
    assert cli_main(["plan", "Someone/tiny-r1v", "--json"]) == 0
    by_name = json.loads(capsys.readouterr().out)
    assert cli_main(["plan", str(tiny_300m), "--json"]) == 0
    assert by_name == json.loads(capsys.readouterr().out)  # the same plan as from the full checkpoint

    assert cli_main(["inspect", "Someone/tiny-r1v", "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert cli_main(["inspect", str(tiny_300m), "--json"]) == 0
    full = json.loads(capsys.readouterr().out)
    assert summary["weights"] == "not read: parameter counts from config.json's shapes, sizes at its torch_dtype"
    assert full["weights"] == "safetensors headers"
    # parameters per component are exact from config.json alone; bf16 sizes as the weights have them
    assert [(c["name"], c["params"], c["bytes"]) for c in summary["components"]] == \
        [(c["name"], c["params"], c["bytes"]) for c in full["components"]]
    for key in ("special_tokens", "eos_token_ids", "chat_template", "total_params"):
        assert summary[key] == full[key]


def test_cli_plan_unknown_name(cache: Path, capsys) -> None:
    assert cli_main(["plan", "Someone/not-cached"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("r1v plan: error: Hugging Face repo Someone/not-cached is not available: it is not in the "
                          "cache and downloads are off.")
    assert f"hf download Someone/not-cached --include config.json --cache-dir {cache}" in err


# --- end to end: a real GGUF pair published under any repo name ---------------------------------------------

@pytest.mark.slow
def test_load_any_repo_runs_the_model(cache: Path) -> None:
    import r1v
    from r1v.micro import demo_image_path, demo_question
    from r1v.micro.files import micro_gguf

    llm = micro_gguf("q8_0")
    files = {"README.md": b"micro\n", "micro-r1v-Q8_0.gguf": llm.read_bytes(),
             "mmproj-micro-r1v-f16.gguf": (llm.parent / "mmproj-micro-r1v-f16.gguf").read_bytes()}
    make_hub_cache(cache, "Someone/micro-r1v-GGUF", files, tree=files)
    question = demo_question()
    with r1v.load("Someone/micro-r1v-GGUF:Q8_0", n_ctx=1024, prefix_cache=False) as model:
        assert model.resolved.path.name == "micro-r1v-Q8_0.gguf"
        assert model.resolved.mmproj.name == "mmproj-micro-r1v-f16.gguf"
        by_name = model.generate(question["question"], images=[demo_image_path()], temperature=0, max_tokens=64)
    with r1v.load(llm, n_ctx=1024, prefix_cache=False) as model:
        local = model.generate(question["question"], images=[demo_image_path()], temperature=0, max_tokens=64)
    assert by_name.content == local.content == question["answer"]
    # the command line says which quant and projector it picked (the repo's only quant here); in a process of its
    # own, as a user runs it (generate_cmd binds sys.stdout when first imported)
    argv = [sys.executable, "-m", "r1v", "generate", "Someone/micro-r1v-GGUF", "--image", str(demo_image_path()),
            "-p", question["question"], "--temperature", "0", "--max-tokens", "64", "--n-ctx", "1024",
            "--no-prefix-cache"]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=300, env=os.environ)
    assert done.returncode == 0, done.stderr
    out, err = done.stdout, done.stderr
    assert out == question["answer"] + "\n"
    assert err.splitlines()[0] == ("Someone/micro-r1v-GGUF: picked Q8_0 (micro-r1v-Q8_0.gguf) the only one; "
                                   "projector mmproj-micro-r1v-f16.gguf")
