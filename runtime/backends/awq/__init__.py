"""The AWQ backend: AutoAWQ GEMM checkpoints on torch: torch's own int4 kernels where the build has them (CPU,
NVIDIA GPUs of sm80+), Triton kernels on other CUDA devices, a pure-torch path elsewhere.

- `int4`: the AutoAWQ weights repacked at load for torch's int4 kernels, and the Triton pass that dequantizes
  their CUDA tile layout for prefill.
- `kernels`: the Triton GEMV / fused GEMM / dequantize kernels and the torch dequantize path.
- `qlinear`: `Int4Linear`, `AWQLinear` and `Int8Linear`, drop-in quantized linears for the torch reference model.
- `loader`: the reference model built from an AWQ checkpoint, placements (`r1v plan`'s keys) applied.
- `sampling`, `tokenizer`: the llama.cpp backend's sampling and token pieces, in torch / `tokenizers`.
- `backend`: `AWQBackend`, what `r1v.load()` runs AWQ checkpoints with.
"""
from .backend import AWQBackend, choose_kernel
from .loader import LoadedAWQ, Placement, load_awq, parse_memory, parse_placement
from .qlinear import AWQLinear, Int4Linear, Int8Linear

__all__ = ["AWQBackend", "AWQLinear", "Int4Linear", "Int8Linear", "LoadedAWQ", "Placement", "choose_kernel",
           "load_awq", "parse_memory", "parse_placement"]
