"""The language model of an R1V / InternVL-chat checkpoint as a llama.cpp GGUF file (architecture qwen2).

F32, F16, BF16 and Q8_0 are written here, one tensor at a time through `gguf_common.write_gguf`; the other
quant types come from this file through llama.cpp's quantizer (`gguf_quantize`). Names follow gguf-py's
table for MODEL_ARCH.QWEN2 (`QWEN2_TENSORS` below, checked against gguf.get_tensor_name_map in the tests);
1-D tensors (norms, q/k/v biases) are stored F32 as llama.cpp expects; a tied lm_head is simply absent
(llama.cpp then uses token_embd as the output matrix).
"""
from __future__ import annotations

import re
from pathlib import Path

import gguf
import numpy as np

from .checkpoint import Checkpoint
from .gguf_common import (
    DIRECT_TYPES,
    FILE_TYPES,
    ConversionError,
    PlannedTensor,
    QType,
    add_provenance,
    storage_type,
    write_gguf,
)
from .gguf_vocab import GGUFVocab, add_vocab, build_vocab

ARCH = gguf.MODEL_ARCH_NAMES[gguf.MODEL_ARCH.QWEN2]  # "qwen2"
# Where the Qwen2ForCausalLM tensors sit inside an InternVL-chat checkpoint.
LLM_PREFIX = "language_model."

# Qwen2ForCausalLM tensor name (under LLM_PREFIX; {bid} = block) -> GGUF tensor name (gguf-py MODEL_ARCH.QWEN2).
QWEN2_TENSORS: dict[str, str] = {
    "model.embed_tokens.weight": "token_embd.weight",
    "model.norm.weight": "output_norm.weight",
    "lm_head.weight": "output.weight",
    "model.layers.{bid}.input_layernorm.weight": "blk.{bid}.attn_norm.weight",
    "model.layers.{bid}.self_attn.q_proj.weight": "blk.{bid}.attn_q.weight",
    "model.layers.{bid}.self_attn.q_proj.bias": "blk.{bid}.attn_q.bias",
    "model.layers.{bid}.self_attn.k_proj.weight": "blk.{bid}.attn_k.weight",
    "model.layers.{bid}.self_attn.k_proj.bias": "blk.{bid}.attn_k.bias",
    "model.layers.{bid}.self_attn.v_proj.weight": "blk.{bid}.attn_v.weight",
    "model.layers.{bid}.self_attn.v_proj.bias": "blk.{bid}.attn_v.bias",
    "model.layers.{bid}.self_attn.o_proj.weight": "blk.{bid}.attn_output.weight",
    "model.layers.{bid}.post_attention_layernorm.weight": "blk.{bid}.ffn_norm.weight",
    "model.layers.{bid}.mlp.gate_proj.weight": "blk.{bid}.ffn_gate.weight",
    "model.layers.{bid}.mlp.up_proj.weight": "blk.{bid}.ffn_up.weight",
    "model.layers.{bid}.mlp.down_proj.weight": "blk.{bid}.ffn_down.weight",
}

_PATTERNS = [(re.compile(re.escape(hf).replace(r"\{bid\}", r"(\d+)") + "$"), out) for hf, out in QWEN2_TENSORS.items()]


def gguf_tensor_name(hf_name: str) -> str | None:
    """The GGUF name of a checkpoint tensor name (with or without LLM_PREFIX); None when it is not in the map."""
    name = hf_name.removeprefix(LLM_PREFIX)
    for pattern, out in _PATTERNS:
        if m := pattern.match(name):
            return out.format(bid=m.group(1)) if m.groups() else out
    return None


def plan_llm_tensors(ckpt: Checkpoint, out_type: str) -> list[PlannedTensor]:
    """Every LLM tensor of the output file in checkpoint file order (sequential reads), with its storage type
    and a producer that reads only that tensor when called."""
    requested = _requested_type(out_type)
    planned: list[PlannedTensor] = []
    for info in ckpt.iter_tensors(LLM_PREFIX):
        name = gguf_tensor_name(info.name)
        if name is None:
            raise ConversionError(f"{info.file}: tensor {info.name!r} has no qwen2 GGUF name")
        shape = tuple(info.shape)
        qtype = storage_type(requested, shape)
        # BF16 to BF16 copies the bits as they are (no rounding twice); everything else reads float32.
        dtype = None if qtype == QType.BF16 and info.dtype == "BF16" else np.float32
        planned.append(PlannedTensor(name, shape, qtype,
                                     rows=lambda a, b, n=info.name, d=dtype: ckpt.read_rows(n, a, b, d)))
    _check_complete(ckpt, planned)
    return planned


