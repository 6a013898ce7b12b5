"""Checkpoint reading and conversion (GGUF, AWQ). Nothing here imports torch."""
from .checkpoint import Checkpoint, TensorInfo, open_checkpoint
from .config import Qwen2Config, R1VConfig, VisionConfig, load_config, parse_config
from .errors import CheckpointError

__all__ = [
    "Checkpoint", "CheckpointError", "Qwen2Config", "R1VConfig", "TensorInfo", "VisionConfig",
    "load_config", "open_checkpoint", "parse_config",
]
