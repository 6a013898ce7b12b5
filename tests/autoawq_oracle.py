"""AutoAWQ's own packing code as a test oracle: awq/utils/packing_utils.py alone (importing `awq` whole
wants accelerate, old transformers, ...; scripts/setup.sh installs autoawq 0.2.9 without dependencies)."""
from __future__ import annotations

import importlib.util
import os
from pathlib import Path
from types import ModuleType

import pytest


def oracle_missing(message: str) -> None:
    """A missing oracle package fails under CI=true (scripts/setup.sh installs it there), else skips."""
    if os.environ.get("CI") == "true":
        pytest.fail(f"{message}; scripts/setup.sh should have installed it under CI=true")
    pytest.skip(message)


def autoawq_packing_utils() -> ModuleType:
    spec = importlib.util.find_spec("awq")
    if spec is None or not spec.submodule_search_locations:
        oracle_missing("autoawq is not installed (pip install --no-deps autoawq==0.2.9): no AutoAWQ oracle")
    path = Path(next(iter(spec.submodule_search_locations))) / "utils" / "packing_utils.py"
    mod_spec = importlib.util.spec_from_file_location("_autoawq_packing_utils", path)
    module = importlib.util.module_from_spec(mod_spec)
    mod_spec.loader.exec_module(module)
    return module
