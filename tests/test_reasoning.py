"""Reasoning/content splitting (streamed and whole) and R1V4-style round parsing."""
from __future__ import annotations

import doctest
import itertools
import random

import pytest

from r1v.runtime import reasoning
from r1v.runtime.reasoning import (
    Delta,
    ReasoningParser,
    Round,
    final_answer,
    parse_rounds,
    split_reasoning,
)

TAGS = ("<think>", "</think>")


def stream(fragments, starts_in_reasoning=True):
    """Feed fragments; return (all deltas, joined reasoning, joined content)."""
    p = ReasoningParser(starts_in_reasoning)
    deltas = []
    for f in fragments:
        deltas += p.feed(f)
        # never more held back than a proper prefix of a tag
        assert p.held == "" or any(t.startswith(p.held) and t != p.held for t in TAGS), p.held
    deltas += p.finish()
    assert all(d.text for d in deltas)
    r = "".join(d.text for d in deltas if d.kind == "reasoning")
    c = "".join(d.text for d in deltas if d.kind == "content")
    return deltas, r, c


def test_doctests():
    assert doctest.testmod(reasoning).failed == 0


# ------------------------------------------------------------------ crafted outputs

CASES = [
    # (text, starts_in_reasoning, reasoning, content)
    # normal R1V3 output: prompt ended with "<think>\n"
    ("The image shows two cats.\nSo 2.\n</think>\n\nThere are **2** cats.", True,
     "The image shows two cats.\nSo 2.\n", "There are **2** cats."),
    # no thinking at all, prompt did not force the tag
    ("Just an answer.\n", False, "", "Just an answer.\n"),
    # unclosed: the model stopped (or was cut) while thinking
    ("Hmm, let me count: 1, 2, 3", True, "Hmm, let me count: 1, 2, 3", ""),
    # unclosed <think> opened by a model that started outside reasoning
    ("Sure. <think>wait, that is wrong", False, "wait, that is wrong", "Sure. "),
    # the model re-emits <think> at the start: dropped, not a second block
    ("<think>\nreasoning</think>\n\nanswer", True, "\nreasoning", "answer"),
    ("\n <think>r</think>a", True, "\n r", "a"),
    # ... but only at the start: later, inside reasoning, it is literal text (no nesting)
    ("a <think>b</think>c</think>d", True, "a <think>b", "cd"),
    ("<think>x<think>y</think>z", True, "x<think>y", "z"),
    ("<think>x<think>y</think>z", False, "x<think>y", "z"),
    # two think rounds
    ("first</think>\n\nmiddle <think>second</think>\n last", True, "firstsecond", "middle last"),
    # only the whitespace immediately after </think> is stripped
    ("r</think> \n\t a \n b\n", True, "r", "a \n b\n"),
    ("r</think>\n\n", True, "r", ""),
    # empty reasoning
    ("</think>\n\nanswer", True, "", "answer"),
    ("  </think>answer", True, "  ", "answer"),
    # a stray </think> in content is dropped, without stripping
    ("a</think> b", False, "", "a b"),
    # tag look-alikes pass through
    ("<thin", True, "<thin", ""),
    ("x</thinking>y</think>a < b <thinking> </thi", True, "x</thinking>y", "a < b <thinking> </thi"),
    ("a < b", False, "", "a < b"),
    ("<thinking>", True, "<thinking>", ""),
    ("", True, "", ""),
    ("", False, "", ""),
    ("   ", True, "   ", ""),
]


@pytest.mark.parametrize("text,sir,want_r,want_c", CASES)
def test_crafted_whole_and_streamed(text, sir, want_r, want_c):
    assert split_reasoning(text, sir) == (want_r, want_c)
    _, r, c = stream([text], sir)
    assert (r, c) == (want_r, want_c)
    _, r, c = stream(list(text), sir)  # one character at a time
    assert (r, c) == (want_r, want_c)


def test_deltas_are_ordered_and_merged():
    deltas, _, _ = stream(["a</think>\n\nb<think>c</think>d"])
    assert deltas == [
        Delta("reasoning", "a"), Delta("content", "b"), Delta("reasoning", "c"), Delta("content", "d"),
    ]
    p = ReasoningParser()
    assert p.feed("x") == [Delta("reasoning", "x")]
    assert p.feed("y</think>z") == [Delta("reasoning", "y"), Delta("content", "z")]


# ------------------------------------------------------------------ minimal hold-back

