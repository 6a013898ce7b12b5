"""`r1v.load()` + `Model.generate/stream` on AWQ checkpoints (the torch backend), against the torch reference model
run on the dequantized weights.

Tiny R1V checkpoints (InternViT-6B flavour, 224-pixel tiles: 64 image tokens per tile) quantized by `r1v convert
awq` (RTN, group 32) with the vision tower kept fp16, stored int8 and stored int4. The reference dequantizes the
stored tensors with `r1v.quant.pack.dequantize_awq` (bit-identical to AutoAWQ's dequantize_gemm) into a plain fp32
`R1VModel`; greedy tokens must be identical for text and image prompts (prefill in chunks of 48 positions, so
images straddle chunks). Then: streaming, KV-cache reuse, sampling, placements (`device_memory`, the 24 GB
placement `r1v plan` picks for R1V3-38B), kernel choice, errors, and `r1v bench generate` on CPU.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Callable

import numpy as np
import pytest
from PIL import Image

torch = pytest.importorskip("torch")  # (tests/conftest.py sets TRITON_INTERPRET=1 where there is no GPU)
# The tiny AWQ checkpoints are made as `r1v convert awq` makes them, which records a llama.cpp imatrix (gguf names).
pytest.importorskip("gguf", reason="r1v convert awq needs gguf (a GPU image without it: pip install gguf)")

from r1v.converters.checkpoint import read_tokenizer_files  # noqa: E402
from r1v.converters.config import load_config, parse_config  # noqa: E402
from r1v.quant.pack import dequantize_awq  # noqa: E402
from r1v.runtime.api import ContextOverflowError, load  # noqa: E402
from r1v.runtime.image import TilingConfig, prepare_image  # noqa: E402
from r1v.runtime.files.plan import GiB, best_placement  # noqa: E402
from r1v.runtime.model import R1VModel  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
R1V3_CONFIG = ROOT / "tests" / "data" / "r1v3-38b-config.json"
GREEDY = dict(temperature=0, repetition_penalty=1.0)
# kernel "torch": the exact path (fp32 products of the fp16 weights), what the parity tests hold to the reference;
# torch's int4 kernels (the default where available, bf16 products) are checked in tests/test_awq_int4.py.
OPTIONS = dict(n_ctx=1024, n_batch=48, device="cpu", kernel="torch")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
STEPS = 24
QUESTION = "How many red circles are in the image?"
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _image(width: int, height: int, seed: int = 0) -> Image.Image:
    yy, xx = np.mgrid[0:height, 0:width]
    base = np.stack([np.sin(xx / 17.0), np.cos(yy / 11.0), np.sin((xx + yy) / 29.0)], -1) * 0.4 + 0.5
    noise = np.random.default_rng(seed).normal(0, 0.08, base.shape)
    return Image.fromarray((np.clip(base + noise, 0, 1) * 255).astype(np.uint8))


@pytest.fixture(scope="module")
def awq_dir(tiny_awq: Callable[[str], Path]) -> Path:
    """The model with the vision tower fp16 (tiny_awq("int4"): stored int4; stored int8: tests/test_awq_export.py)."""
    return tiny_awq("fp16")


def reference_model(outdir: Path) -> R1VModel:
    """The AWQ checkpoint as a plain fp32 R1VModel: AWQ tensors dequantized to fp16 by the project's packing code,
    int8 linears as int8_weight * int8_scale, everything else as stored."""
    from safetensors.torch import load_file

    config = json.loads((outdir / "config.json").read_text())
    group = config["quantization_config"]["group_size"]
    stored: dict[str, torch.Tensor] = {}
    for shard in sorted(outdir.glob("*.safetensors")):
        stored.update(load_file(shard))
    state = {}
    for name, value in stored.items():
        if name.endswith(".qweight"):
            p = name.removesuffix(".qweight")
            g = value.shape[0] // stored[p + ".scales"].shape[0]
            assert g == group or p.startswith("vision_model.")
            state[p + ".weight"] = dequantize_awq(value, stored[p + ".qzeros"], stored[p + ".scales"], g).float()
        elif name.endswith(".int8_weight"):
            p = name.removesuffix(".int8_weight")
            state[p + ".weight"] = value.float() * stored[p + ".int8_scale"].float()[:, None]
        elif not name.endswith((".qzeros", ".scales", ".int8_scale")):
            state[name] = value.float()
    model = R1VModel(parse_config(config), read_tokenizer_files(outdir).token_id("<IMG_CONTEXT>"))
    model.load_state_dict(state, strict=True)
    return model.eval()


@pytest.fixture(scope="module")
def references(tiny_awq: Callable[[str], Path]):
    cache: dict[str, R1VModel] = {}

    def get(vision: str) -> R1VModel:
        if vision not in cache:
            cache[vision] = reference_model(tiny_awq(vision))
        return cache[vision]

    return get


@pytest.fixture(scope="module")
def model(awq_dir):
    with load(awq_dir, **OPTIONS) as m:
        yield m


def _reference_prompt(outdir: Path, question: str, images: list[Image.Image], max_tiles: int = 12):
    """The prompt as InternVL-chat builds it, by hand: ids (each image as <img> + <IMG_CONTEXT> x 64 per tile +
    </img>) and pixel values."""
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(outdir / "tokenizer.json"))
    tiling = TilingConfig(image_size=224, max_tiles=max_tiles)
    prepared = [prepare_image(img, tiling) for img in images]
    blocks = "".join("<img>" + "<IMG_CONTEXT>" * 64 * p.num_tiles + "</img>\n" for p in prepared)
    text = f"<|im_start|>user\n{blocks}{question}<|im_end|>\n<|im_start|>assistant\n<think>\n"
    ids = tokenizer.encode(text, add_special_tokens=False).ids
    pixels = torch.from_numpy(np.concatenate([p.pixel_values for p in prepared])) if prepared else None
    return ids, pixels


def _reference_greedy(reference: R1VModel, outdir: Path, question: str, images: list[Image.Image], steps: int = STEPS,
                      max_tiles: int = 12):
    ids, pixels = _reference_prompt(outdir, question, images, max_tiles)
    # R1VModel.greedy, except that generated tokens go in as plain token embeddings (a random model may well
    # produce <IMG_CONTEXT>, which R1VModel.forward would take for an image position).
    stop = set(reference.eos_token_ids)
    with torch.inference_mode():
        cache = reference.language_model.new_cache(len(ids) + steps)
        logits = reference(torch.tensor([ids]), pixels, cache)
        out: list[int] = []
        while len(out) < steps:
            out.append(int(logits[0, -1].argmax()))
            if out[-1] in stop or len(out) == steps:
                break
            logits = reference.language_model(input_ids=torch.tensor([[out[-1]]]), cache=cache)
    return len(ids), out


# --- parity with the reference ------------------------------------------------------------------------------------
def test_loads_as_awq_with_the_torch_path_on_cpu(model, awq_dir):
    from r1v.runtime.backends.awq import AWQBackend, AWQLinear

    backend = model._backend
    assert isinstance(backend, AWQBackend) and model.has_vision and model.n_ctx == 1024
    assert backend.kernel == "torch" and backend.placement == "awq[vision=fp16,embed=gpu]"
    q = backend.model.language_model.model.layers[0].self_attn.q_proj
    assert isinstance(q, AWQLinear) and q.group_size == 32 and q.qweight.dtype == torch.int32
    assert backend.cache.capacity == 1024  # static: allocated for the whole context at load
    info = backend.describe()
    assert info["bytes"]["llm_layers"] < info["bytes"]["lm_head"] * 10 and info["dtype"] == "float32"


def test_greedy_text_equals_the_reference(model, references, awq_dir):
    n_prompt, expected = _reference_greedy(references("fp16"), awq_dir, QUESTION, [])
    result = model.generate(QUESTION, max_tokens=STEPS, **GREEDY)
    assert result.prompt_tokens == n_prompt
    assert result.tokens == expected
    assert result.completion_tokens == len(expected)


@pytest.mark.parametrize("size", [(224, 224), (448, 224)])
def test_greedy_image_prompts_equal_the_reference(model, references, awq_dir, size):
    image = _image(*size, seed=size[0])
    n_prompt, expected = _reference_greedy(references("fp16"), awq_dir, QUESTION, [image])
    model.reset()
    result = model.generate(QUESTION, images=[image], max_tokens=STEPS, **GREEDY)
    assert result.prompt_tokens == n_prompt > 64 * result.images[0].tiles
    assert result.images[0].tiles == (1 if size == (224, 224) else 3)
    assert result.tokens == expected


@pytest.mark.parametrize("vision", ["int4"])
def test_stored_int8_and_int4_vision_towers_equal_the_reference(tiny_awq, references, vision):
    from r1v.runtime.backends.awq import AWQLinear, Int8Linear

    image = _image(448, 224, seed=5)
    n_prompt, expected = _reference_greedy(references(vision), tiny_awq(vision), QUESTION, [image])
    with load(tiny_awq(vision), **OPTIONS) as m:
        assert m._backend.placement == f"awq[vision={vision},embed=gpu]"
        qkv = m._backend.model.vision_model.encoder.layers[0].attn.qkv
        assert isinstance(qkv, AWQLinear if vision == "int4" else Int8Linear)
        result = m.generate(QUESTION, images=[image], max_tokens=STEPS, **GREEDY)
    assert result.prompt_tokens == n_prompt and result.tokens == expected


def test_logprobs_equal_the_reference(model, references, awq_dir):
    """Teacher forcing (what `r1v eval` scores with) against the reference's log-softmax on the same sequence."""
    image = _image(448, 224, seed=11)
    answer = model.tokenize("Three red circles.</think>3")
    ids, pixels = _reference_prompt(awq_dir, QUESTION, [image])
    with torch.inference_mode():
        logits = references("fp16")(torch.tensor([ids + answer[:-1]]), pixels)[0, len(ids) - 1:]
    expected = torch.log_softmax(logits.double(), -1).numpy()
    got = model.logprobs(QUESTION, answer, images=[image])
    assert got.shape == expected.shape == (len(answer), model._backend.n_vocab)
    assert np.abs(got - expected).max() < 1e-4


