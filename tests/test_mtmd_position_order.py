"""The class token's place in libmtmd's InternVL graph (issue 19 item 4; llama.cpp #25814, fix in PR #25844).

Our mmproj stores the position rows patches-then-class because this llama.cpp appends the class token after
the patches. A llama.cpp with the fix wants the checkpoint's order. `MtmdContext` probes the library once per
build and, when the file's order is not the library's, opens a cached copy with the rows moved. Both orders
are tested: the probe's two answers (the second by giving this library the rows a fixed one would read), and
a tiny mmproj written in each order giving the torch reference's embeddings once opened.
"""
from __future__ import annotations

from pathlib import Path

import gguf
import numpy as np
import pytest
from PIL import Image

from r1v.converters import open_checkpoint
from r1v.converters.gguf_llm import write_llm_gguf
from r1v.converters.gguf_mmproj import (
    CHECKPOINT_POSITION_ORDER, POSITION_EMBD, POSITION_ORDER, POSITION_ORDER_KEY, POSITION_ORDER_NOTE, write_mmproj_gguf,
)
from r1v.runtime.backends.llamacpp import mtmd as mtmd_module
from r1v.runtime.backends.llamacpp import position_order
from r1v.runtime.backends.llamacpp.mtmd import (
    MtmdContext, MtmdError, TextModel, library_position_order, probe_position_order,
)
from r1v.runtime.image import prepare_image
from r1v.testing import make_tiny_checkpoint
from r1v.testing.images import pattern_pixels

SIZES = dict(vit_hidden=64, vit_intermediate=128, vit_heads=4, vit_layers=2)


@pytest.fixture(autouse=True)
def own_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """Each test its own cache directory and an empty in-memory probe cache."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    monkeypatch.setattr(mtmd_module, "_LIBRARY_ORDER", {})


@pytest.fixture(scope="module")
def ckpt_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_checkpoint(tmp_path_factory.mktemp("order") / "tiny-300m", vit="300m", seed=3, dtype="f32",
                                **SIZES)


@pytest.fixture(scope="module")
def files(ckpt_path: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The converter's mmproj (patches,cls), the same rows in checkpoint order (cls,patches), a text model."""
    out = tmp_path_factory.mktemp("order-gguf")
    with open_checkpoint(ckpt_path) as ckpt:
        ours = write_mmproj_gguf(ckpt, out / "mmproj-patches-cls.gguf", "f32", progress=False)
        llm = write_llm_gguf(ckpt, out / "llm-f16.gguf", "f16", progress=False)
    theirs = position_order.reordered_copy(ours, out / "mmproj-cls-patches.gguf", CHECKPOINT_POSITION_ORDER)
    return {POSITION_ORDER: ours, CHECKPOINT_POSITION_ORDER: theirs, "llm": llm}


@pytest.fixture(scope="module")
def text_model(files: dict[str, Path]):
    with TextModel(files["llm"]) as model:
        yield model


@pytest.fixture(scope="module")
def reference(ckpt_path: Path) -> np.ndarray:
    """The torch reference's embeddings of the 448x448 test image (one tile)."""
    torch = pytest.importorskip("torch")
    from r1v.runtime.model import R1VModel

    model = R1VModel.from_checkpoint(ckpt_path, dtype=torch.float32)
    prepared = prepare_image(Image.fromarray(_image()))
    assert prepared.num_tiles == 1
    with torch.inference_mode():
        return model.embed_images(torch.from_numpy(prepared.pixel_values)).numpy()


def _image() -> np.ndarray:
    return pattern_pixels(448, 448, 0)


