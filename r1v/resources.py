"""Files shipped inside the package: chat templates and the model registry."""
from __future__ import annotations

from importlib import resources


def chat_template(name: str) -> str:
    """The Jinja chat template shipped as r1v/chat_templates/<name>.jinja."""
    file = resources.files("r1v") / "chat_templates" / f"{name}.jinja"
    if not file.is_file():
        known = sorted(p.name.removesuffix(".jinja") for p in (resources.files("r1v") / "chat_templates").iterdir())
        raise KeyError(f"no chat template named {name!r}; known: {known}")
    return file.read_text(encoding="utf-8")


def models_yaml_text() -> str:
    return (resources.files("r1v") / "models.yaml").read_text(encoding="utf-8")
