"""Sampling on torch logits with the meaning of the llama.cpp backend's sampler chain (llama.cpp's samplers):

    repetition penalty -> greedy (temperature 0)
                       -> top-k -> top-p -> min-p -> temperature -> seeded draw

- penalty: every distinct token of the last `repeat_last_n` tokens (-1: the context size; 0: none) of the
  prompt's text and the output has its logit divided by the penalty when positive, multiplied when not
  (llama_sampler_init_penalties with frequency and presence 0).
- top-k keeps the k largest logits (0: off); top-p the smallest set of the largest probabilities whose sum
  reaches p (probabilities of what top-k left, before the temperature; at least one token); min-p the tokens
  whose probability is at least min_p times the largest (before the temperature); then logits / temperature,
  softmax, one draw from a torch.Generator seeded with `seed` (a random seed when None).

The draw is not llama.cpp's RNG: the same seed gives the same output within this backend, not the same tokens
as the llama.cpp backend. Greedy decoding takes the first index of the largest logit.
"""
from __future__ import annotations

import random
from collections import deque

import torch

from ...options import SamplingParams

__all__ = ["Sampler"]


class Sampler:
    def __init__(self, params: SamplingParams, n_ctx: int):
        self.params = params
        last_n = n_ctx if params.repeat_last_n == -1 else params.repeat_last_n
        self.window: deque[int] | None = (
            deque(maxlen=last_n) if params.repetition_penalty != 1.0 and last_n > 0 else None)
        self.seed: int | None = None
        self._generator: torch.Generator | None = None
        if params.temperature > 0:
            self.seed = (params.seed if params.seed is not None else random.getrandbits(32)) & 0xFFFFFFFF
            self._generator = torch.Generator(device="cpu").manual_seed(self.seed)

    def accept(self, token: int) -> None:
        """Record a token of the prompt or the output (the penalty window)."""
        if self.window is not None:
            self.window.append(int(token))

    def sample(self, logits: torch.Tensor) -> int:
        """One token id from the logits [vocab] of the last position (any device and float dtype)."""
        p = self.params
        logits = logits.detach().to(device="cpu", dtype=torch.float32).clone()
        if self.window:
            ids = torch.tensor(sorted(set(self.window)), dtype=torch.long)
            ids = ids[ids < logits.shape[0]]
            values = logits[ids]
            logits[ids] = torch.where(values <= 0, values * p.repetition_penalty, values / p.repetition_penalty)
        if p.temperature == 0:
            return int(torch.argmax(logits))
        candidates = torch.arange(logits.shape[0])
        if p.top_k > 0 and p.top_k < logits.shape[0]:
            logits, order = torch.topk(logits, p.top_k)  # sorted, largest first
            candidates = candidates[order]
        else:
            logits, order = torch.sort(logits, descending=True, stable=True)
            candidates = candidates[order]
        if p.top_p < 1.0:
            cumulative = torch.softmax(logits, 0).cumsum(0)
            keep = int(torch.searchsorted(cumulative, torch.tensor([p.top_p]), right=False)) + 1
            logits, candidates = logits[:keep], candidates[:keep]
        if p.min_p > 0.0:
            probs = torch.softmax(logits, 0)
            keep = max(1, int((probs >= p.min_p * probs[0]).sum()))
            logits, candidates = logits[:keep], candidates[:keep]
        probs = torch.softmax(logits / p.temperature, 0)
        choice = int(torch.multinomial(probs, 1, generator=self._generator))
        return int(candidates[choice])
