"""Hostile or careless checkpoints and outputs (issue 16): every entry point refuses bad input with one clear
line naming the file and field, before any work, and a failed run never removes what it did not create."""
from __future__ import annotations

import json
import math
import os
import shutil
import time
from pathlib import Path
from typing import Any, Callable

import gguf
import pytest

from r1v.cli import main
from r1v.converters import CheckpointError, load_config, open_checkpoint
from r1v.converters import gguf as gguf_convert
from r1v.converters import gguf_llm
from r1v.converters.awq import read_part
from r1v.converters.safetensors_io import read_header, write_safetensors
from r1v.converters.gguf_common import ConversionError

@pytest.fixture(scope="module")
def source(tiny_k_quant: Path, tmp_path_factory) -> Path:
    """A 300M-ViT checkpoint stock llama.cpp can take (convert gguf writes its mmproj too): the shared tiny_k_quant
    under the name `ck` (the files converted from it are ck-*)."""
    return Path(shutil.copytree(tiny_k_quant, tmp_path_factory.mktemp("bad") / "ck"))


@pytest.fixture
def ck(source, tmp_path) -> Path:
    return Path(shutil.copytree(source, tmp_path / "ck"))


def _edit_json(path: Path, change: Callable[[dict[str, Any]], None]) -> None:
    data = json.loads(path.read_text())
    change(data)
    path.write_text(json.dumps(data))  # NaN is written as the bare token NaN, which Python's json reads back


def _set(section: str | None, key: str, value: Any) -> Callable[[dict[str, Any]], None]:
    def change(config: dict[str, Any]) -> None:
        (config[section] if section else config)[key] = value
    return change


def _cli(capsys, *argv: str) -> tuple[int, str]:
    """Run the r1v command in-process: (exit code, stderr). An uncaught exception fails the test."""
    code = main(list(argv))
    return code, capsys.readouterr().err


def _one_clear_line(code: int, err: str, *needles: str) -> None:
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2, err
    assert len(lines) == 1 and "Traceback" not in err, err
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])


# --- item 5 and 15: the config against itself and against the tensors --------------------------------------------
BAD_CONFIGS = {
    "layers-1e9": (_set("llm_config", "num_hidden_layers", 10**9),
                   "llm_config.num_hidden_layers 1000000000 is implausible (more than 1024 layers)"),
    "layers-fewer": (_set("llm_config", "num_hidden_layers", 1),
                     "llm_config.num_hidden_layers is 1 but the checkpoint's tensors hold 2 layers"),
    "layers-negative": (_set("llm_config", "num_hidden_layers", -1),
                        "llm_config.num_hidden_layers must be a positive integer, got -1"),
    "vit-layers-more": (_set("vision_config", "num_hidden_layers", 3),
                        "vision_config.num_hidden_layers is 3 but the checkpoint's tensors hold 2 layers"),
    "heads-0": (_set("llm_config", "num_attention_heads", 0),
                "llm_config.num_attention_heads must be a positive integer, got 0"),
    "vit-heads-0": (_set("vision_config", "num_attention_heads", 0),
                    "vision_config.num_attention_heads must be a positive integer, got 0"),
    "patch-0": (_set("vision_config", "patch_size", 0), "vision_config.patch_size must be a positive integer, got 0"),
    "downsample-0": (_set(None, "downsample_ratio", 0), "downsample_ratio must be in (0, 1]"),
    "eps-nan": (_set("llm_config", "rms_norm_eps", math.nan), "llm_config.rms_norm_eps must be a finite number > 0, got nan"),
    "image-negative": (_set("vision_config", "image_size", -448),
                       "vision_config.image_size must be a positive integer, got -448"),
    "eos-list-of-str": (_set("llm_config", "eos_token_id", ["abc"]),
                        "llm_config: eos_token_id must be an integer token id or a list of them, got ['abc']"),
}


@pytest.mark.parametrize("change, message", BAD_CONFIGS.values(), ids=BAD_CONFIGS.keys())
@pytest.mark.parametrize("command", ["inspect", "convert gguf", "plan"])
def test_bad_config_is_one_clear_line_before_any_work(ck, tmp_path, capsys, command, change, message):
    _edit_json(ck / "config.json", change)
    out = tmp_path / "out"
    argv = {"inspect": ["inspect", str(ck)], "plan": ["plan", str(ck)],
            "convert gguf": ["convert", "gguf", str(ck), "-o", str(out), "--quant", "q8_0", "--no-progress"]}[command]
    start = time.perf_counter()
    code, err = _cli(capsys, *argv)
    assert time.perf_counter() - start < 5  # 1e9 layers used to grow to 4 GB for 52 s before a MemoryError
    _one_clear_line(code, err, f"r1v {command.split()[0]}: error:", str(ck / "config.json"), message)
    assert not out.exists()


