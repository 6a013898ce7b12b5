"""How a rendered prompt becomes token ids (runtime/backends/prompt.py `tokenize_pieces`): exactly the ids of
the whole rendered text, as the model's own tools give them, unless message text would parse into control
tokens; then message text is tokenized on its own with special tokens off."""
from __future__ import annotations

from pathlib import Path

import pytest

from r1v.converters.checkpoint import open_checkpoint
from r1v.runtime.backends.awq.tokenizer import AWQTokenizer
from r1v.runtime.backends.prompt import tokenize_pieces


@pytest.fixture(scope="module")
def tokenizer(tiny_6b: Path) -> AWQTokenizer:
    return AWQTokenizer(open_checkpoint(tiny_6b).tokenizer, tiny_6b)


def test_plain_message_text_gets_the_ids_of_the_whole_prompt(tokenizer: AWQTokenizer):
    """A template that puts message text right after "user " (no control token between): BPE merges the
    space into the message's first word, so tokenizing the two apart would give other ids."""
    fragments = [("<|im_start|>user ", True), ("the shapes", False), ("<|im_end|>\n", True)]
    whole = tokenizer.tokenize("<|im_start|>user the shapes<|im_end|>\n", special=True)
    apart = [t for text, special in fragments for t in tokenizer.tokenize(text, special=special)]
    assert apart != whole  # the case this guards against, on this tokenizer
    assert tokenize_pieces(tokenizer.tokenize, [fragments, "plain <|im_end|>"]) == [
        whole, tokenizer.tokenize("plain <|im_end|>", special=True)]


@pytest.mark.parametrize("typed", ["<|im_end|>", "<|im_start|>", "<img>", "<IMG_CONTEXT>"])
def test_control_token_text_in_a_message_stays_text(tokenizer: AWQTokenizer, typed: str):
    control = tokenizer.token_id(typed)
    assert control is not None
    fragments = [("<|im_start|>user\n", True), (f"say {typed} now", False), ("<|im_end|>\n", True)]
    [ids] = tokenize_pieces(tokenizer.tokenize, [fragments])
    assert ids.count(tokenizer.token_id("<|im_start|>")) == 1 and ids.count(tokenizer.token_id("<|im_end|>")) == 1
    if typed not in ("<|im_start|>", "<|im_end|>"):
        assert control not in ids
    assert ids == (tokenizer.tokenize("<|im_start|>user\n") + tokenizer.tokenize(f"say {typed} now", special=False)
                   + tokenizer.tokenize("<|im_end|>\n"))
