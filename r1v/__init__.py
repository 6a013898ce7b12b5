"""r1v-edge: convert and run Skywork-R1V multimodal reasoning models on a laptop CPU or one GPU.

    import r1v
    model = r1v.load("Skywork-R1V3-38B-Q4_K_M.gguf")
    print(model.generate("How many cats?", images=["cats.jpg"]).content)

Importing r1v is cheap and never imports torch or llama_cpp; `load`, `generate` and the runtime's classes
load on first use.
"""
from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("r1v-edge")
except PackageNotFoundError:  # running from a source tree that is not installed
    __version__ = "0.0.0+source"

# name -> module under r1v.runtime that defines it (imported on first access)
_LAZY = {
    "load": "api", "generate": "api", "Model": "api", "LoadOptions": "api", "SamplingParams": "api",
    "Result": "api", "StreamChunk": "api", "ContextOverflowError": "api",
}

__all__ = ["__version__", *_LAZY]


def __getattr__(name: str):
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'r1v' has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(f"r1v.runtime.{module}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))


# The bundled demo model is known by name to the resolver only through this registration (the runtime never
# imports r1v.micro).
from .micro import register as _register_demo_model  # noqa: E402

_register_demo_model()
