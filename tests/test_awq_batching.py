"""Batched decode on the torch model (issue 20, item 3): one forward advancing several sequences, each in its own row
of the KV cache, against each sequence decoded alone.

Model level (`model.decode.StaticDecoder.step_rows`): a small random Qwen2 with plain fp32 linears, AWQ linears on
the exact torch path and on the Triton kernels (interpreted on CPU: the GEMV at M <= 8), and torch's int4 CPU
kernel (bf16 products); sequences of different lengths (one crosses the 256-position span boundary), batches of 1,
2 and 4 rows, a sparse set of rows (padding rows that hold other sequences' cached prefixes), swapped batch mates,
per-row truncation. Backend level: the engine hooks of `r1v.load(awq_dir, parallel=4)` (text and image prompts),
then requests from 1, 2 and 4 threads through the scheduler. CUDA-only checks (one graph per bucket and span) skip
without CUDA.

Tolerance: batched vs alone <= 1e-5 absolute on logits of magnitude ~1 (measured here, CPU: <= 1.6e-6 for fp32, the
AWQ torch and Triton paths and the int4 kernel alike; a bucket of one row is bitwise the sequence alone, a bucket of
several runs each product as one GEMM instead of M GEMVs: another summation order). Backend level: <= 2e-6
measured, tolerance 1e-4. Greedy tokens identical everywhere.
"""
from __future__ import annotations

from typing import Callable

import pytest

torch = pytest.importorskip("torch")

from r1v.converters.config import Qwen2Config  # noqa: E402
from r1v.runtime.backends.awq import int4, kernels  # noqa: E402
from r1v.runtime.backends.awq.qlinear import AWQLinear, Int4Linear  # noqa: E402
from r1v.runtime.model import KVCache, Qwen2ForCausalLM  # noqa: E402
from r1v.runtime.model.decode import StaticDecoder  # noqa: E402

CFG = Qwen2Config(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, vocab_size=97, max_position_embeddings=4096)
CAPACITY = 600  # spans 256, 512, 600
PROMPTS = (5, 17, 300, 40)  # prompt lengths of the four sequences; 300 decodes in span 512
STEPS = 10
TOLERANCE = {"fp32": 1e-5, "awq-torch": 1e-5, "awq-triton": 1e-5, "int4": 1e-5}


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
    if kind == "awq-triton" and not kernels.triton_usable_on("cpu"):
        pytest.skip("the Triton kernels need CUDA or TRITON_INTERPRET=1")
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


@pytest.fixture(scope="module", params=["fp32", "awq-torch", "awq-triton", "int4"])
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
def test_swapped_rows_carry_their_sequences(setup) -> None:
    """`swap_rows` exchanges two rows' sequences (keys, values, lengths): each keeps decoding as alone from its new
    row; the others are untouched."""
    kind, llm, prompts, alone = setup
    batch = Batch(llm, prompts)
    for _ in range(2):
        batch.step([0, 1, 2, 3])
    batch.decoder.swap_rows(0, 2)
    assert [r.length for r in batch.decoder.rows] == [PROMPTS[2] + 2, PROMPTS[1] + 2, PROMPTS[0] + 2, PROMPTS[3] + 2]
    batch.logits[0], batch.logits[2] = batch.logits[2], batch.logits[0]
    batch.tokens[0], batch.tokens[2] = batch.tokens[2], batch.tokens[0]
    for n in range(2, 5):
        out = batch.step([0, 1, 2, 3])
        for row, seq in enumerate((2, 1, 0, 3)):
            assert _diff(out[row], alone[seq][1][n + 1]) <= TOLERANCE[kind], (row, seq, n)
    assert [batch.tokens[r] for r in range(4)] == [alone[s][0][:5] for s in (2, 1, 0, 3)]


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


# --- the AWQ backend: sequences in the rows of one cache, driven through the engine hooks ------------------------
import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402

from r1v.runtime.api import Model, load  # noqa: E402
from r1v.runtime.backends.base import SequenceState, common_prefix  # noqa: E402
from r1v.runtime.backends.prompt import spans  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
OPTIONS = dict(n_ctx=1024, n_batch=48, device="cpu")
QUESTIONS = ("How many red circles are in the image?", "Name three colours.", "What is in the picture?",
             "Describe the shapes, then count them, then say which one is largest and why.")
SIZES = (None, None, (224, 224), (448, 224))  # sequences 2 and 3 carry an image (1 and 3 tiles)
BACKEND_STEPS = 12


