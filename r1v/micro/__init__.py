"""micro-r1v: a small model with the exact Skywork-R1V architecture, trained here on a synthetic visual
reasoning task (`task`), by `train` (`r1v train-micro`); the trained checkpoint ships in `model/`.

The bundled model is the default of `r1v demo` and the yardstick for how much accuracy each quantization
keeps. Importing this package imports neither torch nor the task's image code.
"""
from __future__ import annotations

from importlib import resources
from pathlib import Path

NAME = "micro-r1v"


def model_path() -> Path:
    """Directory of the shipped micro-r1v checkpoint."""
    return Path(str(resources.files("r1v.micro") / "model"))


def demo_image_path() -> Path:
    return Path(str(resources.files("r1v.micro") / "demo.png"))


def demo_question() -> dict[str, str]:
    """{"question", "answer"} of the bundled demo image."""
    import json

    return json.loads((resources.files("r1v.micro") / "demo.json").read_text(encoding="utf-8"))


def demo_files(quant: str | None = None) -> Path:
    """micro-r1v's files at `quant`, built from the shipped checkpoint on first use (see `files`). Not named
    `build`: that is a submodule, and importing it would replace the function on the package."""
    from .files import micro_model

    return micro_model(quant)


def register() -> None:
    """Make `r1v.load("micro-r1v")` (and every command taking a model name) find the demo model."""
    from r1v.runtime.files.resolve import register_local_model

    register_local_model(NAME, demo_files)
