"""Train micro-r1v on CPU with the torch reference model and write a standard R1V checkpoint.

Every batch is freshly generated task items from the training seed range; the loss covers only what the
assistant writes (reasoning chain, `</think>`, answer, `<|im_end|>`). AdamW with linear warmup and a cosine
decay over a fixed number of steps, so a run is a function of its seed (on the same machine and thread
count); `minutes` is a wall-time cap on top: a run that reaches it stops early and says so, and still
writes its checkpoint.
"""
from __future__ import annotations

import functools
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from r1v.converters.config import parse_config
from r1v.runtime.image import TilingConfig, prepare_image
from r1v.runtime.model import R1VModel, apply_rope

from . import task
from .build import build_micro_tokenizer, encode, micro_config, prompt_text, special_ids, write_checkpoint
from .settings import MicroSizes, TrainConfig

if TYPE_CHECKING:
    from .evaluate import Score


def data_seed(run_seed: int, k: int) -> int:
    """Seed of the k-th training item of run `run_seed`: always inside the training split."""
    start, stop = task.SPLITS["train"]
    return start + (run_seed * 100_000_007 + k) % (stop - start)


def init_weights(model: R1VModel, generator: torch.Generator) -> None:
    """GPT-2-style init: N(0, 0.02) for linears, convolutions and embeddings, residual output projections
    scaled by 1/sqrt(2 * layers); zero biases; norms at one; layer scales as the config says."""
    n_vit = len(model.vision_model.encoder.layers)
    n_llm = len(model.language_model.model.layers)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith(("ls1", "ls2")) or "norm" in name or name.startswith("mlp1.0."):
                continue  # layer scale (config value) and norms (ones / zeros) keep their init
            if name.endswith(".bias"):
                param.zero_()
                continue
            std = 0.02
            if name.endswith(("attn.proj.weight", "mlp.fc2.weight")):
                std /= math.sqrt(2 * n_vit)
            elif name.endswith(("o_proj.weight", "down_proj.weight")):
                std /= math.sqrt(2 * n_llm)
            param.normal_(0.0, std, generator=generator)
        embeddings = model.vision_model.embeddings
        embeddings.position_embedding[0, 1:] = sincos_2d(embeddings.grid, embeddings.position_embedding.shape[-1])


def sincos_2d(grid: int, dim: int, scale: float = 0.5) -> torch.Tensor:
    """[grid * grid, dim] 2-D sine-cosine position codes (half the channels for the row, half for the column),
    as MAE initialises a ViT: each patch knows where it is from the first step, which the task's readings
    ("shape 2 is ...") depend on; learned noise took the whole training budget to get there."""
    quarter = dim // 4
    freqs = 1.0 / 10000 ** (torch.arange(quarter, dtype=torch.float64) / quarter)
    rows, cols = torch.meshgrid(torch.arange(grid, dtype=torch.float64), torch.arange(grid, dtype=torch.float64),
                                indexing="ij")
    parts = []
    for coord in (rows.reshape(-1), cols.reshape(-1)):
        angles = coord[:, None] * freqs[None]
        parts += [angles.sin(), angles.cos()]
    codes = torch.cat(parts, dim=1)
    codes = torch.cat([codes, torch.zeros(grid * grid, dim - codes.shape[1], dtype=torch.float64)], dim=1)
    return (scale * codes).float()


@dataclass
class Packed:
    """A training batch: rows of segments. A segment is one prompt prefix (the user turn up to and including
    `</img>`, or just `<|im_start|>user\n` for text-only questions) followed by several branches, each the
    rest of one question's prompt plus its completion. A branch sees its segment's prefix and itself, with
    positions continuing from the prefix, so every branch is computed exactly as its own unpacked sequence
    would be, while the image and the prefix are encoded once for all of its questions."""

    ids: torch.Tensor  # [rows, T]
    positions: torch.Tensor  # [rows, T]
    mask: torch.Tensor  # [rows, T, T] bool: query attends to key
    target: torch.Tensor  # [rows, T] bool: token is predicted (completion tokens and <|im_end|>)
    pixel_values: torch.Tensor | None  # [images, 3, 448, 448] in order of appearance
    questions: int


