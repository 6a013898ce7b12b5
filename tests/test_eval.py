"""`r1v eval`: teacher-forced log-probabilities equal the torch reference's, KL and top-1 agreement, exact-match
scoring, resumable results, clear errors on bad items, and the command."""
from __future__ import annotations

import json

import numpy as np
import pytest

from r1v.cli import main
from r1v.converters.gguf import convert_gguf
from r1v.micro import task
from r1v.runtime.api import load
from r1v.apps.evaluation import (EvalItem, answers_match, evaluate, kl_and_agreement, read_items)
from r1v.testing import make_tiny_checkpoint

SIZES = dict(llm_hidden=128, llm_intermediate=256, llm_layers=2, llm_heads=4, llm_kv_heads=2,
             vit_hidden=64, vit_intermediate=128, vit_heads=4, vit_layers=2, image_size=224)
THREADS = dict(n_threads=1, n_threads_batch=1, n_ctx=1024)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("eval")
    ckpt = make_tiny_checkpoint(root / "tiny", vit="300m", seed=3, dtype="f32", **SIZES)
    made = convert_gguf(ckpt, root / "gguf", quant=["f16", "q8_0"], mmproj_quant="f16", progress=False)
    data = task.write_items(task.TEST_SEED + 40, 6, root / "data" / "items.jsonl")
    return ckpt, made, data


@pytest.fixture(scope="module")
def f16(files):
    with load(files[1].llm["f16"], **THREADS) as m:
        yield m


def test_logprobs_equal_the_torch_reference(files, f16):
    torch = pytest.importorskip("torch")
    from tokenizers import Tokenizer

    from r1v.runtime.image import TilingConfig, prepare_image
    from r1v.runtime.model import R1VModel

    ckpt = files[0]
    item = next(i for i in read_items(files[2]) if i.image is not None)
    messages = [{"role": "user", "content": [{"type": "image", "image": str(item.image)},
                                             {"type": "text", "text": item.question}]}]
    result = f16.generate(messages, temperature=0, max_tokens=12)
    ours = f16.logprobs(messages, result.tokens)
    assert ours.shape == (len(result.tokens), f16._backend.n_vocab)
    # greedy picked the argmax of each row it was sampled from
    assert ours.argmax(axis=-1).tolist() == result.tokens

    reference = R1VModel.from_checkpoint(ckpt, dtype=torch.float32)
    tokenizer = Tokenizer.from_file(str(ckpt / "tokenizer.json"))
    prepared = prepare_image(str(item.image), TilingConfig(image_size=224))
    prompt = ("<|im_start|>user\n<img>" + "<IMG_CONTEXT>" * 64 * prepared.num_tiles + "</img>\n" + item.question
              + "<|im_end|>\n<|im_start|>assistant\n<think>\n")
    ids = tokenizer.encode(prompt, add_special_tokens=False).ids
    with torch.no_grad():
        logits = reference(torch.tensor([ids + result.tokens[:-1]]), torch.from_numpy(prepared.pixel_values))[0]
    expected = torch.log_softmax(logits[len(ids) - 1:].double(), dim=-1).numpy()
    np.testing.assert_allclose(ours[:, : expected.shape[1]], expected, atol=2e-2)


def test_kl_and_agreement_numbers():
    p = np.log(np.array([[0.5, 0.25, 0.25], [0.1, 0.8, 0.1]]))
    q = np.log(np.array([[0.25, 0.5, 0.25], [0.1, 0.8, 0.1]]))
    kl, top1 = kl_and_agreement(p, q)
    assert kl == pytest.approx((0.5 * np.log(2) + 0.25 * np.log(0.5)) / 2)
    assert top1 == 0.5
    assert kl_and_agreement(p, p) == (0.0, 1.0)
    with pytest.raises(ValueError, match="vocabulary"):
        kl_and_agreement(p, q[:, :2])


def test_answers_match():
    assert answers_match(" 7.", "7") and answers_match("red", "red ")
    assert not answers_match("Red", "red") and not answers_match("17", "7")


