"""`r1v ls` / `r1v rm`: the models on disk (r1v builds, Hugging Face repos, the prefix cache), their sizes, and
removing one of them without touching anything else.

The caches are laid out in tmp_path as their owners write them: builds as r1v.micro.files does, hub repos by
test_resolve.make_hub_cache (real huggingface-hub layout, read by its own scan_cache_dir), prefix entries by
PrefixStore.
"""
from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from huggingface_hub import scan_cache_dir
from test_resolve import make_hub_cache

from r1v.cli import main as cli_main
from r1v.cli.ls_cmd import inventory
from r1v.cli.rm_cmd import RemoveError, check_inside, plan_removal, users
from r1v.runtime.backends.llamacpp.prefix_cache import PrefixStore

G = b"GGUF\x03\x00\x00\x00"
OLD, NEW = "1" * 40, "2" * 40  # two revisions of one repo
REPO = "Someone/R1V-Mix-GGUF"


@pytest.fixture
def caches(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, Path]:
    """XDG_CACHE_HOME with a micro-r1v build (two GGUF quants + mmproj, an AWQ checkpoint), a hub cache with a
    GGUF repo at two revisions (one blob shared) and a registry checkpoint repo, and a prefix cache of 2 entries."""
    xdg, hub, prefix = tmp_path / "xdg", tmp_path / "hf" / "hub", tmp_path / "prefix"
    monkeypatch.setenv("XDG_CACHE_HOME", str(xdg))
    monkeypatch.setenv("R1V_PREFIX_CACHE_DIR", str(prefix))
    monkeypatch.setenv("HF_HUB_CACHE", str(hub))
    build = xdg / "r1v" / "micro-r1v" / "9c1a7c26a1785526"
    (build / "gguf-abc").mkdir(parents=True)
    (build / "gguf-abc" / "micro-r1v-q8_0.gguf").write_bytes(G + b"8" * 1000)
    (build / "gguf-abc" / "micro-r1v-q4_k_m.gguf").write_bytes(G + b"4" * 600)
    (build / "gguf-abc" / "mmproj-micro-r1v-f16.gguf").write_bytes(G + b"p" * 300)
    awq = build / "awq-awq-gptq"
    awq.mkdir()
    (awq / "config.json").write_text(json.dumps({"quantization_config": {"quant_method": "awq"}}))
    (awq / "model.safetensors").write_bytes(b"w" * 2000)
    shared = {"mmproj-R1V-Mix-f16.gguf": G + b"p" * 50, "README.md": b"# mix\n"}
    make_hub_cache(hub, REPO, {**shared, "R1V-Mix-Q8_0.gguf": G + b"old8" * 25}, commit=OLD)
    make_hub_cache(hub, REPO, {**shared, "R1V-Mix-Q8_0.gguf": G + b"new8" * 25, "R1V-Mix-Q4_K_M.gguf": G + b"4" * 70},
                   commit=NEW)
    make_hub_cache(hub, "Skywork/Skywork-R1V3-38B-AWQ", {"config.json": b"{}", "model.safetensors": b"s" * 500})
    store = PrefixStore(prefix)
    for i in range(2):
        store.write(hashlib.sha256(b"%d" % i).hexdigest(), b"k" * 100 * (i + 1), {"model": "m.gguf", "positions": 9})
    return {"xdg": xdg, "hub": hub, "prefix": prefix, "build": build}


def _ls_json(capsys) -> dict:
    assert cli_main(["ls", "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def _sizes(listing: dict) -> dict[str, int]:
    return {i["name"]: i["bytes"] for i in listing["items"]}


def _blob_bytes(storage: Path) -> int:
    return sum(p.stat().st_size for p in (storage / "blobs").iterdir())


def test_ls_lists_builds_hub_repos_and_prefix_cache(caches: dict[str, Path], capsys) -> None:
    listing = _ls_json(capsys)
    storage = caches["hub"] / "models--Someone--R1V-Mix-GGUF"
    prefix_bytes = sum(p.stat().st_size for p in caches["prefix"].iterdir())
    assert _sizes(listing) == {
        "micro-r1v:awq": (caches["build"] / "awq-awq-gptq" / "config.json").stat().st_size + 2000,
        "micro-r1v": 3 * len(G) + 1000 + 600 + 300,
        REPO: _blob_bytes(storage),  # each blob once, however many revisions point to it
        "Skywork/Skywork-R1V3-38B-AWQ": 2 + 500,
        "prefix-cache": prefix_bytes,
    }
    assert listing["total_bytes"] == sum(_sizes(listing).values())
    by_name = {i["name"]: i for i in listing["items"]}
    assert by_name["micro-r1v"]["holds"] == "gguf Q4_K_M, Q8_0 + mmproj"
    assert by_name["micro-r1v"]["quants"] == ["q4_k_m", "q8_0"]
    assert by_name["micro-r1v:awq"]["holds"] == "awq checkpoint"
    assert by_name[REPO]["holds"] == "gguf Q4_K_M, Q8_0 + mmproj, 2 revisions"
    assert by_name["Skywork/Skywork-R1V3-38B-AWQ"]["registry_name"] == "skywork-r1v3-38b-awq"
    assert by_name["prefix-cache"]["holds"] == "2 entries (r1v cache ls)"

    assert cli_main(["ls"]) == 0
    text = capsys.readouterr().out.splitlines()
    assert text[0].split() == ["NAME", "WHERE", "SIZE", "MODIFIED", "HOLDS", "PATH"]
    assert any(line.startswith("Skywork/Skywork-R1V3-38B-AWQ (skywork-r1v3-38b-awq)  hub") for line in text)
    assert text[-1] == f"total {_human(listing['total_bytes'])} in 5 items"


def _human(n: int) -> str:
    from r1v.cli.ls_cmd import human_size

    return human_size(n)


def test_ls_empty(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "x"))
    monkeypatch.setenv("R1V_PREFIX_CACHE_DIR", str(tmp_path / "p"))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "h"))
    assert cli_main(["ls"]) == 0
    assert capsys.readouterr().out == "no models on disk (r1v builds, Hugging Face cache, prefix cache)\n"


