"""models.yaml: the bundled registry loads, and every kind of mistake names the entry and field."""
from __future__ import annotations

import pytest
import yaml

from r1v.converters.resources import chat_template
from r1v.runtime.options import SamplingParams
from r1v.runtime.files.registry import RegistryError, load_registry, models_yaml_text, parse_registry


def test_bundled_registry_has_the_skywork_releases():
    registry = load_registry()
    for name in ("skywork-r1v-38b", "skywork-r1v2-38b", "skywork-r1v3-38b", "skywork-r1v-38b-awq",
                 "skywork-r1v2-38b-awq", "skywork-r1v3-38b-awq", "skywork-r1v3-38b-gguf"):
        entry = registry.get(name)
        assert entry.repo_id.startswith("Skywork/")
        assert entry.generation == SamplingParams(0.6, 0.95, 0, 0.0, 1.05, max_tokens=64000)
        assert chat_template(entry.chat_template)
    assert registry.get("Skywork-R1V-38B").chat_template == "deepseek-r1-think"
    assert registry.get("skywork-r1v-38b").pre_tokenizer == "deepseek-r1-qwen"
    assert registry.get("skywork-r1v3-38b").chat_template == "chatml-think"
    gguf = registry.get("skywork-r1v3-38b-gguf")
    assert any("mmproj" in p for p in gguf.allow_patterns("q8_0"))
    assert gguf.allow_patterns() == gguf.allow_patterns("q4_k_m")
    with pytest.raises(RegistryError, match="has no quant 'q2_k'"):
        gguf.allow_patterns("q2_k")
    with pytest.raises(KeyError, match="unknown model 'nope'"):
        registry.get("nope")


def _mutated(edit) -> str:
    data = yaml.safe_load(models_yaml_text())
    edit(data["models"]["skywork-r1v3-38b"])
    return yaml.safe_dump(data)


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda e: e.update(colour="blue"), r"model 'skywork-r1v3-38b': unknown field 'colour'"),
        (lambda e: e.pop("repo_id"), r"model 'skywork-r1v3-38b': missing required field 'repo_id'"),
        (lambda e: e.update(repo_id=7), r"model 'skywork-r1v3-38b': field 'repo_id' should be str, got int"),
        (lambda e: e.update(generation={"temperature": "hot"}),
         r"model 'skywork-r1v3-38b': generation: field 'temperature' should be float"),
        (lambda e: e.update(generation={"top_q": 1}), r"generation: unknown field 'top_q'"),
        (lambda e: e.update(generation={"temperature": -1.0}),  # SamplingParams' own checks, at load
         r"model 'skywork-r1v3-38b': generation: temperature must be >= 0"),
        (lambda e: e.update(format="onnx"), r"field 'format' is 'onnx'"),
        (lambda e: e.update(chat_template="vicuna"), r"field 'chat_template': no chat template named 'vicuna'"),
        (lambda e: e.update(base="skywork-r9"), r"base 'skywork-r9' is not in the registry"),
        (lambda e: e.update(files="*.json"), r"field 'files' should be list"),
    ],
)
def test_errors_name_entry_and_field(edit, message):
    with pytest.raises(RegistryError, match=message) as e:
        parse_registry(_mutated(edit), "custom.yaml")
    assert str(e.value).startswith("custom.yaml")


def test_top_level_errors():
    with pytest.raises(RegistryError, match="expected a top-level 'models' mapping"):
        parse_registry("[]")
    with pytest.raises(RegistryError, match="unknown top-level key 'extras'"):
        parse_registry("models: {}\nextras: 1\n")
    with pytest.raises(RegistryError, match="not valid YAML"):
        parse_registry("models: [")
