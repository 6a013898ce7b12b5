"""The LLM GGUF (qwen2) against llama.cpp itself: logits and greedy tokens vs the torch reference, quantized
files' KL divergence, tokenizer parity, metadata, BF16 bit copies, chat template, and clean failures.

Run with -s to see the measured figures (lines starting with [gguf-llm]).
"""
from __future__ import annotations

import json
import shutil
from dataclasses import replace
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from tokenizers import Tokenizer

import llama_cpp
from r1v.converters import gguf_common, gguf_llm
from r1v.converters.checkpoint import open_checkpoint
from r1v.converters.gguf_common import ConversionError
from r1v.converters.gguf_llm import QWEN2_TENSORS, gguf_tensor_name, write_llm_gguf
from r1v.converters.gguf_quantize import quantize_gguf
from r1v.converters.gguf_vocab import accept_list_content, build_vocab, render_chat_template
from r1v.runtime.backends.llamacpp.llama_params import open_llama
from r1v.converters.resources import chat_template
from r1v.runtime.model import R1VModel
from r1v.testing import make_tiny_checkpoint

# Row lengths that are multiples of 256, so Q4_K/Q6_K really apply (not the F16 fallback).
SIZES = {"llm_hidden": 256, "llm_intermediate": 512, "llm_layers": 3, "llm_heads": 4, "llm_kv_heads": 2}
PROMPTS = [
    "<|im_start|>user\nHow many red circles are in the image?<|im_end|>\n<|im_start|>assistant\n<think>\n",
    "There are 3 blue squares and 2 green triangles, so 3 + 2 = 5 shapes in total.",
    "<img></img>\nQuestion: what colour is the second object from the left?",
    "def add(a, b):\n    return a + b\n# Σ π ∞ café 中文 🙂",
]
TOKENIZER_TEXTS = [
    "Hello world",
    "<|im_start|>system\nYou are helpful.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n",
    "<img><IMG_CONTEXT><IMG_CONTEXT><IMG_CONTEXT></img>\nDescribe the image.",
    "<think>\nLet me think step by step.\n</think>\n\nThe answer is 42.",
    "3 + 2 = 5; 1234567890, 3.14159 and 007",
    "Σ π ∞ — «quotes» 中文 日本語 emoji 🙂🦙 café naïve Привет мир",
    "line one\n\nline two\r\n\tindented   spaces    end ",
    "def add(a, b):\n    return a + b\n",
    '<tool_call>{"name": "zoom", "arguments": {"x": 1}}</tool_call><observation>ok</observation><answer>yes</answer>',
    "I've been 'told he's there, 'RE you sure? We'Ve a'lL",
    "   leading spaces and a trailing newline\n",
    "<|endoftext|>text after the end token",
]


def _report(message: str) -> None:
    print(f"\n[gguf-llm] {message}")


@pytest.fixture(scope="module")
def ckpt_dir(tmp_path_factory) -> Path:
    # seed 42: the reference's greedy path has no near-ties (smallest top-1/top-2 margin 0.026, ~7x the largest
    # F16 logit error), so equal greedy tokens is a fair demand; random tiny models often have margins < 0.005.
    path = tmp_path_factory.mktemp("gguf-llm") / "tiny-llm"
    return make_tiny_checkpoint(path, vit="300m", seed=42, dtype="f32", **SIZES)


@pytest.fixture(scope="module")
def files(ckpt_dir, tmp_path_factory) -> dict[str, Path]:
    out = tmp_path_factory.mktemp("gguf-llm-out")
    with open_checkpoint(ckpt_dir) as ckpt:
        made = {q: write_llm_gguf(ckpt, out / f"tiny-{q}.gguf", q, progress=False) for q in ("f16", "q8_0")}
    made["q4_k_m"] = quantize_gguf(made["f16"], out / "tiny-q4_k_m.gguf", "q4_k_m", threads=2, progress=False)
    return made


@pytest.fixture(scope="module")
def f16_llama(files):
    llm = _load(files["f16"])
    yield llm
    llm.close()