def test_convert_awq_refuses_a_layer_count_the_tensors_disagree_with(ck, tmp_path, capsys):
    _edit_json(ck / "config.json", _set("llm_config", "num_hidden_layers", 1))
    out = tmp_path / "awq"
    code, err = _cli(capsys, "convert", "awq", str(ck), "-o", str(out), "--group-size", "32", "--no-progress")
    _one_clear_line(code, err, "llm_config.num_hidden_layers is 1 but the checkpoint's tensors hold 2 layers")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ck"]  # no output, no work directory


def test_a_missing_middle_layer_is_named(ck):
    index_path = ck / "model.safetensors.index.json"
    _edit_json(index_path, lambda index: index.update(weight_map={
        n: f for n, f in index["weight_map"].items() if not n.startswith("language_model.model.layers.0.")}))
    _edit_json(ck / "config.json", _set("llm_config", "num_hidden_layers", 2))
    for shard in sorted(ck.glob("model-*.safetensors")):  # and from the shards
        arrays, _ = read_part(shard)
        dtypes = {n: info.dtype for n, info in read_header(shard)[0].items()}
        write_safetensors(shard, {n: (dtypes[n], a) for n, a in arrays.items()
                                  if not n.startswith("language_model.model.layers.0.")})
    with pytest.raises(CheckpointError, match=r"llm_config.num_hidden_layers is 2 but the checkpoint has no tensors "
                                              r"for layer 0 \(language_model\.model\.layers\.0\.\*\)"):
        open_checkpoint(ck, check_shapes=False)


def test_plan_of_a_bare_config_has_nothing_to_check_against(ck, capsys):
    _edit_json(ck / "config.json", _set("llm_config", "num_hidden_layers", 3))
    assert _cli(capsys, "plan", str(ck / "config.json"))[0] == 0
    code, err = _cli(capsys, "plan", str(ck))
    _one_clear_line(code, err, "llm_config.num_hidden_layers is 3 but the checkpoint's tensors hold 2 layers")


@pytest.mark.parametrize("value", ["abc", 1.5, -3, [7, "x"], 10**6])
def test_generation_config_eos_must_be_a_token_id(ck, capsys, value):
    _edit_json(ck / "generation_config.json", lambda g: g.update(eos_token_id=value))
    code, err = _cli(capsys, "inspect", str(ck))
    _one_clear_line(code, err, str(ck / "generation_config.json"), "eos_token_id")


def test_every_value_checked_is_accepted_at_its_real_setting(source):
    cfg = load_config(source)  # the bounds leave the real R1V settings alone
    assert (cfg.llm.rms_norm_eps, cfg.downsample_ratio, cfg.vision.patch_size, cfg.select_layer) == (1e-6, 0.5, 14, -1)


# --- item 11: shards named outside the checkpoint ------------------------------------------------------------------
@pytest.mark.parametrize("shard", ["/etc/passwd", "../outside.safetensors", "sub/../../outside.safetensors"])
def test_weight_map_cannot_name_a_file_outside_the_checkpoint(ck, monkeypatch, shard):
    from r1v.converters import checkpoint

    first = sorted(ck.glob("model-*.safetensors"))[0]
    shutil.copyfile(first, ck.parent / "outside.safetensors")  # a valid file there: only the name may stop it
    index_path = ck / "model.safetensors.index.json"
    _edit_json(index_path, lambda index: index["weight_map"].update(
        {n: shard for n, f in index["weight_map"].items() if f == first.name}))
    opened: list[Path] = []
    real = checkpoint.read_header
    monkeypatch.setattr(checkpoint, "read_header", lambda path: (opened.append(Path(path)), real(path))[1])
    with pytest.raises(CheckpointError, match=rf"maps to '{shard}', which is not a file name in the checkpoint "
                                              r"directory"):
        open_checkpoint(ck)
    assert opened == []


