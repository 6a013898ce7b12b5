"""The whole R1V / InternVL-chat model in plain torch: InternViT + pixel shuffle + mlp1 + Qwen2.

Attribute names are the checkpoint's top-level prefixes (`vision_model`, `mlp1`, `language_model`), so
every parameter's name is exactly its tensor name in the checkpoint and loading is a strict 1:1 match.
"""
from __future__ import annotations

import warnings
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
import torch
from torch import nn

from r1v.converters.checkpoint import Checkpoint, open_checkpoint
from r1v.converters.config import R1VConfig
from r1v.converters.errors import CheckpointError

from .projector import Projector, extract_feature
from .qwen2 import KVCache, LinearFactory, Qwen2ForCausalLM
from .vision import InternViT

IMG_CONTEXT = "<IMG_CONTEXT>"


class R1VModel(nn.Module):
    """vision_model (InternViT) + mlp1 (projector) + language_model (Qwen2 with lm_head)."""

    def __init__(
        self,
        config: R1VConfig,
        image_token_id: int,
        eos_token_ids: Sequence[int] = (),
        llm_linear: LinearFactory = nn.Linear,
        vision_linear: LinearFactory = nn.Linear,
    ):
        super().__init__()
        if config.raw.get("llm_config", {}).get("use_sliding_window"):
            raise NotImplementedError("llm_config.use_sliding_window is true; sliding-window attention is not supported")
        self.config = config
        self.image_token_id = image_token_id
        self.eos_token_ids = list(eos_token_ids)
        self.vision_model = InternViT(config.vision, config.select_layer, vision_linear)
        self.mlp1 = Projector(config.projector_input_size, config.llm.hidden_size, vision_linear)
        self.language_model = Qwen2ForCausalLM(config.llm, llm_linear)

    # Readable aliases for the three parts (the attributes keep the checkpoint's names).
    @property
    def vision(self) -> InternViT:
        return self.vision_model

    @property
    def projector(self) -> Projector:
        return self.mlp1

    @property
    def llm(self) -> Qwen2ForCausalLM:
        return self.language_model

    @property
    def dtype(self) -> torch.dtype:
        return self.language_model.model.embed_tokens.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.language_model.model.embed_tokens.weight.device

    # --- loading ---------------------------------------------------------------------------------
    @classmethod
    def from_checkpoint(
        cls,
        path_or_checkpoint: str | Path | Checkpoint,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
    ) -> R1VModel:
        """Build the model and load every tensor of the checkpoint (a path or an opened Checkpoint,
        which the caller keeps owning). Any tensor the model does not use, or lacks, is an error."""
        given = isinstance(path_or_checkpoint, Checkpoint)
        ckpt = path_or_checkpoint if given else open_checkpoint(path_or_checkpoint)
        try:
            special = ckpt.special_tokens()
            if IMG_CONTEXT not in special:
                raise CheckpointError(f"{ckpt.path}: the tokenizer has no {IMG_CONTEXT} token")
            # Built on the meta device: no memory is spent on weights that are about to be replaced.
            with torch.device("meta"):
                model = cls(ckpt.config, special[IMG_CONTEXT], ckpt.eos_token_ids)
            load_weights(model, ckpt, dtype=dtype, device=device)
        finally:
            if not given:
                ckpt.close()
        return model.eval()

    # --- images and prompts ----------------------------------------------------------------------
    def embed_images(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """pixel_values [n_tiles, 3, 448, 448] (normalized) -> [n_tiles, tokens_per_tile, llm_hidden]."""
        return extract_feature(
            self.vision_model, self.mlp1, pixel_values.to(self.device, self.dtype),
            self.config.downsample_ratio, self.config.ps_version,
        )

    def embed_inputs(
        self, input_ids: torch.Tensor, pixel_values: torch.Tensor | None = None, image_embeds: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Token embeddings with the <IMG_CONTEXT> positions replaced by the image embeddings, tiles in
        order (row-major over batch and position, as InternVL-chat does)."""
        input_ids = input_ids.to(self.device)
        embeds = self.language_model.model.embed_tokens(input_ids)
        mask = input_ids == self.image_token_id
        n_ctx = int(mask.sum())
        if image_embeds is None and pixel_values is not None:
            image_embeds = self.embed_images(pixel_values)
        if image_embeds is None:
            if n_ctx:
                raise ValueError(f"the prompt has {n_ctx} {IMG_CONTEXT} tokens but no image was given")
            return embeds
        n_tiles, per_tile = image_embeds.shape[:2]
        if n_ctx != n_tiles * per_tile:
            raise ValueError(
                f"the prompt has {n_ctx} {IMG_CONTEXT} tokens but the images give {n_tiles} tiles x {per_tile} "
                f"= {n_tiles * per_tile} embeddings"
            )
        return embeds.masked_scatter(mask[..., None], image_embeds.to(embeds.dtype))

    def forward(
        self, input_ids: torch.Tensor, pixel_values: torch.Tensor | None = None, cache: KVCache | None = None
    ) -> torch.Tensor:
        """input_ids [B, T] (+ pixel_values for the prompt's images) -> logits [B, T, vocab]."""
        return self.language_model(inputs_embeds=self.embed_inputs(input_ids, pixel_values), cache=cache)

    @torch.inference_mode()
    def greedy(
        self,
        input_ids: torch.Tensor | Sequence[int],
        pixel_values: torch.Tensor | None = None,
        max_new_tokens: int = 32,
        stop_ids: Iterable[int] | None = None,
    ) -> torch.Tensor:
        """Greedy decoding of one sequence with the KV cache: prefill, then one token at a time.
        Returns the new token ids (1-D), ending with the stop token if one was produced. `stop_ids`
        defaults to the checkpoint's EOS ids; pass () to always produce max_new_tokens."""
        ids = torch.as_tensor(input_ids, dtype=torch.long, device=self.device)
        ids = ids[None] if ids.dim() == 1 else ids
        if ids.shape[0] != 1:
            raise ValueError(f"greedy decodes one sequence, got a batch of {ids.shape[0]}")
        stop = set(self.eos_token_ids if stop_ids is None else stop_ids)
        cache = self.language_model.new_cache(ids.shape[1] + max_new_tokens)
        logits = self(ids, pixel_values, cache)
        out: list[int] = []
        while len(out) < max_new_tokens:
            token = int(logits[0, -1].argmax())
            out.append(token)
            if token in stop or len(out) == max_new_tokens:
                break
            logits = self(torch.tensor([[token]], device=self.device), cache=cache)
        return torch.tensor(out, dtype=torch.long)


def stored_to_torch(raw: np.ndarray, dtype: str) -> torch.Tensor:
    """A stored tensor (BF16 as uint16 bit patterns) as a torch tensor sharing its memory."""
    with warnings.catch_warnings():  # the mapped view is read-only; callers copy before any write
        warnings.simplefilter("ignore", UserWarning)
        if dtype == "BF16":
            return torch.from_numpy(raw.view(np.int16)).view(torch.bfloat16)
        return torch.from_numpy(raw)


def load_weights(
    model: nn.Module, ckpt: Checkpoint, dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu"
) -> None:
    """Replace every parameter of `model` by the checkpoint tensor of the same name, cast to `dtype`.

    The names must match exactly both ways and the shapes must agree; all of that is checked before any
    data is read. Tensors are read in file order, one at a time.
    """
    params = dict(model.named_parameters())  # a tied lm_head appears once, as embed_tokens
    unexpected = sorted(set(ckpt.tensors) - set(params))
    if unexpected:
        info = ckpt.tensors[unexpected[0]]
        more = f" (and {len(unexpected) - 1} more)" if len(unexpected) > 1 else ""
        raise CheckpointError(f"{info.file}: tensor {unexpected[0]!r} is not used by the model{more}")
    missing = sorted(set(params) - set(ckpt.tensors))
    if missing:
        more = f" (and {len(missing) - 1} more: {missing[1:4]})" if len(missing) > 1 else ""
        raise CheckpointError(f"{ckpt.path}: tensor {missing[0]!r} needed by the model is missing{more}")
    for name, param in params.items():
        info = ckpt.tensors[name]
        if tuple(param.shape) != info.shape:
            raise CheckpointError(
                f"{info.file}: tensor {name!r} has shape {list(info.shape)}, the model expects {list(param.shape)}"
            )
    for info in ckpt.iter_tensors():
        value = stored_to_torch(ckpt.raw(info.name), info.dtype)
        # copy=True: never alias the memory map (it is closed with the checkpoint).
        value = value.to(device=device, dtype=dtype, copy=True)
        owner_name, _, leaf = info.name.rpartition(".")
        owner = model.get_submodule(owner_name)
        owner._parameters[leaf] = nn.Parameter(value, requires_grad=False)
    for module in model.modules():  # re-share a tied head with the freshly loaded embedding table
        if isinstance(module, Qwen2ForCausalLM):
            module.tie_weights()
    left = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if left:
        raise CheckpointError(f"{ckpt.path}: {left[0]!r} was not loaded")