def test_rm_one_built_quant(caches: dict[str, Path], capsys) -> None:
    folder = caches["build"] / "gguf-abc"
    assert cli_main(["rm", "micro-r1v:Q4_K_M", "--yes"]) == 0
    out = capsys.readouterr().out
    assert f"removed Q4_K_M of micro-r1v: micro-r1v-q4_k_m.gguf, freed {_human(len(G) + 600)}" in out
    assert sorted(p.name for p in folder.iterdir()) == ["micro-r1v-q8_0.gguf", "mmproj-micro-r1v-f16.gguf"]
    # the last quant of a folder takes its projector with it
    assert cli_main(["rm", "micro-r1v:q8_0", "-y"]) == 0
    assert list(folder.iterdir()) == []
    assert (caches["build"] / "awq-awq-gptq" / "model.safetensors").is_file()  # the AWQ build is another item


def test_rm_build_and_awq(caches: dict[str, Path], capsys) -> None:
    assert cli_main(["rm", "micro-r1v:awq", "--yes"]) == 0
    assert not (caches["build"] / "awq-awq-gptq").exists() and (caches["build"] / "gguf-abc").is_dir()
    assert cli_main(["rm", "micro-r1v", "--yes"]) == 0
    assert not (caches["xdg"] / "r1v" / "micro-r1v").exists()
    assert caches["prefix"].is_dir()  # the prefix cache lives beside builds and is not one
    capsys.readouterr()
    assert "micro-r1v" not in _sizes(_ls_json(capsys))


def test_rm_hub_repo_whole(caches: dict[str, Path], capsys) -> None:
    storage = caches["hub"] / "models--Skywork--Skywork-R1V3-38B-AWQ"
    assert cli_main(["rm", "skywork-r1v3-38b-awq", "--yes"]) == 0  # the models.yaml name finds its repo
    assert "freed 502 B" in capsys.readouterr().out
    assert not storage.exists()
    assert (caches["hub"] / "models--Someone--R1V-Mix-GGUF").is_dir()
    assert [r.repo_id for r in scan_cache_dir(caches["hub"]).repos] == [REPO]


def test_rm_hub_quant_keeps_shared_blobs(caches: dict[str, Path], capsys) -> None:
    storage = caches["hub"] / "models--Someone--R1V-Mix-GGUF"
    before = _blob_bytes(storage)
    # Q8_0 is in both revisions (two different blobs); the projector's blob is shared by both and by Q4_K_M's
    assert cli_main(["rm", f"{REPO}:Q8_0", "--yes"]) == 0
    freed = 2 * (len(G) + 100)
    assert f"freed {_human(freed)}" in capsys.readouterr().out
    assert _blob_bytes(storage) == before - freed
    new = storage / "snapshots" / NEW
    assert sorted(p.name for p in new.iterdir()) == ["R1V-Mix-Q4_K_M.gguf", "README.md", "mmproj-R1V-Mix-f16.gguf"]
    assert (new / "mmproj-R1V-Mix-f16.gguf").read_bytes() == G + b"p" * 50  # the link still resolves
    # the old revision lost its only LLM file, so its projector link went too; the blob stays for NEW
    assert sorted(p.name for p in (storage / "snapshots" / OLD).iterdir()) == ["README.md"]
    info = scan_cache_dir(caches["hub"])
    assert info.warnings == []
    with pytest.raises(RemoveError, match=rf"^{REPO} holds no GGUF quant 'Q8_0'; it has: Q4_K_M$"):
        plan_removal(f"{REPO}:Q8_0", inventory())


