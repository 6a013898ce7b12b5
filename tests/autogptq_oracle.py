"""AutoGPTQ's own GPTQ (auto_gptq/quantization/gptq.py + quantizer.py) as a test oracle, loaded from the
installed files alone (importing `auto_gptq` whole wants its CUDA extensions; scripts/setup.sh installs
auto-gptq 0.7.1 without dependencies)."""
from __future__ import annotations

import importlib.util
import sys
import types
from pathlib import Path
from types import ModuleType

from autoawq_oracle import oracle_missing


def autogptq_gptq() -> ModuleType:
    spec = importlib.util.find_spec("auto_gptq")
    if spec is None or not spec.submodule_search_locations:
        oracle_missing("auto-gptq is not installed (pip install --no-deps auto-gptq==0.7.1): no AutoGPTQ oracle")
    root = Path(next(iter(spec.submodule_search_locations))) / "quantization"
    package = "_autogptq_oracle"
    if package not in sys.modules:  # gptq.py imports `.quantizer`: give it a package of its own
        pkg = types.ModuleType(package)
        pkg.__path__ = [str(root)]
        sys.modules[package] = pkg
    for name in ("quantizer", "gptq"):
        full = f"{package}.{name}"
        if full not in sys.modules:
            mod_spec = importlib.util.spec_from_file_location(full, root / f"{name}.py")
            module = importlib.util.module_from_spec(mod_spec)
            sys.modules[full] = module
            mod_spec.loader.exec_module(module)
    return sys.modules[f"{package}.gptq"]