def test_per_request_max_tiles(model, references, awq_dir):
    image = _image(448, 224, seed=12)  # 2x1 tiles + thumbnail; with max_tiles=1 a single tile
    _, expected = _reference_greedy(references("fp16"), awq_dir, QUESTION, [image], steps=8, max_tiles=1)
    model.reset()
    result = model.generate(QUESTION, images=[image], max_tokens=8, max_tiles=1, **GREEDY)
    assert result.images[0].tiles == 1 and result.tokens == expected
    with pytest.raises(ValueError, match="max_tiles"):
        model.generate(QUESTION, images=[image], max_tokens=1, image_budget=2.0)


# --- the Model interface ------------------------------------------------------------------------------------------
def test_stream_equals_generate_and_the_second_turn_reuses_the_cache(model, awq_dir):
    image = _image(224, 224, seed=9)
    model.reset()
    chunks = list(model.stream(QUESTION, images=[image], max_tokens=12, **GREEDY))
    streamed = chunks[-1].result
    assert "".join(c.text for c in chunks) == streamed.reasoning + streamed.content
    again = model.generate(QUESTION, images=[image], max_tokens=12, **GREEDY)
    assert again.tokens == streamed.tokens and again.cached_tokens == again.prompt_tokens - 1
    history = [{"role": "user", "content": [{"type": "image", "image": image}, {"type": "text", "text": QUESTION}]},
               {"role": "assistant", "content": "Three."}, {"role": "user", "content": "And blue ones?"}]
    follow = model.generate(history, max_tokens=12, **GREEDY)
    assert follow.cached_tokens > 64  # the image and the first question were not evaluated again
    with load(awq_dir, **OPTIONS) as fresh:
        assert fresh.generate(history, max_tokens=12, **GREEDY).tokens == follow.tokens