class Batcher:
    """Turns groups of task items (questions about one scene) into packed batches."""

    def __init__(self, tokenizer: Any, tokens_per_tile: int, image_size: int = task.SIZE):
        self.tokenizer = tokenizer
        self.tokens_per_tile = tokens_per_tile
        self.tiling = TilingConfig(image_size=image_size, max_tiles=1)
        ids = special_ids(tokenizer)
        self.pad, self.end = ids["<|endoftext|>"], ids["<|im_end|>"]
        self.image_prefix = self._prefix(True)
        self.text_prefix = self._prefix(False)

    def _prefix(self, has_image: bool) -> list[int]:
        text = prompt_text("{q}", has_image, self.tokens_per_tile)
        head = text.split("\n{q}")[0] if has_image else text.split("{q}")[0]
        return encode(self.tokenizer, head)

    @functools.lru_cache(maxsize=8192)
    def branch_prompt(self, question: str, has_image: bool) -> tuple[int, ...]:
        """The prompt's tokens after the prefix; prefix + these == the whole prompt's tokens (checked)."""
        full = encode(self.tokenizer, prompt_text(question, has_image, self.tokens_per_tile))
        prefix = self.image_prefix if has_image else self.text_prefix
        if full[: len(prefix)] != prefix:
            raise AssertionError(f"prompt of {question!r} does not start with the shared prefix tokens")
        return tuple(full[len(prefix):])

    def segment(self, group: list[task.Item]) -> tuple[list[int], list[int], list[int], list[bool]]:
        """(ids, branch number (0: prefix), positions, target) of one group's segment."""
        has_image = group[0].has_image
        prefix = self.image_prefix if has_image else self.text_prefix
        ids, branch, pos, target = list(prefix), [0] * len(prefix), list(range(len(prefix))), [False] * len(prefix)
        for b, item in enumerate(group, 1):
            prompt = list(self.branch_prompt(item.question, has_image))
            completion = encode(self.tokenizer, item.completion) + [self.end]
            ids += prompt + completion
            branch += [b] * (len(prompt) + len(completion))
            pos += range(len(prefix), len(prefix) + len(prompt) + len(completion))
            target += [False] * len(prompt) + [True] * len(completion)
        return ids, branch, pos, target

    def __call__(self, groups: list[list[task.Item]]) -> Packed:
        # One row per image group; a text-only segment goes onto the shortest row if that row stays no
        # longer than the longest image row, else it starts a new row.
        rows: list[list[list[task.Item]]] = [[g] for g in groups if g[0].has_image]
        lengths = [len(self.segment(row[0])[0]) for row in rows]
        limit = max(lengths, default=0)
        for g in (g for g in groups if not g[0].has_image):
            size = len(self.segment(g)[0])
            i = int(np.argmin(lengths)) if rows else -1
            if i < 0 or lengths[i] + size > max(limit, size):
                rows.append([])
                lengths.append(0)
                i = len(rows) - 1
            rows[i].append(g)
            lengths[i] += size
        length = max(lengths)
        n = len(rows)
        ids = torch.full((n, length), self.pad, dtype=torch.long)
        positions = torch.zeros((n, length), dtype=torch.long)
        target = torch.zeros((n, length), dtype=torch.bool)
        segment_of = torch.full((n, length), -1, dtype=torch.long)
        branch_of = torch.zeros((n, length), dtype=torch.long)
        pixels = []
        for r, row in enumerate(rows):
            at = 0
            for s, group in enumerate(row):
                seg_ids, branch, pos, tgt = self.segment(group)
                end = at + len(seg_ids)
                ids[r, at:end] = torch.tensor(seg_ids)
                positions[r, at:end] = torch.tensor(pos)
                target[r, at:end] = torch.tensor(tgt)
                segment_of[r, at:end] = s
                branch_of[r, at:end] = torch.tensor(branch)
                at = end
                if group[0].has_image:
                    pixels.append(prepare_image(group[0].image(), self.tiling).pixel_values)
        q_seg, k_seg = segment_of[:, :, None], segment_of[:, None, :]
        q_br, k_br = branch_of[:, :, None], branch_of[:, None, :]
        causal = torch.ones(length, length, dtype=torch.bool).tril()
        mask = (q_seg == k_seg) & (q_seg >= 0) & causal & ((k_br == 0) | (k_br == q_br))
        mask |= torch.eye(length, dtype=torch.bool)  # padding attends to itself (no empty softmax rows)
        pixel_values = torch.from_numpy(np.concatenate(pixels)) if pixels else None
        return Packed(ids, positions, mask, target, pixel_values, sum(len(g) for g in groups))


