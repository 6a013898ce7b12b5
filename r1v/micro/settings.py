"""The micro-r1v model sizes and training settings: plain dataclasses (no torch, no numpy), so the CLI can
show the defaults without importing anything heavy."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class MicroSizes:
    """ViT 64 x 4 layers at 448/14 (1024 patches, InternViT-300M flavour), LLM 256 x 4 layers."""

    vit_hidden: int = 64
    vit_intermediate: int = 256
    vit_layers: int = 4  # stock llama.cpp's converter fails to map mlp1.* below 4 ViT layers
    vit_heads: int = 2
    llm_hidden: int = 256
    llm_intermediate: int = 512
    llm_layers: int = 4
    llm_heads: int = 4
    llm_kv_heads: int = 2
    # Tied: the head reads the embedding table, so copying a word (from the question, or the word an image
    # region should become) needs no separate output map to be learned first; untied, 500 steps of training
    # never left the stage of writing plausible but unlooked-at words.
    tie_word_embeddings: bool = True


@dataclass(frozen=True)
class TrainConfig:
    steps: int = 9000
    # Many scenes with few questions each: every question about a scene repeats the same reading of it, so
    # more questions per scene add little for the vision side.
    scenes: int = 6  # images per step
    questions: int = 2  # questions asked about each image: the image is encoded once for all of them
    text_groups: int = 2  # groups of text-only questions per step (the reasoning after the reading)
    text_questions: int = 4  # questions per text group
    # Perception curriculum: the rows start one-coloured and reach the task's own mixture after this many
    # steps (linearly; `task.scene_row`). Without it a run of this size never learned to read: 1,500 steps
    # read 33% of the colours and bar heights right (chance is about 25%), with it 72% after 750.
    curriculum_steps: int = 700
    lr: float = 2e-3
    warmup: int = 100
    final_lr_ratio: float = 0.05
    weight_decay: float = 0.05
    grad_clip: float = 1.0
    seed: int = 0
    minutes: float = 120.0  # wall-time cap of the training loop (the budget: two hours on 2 cores)
    threads: int = 2
    log_every: int = 25
    eval_items: int = 200  # validation items scored greedily after training (0: skip)
    probe_every: int = 750  # steps between greedy checks on validation items while training (0: none)
    probe_items: int = 100  # the probes are the training curve micro_r1v.json records
    init: str | None = None  # a checkpoint directory to start from instead of a fresh initialisation