def test_eval_against_itself_and_a_quantized_model(files, f16):
    items = read_items(files[2])
    same = evaluate(f16, items[:2], reference=f16, max_tokens=24, progress=False)
    assert same.mean_kl == pytest.approx(0.0, abs=1e-6) and same.top1_agreement == 1.0
    with load(files[1].llm["q8_0"], **THREADS) as q8:
        report = evaluate(q8, items[:2], reference=f16, max_tokens=24, progress=False)
    assert 0.0 < report.mean_kl < 0.05, report
    assert 0.8 <= report.top1_agreement <= 1.0
    assert report.total == 2 and 0.0 <= report.accuracy <= 1.0 and report.mean_output_tokens > 0


def test_eval_resumes_from_its_results_file(files, f16, tmp_path):
    items = read_items(files[2], limit=4)
    results = tmp_path / "r.json.items.jsonl"
    names = {"model": "tiny", "data": "items"}
    seen: list[str] = []
    first = evaluate(f16, items[:3], results_path=results, names=names, max_tokens=16, progress=False,
                     on_item=lambda r: seen.append(r.id))
    assert seen == [i.id for i in items[:3]]
    with results.open("a") as f:
        f.write('{"id": "' + items[3].id + '", "task": nu')  # a run killed mid-line
    seen.clear()
    full = evaluate(f16, items, results_path=results, names=names, max_tokens=16, progress=False,
                    on_item=lambda r: seen.append(r.id))
    assert seen == [items[3].id]  # only the unfinished item is run again
    assert full.total == 4 and full.correct >= first.correct
    assert len(results.read_text().splitlines()) == 1 + 4
    with pytest.raises(ValueError, match="another run"):
        evaluate(f16, items, results_path=results, names={**names, "model": "other"}, progress=False)


def test_bad_items_are_named(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"question": "q", "answer": "1"}\n{"question": "q"\n')
    with pytest.raises(ValueError, match=r"bad.jsonl:2: not valid JSON \(Expecting ',' delimiter at column 17\)"):
        read_items(bad)
    bad.write_text('{"question": "q", "answer": "1"}\n[1]\n')
    with pytest.raises(ValueError, match=r"bad.jsonl:2: expected a JSON object, got list"):
        read_items(bad)
    bad.write_bytes(b'{"question": "q", "answer": "1"}\n{"question": "caf\xe9", "answer": "1"}\n')
    with pytest.raises(ValueError, match=r"bad.jsonl:2: not UTF-8 text \(byte 0xe9 at column 18\)"):
        read_items(bad)
    bad.write_text('{"question": "q", "answer": "1"}\n{"question": "q"}\n')
    with pytest.raises(ValueError, match=r"bad.jsonl:2: field 'answer'"):
        read_items(bad)
    bad.write_text('{"question": "q", "answer": "1", "image": "nope.png"}\n')
    with pytest.raises(ValueError, match=r"bad.jsonl:1: field 'image': no file"):
        read_items(bad)
    ok = tmp_path / "ok.jsonl"
    ok.write_text('{"question": "2+2?", "answer": 4, "id": "a"}\n\n{"question": "x", "answer": "y"}\n')
    assert read_items(ok) == [EvalItem("a", "2+2?", "4"), EvalItem("line-3", "x", "y")]


def test_eval_command_writes_a_report(files, tmp_path, capsys):
    out = tmp_path / "report.json"
    argv = ["eval", str(files[1].llm["q8_0"]), str(files[2]), "--limit", "2", "--reference", str(files[1].llm["f16"]),
            "-o", str(out), "--max-tokens", "16", "--threads", "1", "--n-threads-batch", "1", "--n-ctx", "1024"]
    assert main(argv) == 0
    report = json.loads(out.read_text())
    assert 0.0 <= report["accuracy"] <= 1.0 and report["total"] == 2
    assert report["mean_kl"] is not None and 0.0 <= report["top1_agreement"] <= 1.0
    assert "accuracy" in capsys.readouterr().out
    assert main(argv) == 0  # resumed: nothing left to do, same report
    assert json.loads(out.read_text())["correct"] == report["correct"]
