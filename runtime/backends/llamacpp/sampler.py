"""One request's sampler on llama.cpp: its sampler chain (penalties, top-k, top-p, min-p, temperature, seeded
distribution, or greedy at temperature 0), run by llama.cpp on the logits of the context's last position
(`llama_sampler_sample`), which also counts the token for the penalties."""
from __future__ import annotations

from typing import Any, Sequence

from llama_cpp import llama_cpp as _ll

from ...options import SamplingParams

__all__ = ["ChainSampler"]


def _chain(params: SamplingParams, n_ctx: int, n_vocab: int) -> Any:
    chain = _ll.llama_sampler_chain_init(_ll.llama_sampler_chain_default_params())
    add = lambda s: _ll.llama_sampler_chain_add(chain, s)  # noqa: E731 - the chain owns what it is given
    if params.repetition_penalty != 1.0:
        last_n = n_ctx if params.repeat_last_n == -1 else params.repeat_last_n
        add(_ll.llama_sampler_init_penalties(n_vocab, last_n, params.repetition_penalty, 0.0, 0.0))
    if params.temperature == 0:
        add(_ll.llama_sampler_init_greedy())
        return chain
    if params.top_k > 0:
        add(_ll.llama_sampler_init_top_k(params.top_k))
    if params.top_p < 1.0:
        add(_ll.llama_sampler_init_top_p(params.top_p, 1))
    if params.min_p > 0.0:
        add(_ll.llama_sampler_init_min_p(params.min_p, 1))
    add(_ll.llama_sampler_init_temp(params.temperature))
    seed = _ll.LLAMA_DEFAULT_SEED if params.seed is None else params.seed & 0xFFFFFFFF
    add(_ll.llama_sampler_init_dist(seed))
    return chain


class ChainSampler:
    """A `base.TokenSampler` for the llama.cpp context `ctx`; the penalty window starts in the prompt's text."""

    def __init__(self, ctx: Any, params: SamplingParams, n_ctx: int, n_vocab: int, prompt_tokens: Sequence[int]):
        self._ctx = ctx
        self._chain = _chain(params, n_ctx, n_vocab)
        try:
            self.seed = None if params.temperature == 0 else int(_ll.llama_sampler_get_seed(self._chain))
            if params.repetition_penalty != 1.0:
                window = len(prompt_tokens) if params.repeat_last_n == -1 else params.repeat_last_n
                for token in prompt_tokens[len(prompt_tokens) - min(window, len(prompt_tokens)):]:
                    _ll.llama_sampler_accept(self._chain, token)
        except BaseException:
            self.close()
            raise

    def sample(self, logits: int) -> int:
        """The next token from the logits of batch row `logits` (-1: the last)."""
        return int(_ll.llama_sampler_sample(self._chain, self._ctx, logits))

    def close(self) -> None:
        if self._chain is not None:
            _ll.llama_sampler_free(self._chain)
            self._chain = None
