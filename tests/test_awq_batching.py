"""Batched decode on the torch model (issue 20, item 3): one forward advancing several sequences, each in its own row
of the KV cache, against each sequence decoded alone.

Model level (`model.decode.StaticDecoder.step_rows`): a small random Qwen2 with plain fp32 linears, AWQ linears on
the exact torch path, and torch's int4 CPU kernel (bf16 products); sequences of different lengths (one crosses the
256-position span boundary), batches of 1, 2 and 4 rows, a sparse set of rows (padding rows that hold other
sequences' cached prefixes), swapped batch mates, per-row truncation. Backend level: `r1v.load(awq_dir,
parallel=N)`, text and image prompts. CUDA-only checks (one graph per bucket and span) skip without CUDA.

Tolerance: batched vs alone <= 1e-5 absolute on logits of magnitude ~1 (measured here, CPU: <= 1.6e-6 for fp32, the
AWQ torch path and the int4 kernel alike; a bucket of one row is bitwise the sequence alone, a bucket of several
runs each product as one GEMM instead of M GEMVs: another summation order). Greedy tokens identical.
"""
from __future__ import annotations

from typing import Callable

import pytest

torch = pytest.importorskip("torch")

from r1v.converters.config import Qwen2Config  # noqa: E402
from r1v.runtime.backends.awq import int4  # noqa: E402
from r1v.runtime.backends.awq.qlinear import AWQLinear, Int4Linear  # noqa: E402
from r1v.runtime.model import KVCache, Qwen2ForCausalLM  # noqa: E402
from r1v.runtime.model.decode import StaticDecoder  # noqa: E402

CFG = Qwen2Config(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, vocab_size=97, max_position_embeddings=4096)
CAPACITY = 600  # spans 256, 512, 600
PROMPTS = (5, 17, 300, 40)  # prompt lengths of the four sequences; 300 decodes in span 512
STEPS = 10
TOLERANCE = {"fp32": 1e-5, "awq-torch": 1e-5, "int4": 1e-5}


def _awq_linear(kernel: str) -> Callable[..., torch.nn.Module]:
    """A linear factory: a random fp32 weight quantized RTN 4-bit (group 32), run by `kernel`."""

    def make(inp: int, out: int, bias: bool = True) -> torch.nn.Module:
        weight = torch.randn(out, inp) * inp ** -0.5
        b = torch.randn(out) * 0.1 if bias else None
        layer = AWQLinear.quantize(weight, b, 32)
        if kernel == "int4":
            return Int4Linear.from_awq(layer.qweight, layer.qzeros, layer.scales, b)
        return layer

    return make


def _model(kind: str) -> Qwen2ForCausalLM:
    torch.manual_seed(0)
    if kind == "int4" and not int4.available("cpu"):
        pytest.skip("this torch build has no int4 CPU kernel")
    llm = Qwen2ForCausalLM(CFG) if kind == "fp32" else Qwen2ForCausalLM(CFG, _awq_linear(kind.removeprefix("awq-")))
    with torch.no_grad():  # small weights: logits of magnitude ~1, no near-ties from huge values
        llm.model.embed_tokens.weight.normal_(0, 1)
        llm.lm_head.weight.normal_(0, CFG.hidden_size ** -0.5)
    return llm.eval()


def _prompt(n: int, seed: int) -> torch.Tensor:
    return torch.randint(0, CFG.vocab_size, (n,), generator=torch.Generator().manual_seed(seed))


@torch.inference_mode()
def _alone(llm: Qwen2ForCausalLM, ids: torch.Tensor, steps: int) -> tuple[list[int], list[torch.Tensor]]:
    """Greedy tokens and each step's logits of one sequence decoded alone (a one-row cache)."""
    cache = llm.new_cache(CAPACITY)
    decoder = StaticDecoder(llm, cache)
    logits = llm(ids[None], cache=cache)[0, -1].float()
    tokens, rows = [], [logits]
    for _ in range(steps):
        tokens.append(int(logits.argmax()))
        logits = decoder.step(llm.model.embed_tokens(torch.tensor([tokens[-1]])))
        rows.append(logits)
    return tokens, rows


@pytest.fixture(scope="module", params=["fp32", "awq-torch", "int4"])
def setup(request):
    llm = _model(request.param)
    prompts = [_prompt(n, seed) for seed, n in enumerate(PROMPTS)]
    alone = [_alone(llm, ids, STEPS) for ids in prompts]
    return request.param, llm, prompts, alone


class Batch:
    """The four sequences prefilled into the rows of one 4-row cache, stepped together."""

    def __init__(self, llm: Qwen2ForCausalLM, prompts: list[torch.Tensor], order: list[int] | None = None):
        self.llm = llm
        self.order = order or list(range(len(prompts)))  # order[row] = which sequence sits in that row
        self.decoder = StaticDecoder(llm, llm.new_cache(CAPACITY, batch=len(prompts)))
        self.logits = {}
        self.tokens: dict[int, list[int]] = {row: [] for row in range(len(prompts))}
        with torch.inference_mode():
            for row, seq in enumerate(self.order):
                self.logits[row] = llm(prompts[seq][None], cache=self.decoder.rows[row])[0, -1].float()

    @torch.inference_mode()
    def step(self, rows: list[int]) -> dict[int, torch.Tensor]:
        embeds = {}
        for row in rows:
            self.tokens[row].append(int(self.logits[row].argmax()))
            embeds[row] = self.llm.model.embed_tokens(torch.tensor([self.tokens[row][-1]]))
        out = self.decoder.step_rows(embeds)
        self.logits.update(out)
        return out


