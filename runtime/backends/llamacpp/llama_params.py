"""llama.cpp model parameters that run on every x86-64 CPU: the AMX guard.

When llama.cpp's CPU backend is built with AMX (``llama_print_system_info()`` reports ``AMX_INT8 = 1``, which
happens when it is compiled with ``-march=native`` on a Sapphire-Rapids-class Intel CPU), it repacks the
weights into its AMX "extra" buffer type, and on many hosts (VMs among them) ``ggml_backend_amx_mul_mat``
then segfaults at the first decode (llama.cpp #20824, DSPy #10079, Ollama #17006). The model parameter
``use_extra_bufts = False`` avoids it. That switch also turns off the other extra buffer type, CPU_REPACK
(interleaved Q4_0/Q4_K/IQ4_NL weights), so it is only thrown where the library has AMX: a library built
without AMX (scripts/setup.sh builds one) keeps CPU_REPACK and loses nothing.

The decision is made from llama.cpp's own report, not from /proc/cpuinfo: the report says whether this
library can use AMX at all. ``R1V_LLAMA_AMX=1`` (or ``extra_buffers=True``) opts back in on hosts where AMX
works; ``extra_buffers=False`` turns the extra buffer types off anywhere (llama.cpp's ``--no-repack``).
"""
from __future__ import annotations

import functools
import logging
import os
import re
import threading
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Iterator, Mapping

__all__ = ["AMX_ENV", "BufferChoice", "allow_amx_from_env", "choose_buffers", "gpu_layers", "library_has_amx",
           "llama_with_safe_buffers", "model_params", "open_llama", "supports_gpu_offload", "system_info"]

log = logging.getLogger("r1v.llama")

AMX_ENV = "R1V_LLAMA_AMX"
_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off", ""}
_AMX_REPORTED = re.compile(r"(?:^|[\s|])AMX_INT8\s*=\s*1(?:$|[\s|])")


@dataclass(frozen=True)
class BufferChoice:
    """Whether llama.cpp may place weights in its extra buffer types, and why."""

    use_extra_bufts: bool
    library_has_amx: bool
    reason: str


def library_has_amx(report: str) -> bool:
    """True when a ``llama_print_system_info()`` report says the CPU backend uses AMX (``AMX_INT8 = 1``)."""
    return _AMX_REPORTED.search(report) is not None


def allow_amx_from_env(environ: Mapping[str, str] | None = None) -> bool:
    """``R1V_LLAMA_AMX`` as a boolean (unset: False); any other value is an error naming the variable."""
    value = (os.environ if environ is None else environ).get(AMX_ENV, "").strip().lower()
    if value in _TRUE:
        return True
    if value in _FALSE:
        return False
    raise ValueError(f"{AMX_ENV}={value!r}: expected 1 or 0 (true/false, yes/no, on/off)")


def choose_buffers(report: str, extra_buffers: bool | None = None,
                   environ: Mapping[str, str] | None = None) -> BufferChoice:
    """Decide ``use_extra_bufts`` from llama.cpp's system report.

    ``extra_buffers`` None is the guard: on, except where the library has AMX and ``R1V_LLAMA_AMX`` is not 1.
    True or False force llama.cpp's extra buffer types on or off (off is llama.cpp's ``--no-repack``).
    """
    has_amx = library_has_amx(report)
    allowed = allow_amx_from_env(environ) if extra_buffers is None else False  # a bad value is refused anywhere
    if extra_buffers is not None:
        state = "on" if extra_buffers else "off"
        return BufferChoice(extra_buffers, has_amx, f"extra buffer types {state}, as asked")
    if not has_amx:
        return BufferChoice(True, False, "llama.cpp's CPU backend has no AMX: extra buffer types (CPU_REPACK) on")
    if allowed:
        return BufferChoice(True, True, f"llama.cpp reports AMX_INT8 = 1 and {AMX_ENV}=1: AMX and CPU_REPACK "
                                        "buffer types on")
    return BufferChoice(False, True, "llama.cpp reports AMX_INT8 = 1: extra buffer types off, because its AMX "
                                     "matrix product crashes on many hosts (llama.cpp #20824); "
                                     f"set {AMX_ENV}=1 (or extra_buffers=True) to use AMX where it works")


