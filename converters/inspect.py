"""What a checkpoint holds: family, components with parameter counts and dtypes, tokens, template."""
from __future__ import annotations

import math
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterator

from .resources import TEMPLATES_DIR, chat_template
from .checkpoint import Checkpoint, has_weights, open_checkpoint, read_json, read_tokenizer_files
from .config import check_token_ids, load_config

# config.json's torch_dtype -> the safetensors dtype name and its bytes per element (sizes without the weights)
TORCH_DTYPES = {"bfloat16": ("BF16", 2), "float16": ("F16", 2), "float32": ("F32", 4)}
WEIGHTS_READ = "safetensors headers"
WEIGHTS_NOT_READ = "not read: parameter counts from config.json's shapes, sizes at its torch_dtype"

COMPONENT_TITLES = {
    "vision": "vision tower",
    "projector": "projector (mlp1)",
    "llm": "LLM decoder (linears + norms)",
    "embeddings": "token embeddings",
    "lm_head": "lm_head",
    "other": "other",
}


@dataclass
class ComponentSummary:
    name: str
    params: int = 0
    bytes: int = 0
    dtypes: dict[str, int] = field(default_factory=dict)  # dtype -> tensor count


@dataclass
class CheckpointSummary:
    path: str
    architecture: str
    model_type: str
    family: str
    components: list[ComponentSummary]
    total_params: int
    special_tokens: dict[str, int]
    eos_token_ids: list[int]
    chat_template_source: str  # "tokenizer_config.json" or the bundled template file used instead
    chat_template: str | None
    llm: dict[str, Any]
    vision: dict[str, Any]
    weights: str = WEIGHTS_READ  # or WEIGHTS_NOT_READ: a directory of config.json and tokenizer files only

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def summarize(ckpt: Checkpoint, fallback_template: str | None = None) -> CheckpointSummary:
    """Summarize an opened checkpoint; `fallback_template` names the models.yaml template used when the
    tokenizer carries none."""
    by_component: dict[str, ComponentSummary] = {}
    dtype_counts: dict[str, Counter[str]] = {}
    for name, numel, nbytes, dtype in _tensor_sizes(ckpt):
        comp = ckpt.component(name)
        summary = by_component.setdefault(comp, ComponentSummary(comp))
        summary.params += numel
        summary.bytes += nbytes
        dtype_counts.setdefault(comp, Counter())[dtype] += 1
    order = list(COMPONENT_TITLES)
    components = sorted(by_component.values(), key=lambda c: order.index(c.name))
    for c in components:
        c.dtypes = dict(dtype_counts[c.name])
    template = ckpt.tokenizer.chat_template
    source = "tokenizer_config.json"
    if template is None:
        # No template in the checkpoint: the family's (R1V1 speaks DeepSeek-R1 form, later ones ChatML).
        fallback_template = fallback_template or (
            "deepseek-r1-think" if "<｜User｜>" in ckpt.special_tokens() else "chatml-think"
        )
        template, source = chat_template(fallback_template), f"{TEMPLATES_DIR}/{fallback_template}.jinja"
    cfg = ckpt.config
    return CheckpointSummary(
        path=str(ckpt.path),
        architecture=cfg.architecture,
        model_type=cfg.model_type,
        family=cfg.family.name,
        components=components,
        total_params=sum(c.params for c in components),
        special_tokens=ckpt.special_tokens(),
        eos_token_ids=ckpt.eos_token_ids,
        chat_template_source=source,
        chat_template=template,
        llm=asdict(cfg.llm),
        vision=asdict(cfg.vision),
        weights=WEIGHTS_READ if ckpt.tensors else WEIGHTS_NOT_READ,
    )


def _tensor_sizes(ckpt: Checkpoint) -> Iterator[tuple[str, int, int, str]]:
    """(name, elements, bytes, dtype) of each tensor: from the safetensors headers, or without weights from the
    family's shape table at config.json's torch_dtype (bytes 0 when it names none)."""
    if ckpt.tensors:
        for info in ckpt.iter_tensors():
            yield info.name, info.numel, info.nbytes, info.dtype
        return
    cfg = ckpt.config
    declared = str(cfg.raw.get("torch_dtype") or (cfg.raw.get("llm_config") or {}).get("torch_dtype") or "")
    dtype, size = TORCH_DTYPES.get(declared, (declared or "unknown dtype", 0))
    for name, shape in cfg.family.expected_shapes(cfg).items():
        numel = math.prod(shape)
        yield name, numel, numel * size, dtype


def inspect_checkpoint(path: str | Path, fallback_template: str | None = None) -> CheckpointSummary:
    """Summarize a checkpoint directory; one without weights (config.json and tokenizer files only, as
    `r1v inspect NAME` fetches) is summarized from config.json's shapes."""
    path = Path(path)
    if path.is_dir() and not has_weights(path):
        config = load_config(path)
        generation_path = path / "generation_config.json"
        generation = read_json(generation_path, optional=True)
        check_token_ids(generation, str(generation_path), config.llm.vocab_size)
        ckpt = Checkpoint(path=path, config=config, tensors={}, tokenizer=read_tokenizer_files(path),
                          generation_config=generation)
        return summarize(ckpt, fallback_template)
    with open_checkpoint(path) as ckpt:
        return summarize(ckpt, fallback_template)


def format_summary(s: CheckpointSummary) -> str:
    """A table for people."""
    lines = [
        f"checkpoint   {s.path}",
        f"family       {s.family} ({s.architecture}, model_type {s.model_type})",
        f"LLM          Qwen2: hidden {s.llm['hidden_size']}, {s.llm['num_hidden_layers']} layers, "
        f"{s.llm['num_attention_heads']} heads / {s.llm['num_key_value_heads']} KV, vocab {s.llm['vocab_size']}",
        f"vision       InternViT: hidden {s.vision['hidden_size']}, {s.vision['num_hidden_layers']} layers, "
        f"{s.vision['norm_type']}, qk_norm {s.vision['qk_normalization']}, qkv_bias {s.vision['qkv_bias']}",
        "",
        f"{'component':<32}{'params':>16}{'size':>12}  dtypes",
    ]
    for c in s.components:
        dtypes = ", ".join(f"{d}×{n}" for d, n in sorted(c.dtypes.items()))
        lines.append(f"{COMPONENT_TITLES[c.name]:<32}{c.params:>16,}{human_size(c.bytes):>12}  {dtypes}")
    lines.append(f"{'total':<32}{s.total_params:>16,}")
    lines.append("")
    tokens = ", ".join(f"{t}={i}" for t, i in s.special_tokens.items()) or "none"
    lines.append(f"special tokens  {tokens}")
    lines.append(f"eos ids         {s.eos_token_ids}")
    lines.append(f"chat template   {s.chat_template_source}")
    if s.weights != WEIGHTS_READ:
        lines.append(f"weights         {s.weights}")
    return "\n".join(lines)


def human_size(n: float) -> str:
    """Decimal units, as `ollama list` and `hf cache scan` print them."""
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"