def _diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).abs().max())


@pytest.mark.parametrize("active", [[0], [0, 1], [0, 1, 2, 3], [1, 3]], ids=["1", "2", "4", "rows-1-3"])
def test_batched_steps_match_each_sequence_alone(setup, active: list[int]) -> None:
    """Each row's logits at every step within the tolerance of the sequence alone, greedy tokens identical; rows
    not stepped (padding rows of the bucket, holding their prefilled prompts) are untouched: stepped afterwards
    they still match."""
    kind, llm, prompts, alone = setup
    batch = Batch(llm, prompts)
    assert batch.decoder.buckets == [1, 2, 4]
    worst = 0.0
    for n in range(STEPS):
        out = batch.step(active)
        assert sorted(out) == active
        for row in active:
            worst = max(worst, _diff(out[row], alone[row][1][n + 1]))
    for row in active:
        assert batch.tokens[row] == alone[row][0][:STEPS]
    rest = [row for row in range(4) if row not in active]
    for n in range(3 if rest else 0):  # the others, never stepped so far: their caches were only padded over
        out = batch.step(rest)
        for row in rest:
            worst = max(worst, _diff(out[row], alone[row][1][n + 1]))
    for row in rest:
        assert batch.tokens[row] == alone[row][0][:3]
    print(f"[{kind}] rows {active}: max |batched - alone| = {worst:.2e}")
    assert worst <= TOLERANCE[kind]
    lengths = [r.length for r in batch.decoder.rows]
    assert lengths == [PROMPTS[r] + (STEPS if r in active else 3) for r in range(4)]


def test_a_sequence_does_not_depend_on_its_batch_mates(setup) -> None:
    """Sequence 0 in row 0 with the other three in rows 1-3, then with them in another order: the same logits
    (bitwise: the same bucket, and each row of a product is computed on its own)."""
    kind, llm, prompts, _ = setup
    first, second = Batch(llm, prompts), Batch(llm, prompts, order=[0, 3, 1, 2])
    for _ in range(4):
        a, b = first.step([0, 1, 2, 3])[0], second.step([0, 1, 2, 3])[0]
        assert torch.equal(a, b), f"[{kind}] row 0 changed with its batch mates: {_diff(a, b):.2e}"
    assert first.tokens[0] == second.tokens[0]
    assert [first.tokens[r] for r in (1, 2, 3)] == [second.tokens[r] for r in (2, 3, 1)]


@torch.inference_mode()
def test_truncate_one_row_leaves_the_others(setup) -> None:
    """Cutting one row back (its length) and re-evaluating from there gives that sequence's logits again; the other
    rows, stepped meanwhile, keep matching their sequences alone."""
    kind, llm, prompts, alone = setup
    batch = Batch(llm, prompts)
    for _ in range(3):
        batch.step([0, 1, 2, 3])
    row = batch.decoder.rows[1]
    row.length = PROMPTS[1] - 4  # keep all but the prompt's last 4 positions
    logits = llm(prompts[1][None, -4:], cache=row)[0, -1].float()
    assert row.length == PROMPTS[1]
    assert _diff(logits, alone[1][1][0]) <= TOLERANCE[kind]
    batch.logits[1], batch.tokens[1] = logits, []
    for n in range(3):
        out = batch.step([0, 1, 2, 3])
        assert _diff(out[1], alone[1][1][n + 1]) <= TOLERANCE[kind]
        for r in (0, 2, 3):
            assert _diff(out[r], alone[r][1][n + 4]) <= TOLERANCE[kind]
    assert batch.tokens[1] == alone[1][0][:3]


def test_bucket_choice_and_errors() -> None:
    llm = _model("fp32")
    decoder = StaticDecoder(llm, llm.new_cache(300, batch=3))
    assert decoder.buckets == [1, 2, 3] and [decoder.bucket_for(n) for n in (1, 2, 3)] == [1, 2, 3]
    assert StaticDecoder(llm, llm.new_cache(300, batch=8)).buckets == [1, 2, 4, 8]
    assert StaticDecoder(llm, llm.new_cache(300)).buckets == [1]
    embeds = llm.model.embed_tokens(torch.tensor([1]))
    with pytest.raises(ValueError, match="row 3 of a KV cache of 3 rows"):
        decoder.step_rows({3: embeds})
    with pytest.raises(ValueError, match="at least one row"):
        decoder.step_rows({})
    decoder.rows[1].length = 300
    with pytest.raises(ValueError, match="KV cache full: position 300, capacity 300"):
        decoder.step_rows({0: embeds, 1: embeds})
    assert decoder.rows[0].length == 0  # nothing advanced
    with pytest.raises(IndexError, match="KV cache row 3 of 3"):
        KVCache.row(decoder.cache, 3)