@pytest.fixture(scope="module")
def reference(ckpt_dir) -> R1VModel:
    return R1VModel.from_checkpoint(ckpt_dir, dtype=torch.float32)


def _load(path: Path) -> llama_cpp.Llama:
    return open_llama(path, logits_all=True, n_ctx=256, n_threads=2, verbose=False)


def _logits(llm: llama_cpp.Llama, ids: list[int]) -> np.ndarray:
    llm.reset()
    llm.eval(ids)
    return np.array(llm.scores[: len(ids)], dtype=np.float64)


def _tokens(llm: llama_cpp.Llama, text: str) -> list[int]:
    return llm.tokenize(text.encode("utf-8"), add_bos=False, special=True)


def _log_softmax(x: np.ndarray) -> np.ndarray:
    x = x - x.max(axis=-1, keepdims=True)
    return x - np.log(np.exp(x).sum(axis=-1, keepdims=True))


# --- the name table ------------------------------------------------------------------------------------------
def test_tensor_map_is_gguf_pys_qwen2_table():
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.QWEN2, 2)
    allowed = {gguf.TENSOR_NAMES[t] for t in gguf.MODEL_TENSORS[gguf.MODEL_ARCH.QWEN2]}
    for hf, ours in QWEN2_TENSORS.items():
        for bid in (0, 1):
            hf_name, expected = hf.format(bid=bid), ours.format(bid=bid)
            base, _, suffix = hf_name.rpartition(".")
            assert names.get_name(base) + "." + suffix == expected
            assert gguf_tensor_name("language_model." + hf_name) == expected
        assert ours.rpartition(".")[0] in allowed


# --- parity with the torch reference in llama.cpp ---------------------------------------------------------------
def test_f16_logits_match_the_reference(f16_llama, reference):
    worst, scale = 0.0, 0.0
    for text in PROMPTS:
        ids = _tokens(f16_llama, text)
        ours = _logits(f16_llama, ids)
        with torch.no_grad():
            ref = reference(torch.tensor([ids]))[0].double().numpy()
        worst, scale = max(worst, float(np.abs(ours - ref).max())), max(scale, float(np.abs(ref).max()))
    _report(f"F16 vs torch fp32: max |logit diff| {worst:.2e}, logit scale {scale:.2f}, relative {worst / scale:.2e}")
    assert worst <= 1e-2 * scale


def test_f16_greedy_tokens_match_the_reference(f16_llama, reference):
    ids = _tokens(f16_llama, PROMPTS[0])
    expected = reference.greedy(ids, max_new_tokens=32, stop_ids=()).tolist()
    f16_llama.reset()
    f16_llama.eval(ids)
    ours, margins = [], []
    for _ in range(32):  # plain argmax: no sampler, no repetition penalty
        logits = f16_llama.scores[f16_llama.n_tokens - 1]
        top2 = np.sort(logits)[-2:]
        margins.append(float(top2[1] - top2[0]))
        ours.append(int(np.argmax(logits)))
        f16_llama.eval([ours[-1]])
    _report(f"greedy 32 steps: {sum(a == b for a, b in zip(ours, expected))}/32 tokens equal; "
            f"{len(set(expected))} distinct tokens; smallest top-1/top-2 logit margin {min(margins):.3f}")
    assert ours == expected


def test_tied_embeddings_have_no_output_tensor_and_still_match(tiny_tied: Path, tmp_path):
    with open_checkpoint(tiny_tied) as ckpt:
        path = write_llm_gguf(ckpt, tmp_path / "tied-f16.gguf", "f16", progress=False)
    assert "output.weight" not in {t.name for t in gguf.GGUFReader(path).tensors}
    llm = _load(path)
    try:
        ids = _tokens(llm, PROMPTS[1])
        ours = _logits(llm, ids)
    finally:
        llm.close()
    with torch.no_grad():
        ref = R1VModel.from_checkpoint(tiny_tied)(torch.tensor([ids]))[0].double().numpy()
    assert np.abs(ours - ref).max() <= 1e-2 * np.abs(ref).max()