def test_sampling(model):
    model.reset()
    a = model.generate("Tell me a story.", max_tokens=16, temperature=1.0, top_p=1.0, seed=7)
    b = model.generate("Tell me a story.", max_tokens=16, temperature=1.0, top_p=1.0, seed=7)
    assert a.tokens == b.tokens and a.seed == 7
    greedy = model.generate("Tell me a story.", max_tokens=16, temperature=0, repetition_penalty=1.0)
    assert greedy.seed is None
    # top_k=1 and min_p=1 leave only the largest logit: sampling at any temperature is greedy.
    for cut in (dict(top_k=1), dict(min_p=1.0)):
        sampled = model.generate("Tell me a story.", max_tokens=16, temperature=1.5, repetition_penalty=1.0, seed=1,
                                 **cut)
        assert sampled.tokens == greedy.tokens
    seeds = {tuple(model.generate("Tell me a story.", max_tokens=16, temperature=2.0, top_p=1.0, seed=s).tokens)
             for s in range(4)}
    assert len(seeds) > 1
    penalized = model.generate("Tell me a story.", max_tokens=16, temperature=0, repetition_penalty=1.3)
    assert penalized.finish_reason in ("stop", "length")


def test_sampler_penalty_and_cuts_follow_llama_cpp():
    from r1v.runtime.api import SamplingParams
    from r1v.runtime.backends.awq.sampling import Sampler

    logits = torch.tensor([2.0, -1.0, 1.9, 0.5])
    s = Sampler(SamplingParams(temperature=0, repetition_penalty=2.0, repeat_last_n=2), n_ctx=16)
    for t in (0, 1, 3):  # window of 2: tokens 1 and 3 only
        s.accept(t)
    assert s.sample(logits) == 0  # 0 is outside the window: 2.0 stays; 1 -> -2.0, 3 -> 0.25
    s.accept(0)
    assert s.sample(logits) == 2  # 0 now penalized: 1.0 < 1.9
    top_p = Sampler(SamplingParams(temperature=1.0, top_p=0.5, repetition_penalty=1.0, seed=0), n_ctx=16)
    assert {top_p.sample(torch.tensor([3.0, 0.0, 0.0, 0.0])) for _ in range(20)} == {0}