def test_hub_snapshot_shards_symlinked_into_blobs_still_open(source, tmp_path):
    """huggingface-hub's cache: snapshots/<commit>/<file> -> ../../blobs/<hash>; the link target is outside the
    snapshot directory, the name is not."""
    repo = tmp_path / "models--x--y"
    snapshot = repo / "snapshots" / "0123abc"
    (repo / "blobs").mkdir(parents=True)
    snapshot.mkdir(parents=True)
    for i, file in enumerate(sorted(source.iterdir())):
        blob = repo / "blobs" / f"blob{i}"
        shutil.copyfile(file, blob)
        (snapshot / file.name).symlink_to(Path("../../blobs") / blob.name)
    with open_checkpoint(snapshot) as ckpt:
        assert ckpt.name == "0123abc" and len(ckpt.tensors) == len(open_checkpoint(source).tensors)


# --- item 13: tokenizer ids, and plan on something that is not a config ---------------------------------------------
def test_non_integer_added_token_id_names_the_file_and_token(ck, capsys):
    def change(data: dict[str, Any]) -> None:
        entry = next(e for e in data["added_tokens"] if e["content"] == "<img>")
        entry["id"] = "seven"
    _edit_json(ck / "tokenizer.json", change)
    code, err = _cli(capsys, "inspect", str(ck))
    _one_clear_line(code, err, str(ck / "tokenizer.json"), "token '<img>' has id 'seven'")


def test_non_integer_vocab_id_names_the_file_and_token(ck, tmp_path, capsys):
    _edit_json(ck / "tokenizer.json", lambda data: data["model"]["vocab"].update({"Ġthe": 1.5}))
    code, err = _cli(capsys, "convert", "gguf", str(ck), "-o", str(tmp_path / "out"), "--quant", "q8_0",
                     "--no-mmproj", "--no-progress")
    _one_clear_line(code, err, str(ck / "tokenizer.json"), "token 'Ġthe' has id 1.5")
    assert list((tmp_path / "out").iterdir()) == []


def test_plan_of_a_gguf_or_binary_file_is_one_clear_line(tmp_path, capsys):
    model = tmp_path / "x.gguf"
    writer = gguf.GGUFWriter(model, "qwen2")
    writer.add_block_count(2)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    writer.close()
    code, err = _cli(capsys, "plan", str(model))
    _one_clear_line(code, err, f"{model}: is a GGUF file, not a config.json")
    binary = tmp_path / "weights.bin"
    binary.write_bytes(bytes(range(256)) * 4)
    code, err = _cli(capsys, "plan", str(binary))
    _one_clear_line(code, err, f"{binary}: not a config.json (binary, not UTF-8 text)")


# --- item 6: a failed rerun keeps the earlier run's files -----------------------------------------------------------
def _stats(out: Path) -> dict[str, tuple[int, int]]:
    return {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in sorted(out.iterdir())}


@pytest.fixture
def earlier(source, tmp_path) -> Path:
    out = tmp_path / "out"
    gguf_convert.convert_gguf(source, out, ["q8_0"], "f16", progress=False)
    return out


def test_rerun_with_a_bad_imatrix_keeps_earlier_outputs(source, earlier, tmp_path, capsys):
    before = _stats(earlier)
    assert sorted(before) == ["ck-q8_0.gguf", "mmproj-ck-f16.gguf"]
    bad = tmp_path / "bad.imatrix"
    bad.write_bytes(b"\x05\x00\x00\x00" + b"garbage" * 3)
    code, err = _cli(capsys, "convert", "gguf", str(source), "-o", str(earlier), "--quant", "q8_0", "q4_k_m",
                     "--imatrix", str(bad), "--no-progress")
    _one_clear_line(code, err, str(bad), "not an imatrix file")
    assert _stats(earlier) == before  # the same files, untouched: not even rewritten


def test_interrupt_while_writing_the_intermediate_keeps_earlier_outputs(source, earlier, monkeypatch):
    before = _stats(earlier)
    real = gguf_llm.write_llm_gguf

    def interrupted(ckpt, path, *args, **kwargs):
        if path.name.endswith(".intermediate.gguf"):  # SIGINT while the 16-bit intermediate is written
            raise KeyboardInterrupt
        return real(ckpt, path, *args, **kwargs)

    monkeypatch.setattr(gguf_llm, "write_llm_gguf", interrupted)
    with pytest.raises(KeyboardInterrupt):
        gguf_convert.convert_gguf(source, earlier, ["q8_0", "q4_k_m"], "f16", progress=False)
    assert _stats(earlier) == before