def _image(width: int, height: int, seed: int = 0) -> Image.Image:
    yy, xx = np.mgrid[0:height, 0:width]
    base = np.stack([np.sin(xx / 17.0), np.cos(yy / 11.0), np.sin((xx + yy) / 29.0)], -1) * 0.4 + 0.5
    noise = np.random.default_rng(seed).normal(0, 0.08, base.shape)
    return Image.fromarray((np.clip(base + noise, 0, 1) * 255).astype(np.uint8))


def _prompts(model: Model) -> list:
    backend, out = model._backend, []
    for i, (question, size) in enumerate(zip(QUESTIONS, SIZES)):
        images = [_image(*size, seed=i)] if size else []
        rendered = model.render(question, images)
        out.append(backend.prepare(rendered.fragments, rendered.images))
    return out


def _prefill(backend, sequence: SequenceState, prompt, keep: int = 0):
    """Evaluate the prompt after `keep` positions into the sequence, span by span (the engine hook the request loop
    calls); the logits handle of its last position."""
    embeddings = backend._image_embeddings(prompt, keep)
    with torch.inference_mode():
        for span in spans(prompt, keep, backend.n_batch, across_segments=backend.across_segments):
            handle = backend._evaluate_span(sequence, prompt, span, embeddings)
    return handle


def _drive(model: Model, runs: list[tuple[SequenceState, object]], steps: int = BACKEND_STEPS):
    """Evaluate each prompt into its sequence, then greedy-decode them together (one `_step_batch` per token; a
    sequence leaves at an end token): per run, the tokens and each step's logits (numpy)."""
    backend = model._backend
    handles, tokens, rows = {}, {}, {}
    with torch.inference_mode():
        for i, (sequence, prompt) in enumerate(runs):
            backend._truncate(sequence, 0)
            handles[i] = _prefill(backend, sequence, prompt)
            tokens[i], rows[i] = [], []
        while handles:
            steps_now = []
            for i, handle in handles.items():
                row = backend._logits_row(handle)
                rows[i].append(row)
                tokens[i].append(int(row.argmax()))
                if len(tokens[i]) < steps and not backend._is_end(tokens[i][-1]):
                    steps_now.append((i, runs[i][0], tokens[i][-1]))
            handles = {}
            if steps_now:
                out = backend._step_batch([(sequence, token) for _, sequence, token in steps_now])
                handles = {i: h for (i, _, _), h in zip(steps_now, out)}
    return [tokens[i] for i in range(len(runs))], [np.stack(rows[i]) for i in range(len(runs))]


@pytest.fixture(scope="module", params=["torch", "int4"])
def kernel(request) -> str:
    if request.param == "int4" and not int4.available("cpu"):
        pytest.skip("this torch build has no int4 CPU kernel")
    return request.param


@pytest.fixture(scope="module")
def awq_dir(tiny_awq: Callable) -> object:
    # The tiny AWQ checkpoint is made as `r1v convert awq` makes it, which records a llama.cpp imatrix (gguf names).
    pytest.importorskip("gguf", reason="r1v convert awq needs gguf (a GPU image without it: pip install gguf)")
    return tiny_awq("fp16")


@pytest.fixture(scope="module")
def alone(awq_dir, kernel):
    """Each prompt decoded alone at parallel=1 (the single-sequence path)."""
    with load(awq_dir, **OPTIONS, kernel=kernel) as m:
        assert m._backend.cache.rows == 1 and m._backend.decoder.buckets == [1]
        prompts = _prompts(m)
        return [tuple(part[0] for part in _drive(m, [(m._backend.sequence, p)])) for p in prompts]


@pytest.fixture(scope="module")
def parallel(awq_dir, kernel):
    with load(awq_dir, **OPTIONS, kernel=kernel, parallel=4) as m:
        yield m


# Batched vs alone on the tiny AWQ model (measured here: torch path <= 2e-6, int4 kernel <= 2e-6 on logits ~1-10).
BACKEND_TOLERANCE = 1e-4