@functools.lru_cache(maxsize=1)
def system_info() -> str:
    """llama.cpp's ``llama_print_system_info()`` (the features its CPU backend was built with)."""
    from llama_cpp import llama_cpp as _ll

    return _ll.llama_print_system_info().decode("utf-8", "replace")


_logged: set[BufferChoice] = set()


def _choice(extra_buffers: bool | None) -> BufferChoice:
    choice = choose_buffers(system_info(), extra_buffers)
    if choice.library_has_amx and choice not in _logged:  # say it once per process, only where it matters
        _logged.add(choice)
        log.info(choice.reason)
    return choice


@functools.lru_cache(maxsize=1)
def supports_gpu_offload() -> bool:
    """Whether this llama.cpp build can put layers on a GPU (CUDA, Metal, Vulkan...): llama_supports_gpu_offload."""
    from llama_cpp import llama_cpp as _ll

    return bool(_ll.llama_supports_gpu_offload())


GPU_OFFLOAD_NOTICE = ("n_gpu_layers={n}: this llama-cpp-python is a CPU build (llama_supports_gpu_offload() is "
                      "false), so every layer runs on the CPU; reinstall it with CMAKE_ARGS=\"-DGGML_CUDA=on\" "
                      "(or -DGGML_METAL=on) to offload")
_gpu_notice_given = False


def gpu_layers(n_gpu_layers: int) -> int:
    """The ``n_gpu_layers`` to hand llama.cpp (-1: all, which llama.cpp reads as any negative value). On a build
    without GPU offload a request for layers is said once per process: llama.cpp itself ignores it silently."""
    global _gpu_notice_given
    if n_gpu_layers < -1:
        raise ValueError(f"n_gpu_layers must be >= -1 (-1: all layers), got {n_gpu_layers}")
    if n_gpu_layers != 0 and not _gpu_notice_given and not supports_gpu_offload():
        _gpu_notice_given = True
        log.warning(GPU_OFFLOAD_NOTICE.format(n=n_gpu_layers))
    return n_gpu_layers


def model_params(*, vocab_only: bool = False, n_gpu_layers: int = 0, extra_buffers: bool | None = None) -> Any:
    """``llama_model_params`` with llama.cpp's defaults, the given fields, and the AMX guard applied.
    ``n_gpu_layers``: layers offloaded to the GPU (0: none, -1: all), as llama.cpp's ``-ngl``."""
    from llama_cpp import llama_cpp as _ll

    params = _ll.llama_model_default_params()
    params.vocab_only = vocab_only
    params.n_gpu_layers = gpu_layers(n_gpu_layers)
    params.use_extra_bufts = _choice(extra_buffers).use_extra_bufts
    return params


_patch_lock = threading.RLock()


@contextmanager
def llama_with_safe_buffers(extra_buffers: bool | None = None) -> Iterator[None]:
    """Within this block, ``llama_cpp.Llama(...)`` loads its model with the AMX guard applied.

    ``Llama`` builds its model parameters itself and has no argument for ``use_extra_bufts``; this wraps the
    default-parameters function it calls (used by the plain llama-cpp-python baseline of ``r1v bench generate``
    and by tests that compare with it), and restores it on exit.
    """
    from llama_cpp import llama_cpp as _ll

    use_extra_bufts = _choice(extra_buffers).use_extra_bufts
    with _patch_lock:
        original = _ll.llama_model_default_params

        def guarded() -> Any:
            params = original()
            params.use_extra_bufts = use_extra_bufts
            return params

        _ll.llama_model_default_params = guarded
        try:
            yield
        finally:
            _ll.llama_model_default_params = original


def open_llama(model_path: str | os.PathLike[str], *, extra_buffers: bool | None = None, **kwargs: Any) -> Any:
    """``llama_cpp.Llama(model_path, **kwargs)`` with the AMX guard applied to its model."""
    import llama_cpp

    with llama_with_safe_buffers(extra_buffers):
        return llama_cpp.Llama(os.fspath(model_path), **kwargs)
