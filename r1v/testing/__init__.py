"""Test support shipped with the package: tiny R1V-layout checkpoints built on the spot."""
from .tiny import TinySizes, make_tiny_checkpoint

__all__ = ["TinySizes", "make_tiny_checkpoint"]