@pytest.mark.parametrize("which", [[0], [2], [0, 3], [0, 1, 2, 3], [3]], ids=["1-text", "1-image", "2", "4", "row-3"])
def test_backend_batched_decode_matches_each_prompt_alone(parallel, alone, kernel, which) -> None:
    """`_step_batch` over 1, 2 and 4 sequences (text and image prompts of different lengths; row 3 alone runs the
    bucket of 4 with three padding rows): the same greedy tokens as each prompt alone at parallel=1, logits within
    the tolerance."""
    backend = parallel._backend
    prompts = _prompts(parallel)
    tokens, rows = _drive(parallel, [(backend.sequences[i], prompts[i]) for i in which])
    worst = 0.0
    for i, got_tokens, got_rows in zip(which, tokens, rows):
        want_tokens, want_rows = alone[i]
        assert got_tokens == want_tokens, f"sequence {i} in batch {which}"
        worst = max(worst, float(np.abs(got_rows - want_rows).max()))
    print(f"[{kernel}] sequences {which}: max |batched - alone| = {worst:.2e}")
    assert worst <= BACKEND_TOLERANCE
    # The stepped sequences sit in the first rows (moved there when they were not): one alone is bucket 1, the
    # single-sequence step exactly.
    assert sorted(backend._row[i] for i in which) == list(range(len(which)))
    if len(which) == 1:
        assert worst == 0.0


def test_backend_sequence_is_independent_of_its_row_and_mates(parallel, alone) -> None:
    """The four prompts in reversed rows: each one's tokens unchanged."""
    backend = parallel._backend
    prompts = _prompts(parallel)
    tokens, _ = _drive(parallel, [(backend.sequences[3 - i], prompts[i]) for i in range(4)])
    assert tokens == [alone[i][0] for i in range(4)]


def test_backend_truncates_one_sequence(parallel, alone) -> None:
    """A sequence cut back to a prefix and continued with another prompt (multi-turn reuse of one sequence) while
    the others keep their cached prompts: its tokens are the other prompt's alone, the others' cache rows intact
    (decoded again from their kept prompts, via the common prefix, the same tokens)."""
    backend = parallel._backend
    prompts = _prompts(parallel)
    _drive(parallel, [(backend.sequences[i], prompts[i]) for i in range(4)])
    first = backend.sequences[1]
    keep = common_prefix(first.positions, prompts[0].items)
    assert 0 < keep < prompts[0].n_positions
    backend._truncate(first, keep)
    assert len(first.positions) == keep == backend.decoder.rows[backend._row[1]].length
    handle = _prefill(backend, first, prompts[0], keep)
    assert int(backend._logits_row(handle).argmax()) == alone[0][0][0]
    for i in (0, 2, 3):  # untouched rows: their prompts' last position evaluated again over the kept prefix
        sequence = backend.sequences[i]
        backend._truncate(sequence, prompts[i].n_positions - 1)
        handle = _prefill(backend, sequence, prompts[i], prompts[i].n_positions - 1)
        assert np.abs(backend._logits_row(handle) - alone[i][1][0]).max() <= BACKEND_TOLERANCE


def test_backend_describes_its_sequences(parallel) -> None:
    backend = parallel._backend
    info = backend.describe()
    assert info["parallel"] == 4 and info["decode"]["batch_buckets"] == [1, 2, 4]
    assert backend.cache.rows == 4 and backend.cache.capacity == 1024  # n_ctx per sequence
    one_row = sum(k[:1].numel() * k.element_size() for k in backend.cache.keys)
    assert info["bytes"]["kv_cache"] == 2 * 4 * one_row
    with pytest.raises(ValueError, match=r"a decode step advances each sequence once; got sequences \[0, 0\]"):
        backend._step_batch([(backend.sequences[0], 1), (backend.sequences[0], 2)])


# On a GPU the default kernel is int4 in bf16: rows of one product against one row may round differently (not
# measured: no GPU here when this was written), so tokens are compared up to the first near tie of the one alone;
# the graphs against the same steps run eagerly must agree to rounding.
CUDA_TOLERANCE = 0.02


def _equal_until_a_near_tie(got: tuple[list[int], np.ndarray], want: tuple[list[int], np.ndarray],
                            tolerance: float) -> int:
    """Logits within `tolerance` and the same greedy tokens, step by step, up to the first step whose top-2 margin
    in `want` is within 2 x tolerance (a token there may flip, and the sequences part); the steps compared."""
    for n, row in enumerate(want[1]):
        assert np.abs(got[1][n] - row).max() <= tolerance, n
        second, first = np.sort(row)[-2:]
        if first - second <= 2 * tolerance:
            return n
        assert got[0][n] == want[0][n], n
    return len(want[0])