def test_rm_prefix_cache(caches: dict[str, Path], capsys) -> None:
    assert cli_main(["rm", "prefix-cache", "--yes"]) == 0
    assert not any(p.name.endswith(".r1vkv") for p in caches["prefix"].iterdir())


def test_rm_unknown_name_lists_what_there_is(caches: dict[str, Path], capsys) -> None:
    assert cli_main(["rm", "nano-r1v", "--yes"]) == 2
    err = capsys.readouterr().err
    assert err == ("r1v rm: error: no model 'nano-r1v' on disk; `r1v ls` shows: micro-r1v:awq, "
                   "micro-r1v[:q4_k_m|q8_0], Skywork/Skywork-R1V3-38B-AWQ, Someone/R1V-Mix-GGUF[:q4_k_m|q8_0], "
                   "prefix-cache\n")


def test_rm_asks_first(caches: dict[str, Path], capsys, monkeypatch: pytest.MonkeyPatch) -> None:
    awq = caches["build"] / "awq-awq-gptq"
    # stdin not a terminal (as under pytest): refused without --yes, nothing removed
    assert cli_main(["rm", "micro-r1v:awq"]) == 2
    assert "not removing: stdin is not a terminal to ask on; pass --yes" in capsys.readouterr().err
    assert awq.is_dir()
    monkeypatch.setattr(sys.stdin, "isatty", lambda: True)
    answers = iter(["n", "y"])
    monkeypatch.setattr("builtins.input", lambda prompt: next(answers))
    assert cli_main(["rm", "micro-r1v:awq"]) == 1 and awq.is_dir()
    assert capsys.readouterr().out.endswith("kept\n")
    assert cli_main(["rm", "micro-r1v:awq"]) == 0 and not awq.exists()


def test_rm_never_follows_links_out_of_the_cache(caches: dict[str, Path], tmp_path: Path) -> None:
    outside = tmp_path / "precious"
    outside.mkdir()
    (outside / "model.gguf").write_bytes(b"mine")
    (caches["build"] / "gguf-abc" / "linked").symlink_to(outside, target_is_directory=True)
    # a removal whose path lies outside its cache directory is refused before anything happens
    removal = plan_removal("micro-r1v:awq", inventory())
    removal.paths = [outside]
    with pytest.raises(RemoveError, match=r"refusing to remove .*precious: it is not inside the cache directory"):
        check_inside(removal)
    removal.paths = [caches["xdg"] / "r1v"]  # nor the cache directory itself
    with pytest.raises(RemoveError, match="refusing to remove"):
        check_inside(removal)
    assert cli_main(["rm", "micro-r1v", "--yes"]) == 0
    assert (outside / "model.gguf").read_bytes() == b"mine"


def test_rm_refuses_files_in_use(caches: dict[str, Path], capsys) -> None:
    if not Path("/proc/self/maps").is_file():
        pytest.skip("needs /proc")
    model = caches["build"] / "gguf-abc" / "micro-r1v-q8_0.gguf"
    code = ("import mmap, sys; f = open(sys.argv[1], 'rb'); m = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ); "
            "f.close(); print('mapped', flush=True); sys.stdin.read()")  # mapped, as llama.cpp maps a GGUF
    holder = subprocess.Popen([sys.executable, "-c", code, str(model)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                              text=True)
    try:
        assert holder.stdout.readline() == "mapped\n"
        assert set(users([model])) == {holder.pid}
        assert cli_main(["rm", "micro-r1v:q8_0", "--yes"]) == 2
        err = capsys.readouterr().err
        assert f"is in use by pid {holder.pid} ({sys.executable} -c import mmap" in err and "stop it first" in err
        assert model.is_file()
    finally:
        holder.stdin.close()
        holder.wait(timeout=30)
    start = time.monotonic()
    assert cli_main(["rm", "micro-r1v:q8_0", "--yes"]) == 0 and not model.exists()
    assert time.monotonic() - start < 10
    assert os.path.isdir(caches["build"])


def test_support_folders_are_listed_as_such_and_removable(caches: dict[str, Path], capsys) -> None:
    """llama.cpp's source (setup.sh fetches it into the r1v cache) holds test .gguf files: it is no model build."""
    src = caches["xdg"] / "r1v" / "llama.cpp-src"
    (src / "models").mkdir(parents=True)
    (src / "models" / "ggml-vocab-llama.gguf").write_bytes(G + b"v" * 400)
    (src / "convert_hf_to_gguf.py").write_text("# converter\n")
    items = {i["name"]: i for i in _ls_json(capsys)["items"]}
    assert items["llama.cpp-src"]["kind"] == "support"
    assert items["llama.cpp-src"]["holds"] == "llama.cpp source (r1v bench convert, tests)"
    assert items["llama.cpp-src"]["bytes"] == len(G) + 400 + len("# converter\n")
    assert cli_main(["rm", "llama.cpp-src", "--yes"]) == 0
    assert not src.exists() and (caches["build"] / "gguf-abc").is_dir()