def _attention(attn: nn.Module, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The reference model's Qwen2 attention (same weights, same math) with an explicit mask."""
    b, t, _ = x.shape
    q = attn.q_proj(x).view(b, t, attn.n_heads, attn.head_dim).transpose(1, 2)
    k = attn.k_proj(x).view(b, t, attn.n_kv, attn.head_dim).transpose(1, 2)
    v = attn.v_proj(x).view(b, t, attn.n_kv, attn.head_dim).transpose(1, 2)
    q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
    groups = attn.n_heads // attn.n_kv
    k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    return attn.o_proj(out.transpose(1, 2).reshape(b, t, attn.n_heads * attn.head_dim))


def packed_hidden(model: R1VModel, batch: Packed) -> torch.Tensor:
    """Final hidden states [rows, T, hidden] of a packed batch (the decoder run with the packing mask)."""
    lm = model.language_model.model
    x = model.embed_inputs(batch.ids, batch.pixel_values)
    rows, length = batch.ids.shape
    cos, sin = lm.rotary(batch.positions.reshape(-1), x.dtype)
    cos, sin = cos.view(rows, 1, length, -1), sin.view(rows, 1, length, -1)
    mask = batch.mask[:, None]
    for layer in lm.layers:
        x = x + _attention(layer.self_attn, layer.input_layernorm(x), cos, sin, mask)
        x = x + layer.mlp(layer.post_attention_layernorm(x))
    return lm.norm(x)


def loss_fn(model: R1VModel, batch: Packed) -> torch.Tensor:
    """Mean cross-entropy of the target tokens; the head runs only where a target is predicted."""
    hidden = packed_hidden(model, batch)
    predict = batch.target[:, 1:]
    logits = model.language_model.lm_head(hidden[:, :-1][predict])
    return F.cross_entropy(logits, batch.ids[:, 1:][predict])


def probe(model: R1VModel, tokenizer: Any, n: int) -> Score:
    """Greedy `evaluate.Score` on the first n validation items, mid-training (the model is put back in train
    mode)."""
    from .evaluate import evaluate

    model.eval()
    try:
        with torch.no_grad():
            return evaluate(model, tokenizer, task.make_items(task.VALIDATION_SEED, n))
    finally:
        model.train()


def lr_at(step: int, cfg: TrainConfig) -> float:
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    progress = (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)
    return cfg.lr * (cfg.final_lr_ratio + (1 - cfg.final_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


def curriculum_ease(step: int, cfg: TrainConfig) -> float:
    """How one-coloured the training rows are at `step`: 1 at the start, 0 from `curriculum_steps` on."""
    return max(0.0, 1.0 - step / cfg.curriculum_steps) if cfg.curriculum_steps > 0 else 0.0


def _param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        (decay if p.dim() >= 2 and "embedding" not in name and "embed_tokens" not in name else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def train(
    out: str | Path,
    cfg: TrainConfig = TrainConfig(),
    sizes: MicroSizes = MicroSizes(),
    log: Callable[[str], None] = print,
) -> Path:
    """Train micro-r1v and write its checkpoint directory to `out`; returns the path."""
    torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    generator = torch.Generator().manual_seed(cfg.seed)

    tokenizer = build_micro_tokenizer()
    config = micro_config(tokenizer, sizes)
    r1v_config = parse_config(config)
    special = special_ids(tokenizer)
    model = R1VModel(r1v_config, special["<IMG_CONTEXT>"], [special["<|im_end|>"], special["<|endoftext|>"]])
    init_weights(model, generator)
    if cfg.init:  # continue from an earlier run's checkpoint (a second schedule over the trained weights)
        trained = R1VModel.from_checkpoint(cfg.init, dtype=torch.float32)
        model.load_state_dict(trained.state_dict())
        log(f"starting from the weights of {cfg.init}")
    model.train()
    n_params = sum(p.numel() for p in model.parameters())
    log(f"micro-r1v: {n_params / 1e6:.2f} M parameters ({n_params * 2 / 1e6:.1f} MB in bf16); "
        f"{cfg.steps} steps x ({cfg.scenes} images x {cfg.questions} + {cfg.text_groups} x {cfg.text_questions} text) questions, lr {cfg.lr}, cap {cfg.minutes} min, {cfg.threads} threads")

    optimizer = torch.optim.AdamW(_param_groups(model, cfg.weight_decay), lr=cfg.lr, betas=(0.9, 0.98), eps=1e-8)
    batcher = Batcher(tokenizer, r1v_config.tokens_per_tile)
    start, cpu_start = time.perf_counter(), time.process_time()
    ema = None
    curve: list[dict[str, float]] = []  # the probes: the training curve micro_r1v.json records
    step = 0
    stopped_early = False
    for step in range(cfg.steps):
        if time.perf_counter() - start > cfg.minutes * 60:
            stopped_early = True
            log(f"reached the {cfg.minutes} min cap after {step} of {cfg.steps} steps; stopping early")
            break
        ease = curriculum_ease(step, cfg)
        groups = [task.make_group(data_seed(cfg.seed, step * cfg.scenes + g), cfg.questions, ease=ease)
                  for g in range(cfg.scenes)]
        groups += [task.make_group(data_seed(cfg.seed, step * cfg.text_groups + g), cfg.text_questions, text=True)
                   for g in range(cfg.text_groups)]
        batch = batcher(groups)
        for param_group in optimizer.param_groups:
            param_group["lr"] = lr_at(step, cfg)
        loss = loss_fn(model, batch)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        optimizer.step()
        ema = loss.item() if ema is None else 0.95 * ema + 0.05 * loss.item()
        if cfg.probe_every and (step + 1) % cfg.probe_every == 0:
            score = probe(model, tokenizer, cfg.probe_items)
            curve.append({"step": step + 1, "loss": round(ema, 4), "accuracy": round(score.accuracy, 4),
                          "reading_accuracy": round(score.reading_accuracy, 4),
                          "minutes": round((time.perf_counter() - start) / 60, 1)})
            log(f"step {step + 1} probe: {score.summary()}")
        if (step + 1) % cfg.log_every == 0 or step == 0:
            elapsed = time.perf_counter() - start
            rate = (step + 1) / elapsed
            log(f"step {step + 1}/{cfg.steps}  loss {ema:.4f}  lr {lr_at(step, cfg):.2e}  "
                f"{rate:.2f} steps/s  {elapsed / 60:.1f} min (cpu {(time.process_time() - cpu_start) / 60:.1f}), "
                f"~{(cfg.steps - step - 1) / rate / 60:.1f} min left", )
    else:
        step = cfg.steps
    train_seconds = time.perf_counter() - start
    cpu_seconds = time.process_time() - cpu_start

    model.eval()
    tensors = {name: t.detach().float().numpy() for name, t in model.state_dict().items()}
    info = {
        "name": "micro-r1v", "train": asdict(cfg), "sizes": asdict(sizes), "steps_done": step,
        "stopped_early": stopped_early, "train_seconds": round(train_seconds, 1),
        "train_cpu_seconds": round(cpu_seconds, 1), "final_loss": ema, "curve": curve,
        "parameters": n_params, "torch": torch.__version__,
    }
    path = write_checkpoint(out, tensors, config, tokenizer, info)
    log(f"wrote {path} ({step} steps in {train_seconds / 60:.1f} min, loss {ema:.4f})")

    if cfg.eval_items:
        import json

        from .evaluate import evaluate, load_reference

        ref, tok = load_reference(path)
        items = task.make_items(task.VALIDATION_SEED, cfg.eval_items)
        score = evaluate(ref, tok, items)
        log(f"validation ({cfg.eval_items} items, greedy, fp32 reference from the bf16 checkpoint): {score.summary()}")
        info["validation"] = score.to_json()
        (path / "micro_r1v.json").write_text(json.dumps(info, indent=2))
    return path