def write_llm_gguf(
    ckpt: Checkpoint,
    path: Path,
    out_type: str = "f16",
    *,
    pre_tokenizer: str | None = None,
    chat_template: str | None = None,
    progress: bool = True,
) -> Path:
    """Write the checkpoint's Qwen2 LLM + tokenizer to `path` as a qwen2 GGUF of `out_type`
    (f32 / f16 / bf16 / q8_0). The file appears only when complete. Returns `path`."""
    path = Path(path)
    out_type = out_type.lower()
    tensors = plan_llm_tensors(ckpt, out_type)
    vocab = build_vocab(ckpt, pre_tokenizer=pre_tokenizer, chat_template=chat_template)
    return write_gguf(path, ARCH, lambda w: add_llm_kv(w, ckpt, vocab, out_type), tensors, progress=progress)


def add_llm_kv(writer: gguf.GGUFWriter, ckpt: Checkpoint, vocab: GGUFVocab, out_type: str) -> None:
    """general.*, qwen2.* hyper-parameters, tokenizer.* and provenance keys."""
    llm = ckpt.config.llm
    writer.add_name(ckpt.name)
    writer.add_file_type(FILE_TYPES[out_type])
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    writer.add_context_length(llm.max_position_embeddings)
    writer.add_embedding_length(llm.hidden_size)
    writer.add_block_count(llm.num_hidden_layers)
    writer.add_feed_forward_length(llm.intermediate_size)
    writer.add_head_count(llm.num_attention_heads)
    writer.add_head_count_kv(llm.num_key_value_heads)
    writer.add_rope_freq_base(llm.rope_theta)
    writer.add_layer_norm_rms_eps(llm.rms_norm_eps)
    writer.add_vocab_size(llm.vocab_size)
    _add_rope_scaling(writer, ckpt)
    add_vocab(writer, vocab)
    add_provenance(writer, ckpt.name, ckpt.config.sha256, out_type)


def _requested_type(out_type: str) -> QType:
    if out_type not in DIRECT_TYPES:
        raise ConversionError(f"out_type {out_type!r} is not written directly; choose from {', '.join(DIRECT_TYPES)} "
                              "(other types go through gguf_quantize.quantize_gguf)")
    return DIRECT_TYPES[out_type]


def _check_complete(ckpt: Checkpoint, planned: list[PlannedTensor]) -> None:
    """Refuse what llama.cpp's qwen2 loader would refuse or run wrongly: missing tensors, sliding window."""
    llm = ckpt.config.llm
    raw = ckpt.config.raw.get("llm_config") or {}
    if raw.get("use_sliding_window"):
        raise ConversionError(f"{ckpt.path / 'config.json'}: llm_config.use_sliding_window is true; "
                              "llama.cpp's qwen2 has no sliding-window attention")
    if llm.hidden_act != "silu":
        raise ConversionError(
            f"{ckpt.path / 'config.json'}: llm_config.hidden_act {llm.hidden_act!r}; qwen2 needs silu")
    have = {t.name for t in planned}
    need = [QWEN2_TENSORS[k] for k in ("model.embed_tokens.weight", "model.norm.weight")]
    if not llm.tie_word_embeddings:
        need.append(QWEN2_TENSORS["lm_head.weight"])
    per_block = [out for hf, out in QWEN2_TENSORS.items() if "{bid}" in hf]
    need += [out.format(bid=b) for b in range(llm.num_hidden_layers) for out in per_block]
    missing = [n for n in need if n not in have]
    if missing:
        raise ConversionError(f"{ckpt.path}: the LLM lacks tensor(s) for {', '.join(missing[:4])}"
                              + (f" and {len(missing) - 4} more" if len(missing) > 4 else ""))


def _add_rope_scaling(writer: gguf.GGUFWriter, ckpt: Checkpoint) -> None:
    scaling = ckpt.config.llm.rope_scaling
    if not scaling:
        return
    kind = scaling.get("rope_type", scaling.get("type"))
    factor = scaling.get("factor")
    if kind in (None, "default"):
        return
    if kind == "linear" and factor is not None:
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(factor)
    elif kind == "yarn" and factor is not None:
        writer.add_rope_scaling_type(gguf.RopeScalingType.YARN)
        writer.add_rope_scaling_factor(factor)
        original = scaling.get("original_max_position_embeddings")
        if original is not None:
            writer.add_rope_scaling_orig_ctx_len(int(original))
    else:
        raise ConversionError(f"{ckpt.path / 'config.json'}: llm_config.rope_scaling {scaling!r} is not supported "
                              "(none, linear or yarn)")
