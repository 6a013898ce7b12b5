"""A small byte-level BPE tokenizer with the R1V special tokens, built with the `tokenizers` library.

Same pre-tokenizer regex and byte-level decoding as Qwen2's tokenizer, so llama.cpp's `qwen2`
pre-tokenizer splits text the same way; trained on a fixed corpus, so it is deterministic.
"""
from __future__ import annotations

from typing import Iterable

# Qwen2's pre-tokenizer split pattern (tokenizer.json of Qwen2 / Qwen2.5 / R1V).
QWEN2_SPLIT_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
CHATML_SPECIAL_TOKENS = [
    "<|endoftext|>", "<|im_start|>", "<|im_end|>",
    "<img>", "</img>", "<IMG_CONTEXT>", "<think>", "</think>",
    "<tool_call>", "</tool_call>", "<observation>", "</observation>", "<answer>", "</answer>",
]
# Added tokens that are not "special" in Qwen's tokenizer: they are plain text a model writes.
NON_SPECIAL = {"<think>", "</think>", "<tool_call>", "</tool_call>", "<observation>", "</observation>",
               "<answer>", "</answer>"}

_CORPUS = [
    "The quick brown fox jumps over the lazy dog. How many red circles are in the image?",
    "There are 3 blue squares and 2 green triangles, so 3 + 2 = 5 shapes in total.",
    "Let me think step by step. The larger bar is on the left; its value is 17.",
    "Question: what colour is the second object from the left? Answer: yellow.",
    "Image understanding, reasoning, counting, comparing, adding numbers: 0 1 2 3 4 5 6 7 8 9 10 42 100.",
    "def add(a, b):\n    return a + b\n# comment\n",
    "User: describe the picture.\nAssistant: It shows a cat sitting on a mat.",
    "Σ π ∞ — «quotes» 中文 日本語 emoji 🙂 accents café naïve",
]


def build_tokenizer(vocab_size: int = 512, corpus: Iterable[str] | None = None):  # -> tokenizers.Tokenizer
    """Train the BPE on `corpus` (default: a fixed mixed-text corpus) and add the R1V special tokens.

    The default output is fixed: tests compare it byte for byte. (tokenizers is imported here, not at the
    top: it is an optional dependency.)"""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE(unk_token=None, fuse_unk=False, byte_fallback=False))
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN2_SPLIT_PATTERN), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tokenizer.decoder = decoders.ByteLevel(add_prefix_space=False, use_regex=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
        special_tokens=[],
    )
    tokenizer.train_from_iterator(_CORPUS * 4 if corpus is None else list(corpus), trainer=trainer)
    for token in CHATML_SPECIAL_TOKENS:  # one at a time so ids follow the list order, as in Qwen's vocab
        special = token not in NON_SPECIAL
        added = AddedToken(token, special=special, normalized=False)
        (tokenizer.add_special_tokens if special else tokenizer.add_tokens)([added])
    return tokenizer
