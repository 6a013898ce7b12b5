"""The README format table's tool (`python -m r1v.micro.formats`): its arithmetic and its reuse of the
reference. (The whole measurement builds a dozen formats and takes tens of minutes: it is run by hand, its
figures are in README.md.)"""
from __future__ import annotations

import math

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