def test_a_successful_rerun_replaces_the_files(source, earlier):
    before = _stats(earlier)
    result = gguf_convert.convert_gguf(source, earlier, ["q8_0"], "f16", progress=False)
    after = _stats(earlier)
    assert sorted(after) == sorted(before) and all(after[n] != before[n] for n in before)
    assert result.files == [earlier / "ck-q8_0.gguf", earlier / "mmproj-ck-f16.gguf"]


def test_a_failed_first_run_leaves_no_file(source, tmp_path, monkeypatch):
    def broken(*args, **kwargs):
        raise ConversionError("mmproj failed")

    import r1v.converters.gguf_mmproj as mmproj
    monkeypatch.setattr(mmproj, "write_mmproj_gguf", broken)
    out = tmp_path / "fresh"
    with pytest.raises(ConversionError, match="mmproj failed"):
        gguf_convert.convert_gguf(source, out, ["q8_0"], "f16", progress=False)
    assert list(out.iterdir()) == []


# --- item 16: provenance without the converting machine's paths ------------------------------------------------------
def test_provenance_names_the_checkpoint_directory_only(source, earlier):
    for file in earlier.iterdir():
        fields = gguf.GGUFReader(file).fields
        assert fields["r1v.source.checkpoint"].contents() == "ck"
        assert fields["r1v.source.config_sha256"].contents() == load_config(source).sha256
        assert str(source.parent) not in file.read_bytes().decode("latin-1")


def test_relative_checkpoint_path_keeps_its_name(source, tmp_path, monkeypatch):
    monkeypatch.chdir(source)
    result = gguf_convert.convert_gguf(".", tmp_path, ["q8_0"], None, progress=False)
    assert [p.name for p in result.files] == ["ck-q8_0.gguf"]
    assert gguf.GGUFReader(result.files[0]).fields["r1v.source.checkpoint"].contents() == "ck"


# --- item 7: the AWQ output name is not a glob pattern ---------------------------------------------------------------
@pytest.mark.parametrize("name, other", [("model[a]", ".modela.partial-0123456789abcdef"),
                                         ("*", ".other.partial-0123456789abcdef")])
def test_awq_keeps_other_outputs_resumable_work(tiny_6b, tmp_path, monkeypatch, name, other):
    from r1v.quant import driver

    parent = tmp_path / "gl"
    parent.mkdir()
    (parent / other).mkdir()
    (parent / other / "state.json").write_text("{}")
    own_stale = parent / f".{name}.partial-fedcba9876543210"  # this output's run with other options: removed
    own_stale.mkdir()
    stopped: list[Path] = []

    def stop(self, start, imatrix_out):  # the run opened its work directory: stop before calibrating
        stopped.append(self.work)
        raise KeyboardInterrupt

    monkeypatch.setattr(driver._Run, "_run", stop)
    with pytest.raises(KeyboardInterrupt):
        driver.quantize_checkpoint_awq(tiny_6b, parent / name, group_size=32, progress=False)
    assert (parent / other / "state.json").is_file()
    assert not own_stale.exists()
    assert sorted(p.name for p in parent.iterdir()) == sorted([other, stopped[0].name])


def test_work_directories_are_matched_exactly(tmp_path):
    from r1v.quant.driver import _work_dirs

    for entry in (".m.partial-0123456789abcdef", ".m.partial-0123456789abcdef0", ".m.partial-x123456789abcdef",
                  ".m.partial-abc.partial-0123456789abcdef", ".mm.partial-0123456789abcdef", "m"):
        (tmp_path / entry).mkdir()
    assert [p.name for p in _work_dirs(tmp_path / "m")] == [".m.partial-0123456789abcdef"]
    assert os.listdir(tmp_path)  # nothing removed by looking


@pytest.mark.parametrize("file, change, message", [
    ("tokenizer_config.json", lambda c: c["added_tokens_decoder"].update({"x7": {"content": "<odd>"}}),
     "token '<odd>' has id 'x7'"),
    ("tokenizer_config.json", lambda c: c.update(added_tokens_decoder=[1, 2]), "added_tokens_decoder must be an object"),
    ("tokenizer.json", lambda t: t["added_tokens"].append({"id": 3}), "added token entry {'id': 3} has no string"),
], ids=["decoder-key", "decoder-list", "entry-without-content"])
def test_other_malformed_added_tokens_name_the_file(ck, capsys, file, change, message):
    _edit_json(ck / file, change)
    code, err = _cli(capsys, "inspect", str(ck))
    _one_clear_line(code, err, str(ck / file), message)
