"""r1v-edge: convert and run Skywork-R1V multimodal reasoning models on a laptop CPU or one GPU.

Importing r1v is cheap and never imports torch; backends load on first use.
"""
from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("r1v-edge")
except PackageNotFoundError:  # running from a source tree that is not installed
    __version__ = "0.0.0+source"

__all__ = ["__version__"]
