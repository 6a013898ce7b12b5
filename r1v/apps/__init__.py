"""Applications on top of `r1v.load()`: the OpenAI-compatible server (`serve`), the JSONL batch runner
(`batch`), the results viewer (`viewer`) and the evaluation harness (`evaluation`). The library core
(converters/, quant/, runtime/) never imports them."""
