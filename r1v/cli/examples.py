"""One or more example command lines for each `r1v` command's `--help` (its epilog), by command path.

A table, so that every command has one and tests/test_cli_conventions.py can parse each line with the real
parser: an example that stops parsing fails the tests.
"""
from __future__ import annotations

EXAMPLES: dict[str, tuple[str, ...]] = {
    "": ("r1v demo", "r1v generate model-Q4_K_M.gguf --image cat.png -p 'How many cats?'", "r1v COMMAND --help"),
    "inspect": ("r1v inspect Skywork-R1V3-38B/",),
    "plan": ("r1v plan Skywork-R1V3-38B/", "r1v plan Skywork-R1V3-38B/config.json -c 32768 -ngl 40 --quant Q4_K_M"),
    "convert": ("r1v convert gguf Skywork-R1V3-38B/ -o gguf/ --quant Q4_K_M Q8_0",
                "r1v convert awq Skywork-R1V3-38B/ -o r1v3-awq/ --device cuda"),
    "convert gguf": ("r1v convert gguf Skywork-R1V3-38B/ -o gguf/ --quant Q4_K_M Q8_0 --mmproj-quant f16",
                     "r1v convert gguf r1v/micro/model -o /tmp/micro --quant q4_k_m --no-progress"),
    "convert awq": ("r1v convert awq Skywork-R1V3-38B/ -o r1v3-awq/ --device cuda --vision int4",),
    "bench": ("r1v bench generate model-q4_k_m.gguf --image a.png", "r1v bench convert --json"),
    "bench convert": ("r1v bench convert --layers 12 --json",),
    "bench generate": ("r1v bench generate -m model-q4_k_m.gguf --image a.png -t 8 -c 4096",
                       "r1v bench generate r1v3-awq/ --device cuda"),
    "demo": ("r1v demo", "r1v demo --quant Q4_K_M --hide-reasoning", "r1v demo --quant awq --no-progress"),
    "generate": ("r1v generate micro-r1v --image r1v/micro/demo.png -p 'How many shapes are red?'",
                 "r1v generate -m model-Q4_K_M.gguf --image a.png -p 'Describe it' -c 16384 -t 8 -n 4096 --temp 0.6",
                 "r1v generate model-q4_k_m.gguf -ngl 99 --image a.png -p 'What is written here?'",
                 "echo 'What is 17*23?' | r1v generate micro-r1v --show-reasoning"),
    "chat": ("r1v chat micro-r1v", "r1v chat -m model-q4_k_m.gguf -c 16384 --temp 0.6 --system 'Answer briefly.'"),
    "cache": ("r1v cache ls", "r1v cache clear --rates"),
    "cache ls": ("r1v cache ls --json",),
    "cache clear": ("r1v cache clear --dir /tmp/prefix-cache",),
    "serve": ("r1v serve model-q4_k_m.gguf --port 8080 -np 2",
              "r1v serve -m r1v3-awq/ --max-model-len 32768 --served-model-name r1v3 --api-key KEY"),
    "batch": ("r1v batch micro-r1v questions.jsonl answers.jsonl", "r1v batch -m model.gguf in.jsonl out.jsonl -n 2048"),
    "view": ("r1v view answers.jsonl --open",),
    "micro-data": ("r1v micro-data --split validation -n 50 -o val.jsonl",),
    "train-micro": ("r1v train-micro -o micro-ckpt/ --minutes 10",),
    "ls": ("r1v ls", "r1v ls --json"),
    "rm": ("r1v rm micro-r1v:q4_k_m", "r1v rm Skywork/Skywork-R1V3-38B-GGUF --yes"),
    "eval": ("r1v eval micro-r1v val.jsonl --quant Q4_K_M --limit 50",
             "r1v eval model-q4_k_m.gguf val.jsonl --reference model-f16.gguf -o q4-vs-f16.json --force"),
}


def epilog(path: str) -> str | None:
    """The `examples:` block of command `path` ("convert gguf"; "" is `r1v` itself), or None."""
    lines = EXAMPLES.get(path)
    if not lines:
        return None
    head = "example:" if len(lines) == 1 else "examples:"
    return "\n".join([head, *(f"  {line}" for line in lines)])
