"""Backends behind `r1v.runtime.api.Model`, one module per engine; `load()` picks one by the model's format.

A backend meets `base.Backend`: `path`, `mmproj_path`, `n_ctx`, `chat_template` (the file's own, or None),
`special_texts` (bos_token / eos_token for templates), `tokenize(text, special)`, `detokenize(ids)`,
`prepare(pieces, images) -> prompt` (text around images; loads images and counts positions, no model work),
`start(prompt, SamplingParams) -> run` (checks the context size; iterating the run evaluates the prompt and
yields `(token_id, piece_bytes, is_end)`; `run.stats` holds counts and timings; `run.close()` stops it),
`logprobs(prompt, tokens)`, `reset()` and `close()`.

- `base`: the `Backend` protocol and `BaseBackend`, the one request loop both engines run under.
- `llamacpp/`: GGUF + mmproj through llama-cpp-python's low-level bindings and libmtmd (CPU).
- `awq/`: AutoAWQ GEMM checkpoints on torch (int4 kernels, Triton on CUDA, a pure-torch path elsewhere).
- `prompt`: what both share: prompt pieces, image slots, the run and its stats.
"""
