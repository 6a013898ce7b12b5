"""The README's Python example runs as written, on the bundled micro-r1v (issue 19 item 13): a real two-turn
conversation, the follow-up carrying the first turn's picture and answer, its prompt served from the KV cache.

The other Python blocks of the README need a server (`r1v serve`) or a 38B checkpoint; they are not run here."""
from __future__ import annotations

import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"


def python_blocks(text: str) -> list[str]:
    return re.findall(r"^```python\n(.*?)^```$", text, re.DOTALL | re.MULTILINE)


def the_conversation_example() -> str:
    blocks = [b for b in python_blocks(README.read_text(encoding="utf-8")) if "model.stream(messages" in b]
    assert len(blocks) == 1, "README.md: expected one Python example streaming a follow-up (model.stream(messages"
    return blocks[0]


@pytest.mark.slow
def test_the_multi_turn_example_runs_as_written(capsys):
    from r1v.micro import demo_question

    code = the_conversation_example()
    namespace: dict = {}
    exec(compile(code, f"{README}:python", "exec"), namespace)  # noqa: S102 - the README's own code
    out = capsys.readouterr().out

    first, last = namespace["result"], namespace["chunk"].result
    assert first.content == demo_question()["answer"] == "2"  # the bundled question, answered right
    assert f"{first.reasoning}\n{first.content}\n{first.summary()}\n" in out
    messages = namespace["messages"]
    assert [m["role"] for m in messages] == ["user", "assistant", "user"]
    assert messages[1] == {"role": "assistant", "content": "2"}
    # The follow-up's prompt holds the picture (once) and the first turn; all of the first prompt but the
    # generation prompt's "<think>\n" came from the KV cache, nothing was evaluated twice.
    assert last.prompt.count("<image>") == 1 and "How many shapes are red or green?" in last.prompt
    assert last.prompt.index("<|im_start|>assistant\n2<|im_end|>") < last.prompt.index("And how many are blue?")
    assert last.prompt_tokens > first.prompt_tokens > 64
    assert last.cached_tokens == first.prompt_tokens - 2
    assert last.finish_reason == "stop" and out.endswith(last.content)