# --- quantized files -------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_quantized_kl_divergence_to_f16(files, f16_llama):
    prompts = [_tokens(f16_llama, text) for text in PROMPTS]
    base = [_log_softmax(_logits(f16_llama, ids)) for ids in prompts]
    kl = {}
    for quant in ("q8_0", "q4_k_m"):
        llm = _load(files[quant])
        try:
            per_position = [
                (np.exp(p) * (p - _log_softmax(_logits(llm, ids)))).sum(-1) for p, ids in zip(base, prompts)
            ]
        finally:
            llm.close()
        kl[quant] = float(np.concatenate(per_position).mean())
    n = sum(len(ids) for ids in prompts)
    _report(f"KL(F16 || quant) mean over {n} positions of {len(prompts)} prompts: "
            f"Q8_0 {kl['q8_0']:.2e}, Q4_K_M {kl['q4_k_m']:.2e}")
    assert kl["q8_0"] <= 1e-3
    assert kl["q4_k_m"] < 0.1
    types = {t.tensor_type.name for t in gguf.GGUFReader(files["q4_k_m"]).tensors}
    assert {"Q4_K", "Q6_K"} <= types, types  # llama.cpp's Q4_K_M mix really applied


def test_quantized_file_metadata(files):
    fields = gguf.GGUFReader(files["q4_k_m"]).fields
    assert fields["r1v.quant"].contents() == "q4_k_m"
    assert fields["general.file_type"].contents() == 15  # LLAMA_FTYPE_MOSTLY_Q4_K_M
    assert fields["r1v.source.config_sha256"].contents()
    q8 = gguf.GGUFReader(files["q8_0"])
    assert q8.fields["general.file_type"].contents() == gguf.LlamaFileType.MOSTLY_Q8_0
    assert {t.tensor_type.name for t in q8.tensors} == {"Q8_0", "F32"}


