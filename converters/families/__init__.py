"""Model families: what differs between checkpoint layouts, one module per family."""
from __future__ import annotations

from .skywork_chat import SKYWORK_CHAT, Family

FAMILIES: tuple[Family, ...] = (SKYWORK_CHAT,)


def family_for(architecture: str | None, model_type: str | None) -> Family | None:
    """The family whose architecture names or model types match; None when unknown."""
    for family in FAMILIES:
        if architecture is not None:
            if architecture in family.architectures:
                return family
        elif model_type in family.model_types:
            return family
    return None

__all__ = ["FAMILIES", "Family", "family_for", "SKYWORK_CHAT"]
