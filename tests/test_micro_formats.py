"""The README format table's tool (`python -m r1v.micro.formats`): its arithmetic and its reuse of the
reference. (The whole measurement builds a dozen formats and takes tens of minutes: it is run by hand, its
figures are in README.md.)"""
from __future__ import annotations

import json
import math

import numpy as np
import pytest

from r1v.micro import formats


def test_standard_error_is_the_binomial_one():
    assert formats.standard_error(0.9, 1000) == pytest.approx(math.sqrt(0.9 * 0.1 / 1000))
    assert formats.standard_error(0.5, 200) == pytest.approx(0.0354, abs=1e-4)
    assert formats.standard_error(0.0, 0) == 0.0


def test_markdown_rows_show_accuracy_with_its_error_and_no_kl_for_the_reference():
    rows = [formats.Row("GGUF F16", 0.9, 0.0095, 900, 1000, 0.0, 1.0, 40.0),
            formats.Row("GGUF Q2_K", 0.871, 0.0106, 871, 1000, 2.345e-3, 0.97654, 41.2)]
    lines = formats.markdown(rows).splitlines()
    assert lines[2] == "| GGUF F16 | 90.0% ± 0.9% | — | — |"
    assert lines[3] == "| GGUF Q2_K | 87.1% ± 1.1% | 2.3e-03 | 97.65% |"


class CountingModel:
    def __init__(self):
        self.calls = {"generate": 0, "logprobs": 0, "reset": 0}

    def reset(self):
        self.calls["reset"] += 1

    def generate(self, messages, **kwargs):
        self.calls["generate"] += 1
        return ("answer", messages[0]["content"], kwargs["max_tokens"])

    def logprobs(self, messages, tokens):
        self.calls["logprobs"] += 1
        return [len(tokens)]


def test_the_reference_answers_each_item_once_for_all_formats():
    model = CountingModel()
    ref = formats._RememberedReference(model)
    a = [{"role": "user", "content": "a"}]
    b = [{"role": "user", "content": "b"}]
    for _ in range(3):  # three formats scored against it
        ref.reset()
        assert ref.generate(a, temperature=0, max_tokens=8) == ("answer", "a", 8)
        assert ref.logprobs(a, [1, 2]) == [2]
    ref.generate(b, temperature=0, max_tokens=8)
    ref.generate(a, temperature=0, max_tokens=9)  # other settings: another answer
    ref.logprobs(a, [1, 2, 3])
    assert model.calls == {"generate": 3, "logprobs": 2, "reset": 3}


def _write_items(work, name, kl_by_id):
    lines = ['{"r1v_eval_results": 1}'] + [json.dumps({"id": k, "kl": v}) for k, v in kl_by_id.items()]
    formats.results_path(work, name).write_text("\n".join(lines) + "\n")


def test_imatrix_choice_pairs_items_and_counts_ties_half(tmp_path):
    from r1v.micro import imatrix_choice

    kl = {"text positions": [1.0, 2.0, 3.0, 4.0], "every position": [2.0, 2.0, 4.0, 8.0],
          "text without images": [1.0, 1.0, 1.0, 1.0], "no imatrix": [4.0, 4.0, 4.0, 4.0]}
    for quant in formats.IMATRIX_QUANTS:
        for variant, values in kl.items():
            by_id = {f"item-{i}": v for i, v in enumerate(values)} | {"unscored": None}
            _write_items(tmp_path, imatrix_choice._row_name(quant, variant), by_id)
    kls = imatrix_choice.item_kls(tmp_path)
    found = {(p.quant, p.variant, p.versus): p for p in imatrix_choice.pairs(kls)}
    assert len(found) == 3 * 6
    p = found[("Q2_K", "every position", "text positions")]
    assert p.kl_ratio == pytest.approx(16 / 10) and p.lower_on == pytest.approx(0.5 / 4)
    d = np.array([1.0, 0.0, 1.0, 4.0])
    assert p.mean_difference == pytest.approx(d.mean())
    assert p.difference_standard_error == pytest.approx(d.std(ddof=1) / 2)
    assert found[("Q4_K_M", "text without images", "no imatrix")].lower_on == 1.0
    assert p.geometric_ratio == pytest.approx(math.exp(np.mean(np.log([2.0, 1.0, 4 / 3, 2.0]))))
    assert p.log_ratio_standard_error == pytest.approx(np.std(np.log([2.0, 1.0, 4 / 3, 2.0]), ddof=1) / 2)
    table = imatrix_choice.pairs_markdown(list(found.values())).splitlines()
    assert table[2] == ("| Q4_K_M | every position | text positions | 1.60 | +1.5e+00 ± 8.7e-01 | 1.52 (± 0.169) "
                        "| 12% |")

    rows = [formats.Row(imatrix_choice._row_name(quant, variant), 0.5, 0.0, 1, 2, float(np.mean(kl[variant])), 1.0, 1.0)
            for quant in formats.IMATRIX_QUANTS for variant in imatrix_choice.MATRICES]
    summary = imatrix_choice.summary_markdown(kls, rows).splitlines()
    assert summary[0] == ("| KL to F16: mean / geometric mean (accuracy) | no imatrix | every position | "
                          "text positions | text without images |")
    assert summary[2] == ("| Q4_K_M | 4.0e+00 / 4.00e+00 (50.0%) | 4.0e+00 / 3.36e+00 (50.0%) | "
                          "2.5e+00 / 2.21e+00 (50.0%) | 1.0e+00 / 1.00e+00 (50.0%) |")


@pytest.mark.parametrize("tool", ["formats", "imatrix_choice"])
def test_a_folder_that_is_no_checkpoint_is_refused_before_any_work(tmp_path, capsys, tool):
    import importlib

    main = importlib.import_module(f"r1v.micro.{tool}").main
    with pytest.raises(SystemExit) as exit_info:
        main([str(tmp_path / "nothing"), "--work", str(tmp_path / "work")])
    assert exit_info.value.code == 2
    assert f"{tmp_path / 'nothing'}: not a checkpoint directory (no config.json)" in capsys.readouterr().err
    assert not (tmp_path / "work").exists()
