"""The registry of known models (models.yaml, beside pyproject.toml), loaded into validated dataclasses.

In a source checkout or an editable install the file is the repository's top-level models.yaml; a built wheel
carries it as r1v/models.yaml (pyproject.toml's package-data). Both are `MODELS_YAML`: models.yaml in the folder
that holds runtime/.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

import yaml

from r1v.converters.resources import chat_template
from r1v.converters.schema import from_dict

from ..options import SamplingParams

MODELS_YAML = Path(__file__).resolve().parents[2] / "models.yaml"

FORMATS = ("safetensors", "awq", "gguf")


class RegistryError(ValueError):
    """models.yaml (or a user registry file) is malformed; the message names the entry and field."""


def models_yaml_text() -> str:
    """The bundled registry's text."""
    return MODELS_YAML.read_text(encoding="utf-8")


@dataclass(frozen=True)
class ModelEntry:
    name: str
    repo_id: str
    family: str
    format: str
    chat_template: str
    pre_tokenizer: str
    files: list[str]
    generation: SamplingParams = field(default_factory=SamplingParams)  # the entry's sampling defaults
    license: str | None = None
    base: str | None = None
    default_quant: str | None = None
    quants: dict[str, list[str]] = field(default_factory=dict)
    description: str | None = None

    def allow_patterns(self, quant: str | None = None) -> list[str]:
        """The file patterns to download for this entry (and quant, for GGUF releases)."""
        if not self.quants:
            return list(self.files)
        quant = (quant or self.default_quant or "").lower()
        if quant not in self.quants:
            raise RegistryError(f"model {self.name!r} has no quant {quant!r}; known: {sorted(self.quants)}")
        return list(self.files) + list(self.quants[quant])


@dataclass(frozen=True)
class Registry:
    models: dict[str, ModelEntry]

    def get(self, name: str) -> ModelEntry:
        try:
            return self.models[name.lower()]
        except KeyError:
            raise KeyError(f"unknown model {name!r}; known: {', '.join(sorted(self.models))}") from None

    def __contains__(self, name: str) -> bool:
        return name.lower() in self.models


def _parse_entry(name: str, data: Any, where: str) -> ModelEntry:
    place = f"{where}: model {name!r}"
    if not isinstance(data, dict):
        raise RegistryError(f"{place}: expected a mapping, got {type(data).__name__}")
    try:
        generation = from_dict(
            SamplingParams, data.get("generation") or {}, f"{place}: generation", RegistryError, strict=True
        )
    except RegistryError:
        raise
    except ValueError as e:  # SamplingParams' own range checks
        raise RegistryError(f"{place}: generation: {e}") from None
    entry = from_dict(ModelEntry, data, place, RegistryError, strict=True, name=name, generation=generation)
    if entry.format not in FORMATS:
        raise RegistryError(f"{place}: field 'format' is {entry.format!r}; expected one of {FORMATS}")
    if not all(isinstance(p, str) for p in entry.files):
        raise RegistryError(f"{place}: field 'files' must be a list of strings")
    for quant, patterns in entry.quants.items():
        if not isinstance(patterns, list) or not all(isinstance(p, str) for p in patterns):
            raise RegistryError(f"{place}: quants.{quant} must be a list of file patterns")
    if entry.default_quant is not None and entry.default_quant not in entry.quants:
        raise RegistryError(f"{place}: default_quant {entry.default_quant!r} is not one of quants {sorted(entry.quants)}")
    try:
        chat_template(entry.chat_template)
    except KeyError as e:
        raise RegistryError(f"{place}: field 'chat_template': {e.args[0]}") from None
    return entry


def parse_registry(text: str, where: str = "models.yaml") -> Registry:
    """Parse registry YAML text; `where` names the file in errors."""
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise RegistryError(f"{where}: not valid YAML ({e})") from None
    if not isinstance(data, dict) or not isinstance(data.get("models"), dict):
        raise RegistryError(f"{where}: expected a top-level 'models' mapping")
    unknown = sorted(set(data) - {"models", "generation_presets"})
    if unknown:
        raise RegistryError(f"{where}: unknown top-level key {unknown[0]!r}")
    models: dict[str, ModelEntry] = {}
    for name, entry in data["models"].items():
        models[str(name).lower()] = _parse_entry(str(name), entry, where)
    for entry in models.values():
        if entry.base is not None and entry.base not in models:
            raise RegistryError(f"{where}: model {entry.name!r}: base {entry.base!r} is not in the registry")
    return Registry(models)


@lru_cache(maxsize=1)
def load_registry(path: str | Path | None = None) -> Registry:
    """The bundled registry, or the one at `path`."""
    if path is None:
        return parse_registry(models_yaml_text(), "models.yaml")
    path = Path(path)
    return parse_registry(path.read_text(encoding="utf-8"), str(path))