def test_holds_only_a_possible_tag():
    p = ReasoningParser()
    assert p.feed("abc<") == [Delta("reasoning", "abc")]
    assert p.held == "<"
    assert p.feed("/thi") == []
    assert p.held == "</thi"
    assert p.feed("nking") == [Delta("reasoning", "</thinking")]  # not a tag after all
    assert p.held == ""
    # in reasoning only the close tag matters: "<thi" is not held
    assert p.feed(" <thi") == [Delta("reasoning", " <thi")]
    assert p.feed("</think>\n") == []
    assert not p.in_reasoning
    assert p.feed("\n a <") == [Delta("content", "a ")]
    assert p.held == "<"
    assert p.feed(" b") == [Delta("content", "< b")]
    assert p.feed("<<") == [Delta("content", "<")]  # the first '<' cannot start a tag any more
    assert p.held == "<"
    assert p.feed("thin") == []
    assert p.feed("king>") == [Delta("content", "<thinking>")]
    assert p.feed("</") == []
    assert p.finish() == [Delta("content", "</")]


def test_prelude_holds_possible_think_only():
    p = ReasoningParser()
    assert p.feed("\n<thi") == [Delta("reasoning", "\n")]  # whitespace goes out at once
    assert p.held == "<thi"
    assert p.feed("nk>\n") == [Delta("reasoning", "\n")]  # tag dropped
    assert p.feed("<think>") == [Delta("reasoning", "<think>")]  # literal now
    p = ReasoningParser()
    assert p.feed("<thin") == []
    assert p.finish() == [Delta("reasoning", "<thin")]  # flushed, not held forever


def test_in_reasoning_and_finish_order():
    p = ReasoningParser()
    assert p.in_reasoning
    p.feed("r</think>")
    assert not p.in_reasoning
    p.feed("<think>more")
    assert p.in_reasoning
    assert p.finish() == []
    with pytest.raises(RuntimeError):
        p.feed("x")
    with pytest.raises(RuntimeError):
        p.finish()
    assert not ReasoningParser(starts_in_reasoning=False).in_reasoning


def test_custom_tags_and_bad_tags():
    p = ReasoningParser(open_tag="<reason>", close_tag="</reason>")
    out = p.feed("a</rea") + p.feed("son>\nb<think>c") + p.finish()
    assert out == [Delta("reasoning", "a"), Delta("content", "b<think>c")]
    assert split_reasoning("a</reason>\nb", open_tag="<reason>", close_tag="</reason>") == ("a", "b")
    with pytest.raises(ValueError):
        ReasoningParser(open_tag="", close_tag="</x>")
    with pytest.raises(ValueError):
        ReasoningParser(open_tag="<x>", close_tag="<x>y")


# ------------------------------------------------------------------ any fragmentation

EXHAUSTIVE = [
    "<think>ab</think>\n\ncd",
    " <think>a<think>b</think> c </think>d",
    "x</think>  <think>y</th</think>\t<thinking>z<",
    "a</thi</think></think><think>",
]


@pytest.mark.parametrize("text", EXHAUSTIVE)
@pytest.mark.parametrize("sir", [True, False])
def test_every_one_and_two_split_points(text, sir):
    want = split_reasoning(text, sir)
    n = len(text)
    for i, j in itertools.combinations_with_replacement(range(n + 1), 2):
        _, r, c = stream([text[:i], text[i:j], text[j:]], sir)
        assert (r, c) == want, (i, j)


PIECES = ["<think>", "</think>", "<", "</", "<thi", "</thin", "think>", ">", "/", "<thinking>",
          "</think", "a", "b", "cd", " ", "\n", "\n\n", "\t", "é", "<answer>"]


def random_fragments(rng, text):
    cuts = sorted(rng.sample(range(len(text) + 1), k=min(len(text) + 1, rng.randint(0, 8))))
    bounds = [0, *cuts, len(text)]
    return [text[a:b] for a, b in zip(bounds, bounds[1:])]  # may include empty fragments


def test_random_fragmentation_matches_whole_text():
    # hypothesis is not installed in the venv; a seeded RNG does the same job here
    rng = random.Random(1234)
    for _ in range(3000):
        text = "".join(rng.choice(PIECES) for _ in range(rng.randint(0, 14)))
        sir = rng.random() < 0.6
        want = split_reasoning(text, sir)
        _, r, c = stream(random_fragments(rng, text), sir)
        assert (r, c) == want, (text, sir)
        _, r, c = stream(list(text), sir)
        assert (r, c) == want, (text, sir)


# ------------------------------------------------------------------ R1V4-style rounds

R1V4 = """<think>
I need the rightmost child's skirt. Let me crop the right part of the image.
</think>
<tool_call>{"name": "code", "arguments": {"code": "crop(img, (600, 0, 800, 400))"}}</tool_call>
<observation>{"result": "<image>", "type": "code"}</observation>
<think>
Still small; zoom in further.
</think>
<tool_call>
{"name": "zoom", "arguments": {"factor": 2}}
</tool_call>
<observation>Zoomed image attached.</observation>
<think>
The skirt is clearly red.
</think>
<answer>
The rightmost child has a red skirt.
</answer>"""