# --- placements ---------------------------------------------------------------------------------------------------
def test_r1v_plan_shows_a_24gb_placement_with_8k_context():
    entry = best_placement(load_config(R1V3_CONFIG), 24 * GiB, context=8192)
    assert entry is not None and entry.total_bytes <= 24 * GiB and entry.fits == 24
    out = subprocess.run([sys.executable, "-m", "r1v", "plan", str(R1V3_CONFIG), "--context", "8192"],
                         capture_output=True, text=True, env=ENV, check=True).stdout
    row = next(line for line in out.splitlines() if line.startswith(entry.key))
    assert "  24 GB" in row  # the table's "fits" column
    assert f"24 GB: {entry.key}" in out  # and the placement load(device_memory="24GB") applies
    print(f"\n[awq] R1V3-38B at 8192 tokens on 24 GB: {entry.key}, {entry.total_bytes / GiB:.1f} GiB "
          f"(+{entry.host_bytes / GiB:.1f} GiB in RAM)")


def test_device_memory_applies_a_placement(awq_dir):
    with load(awq_dir, device_memory="24GB", **OPTIONS) as m:
        backend = m._backend
        assert backend.placement == "awq[vision=fp16,embed=gpu]"  # a tiny model fits 24 GB as it is
        assert "r1v plan" in backend.loaded.placement.source and backend.loaded.plan_entry is not None
        assert m.generate(QUESTION, images=[_image(224, 224)], max_tokens=4, **GREEDY).completion_tokens == 4
    with pytest.raises(ValueError, match="does not fit"):
        load(awq_dir, device_memory="1GB", **OPTIONS)  # below the plan's fixed CUDA context + activations


def test_the_r1v3_24gb_placement_loads_and_runs_on_the_tiny_model(awq_dir, model):
    from r1v.runtime.backends.awq import AWQLinear, Int8Linear

    entry = best_placement(load_config(R1V3_CONFIG), 24 * GiB, context=8192)
    image = _image(448, 224, seed=2)
    model.reset()
    fp = model.generate(QUESTION, max_tokens=STEPS, **GREEDY)
    with load(awq_dir, placement=entry.key, **OPTIONS) as m:
        backend = m._backend
        assert backend.placement == entry.key
        fc1 = backend.model.vision_model.encoder.layers[1].mlp.fc1
        assert isinstance(fc1, {"int8": Int8Linear, "int4": AWQLinear}.get(entry.vision, torch.nn.Linear))
        if entry.embed == "cpu":
            assert backend.loaded.embed_device.type == "cpu"
            assert backend.model.language_model.model.embed_tokens.weight.device.type == "cpu"
        # Text never touches the vision tower and the embedding rows are the same wherever the table lives.
        assert m.generate(QUESTION, max_tokens=STEPS, **GREEDY).tokens == fp.tokens
        quantized = backend._embeddings(backend.prepare(["", ""], [image]).segments[1])
    reference = model._backend._embeddings(model._backend.prepare(["", ""], [image]).segments[1])
    cosine = torch.nn.functional.cosine_similarity(quantized, reference).min().item()
    print(f"\n[awq] tiny model, {entry.key}: image embeddings cosine to fp16 vision >= {cosine:.4f}")
    assert cosine > (0.95 if entry.vision == "int4" else 0.999)


@pytest.mark.parametrize("key", ["awq[vision=int8,embed=cpu]", "awq[vision=int4,embed=gpu]"])
def test_explicit_placements(awq_dir, key):
    with load(awq_dir, placement=key, **OPTIONS) as m:
        assert m._backend.placement == key
        assert m.generate(QUESTION, images=[_image(224, 224)], max_tokens=4, **GREEDY).completion_tokens == 4


# --- kernels, options, errors -------------------------------------------------------------------------------------
def test_dense_kernel_equals_the_torch_path(awq_dir, model):
    model.reset()
    expected = model.generate(QUESTION, max_tokens=12, **GREEDY).tokens
    with load(awq_dir, **{**OPTIONS, "kernel": "dense"}) as dense:
        layer = dense._backend.model.language_model.model.layers[0]
        assert type(layer.mlp.down_proj) is torch.nn.Linear
        assert dense.generate(QUESTION, max_tokens=12, **GREEDY).tokens == expected


