"""Files shipped inside the package: the bundled chat templates (converters/chat_templates/*.jinja)."""
from __future__ import annotations

from importlib import resources

TEMPLATES_DIR = "converters/chat_templates"  # where they live in the source tree (named in `r1v inspect`)


def chat_template(name: str) -> str:
    """The Jinja chat template shipped as converters/chat_templates/<name>.jinja."""
    folder = resources.files("r1v.converters") / "chat_templates"
    file = folder / f"{name}.jinja"
    if not file.is_file():
        known = sorted(p.name.removesuffix(".jinja") for p in folder.iterdir())
        raise KeyError(f"no chat template named {name!r}; known: {known}")
    return file.read_text(encoding="utf-8")