@pytest.mark.parametrize("sir", [True, False])
def test_parse_rounds_r1v4_transcript(sir):
    rounds = parse_rounds(R1V4, starts_in_reasoning=sir)
    assert rounds == [
        Round("think", "I need the rightmost child's skirt. Let me crop the right part of the image."),
        Round("tool_call", '{"name": "code", "arguments": {"code": "crop(img, (600, 0, 800, 400))"}}',
              tool_call={"name": "code", "arguments": {"code": "crop(img, (600, 0, 800, 400))"}}),
        Round("observation", '{"result": "<image>", "type": "code"}'),
        Round("think", "Still small; zoom in further."),
        Round("tool_call", '{"name": "zoom", "arguments": {"factor": 2}}',
              tool_call={"name": "zoom", "arguments": {"factor": 2}}),
        Round("observation", "Zoomed image attached."),
        Round("think", "The skirt is clearly red."),
        Round("answer", "The rightmost child has a red skirt."),
    ]
    assert final_answer(R1V4) == "The rightmost child has a red skirt."


def test_parse_rounds_implicit_think_text_and_unclosed():
    text = ("Let me think.\n</think>\n\nSome prose.\n<tool_call>{\"name\": \"search\", "
            "\"arguments\": {\"q\": \"cats\"}}</tool_call>\n \n<observation>3 results</observation>"
            "\nmore prose</answer> still prose\n<answer>partial answer")
    assert parse_rounds(text) == [
        Round("think", "Let me think."),
        Round("text", "Some prose."),
        Round("tool_call", '{"name": "search", "arguments": {"q": "cats"}}',
              tool_call={"name": "search", "arguments": {"q": "cats"}}),
        Round("observation", "3 results"),
        Round("text", "more prose still prose"),  # stray </answer> dropped, the text merged
        Round("answer", "partial answer"),  # unclosed: runs to the end
    ]
    # other tags inside a block are literal; an unclosed think runs to the end
    assert parse_rounds("<think>a <answer>b</answer> c", starts_in_reasoning=False) == [
        Round("think", "a <answer>b</answer> c"),
    ]
    assert parse_rounds("still thinking <tool_call>{") == [Round("think", "still thinking <tool_call>{")]
    assert parse_rounds("plain answer", starts_in_reasoning=False) == [Round("text", "plain answer")]
    assert parse_rounds("</think>\n\nanswer") == [Round("text", "answer")]  # empty implicit think
    assert parse_rounds("<think></think>x") == [Round("think", ""), Round("text", "x")]
    assert parse_rounds("") == [] and parse_rounds(" \n", starts_in_reasoning=False) == []


def test_parse_rounds_invalid_tool_json():
    rounds = parse_rounds('t</think><tool_call>{"name": "code", "arguments": {</tool_call>'
                          '<tool_call>["code"]</tool_call><tool_call>{"name": "noargs"}</tool_call>'
                          "<tool_call>{\"name\": \"cut")
    assert [r.kind for r in rounds] == ["think", "tool_call", "tool_call", "tool_call", "tool_call"]
    bad_json, not_obj, no_args, unclosed = rounds[1:]
    assert bad_json.tool_call is None and bad_json.text == '{"name": "code", "arguments": {'
    assert bad_json.error.startswith("invalid tool call JSON: ")
    assert not_obj.tool_call is None
    assert not_obj.error == "tool call must be a JSON object with a string 'name'"
    assert no_args == Round("tool_call", '{"name": "noargs"}', tool_call={"name": "noargs", "arguments": {}})
    assert unclosed.tool_call is None and unclosed.text == '{"name": "cut'
    assert unclosed.error.startswith("invalid tool call JSON: ")


# ------------------------------------------------------------------ final_answer

@pytest.mark.parametrize("text,want", [
    ("reasoning\n</think>\n\nThe answer is 42.\n", "The answer is 42."),
    ("r1</think>draft<think>r2</think>\n final ", "final"),
    ("<answer>A</answer> then <answer>\n B \n</answer>\n", "B"),
    ("<think>x</think><answer> cut off", "cut off"),
    ("r</think>ans<think>unclosed afterthought", "ans"),
    ("never stopped thinking", ""),
    ("r</think>\n\n", ""),
])
def test_final_answer(text, want):
    assert final_answer(text) == want


def test_final_answer_without_forced_think():
    assert final_answer("  Plain answer. ", starts_in_reasoning=False) == "Plain answer."
    assert final_answer("Answer. <think>hmm", starts_in_reasoning=False) == "Answer."
    assert final_answer("<think>hmm</think> 7", starts_in_reasoning=False) == "7"