@pytest.mark.skipif(DEVICE != "cuda", reason="needs CUDA")
def test_cuda_graphs_per_bucket_match_eager_steps_and_each_prompt_alone(awq_dir) -> None:
    """On a GPU: one graph per (bucket, span) captured at load; the batched steps replayed from the graphs of
    buckets 1, 2 and 4 give the logits of the same steps run eagerly, and each prompt's logits and greedy tokens
    alone (parallel=1, its own graphs) up to a near tie."""
    options = dict(n_ctx=1024, n_batch=48, device="cuda")
    with load(awq_dir, **options) as m:
        assert m._backend.describe()["decode"]["cuda_graphs"]
        want = [tuple(part[0] for part in _drive(m, [(m._backend.sequence, p)])) for p in _prompts(m)]
    with load(awq_dir, **options, parallel=4) as m:
        backend = m._backend
        decode = backend.describe()["decode"]
        assert decode["cuda_graphs"] and decode["batch_buckets"] == [1, 2, 4], decode
        assert sorted(backend.decoder._graphs) == [(b, s) for b in (1, 2, 4) for s in decode["spans"]]
        prompts = _prompts(m)
        for which in ([0], [0, 3], [0, 1, 2, 3], [3]):
            runs = [(backend.sequences[i], prompts[i]) for i in which]
            tokens, rows = _drive(m, runs)
            graphs, backend.decoder._graphs = backend.decoder._graphs, {}
            try:
                eager = _drive(m, runs)
            finally:
                backend.decoder._graphs = graphs
            for k in range(len(which)):
                _equal_until_a_near_tie((tokens[k], rows[k]), (eager[0][k], eager[1][k]), 1e-3)
            compared = [_equal_until_a_near_tie((tokens[k], rows[k]), want[i], CUDA_TOLERANCE)
                        for k, i in enumerate(which)]
            print(f"CUDA sequences {which}: steps compared with each alone {compared}")


def test_bench_batched_decode_runs_and_the_gpu_check_summary_shows_it(awq_dir, tmp_path) -> None:
    """`bench_batched_decode` on CPU (a few steps): one row per batch size with positive rates; gpu-check's
    summary prints its table, and names batched.json missing only when the batched stage ran."""
    import json

    from r1v.bench import gpu_check
    from r1v.bench.generate_awq import bench_batched_decode, format_batched

    with pytest.raises(ValueError, match=r"bench_batched_decode: a \d+-token prompt and 3 steps do not fit n_ctx 256"):
        bench_batched_decode(str(awq_dir), sizes=(1, 2), steps=2, warm_up=1, n_ctx=256, device="cpu")
    results = bench_batched_decode(str(awq_dir), sizes=(1, 2, 4), steps=2, warm_up=1, n_ctx=1024, device="cpu",
                                   kernel="torch")
    assert [r["sequences"] for r in results["rows"]] == [1, 2, 4] and results["batch_buckets"] == [1, 2, 4]
    assert all(r["tokens_per_second"] > 0 and r["step_ms"] > 0 for r in results["rows"])
    assert results["rows"][0]["speedup"] == 1.0 and results["cuda_graphs"] is False
    assert "batched decode:" in format_batched(results)
    (tmp_path / "stages.tsv").write_text("install\t0\t3.5\nbatched\t1\t2.0\n")
    gpu_check.main([str(tmp_path)])
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert "batched.json was not written" in summary["missing"]
    (tmp_path / "batched.json").write_text(json.dumps(results))
    summary, text = gpu_check.summarize(tmp_path)
    assert summary["batched"]["rows"][2]["sequences"] == 4 and "batched.json was not written" not in summary["missing"]
    assert "batched decode:" in text


# --- end to end: r1v.load(parallel=4), requests from threads (the scheduler) ---------------------------------------
def test_concurrent_requests_through_load_equal_each_alone(awq_dir, kernel) -> None:
    """`r1v.load(awq_dir, parallel=4)` and 1, 2 and 4 threads calling `generate` at once (an image prompt and text
    prompts of different lengths; prefill in spans of 48 between the others' steps): each answer's greedy tokens
    equal that request alone at parallel=1."""
    from test_batching import _concurrently

    requests = [(q, [_image(*size, seed=i)] if size else []) for i, (q, size) in enumerate(zip(QUESTIONS, SIZES))]
    requests = [requests[3], requests[0], requests[2], requests[1]]  # the 3-tile image first: it is in every batch
    params = dict(max_tokens=BACKEND_STEPS, temperature=0, repetition_penalty=1.0)
    with load(awq_dir, **OPTIONS, kernel=kernel) as m:
        alone = []
        for question, images in requests:
            m.reset()
            alone.append(m.generate(question, images, **params).tokens)
    with load(awq_dir, **OPTIONS, kernel=kernel, parallel=4) as m:
        for k in (1, 2, 4):
            m.reset()
            results = _concurrently([lambda q=q, i=i: m.generate(q, i, **params) for q, i in requests[:k]])
            assert [r.tokens for r in results] == alone[:k], k
            assert results[0].images[0].tiles == 3