def test_triton_kernel_option_runs_interpreted_on_cpu(awq_dir, model):
    """kernel="triton": compiled on a CUDA machine, interpreted on CPU tensors elsewhere (TRITON_INTERPRET=1)."""
    pytest.importorskip("triton", reason="triton is not installed")
    from r1v.runtime.backends.awq import kernels

    assert DEVICE == "cuda" or kernels._interpreting()
    with load(awq_dir, **{**OPTIONS, "kernel": "triton", "device": DEVICE}) as m:
        backend = m._backend
        assert backend.kernel == "triton"
        prompt = backend.prepare([m.render(QUESTION).text], [])
        backend.reset()
        fast = backend._evaluate(prompt, {}, 0).cpu()
    model._backend.reset()
    slow = model._backend._evaluate(prompt, {}, 0)
    model._backend.reset()
    assert torch.nn.functional.cosine_similarity(fast, slow, dim=0).item() > 0.9999
    assert fast.argmax() == slow.argmax()


def test_errors(awq_dir, model):
    with pytest.raises(ContextOverflowError):
        model.generate("word " * 1100, max_tokens=4)
    with pytest.raises(ValueError, match="placement"):
        load(awq_dir, placement="awq[vision=int2]", **OPTIONS)
    with pytest.raises(ValueError, match="kernel"):
        load(awq_dir, **{**OPTIONS, "kernel": "cuda"})
    with pytest.raises(ValueError, match="device_memory"):
        load(awq_dir, device_memory="lots", **OPTIONS)
    with pytest.raises(ValueError, match="max_position_embeddings"):
        load(awq_dir, n_ctx=1 << 20, device="cpu")


def test_parse_memory_and_placement():
    from r1v.runtime.backends.awq import parse_memory, parse_placement

    assert parse_memory("24GB") == parse_memory("24 GiB") == 24 * GiB
    assert parse_memory("512MB") == 512 << 20 and parse_memory(1000) == 1000
    p = parse_placement("awq[vision=int4,embed=cpu]")
    assert (p.vision, p.embed, p.key) == ("int4", "cpu", "awq[vision=int4,embed=cpu]")
    assert parse_placement("vision=int8").key == "awq[vision=int8,embed=gpu]"


@pytest.mark.slow
def test_bench_generate_runs_on_cpu(awq_dir, tmp_path):
    out = subprocess.run([sys.executable, "-m", "r1v", "bench", "generate", str(awq_dir), "--rounds", "1",
                          "--max-tokens", "8", "--prompt-repeats", "2", "--n-ctx", "512", "--device", "cpu",
                          "--json"],
                         capture_output=True, text=True, env=ENV)
    assert out.returncode == 0, out.stderr[-3000:]
    results = json.loads(out.stdout)
    for side in ("awq", "fp16"):
        figures = results[side]
        assert figures["decode_tokens_per_second"] > 0 and figures["prefill_tokens_per_second"] > 0
        assert figures["completion_tokens"] == 8 and figures["peak_memory_mb"] > 0
        # the process's first request and a new prompt length, apart from the steady state
        assert figures["first_decode_tokens_per_second"] > 0 and figures["first_time_to_first_token"] > 0
        assert figures["other_length_prompt_tokens"] > figures["prompt_tokens"]
        assert figures["other_length_decode_tokens_per_second"] > 0 and figures["cuda_graphs"] is False
    assert results["bandwidth"]["awq_weight_bytes_per_token"] < results["bandwidth"]["fp16_weight_bytes_per_token"]
    assert results["device"] == "cpu" and results["awq"]["kernel"] == "int4" and results["fp16"]["kernel"] == "dense"


# --- GPU ----------------------------------------------------------------------------------------------------------
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_triton_backend_matches_the_reference(awq_dir, references):
    reference = references("fp16")
    image = _image(448, 224, seed=4)
    _, expected = _reference_greedy(reference, awq_dir, QUESTION, [image], steps=8)
    with load(awq_dir, n_ctx=1024, n_batch=48, kernel="triton") as m:
        assert m._backend.kernel == "triton" and m._backend.device.type == "cuda"
        result = m.generate(QUESTION, images=[image], max_tokens=8, **GREEDY)
    # fp16 activations on the GPU vs fp32 on the CPU: the first tokens agree (random tiny models have near-ties)
    assert result.tokens[:4] == expected[:4]
