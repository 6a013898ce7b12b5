"""What `r1v convert awq` writes for the vision tower, and where each output loads (issue 19 item 3).

The AutoAWQ GEMM layout has no int8 mode: an int8 vision tower in an AWQ checkpoint is read by neither vLLM nor
transformers, so the export refuses `--vision int8` (naming the option and the load-time placement to use
instead), and int8 stays a placement of the awq backend: `awq[vision=int8]` on an fp16 export. Checkpoints an
earlier version wrote with `int8_weight` / `int8_scale` still load in r1v, to the same model as the placement.
"""
from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("gguf", reason="r1v convert awq records a llama.cpp imatrix (gguf names)")

from r1v.cli import main  # noqa: E402
from r1v.converters.awq import INDEX_FILE, array_tensor, read_part, write_part  # noqa: E402
from r1v.converters.gguf_common import ConversionError  # noqa: E402
from r1v.quant.driver import VISION_LINEARS, quantize_checkpoint_awq  # noqa: E402
from r1v.runtime.api import load  # noqa: E402
from r1v.runtime.backends.awq.qlinear import Int8Linear  # noqa: E402
from r1v.testing import make_tiny_checkpoint  # noqa: E402

SIZES = dict(image_size=224, llm_layers=2)
RUN = dict(group_size=32, n_samples=4, seq_len=160, method="rtn", progress=False)
OPTIONS = dict(n_ctx=1024, n_batch=48, device="cpu", kernel="torch")
GREEDY = dict(temperature=0, repetition_penalty=1.0, max_tokens=12)
REFUSAL = (r"not written to checkpoints: vLLM and transformers read no int8 vision tower in an AWQ "
           r"checkpoint\. Convert with --vision fp16 \(every loader\) or int4 \(the AWQ layout\), and hold the tower "
           r"in int8 when loading with r1v: --placement 'awq\[vision=int8\]'")


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> Path:
    return make_tiny_checkpoint(tmp_path_factory.mktemp("awq-export") / "tiny", vit="6b", seed=3, **SIZES)


def test_the_export_refuses_int8_and_writes_nothing(ckpt, tmp_path):
    out = tmp_path / "out"
    with pytest.raises(ConversionError, match=r"^vision='int8' \(--vision int8\) is " + REFUSAL):
        quantize_checkpoint_awq(ckpt, out, vision="int8", **RUN)
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(ConversionError, match=r"unknown vision mode 'int2'; choose from fp16, int4$"):
        quantize_checkpoint_awq(ckpt, out, vision="int2", **RUN)


def test_the_command_line_refuses_int8_naming_the_placement(ckpt, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["convert", "awq", str(ckpt), "-o", str(tmp_path / "out"), "--vision", "int8"])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and "Traceback" not in err
    assert re.search(r"^r1v convert awq: error: argument --vision: int8 is " + REFUSAL, err, re.MULTILINE)
    assert "--placement 'awq[vision=int8]'" in err and "--vision {fp16,int4}" in err
    assert not (tmp_path / "out").exists()


def _as_earlier_int8_export(src: Path, dst: Path) -> Path:
    """`src` (an AWQ checkpoint with an fp16 vision tower) as `--vision int8` wrote it before it was refused:
    each ViT linear `<p>.weight` became `<p>.int8_weight` (int8 [out, in]) + `<p>.int8_scale` (fp16 [out])."""
    shutil.copytree(src, dst)
    index = json.loads((dst / INDEX_FILE).read_text())
    weight_map = index["weight_map"]
    for shard in sorted(dst.glob("model-*.safetensors")):
        arrays, _ = read_part(shard)
        tensors = []
        for name, value in arrays.items():
            module, _, leaf = name.rpartition(".")
            if leaf == "weight" and module.startswith("vision_model.encoder.") and module.endswith(VISION_LINEARS):
                q = Int8Linear.quantize(torch.from_numpy(value), None)
                tensors += [array_tensor(f"{module}.int8_weight", q.int8_weight.numpy()),
                            array_tensor(f"{module}.int8_scale", q.int8_scale.numpy())]
                del weight_map[name]
                weight_map[f"{module}.int8_weight"] = weight_map[f"{module}.int8_scale"] = shard.name
            else:
                tensors.append(array_tensor(name, value))
        shard.unlink()  # copytree copied the data; the part file the shard was linked to is not touched
        write_part(shard, tensors)
    (dst / INDEX_FILE).write_text(json.dumps(index))
    config = json.loads((dst / "config.json").read_text())
    config["r1v_quantization"]["vision"] = {"mode": "int8"}
    (dst / "config.json").write_text(json.dumps(config))
    return dst


@pytest.mark.slow
def test_int8_is_a_load_time_placement_equal_to_the_earlier_stored_int8(ckpt, tmp_path):
    out = tmp_path / "fp16"
    quantize_checkpoint_awq(ckpt, out, vision="fp16", **RUN)
    config = json.loads((out / "config.json").read_text())
    assert config["quantization_config"]["modules_to_not_convert"] == ["vision_model", "mlp1"]
    assert config["r1v_quantization"]["vision"] == {"mode": "fp16"}
    legacy = _as_earlier_int8_export(out, tmp_path / "legacy-int8")

    image = np.random.default_rng(5).integers(0, 256, (224, 448, 3), dtype=np.uint8)
    from PIL import Image

    picture = Image.fromarray(image)
    results = {}
    for name, path, placement in (("placement", out, "awq[vision=int8]"), ("stored", legacy, None)):
        with load(path, placement=placement, **OPTIONS) as model:
            backend = model._backend
            qkv = backend.model.vision_model.encoder.layers[0].attn.qkv
            assert isinstance(qkv, Int8Linear) and backend.placement == "awq[vision=int8,embed=gpu]"
            results[name] = (model.generate("How many red circles?", images=[picture], **GREEDY),
                             qkv.int8_weight.clone(), qkv.int8_scale.clone())
    (a, wa, sa), (b, wb, sb) = results["placement"], results["stored"]
    assert torch.equal(wa, wb) and torch.equal(sa, sb)  # one int8 rule, at load or stored
    assert a.prompt_tokens == b.prompt_tokens > 64 and a.tokens == b.tokens and len(a.tokens) == 12