def _min_cosine(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.reshape(-1, a.shape[-1]), b.reshape(-1, b.shape[-1])
    return float(((a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)).min())


def _rows(path: Path) -> np.ndarray:
    tensor = next(t for t in gguf.GGUFReader(path).tensors if t.name == POSITION_EMBD)
    return np.asarray(tensor.data)


# --- the probe ----------------------------------------------------------------------------------------------

def test_probe_says_this_library_appends_the_class_token(text_model: TextModel):
    result = probe_position_order(text_model)
    assert result.order == POSITION_ORDER == "patches,cls"
    assert result.live_tokens == (0,)  # the first patch got row 0: the class token is last


def test_probe_tells_a_class_token_first_library_apart(text_model: TextModel, tmp_path: Path):
    """This library given the rows a class-token-first library reads (each patch the next row) answers as
    that library would."""
    n_embd = text_model.n_embd
    probe = position_order.write_probe_mmproj(tmp_path / "probe.gguf", n_embd, roll=-1)
    with MtmdContext(probe, text_model, n_threads=1, match_position_order=False) as ctx:
        out = ctx.embed_image(np.zeros((56, 56, 3), np.uint8)).embeddings[0]
    assert out.shape == (4, n_embd)
    result = position_order.order_from_probe(out)
    assert result == position_order.ProbeResult(CHECKPOINT_POSITION_ORDER, (3,))


def test_probe_refuses_an_unknown_pattern():
    out = np.zeros((4, 8), np.float32)
    out[1] = 1.0
    with pytest.raises(ValueError, match=r"non-zero output tokens \[1\] of 4; expected only the first"):
        position_order.order_from_probe(out)


def test_probe_runs_once_per_library_build(text_model: TextModel, monkeypatch: pytest.MonkeyPatch, tmp_path: Path):
    calls = []
    real = mtmd_module.probe_position_order
    monkeypatch.setattr(mtmd_module, "probe_position_order", lambda tm: calls.append(1) or real(tm))
    assert library_position_order(text_model) == POSITION_ORDER
    assert library_position_order(text_model) == POSITION_ORDER
    assert len(calls) == 1
    mtmd_module._LIBRARY_ORDER.clear()  # a new process: the answer comes from the disk cache
    assert library_position_order(text_model) == POSITION_ORDER and len(calls) == 1
    stored = (tmp_path / "xdg" / "r1v" / "mtmd-position-order.json").read_text()
    assert f'"{mtmd_module._library_key()}": "patches,cls"' in stored
    assert library_position_order(text_model, refresh=True) == POSITION_ORDER and len(calls) == 2


def test_library_key_changes_with_the_library_file(tmp_path: Path):
    lib = tmp_path / "libmtmd.so"
    lib.write_bytes(b"a")
    first = position_order.library_key([lib], "0.3.36")
    assert position_order.library_key([lib], "0.3.37") != first
    lib.write_bytes(b"ab")
    assert position_order.library_key([lib], "0.3.36") != first


# --- both file orders give the reference's embeddings ------------------------------------------------------

@pytest.mark.parametrize("order", [POSITION_ORDER, CHECKPOINT_POSITION_ORDER])
def test_either_file_order_matches_the_reference(order: str, files: dict[str, Path], text_model: TextModel,
                                                 reference: np.ndarray, tmp_path: Path):
    assert position_order.file_order(files[order]) == order
    with MtmdContext(files[order], text_model, n_threads=2) as ctx:
        got = ctx.embed_image(_image()).embeddings
        loaded = ctx.loaded_path
    assert _min_cosine(got, reference) >= 0.999
    if order == POSITION_ORDER:
        assert loaded == files[order]  # already what this library wants: no copy
    else:
        assert loaded.parent == tmp_path / "xdg" / "r1v" / "mmproj-reordered"
        assert position_order.file_order(loaded) == POSITION_ORDER
        np.testing.assert_array_equal(_rows(loaded), _rows(files[POSITION_ORDER]))


def test_without_the_check_checkpoint_order_is_wrong_here(files: dict[str, Path], text_model: TextModel,
                                                          reference: np.ndarray):
    """What the check prevents: the checkpoint's order on this library moves every patch one position."""
    with MtmdContext(files[CHECKPOINT_POSITION_ORDER], text_model, n_threads=2, match_position_order=False) as ctx:
        got = ctx.embed_image(_image()).embeddings
    assert _min_cosine(got, reference) < 0.99


def test_a_class_token_first_library_gets_checkpoint_order(files: dict[str, Path], text_model: TextModel,
                                                           ckpt_path: Path, monkeypatch: pytest.MonkeyPatch):
    """Where the library puts the class token first, our file is opened as a copy in the checkpoint's order."""
    monkeypatch.setitem(mtmd_module._LIBRARY_ORDER, mtmd_module._library_key(), CHECKPOINT_POSITION_ORDER)
    loaded = mtmd_module._matching_file(files[POSITION_ORDER], text_model.model)
    assert loaded != files[POSITION_ORDER]
    with open_checkpoint(ckpt_path) as ckpt:
        checkpoint_rows = ckpt.read("vision_model.embeddings.position_embedding", np.float32)
    np.testing.assert_array_equal(_rows(loaded), checkpoint_rows)
    assert gguf.GGUFReader(loaded).get_field(POSITION_ORDER_KEY).contents() == CHECKPOINT_POSITION_ORDER
    assert mtmd_module._matching_file(files[POSITION_ORDER], text_model.model) == loaded  # written once


# --- the copy -----------------------------------------------------------------------------------------------

def test_reordered_copy_keeps_everything_else(files: dict[str, Path], tmp_path: Path):
    back = position_order.reordered_copy(files[CHECKPOINT_POSITION_ORDER], tmp_path / "back.gguf", POSITION_ORDER)
    a, b = gguf.GGUFReader(files[POSITION_ORDER]), gguf.GGUFReader(back)
    assert {f: a.fields[f].contents() for f in a.fields if not f.startswith("GGUF.")} == \
        {f: b.fields[f].contents() for f in b.fields if not f.startswith("GGUF.")}
    for ta, tb in zip(a.tensors, b.tensors, strict=True):
        assert (ta.name, ta.tensor_type) == (tb.name, tb.tensor_type)
        np.testing.assert_array_equal(np.asarray(ta.data), np.asarray(tb.data), err_msg=ta.name)


def test_bad_order_key_is_named(files: dict[str, Path], tmp_path: Path):
    path = tmp_path / "bad.gguf"
    writer = gguf.GGUFWriter(path, "clip")
    writer.add_string(POSITION_ORDER_KEY, "cls-first")
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    writer.close()
    with pytest.raises(ValueError, match=rf"{path}: r1v.vision.position_embd_order is 'cls-first'; expected one of "
                                         "patches,cls, cls,patches"):
        position_order.file_order(path)


def test_command_line_copy(files: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    out = tmp_path / "for-fixed-llama.gguf"
    assert position_order.main([str(files[POSITION_ORDER]), str(out), "--order", "cls,patches"]) == 0
    assert capsys.readouterr().out == f"{out}: position rows cls,patches (was patches,cls)\n"
    np.testing.assert_array_equal(_rows(out), _rows(files[CHECKPOINT_POSITION_ORDER]))


def test_note_names_the_builds_and_the_fix():
    assert "#25814" in POSITION_ORDER_NOTE and "PR #25844" in POSITION_ORDER_NOTE
    assert "llama-cpp-python 0.3.36" in POSITION_ORDER_NOTE


def test_mtmd_error_for_an_mmproj_with_a_bad_key(files: dict[str, Path], text_model: TextModel, tmp_path: Path):
    bad = tmp_path / "mmproj-bad.gguf"
    reader = gguf.GGUFReader(files[POSITION_ORDER])
    writer = gguf.GGUFWriter(bad, "clip")
    for field in reader.fields.values():
        if field.name.startswith("GGUF.") or field.name == "general.architecture":
            continue
        kind = field.types[0]
        value = "sideways" if field.name == POSITION_ORDER_KEY else field.contents()
        writer.add_key_value(field.name, value, kind,
                             sub_type=field.types[-1] if kind == gguf.GGUFValueType.ARRAY else None)
    for t in reader.tensors:
        writer.add_tensor_info(t.name, t.data.shape, t.data.dtype, t.data.nbytes, t.tensor_type)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    for t in reader.tensors:
        writer.write_tensor_data(t.data)
    writer.close()
    with pytest.raises(MtmdError, match="r1v.vision.position_embd_order is 'sideways'"):
        MtmdContext(bad, text_model)


def test_convert_prints_which_builds_the_mmproj_is_exact_for(tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    from r1v.cli import main
    from r1v.micro import model_path

    assert main(["convert", "gguf", str(model_path()), "-o", str(tmp_path / "out"), "--no-llm", "--no-progress"]) == 0
    line = capsys.readouterr().out.splitlines()[0]
    assert line.startswith(f"{tmp_path / 'out' / 'mmproj-model-f16.gguf'}  (0.8 MB; position rows patches,cls: exact "
                           "for llama.cpp builds without PR #25844")


@pytest.mark.parametrize("content, message", [
    (None, "No such file or directory"),
    (b"junk, not GGUF", "not a GGUF file (it starts with b'junk'"),
])
def test_command_line_names_a_bad_file_in_one_line(content: bytes | None, message: str, tmp_path: Path,
                                                   capsys: pytest.CaptureFixture[str]):
    source, out = tmp_path / "mmproj.gguf", tmp_path / "out.gguf"
    if content is not None:
        source.write_bytes(content)
    with pytest.raises(SystemExit) as stop:
        position_order.main([str(source), str(out), "--order", "cls,patches"])
    err = capsys.readouterr().err.strip().splitlines()
    assert stop.value.code == 2 and len(err) == 1 and message in err[0] and str(source) in err[0]
    assert sorted(p.name for p in tmp_path.iterdir()) == (["mmproj.gguf"] if content else [])  # nothing written
