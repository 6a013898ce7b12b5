"""Whether a projector belongs to a model: the provenance keys the converter writes into both GGUF files of a
model (`converters.gguf_common.add_provenance`) name the checkpoint they come from."""
from __future__ import annotations

from ...options import MismatchedProjectorError
from .gguf_header import GGUFHeader

__all__ = ["SOURCE_KEYS", "check_same_source"]

# The config's hash, and the checkpoint's directory name.
SOURCE_KEYS = ("r1v.source.config_sha256", "r1v.source.checkpoint")


def _source_value(header: GGUFHeader, key: str) -> str | None:
    value = header.get(key)
    if not isinstance(value, str) or not value:
        return None
    if key == "r1v.source.checkpoint":  # older files store the converting machine's path: compare its name
        value = value.replace("\\", "/").rstrip("/").rsplit("/", 1)[-1]
    return value


def check_same_source(model: GGUFHeader, mmproj: GGUFHeader) -> None:
    """Refuse a projector converted from another checkpoint than the LLM: the same shapes run, but give
    garbage. Only keys both files carry are compared (stock-converted or older files have none: no check)."""
    for key in SOURCE_KEYS:
        ours, theirs = _source_value(model, key), _source_value(mmproj, key)
        if ours is not None and theirs is not None and ours != theirs:
            raise MismatchedProjectorError(
                f"{mmproj.path} does not belong to {model.path}: they come from different checkpoints ({key} is "
                f"{theirs!r} in the projector, {ours!r} in the model). Give the projector converted with this model "
                f"(mmproj=PATH, --mmproj PATH), or load with allow_mismatched_mmproj=True "
                f"(--allow-mismatched-mmproj) if you are sure they go together")