def test_imatrix_is_used_by_the_quantizer(files, tmp_path):
    reader = gguf.GGUFReader(files["f16"])
    imatrix = tmp_path / "imatrix.gguf"
    writer = gguf.GGUFWriter(imatrix, "imatrix")
    writer.add_string("general.type", "imatrix")
    writer.add_uint32("imatrix.chunk_count", 4)
    writer.add_uint32("imatrix.chunk_size", 64)
    writer.add_array("imatrix.datasets", ["synthetic"])
    rng = np.random.default_rng(0)
    for t in reader.tensors:
        if t.name.startswith("blk.") and len(t.shape) == 2:  # shape is GGML order: [n_per_row, rows]
            importance = rng.exponential(1.0, int(t.shape[0])).astype(np.float32) ** 4
            writer.add_tensor(f"{t.name}.in_sum2", importance * 256)
            writer.add_tensor(f"{t.name}.counts", np.array([256.0], np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    out = quantize_gguf(files["f16"], tmp_path / "tiny-q4_k_m-imatrix.gguf", "q4_k_m", imatrix=imatrix,
                        threads=2, progress=False)
    with_imatrix = gguf.GGUFReader(out)
    assert with_imatrix.fields["quantize.imatrix.file"].contents() == "imatrix.gguf"
    entries = with_imatrix.fields["quantize.imatrix.entries_count"].contents()
    assert entries == 7 * SIZES["llm_layers"]  # q k v o gate up down
    plain = {t.name: bytes(t.data) for t in gguf.GGUFReader(files["q4_k_m"]).tensors}
    changed = [t.name for t in with_imatrix.tensors if bytes(t.data) != plain[t.name]]
    assert "blk.0.attn_q.weight" in changed and "token_embd.weight" not in changed


def test_legacy_imatrix_file_is_read_as_llama_cpp_does(tmp_path):
    import struct

    from r1v.converters.gguf_quantize import read_imatrix

    values = np.arange(1, 9, dtype=np.float32)
    name = b"blk.0.attn_q.weight"
    data = struct.pack("<i", 1) + struct.pack("<i", len(name)) + name + struct.pack("<ii", 4, values.size)
    data += values.tobytes() + struct.pack("<i", 10) + struct.pack("<i", 5) + b"calib"
    (tmp_path / "imatrix.dat").write_bytes(data)
    entries, info = read_imatrix(tmp_path / "imatrix.dat")
    assert np.array_equal(entries["blk.0.attn_q.weight"], values / 4)  # sums hold (raw/count)*ncall
    assert info["quantize.imatrix.chunks_count"] == 10 and info["quantize.imatrix.dataset"] == "calib"


def test_quantizer_failure_is_a_conversion_error_naming_the_file(tmp_path):
    bad = tmp_path / "not-a-model.gguf"
    bad.write_bytes(b"GGUF" + b"\0" * 60)
    with pytest.raises(ConversionError, match=r"not-a-model.gguf: llama.cpp failed .* failed to load model"):
        quantize_gguf(bad, tmp_path / "out.gguf", "q4_k_m", progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["not-a-model.gguf"]


# --- tokenizer -------------------------------------------------------------------------------------------------
def test_llama_cpp_tokenizes_like_the_tokenizers_library(ckpt_dir, f16_llama):
    reference = Tokenizer.from_file(str(ckpt_dir / "tokenizer.json"))
    for text in TOKENIZER_TEXTS:
        expected = reference.encode(text).ids
        ours = _tokens(f16_llama, text)
        assert ours == expected, text
        assert f16_llama.detokenize(ours, special=True).decode("utf-8") == text
    special = {t: reference.token_to_id(t) for t in ("<img>", "</img>", "<IMG_CONTEXT>", "<think>", "<|im_end|>")}
    for token, token_id in special.items():
        assert _tokens(f16_llama, token) == [token_id], token
    assert f16_llama.token_eos() == special["<|im_end|>"]


def test_bos_only_in_llm_config_is_kept_and_pre_tokenizer_is_chosen(tmp_path):
    ckpt_dir = make_tiny_checkpoint(tmp_path / "tiny", vit="300m", seed=0)
    generation = json.loads((ckpt_dir / "generation_config.json").read_text())
    del generation["bos_token_id"]
    (ckpt_dir / "generation_config.json").write_text(json.dumps(generation))
    with open_checkpoint(ckpt_dir) as ckpt:
        llm_bos = ckpt.config.llm.bos_token_id
        vocab = build_vocab(ckpt)
        assert vocab.special_ids["bos"] == llm_bos == vocab.token_id("<|endoftext|>")
        assert vocab.pre == "qwen2" and vocab.add_bos is False
        assert build_vocab(ckpt, pre_tokenizer="deepseek-r1-qwen").pre == "deepseek-r1-qwen"
        with pytest.raises(ConversionError, match="pre-tokenizer 'llama3'"):
            build_vocab(ckpt, pre_tokenizer="llama3")


# --- metadata --------------------------------------------------------------------------------------------------
def test_metadata_and_tensor_types(ckpt_dir, files):
    reader = gguf.GGUFReader(files["f16"])
    kv = {name: field.contents() for name, field in reader.fields.items() if not name.startswith("GGUF.")}
    with open_checkpoint(ckpt_dir) as ckpt:
        llm, tok = ckpt.config.llm, Tokenizer.from_file(str(ckpt_dir / "tokenizer.json"))
        expected = {
            "general.architecture": "qwen2",
            "general.name": ckpt_dir.name,
            "general.file_type": gguf.LlamaFileType.MOSTLY_F16,
            "general.quantization_version": gguf.GGML_QUANT_VERSION,
            "qwen2.context_length": llm.max_position_embeddings,
            "qwen2.embedding_length": llm.hidden_size,
            "qwen2.block_count": llm.num_hidden_layers,
            "qwen2.feed_forward_length": llm.intermediate_size,
            "qwen2.attention.head_count": llm.num_attention_heads,
            "qwen2.attention.head_count_kv": llm.num_key_value_heads,
            "qwen2.vocab_size": llm.vocab_size,
            "tokenizer.ggml.model": "gpt2",
            "tokenizer.ggml.pre": "qwen2",
            "tokenizer.ggml.bos_token_id": ckpt.generation_config["bos_token_id"],
            "tokenizer.ggml.eos_token_id": ckpt.eos_token_ids[0],
            "tokenizer.ggml.eot_token_id": tok.token_to_id("<|im_end|>"),
            "tokenizer.ggml.padding_token_id": tok.token_to_id("<|endoftext|>"),
            "tokenizer.ggml.add_bos_token": False,
            "tokenizer.chat_template": ckpt.tokenizer.chat_template,
            "r1v.source.checkpoint": ckpt_dir.name,
            "r1v.source.config_sha256": ckpt.config.sha256,
            "r1v.quant": "f16",
        }
        for key, value in expected.items():
            assert kv[key] == value, key
        assert kv["qwen2.rope.freq_base"] == pytest.approx(llm.rope_theta)
        assert kv["qwen2.attention.layer_norm_rms_epsilon"] == pytest.approx(llm.rms_norm_eps)
        assert "r1v.version" in kv and "tokenizer.ggml.unknown_token_id" not in kv

        tokens, types = kv["tokenizer.ggml.tokens"], kv["tokenizer.ggml.token_type"]
        assert len(tokens) == len(types) == llm.vocab_size
        merges = json.loads((ckpt_dir / "tokenizer.json").read_text())["model"]["merges"]
        assert len(kv["tokenizer.ggml.merges"]) == len(merges)
        probe = ("<|im_end|>", "<img>", "<IMG_CONTEXT>", "<think>", "</think>", "Ġthe")
        kind = {t: types[tokens.index(t)] for t in probe}
        assert kind == {"<|im_end|>": 3, "<img>": 3, "<IMG_CONTEXT>": 3, "<think>": 4, "</think>": 4, "Ġthe": 1}
        n_real = tok.get_vocab_size(with_added_tokens=True)
        assert tokens[n_real:] == [f"[PAD{i}]" for i in range(n_real, llm.vocab_size)]
        assert set(types[n_real:]) == {gguf.TokenType.UNUSED}

        stored = {t.name: t.tensor_type.name for t in reader.tensors}
        assert len(stored) == 3 + 12 * llm.num_hidden_layers
        for name, qtype in stored.items():
            one_d = name.endswith(("_norm.weight", ".bias"))
            assert qtype == ("F32" if one_d else "F16"), name


def test_bf16_source_to_bf16_is_a_bit_copy(tiny_6b, tmp_path):
    with open_checkpoint(tiny_6b) as ckpt:
        path = write_llm_gguf(ckpt, tmp_path / "tiny-bf16.gguf", "bf16", progress=False)
        source = {gguf_tensor_name(i.name): i.name for i in ckpt.iter_tensors("language_model.")}
        reader = gguf.GGUFReader(path)
        assert reader.fields["general.file_type"].contents() == gguf.LlamaFileType.MOSTLY_BF16
        assert len(reader.tensors) == len(source)
        for t in reader.tensors:
            name = source[t.name]
            assert tuple(int(d) for d in reversed(t.shape)) == ckpt.tensors[name].shape
            if t.tensor_type == gguf.GGMLQuantizationType.BF16:
                assert bytes(t.data) == ckpt.raw(name).tobytes(), t.name
            else:  # 1-D: widened exactly to F32
                assert t.tensor_type == gguf.GGMLQuantizationType.F32 and len(ckpt.tensors[name].shape) == 1
                assert np.array_equal(np.asarray(t.data), ckpt.read(name)), t.name


# --- chat template ---------------------------------------------------------------------------------------------
QWEN_STRING_ONLY = (
    "{% for message in messages %}"
    "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def test_written_template_renders_string_and_list_content(files):
    from llama_cpp.llama_chat_format import Jinja2ChatFormatter

    template = gguf.GGUFReader(files["f16"]).fields["tokenizer.chat_template"].contents()
    as_text = [{"role": "user", "content": "<__media__>\nHow many?"}]
    as_parts = [{"role": "user", "content": [{"type": "text", "text": "<__media__>"},  # what MTMDChatHandler passes
                                             {"type": "text", "text": "\nHow many?"}]}]
    expected = "<|im_start|>user\n<__media__>\nHow many?<|im_end|>\n<|im_start|>assistant\n<think>\n"
    assert render_chat_template(template, as_text) == render_chat_template(template, as_parts) == expected
    formatter = Jinja2ChatFormatter(template, eos_token="<|im_end|>", bos_token="<|endoftext|>")
    assert formatter(messages=as_parts).prompt == expected


def test_string_only_templates_are_wrapped_to_accept_lists():
    wrapped = accept_list_content(QWEN_STRING_ONLY)
    assert wrapped != QWEN_STRING_ONLY
    text = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi there"}]
    parts = [text[0], {"role": "user", "content": [{"type": "text", "text": "Hi"}, {"type": "text", "text": " there"}]}]
    assert render_chat_template(wrapped, parts) == render_chat_template(QWEN_STRING_ONLY, text)
    assert "<image>\n" in render_chat_template(wrapped, [{"role": "user", "content": [{"type": "image_url"}]}])
    assert accept_list_content(chat_template("chatml-think")) == chat_template("chatml-think")


def test_template_fallbacks_when_the_checkpoint_has_none(tmp_path):
    ckpt_dir = make_tiny_checkpoint(tmp_path / "tiny", vit="300m", seed=0)
    config = json.loads((ckpt_dir / "tokenizer_config.json").read_text())
    del config["chat_template"]
    (ckpt_dir / "tokenizer_config.json").write_text(json.dumps(config))
    with open_checkpoint(ckpt_dir) as ckpt:
        assert build_vocab(ckpt).chat_template == chat_template("chatml-think")
        assert build_vocab(ckpt, chat_template="deepseek-r1-think").chat_template == chat_template("deepseek-r1-think")
        assert build_vocab(ckpt, chat_template=QWEN_STRING_ONLY).chat_template == accept_list_content(QWEN_STRING_ONLY)


# --- failures leave nothing behind -----------------------------------------------------------------------------
def test_unwritable_output_dir(ckpt_dir, tmp_path):
    target = Path("/proc/self")  # refuses new files even to root, for whom a chmod-ed directory stays writable
    with open_checkpoint(ckpt_dir) as ckpt, pytest.raises(ConversionError, match="not writable"):
        write_llm_gguf(ckpt, target / "x-f16.gguf", "f16", progress=False)
    with open_checkpoint(ckpt_dir) as ckpt, pytest.raises(ConversionError, match="does not exist"):
        write_llm_gguf(ckpt, tmp_path / "missing" / "x-f16.gguf", "f16", progress=False)
    assert not (target / "x-f16.gguf").exists() and not (tmp_path / "missing").exists()


def test_interrupt_while_writing_leaves_no_file(ckpt_dir, tmp_path, monkeypatch):
    real_plan = gguf_llm.plan_llm_tensors

    def interrupted(*args, **kwargs):
        def stop(start, stop):
            raise KeyboardInterrupt

        planned = real_plan(*args, **kwargs)
        planned[5] = replace(planned[5], rows=stop)
        return planned

    monkeypatch.setattr(gguf_llm, "plan_llm_tensors", interrupted)
    with open_checkpoint(ckpt_dir) as ckpt, pytest.raises(KeyboardInterrupt):
        write_llm_gguf(ckpt, tmp_path / "x-q8_0.gguf", "q8_0", progress=False)
    assert list(tmp_path.iterdir()) == []


def test_unknown_out_type_and_unmapped_tensor(ckpt_dir, tmp_path):
    with open_checkpoint(ckpt_dir) as ckpt:
        with pytest.raises(ConversionError, match="q4_k_m"):
            write_llm_gguf(ckpt, tmp_path / "x.gguf", "q4_k_m", progress=False)
    copy = Path(shutil.copytree(ckpt_dir, tmp_path / "extra"))
    with open_checkpoint(copy, check_shapes=False) as ckpt:
        info = ckpt.tensors["language_model.model.norm.weight"]
        extra = "language_model.model.rotary_emb.inv_freq"
        ckpt.tensors[extra] = replace(info, name=extra)
        with pytest.raises(ConversionError, match="rotary_emb.inv_freq"):
            write_llm_gguf(ckpt, tmp_path / "x.gguf", "f16", progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["extra"]
