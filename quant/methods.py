"""The quantization methods `quantize_checkpoint_awq` / `r1v convert awq --method` offer, as data (no torch
here: the CLI lists them without importing it).

Per decoder layer (quant/awq.py `quantize_layer_awq`): AWQ's scale search, its clip search, and how the
weights are rounded on the fp16 group grid: to nearest, or by GPTQ (quant/gptq.py). With GPTQ the clip search
is skipped: a narrowed grid only takes levels away from the error feedback (measured worse on micro-r1v).
Every method writes the same AutoAWQ GEMM layout.
"""
from __future__ import annotations

from typing import Any

METHOD_STEPS: dict[str, dict[str, Any]] = {
    "awq+gptq": {"scale": True, "clip": False, "rounding": "gptq"},
    "awq": {"scale": True, "clip": True, "rounding": "rtn"},
    "gptq": {"scale": False, "clip": False, "rounding": "gptq"},
    "rtn": {"scale": False, "clip": False, "rounding": "rtn"},
}
METHODS = tuple(METHOD_STEPS)
# The lowest KL to the fp model on micro-r1v (README, "micro-r1v"); "awq" is AutoAWQ's algorithm alone.
DEFAULT_METHOD = "awq+gptq"
