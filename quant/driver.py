"""`quantize_checkpoint_awq`: a Skywork-R1V / InternVL-chat checkpoint to AutoAWQ's 4-bit GEMM layout, one
decoder layer at a time.

1. Calibration: the items (built-in or a user JSONL) become `n_samples` windows of `seq_len` tokens
   (quant/calibration.py). The vision tower runs once over their images, itself streamed one ViT layer at a
   time, then pixel shuffle and mlp1; the LLM input embeddings are the rows of `embed_tokens` the windows
   use (read in blocks, never the whole table), with the `<IMG_CONTEXT>` positions replaced.
2. For each decoder layer: build it from the checkpoint's tensors (fp32 on CPU, fp16 on CUDA); record its
   linears' input statistics (importance matrix); AWQ scale (+ clip) search and 4-bit rounding, to nearest
   or by GPTQ (quant/awq.py `quantize_layer_awq`; `method` picks the steps, quant/methods.py); pack each
   linear (quant/pack.py) and write the layer's part file; run the *quantized* layer (norms and biases
   rounded to the fp16 they are stored as) over the calibration hidden states to get the next layer's
   inputs; free it.
3. Embeddings, final norm and lm_head are copied fp16; the vision tower and mlp1 fp16 (`vision="fp16"`), or
   the ViT linears RTN-quantized in the same AWQ GEMM layout (`int4`). mlp1 stays fp16 (vLLM builds it
   unquantized). `int8` is refused: no AWQ loader reads it (converters/awq.py); it is a load-time placement.
4. converters/awq.py assembles the shards, the index, config.json with `quantization_config` and the
   tokenizer files.

Work happens in a hidden sibling of OUTDIR, `.<name>.partial-<key>`, which is renamed into place only when
complete: OUTDIR appears whole or not at all. The key hashes the source config, its tensor headers, the
calibration items and every option. Progress is kept per layer: the layer's part, then the next layer's
input hidden states and the statistics so far (`hidden-<i>.safetensors`), then `state.json`. A rerun with
the same arguments continues from the last finished layer; since every step is deterministic and the saved
hidden states are exact, the output is byte for byte that of an uninterrupted run.

Memory: one decoder layer (fp32 on CPU) + the calibration activations (hidden states [n_samples, seq_len,
hidden], and what `quantize_layer_awq`'s scale and clip searches capture: every linear's input, the MLP's
[n_samples, seq_len, intermediate] the largest; GPTQ's Hessians are accumulated chunk by chunk, [in, in] per
linear), never the whole model.
"""
from __future__ import annotations

import ctypes
import functools
import hashlib
import json
import os
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import torch
from torch import nn

from r1v.converters.awq import (
    INT8_VISION_REFUSED, INT8_WEIGHT, MAX_SHARD_BYTES, PartTensor, array_tensor, assemble, awq_config,
    quantization_config, read_part, write_part,
)
from r1v.converters.checkpoint import Checkpoint, open_checkpoint
from r1v.converters.gguf_common import ConversionError
from r1v.runtime.model.projector import Projector, pixel_shuffle
from r1v.runtime.model.qwen2 import DecoderLayer, RMSNorm, RotaryEmbedding, check_supported
from r1v.runtime.model.vision import VisionEmbeddings, VisionLayer

from .awq import QWEN2_TABLE, quantize_layer_awq
from .calibration import CalibrationBatch, CalibrationItem, build_calibration_batch, builtin_calibration, \
    calibration_fingerprint, load_calibration
from .imatrix import DEFAULT_IMATRIX_POSITIONS, IMATRIX_POSITIONS, Imatrix
from .methods import DEFAULT_METHOD, METHOD_STEPS, METHODS
from .pack import PACK, pack_awq
from .rtn import check_groupable, quantize_rtn

VISION_MODES = ("fp16", "int4")  # what a checkpoint can hold for vLLM and transformers (int8: load time only)
STATE_FILE = "state.json"
STATE_VERSION = 3  # 3: the hidden-state parts carry the mask of the positions the imatrix counts
WORK_KEY_CHARS = 16  # hex digits of the run's key in its work directory's name
_HEX = frozenset("0123456789abcdef")
LLM = "language_model.model."
VISION_LINEARS = ("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2")
_CHUNK_ELEMENTS = 1 << 26  # elements of the widest activation one forward chunk may make (256 MB in fp32)


@dataclass
class AWQResult:
    """What a conversion produced. `resumed_from`: the first decoder layer this run quantized (0 for a fresh
    run, n_layers when only the assembly was left)."""

    outdir: Path
    files: list[Path]
    quantization_config: dict[str, Any]
    n_layers: int
    resumed_from: int
    calibration: dict[str, int] = field(default_factory=dict)
    imatrix: Path | None = None
    seconds: dict[str, float] = field(default_factory=dict)


def quantize_checkpoint_awq(
    checkpoint: str | Path | Checkpoint,
    outdir: str | Path,
    *,
    calib: str | Path | Sequence[CalibrationItem] | None = None,
    group_size: int = 128,
    bits: int = 4,
    vision: str = "fp16",
    n_samples: int = 128,
    seq_len: int = 512,
    method: str = DEFAULT_METHOD,
    device: str = "cpu",
    imatrix_out: str | Path | None = None,
    imatrix_positions: str = DEFAULT_IMATRIX_POSITIONS,
    progress: bool = True,
) -> AWQResult:
    """Quantize `checkpoint` into the AutoAWQ GEMM checkpoint directory `outdir` (see the module doc).

    `calib`: None for the built-in set, a JSONL path, or CalibrationItems. `imatrix_out`: also write the LLM
    linears' activation statistics as a llama.cpp importance matrix (for `r1v convert gguf --imatrix`), counting
    `imatrix_positions` of the calibration windows: "all" (image tokens too), or "text" (their context still
    holds the image). "all" measured best on micro-r1v (quant/imatrix.py, README "The importance matrix")."""
    opts = _Options.check(group_size, bits, vision, n_samples, seq_len, method, device, imatrix_positions)
    out = Path(outdir)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ConversionError(f"{out}: already exists and is not empty; choose a new OUTDIR or remove it")
    ckpt, owned = _open_source(checkpoint)
    try:
        check_convertible(ckpt, group_size, vision)
        items = _calibration_items(calib)
        return _Run(ckpt, out, opts, items, progress).run(Path(imatrix_out) if imatrix_out else None)
    finally:
        if owned:
            ckpt.close()


# --- refusals -------------------------------------------------------------------------------------------------
def _open_source(checkpoint: str | Path | Checkpoint) -> tuple[Checkpoint, bool]:
    if isinstance(checkpoint, Checkpoint):
        refuse_quantized(checkpoint)
        return checkpoint, False
    with open_checkpoint(checkpoint, check_shapes=False) as probe:  # an AWQ checkpoint fails the shape check
        refuse_quantized(probe)
    return open_checkpoint(checkpoint), True


def refuse_quantized(ckpt: Checkpoint) -> None:
    """A checkpoint that is already quantized is not a source for quantization."""
    raw = ckpt.config.raw
    for where, cfg in (("", raw), ("llm_config.", raw.get("llm_config") or {})):
        q = cfg.get("quantization_config")
        if q:
            method = q.get("quant_method") if isinstance(q, dict) else None
            raise ConversionError(
                f"{ckpt.path / 'config.json'}: {where}quantization_config is set (quant_method {method!r}): the "
                "checkpoint is already quantized; convert from the original fp16/bf16 checkpoint")
    for name in ckpt.tensors:
        if name.endswith((".qweight", ".qzeros", f".{INT8_WEIGHT}")):
            raise ConversionError(
                f"{ckpt.tensors[name].file}: tensor {name!r} is a quantized weight: the checkpoint is already "
                "quantized; convert from the original fp16/bf16 checkpoint")


def check_convertible(ckpt: Checkpoint, group_size: int, vision: str = "fp16") -> None:
    """Refuse, before any work, a linear that cannot be packed: in_features not divisible by `group_size`
    or out_features not a multiple of 8, naming the tensor and its shape."""
    try:
        check_supported(ckpt.config.llm)
    except NotImplementedError as e:
        raise ConversionError(f"{ckpt.path / 'config.json'}: {e}") from None
    names = [f"{LLM}layers.{i}.{lin}.weight" for i in range(ckpt.config.llm.num_hidden_layers)
             for lin in QWEN2_TABLE.linears]
    if vision == "int4":
        names += [f"vision_model.encoder.layers.{i}.{lin}.weight"
                  for i in range(ckpt.config.vision.num_hidden_layers) for lin in VISION_LINEARS]
    for name in names:
        shape = ckpt.tensors[name].shape
        try:
            check_groupable(shape, group_size, name)
        except ValueError as e:
            hint = " (or --vision fp16)" if name.startswith("vision_model.") else ""
            raise ConversionError(f"{ckpt.path}: {e}; choose a --group-size that divides it{hint}") from None
        if shape[0] % PACK:
            raise ConversionError(f"{ckpt.path}: {name} of shape {shape}: out_features {shape[0]} is not a "
                                  f"multiple of {PACK}, which the AWQ GEMM layout needs")


@dataclass(frozen=True)
class _Options:
    group_size: int
    bits: int
    vision: str
    n_samples: int
    seq_len: int
    method: str
    device: str
    imatrix_positions: str

    @classmethod
    def check(cls, group_size: int, bits: int, vision: str, n_samples: int, seq_len: int, method: str,
              device: str, imatrix_positions: str) -> _Options:
        if vision == "int8":
            raise ConversionError(f"vision='int8' (--vision int8) is {INT8_VISION_REFUSED}")
        if vision not in VISION_MODES:
            raise ConversionError(f"unknown vision mode {vision!r}; choose from {', '.join(VISION_MODES)}")
        if method not in METHODS:
            raise ConversionError(f"unknown method {method!r}; choose from {', '.join(METHODS)}")
        if imatrix_positions not in IMATRIX_POSITIONS:
            raise ConversionError(f"unknown imatrix_positions {imatrix_positions!r}; choose from "
                                  f"{', '.join(IMATRIX_POSITIONS)}")
        if bits != 4:
            raise ConversionError(f"bits={bits}: the AutoAWQ GEMM layout holds 4-bit weights only")
        if group_size < 1:
            raise ConversionError(f"group_size must be positive, got {group_size}")
        if n_samples < 1 or seq_len < 16:
            raise ConversionError(f"need n_samples >= 1 and seq_len >= 16, got {n_samples} and {seq_len}")
        try:
            kind = torch.device(device).type
        except RuntimeError:
            kind = None
        if kind not in ("cpu", "cuda"):
            raise ConversionError(f"device {device!r}: choose cpu or cuda")
        if kind == "cuda" and not torch.cuda.is_available():
            raise ConversionError("device cuda was asked for, but torch sees no CUDA device")
        return cls(group_size, bits, vision, n_samples, seq_len, method, device, imatrix_positions)

    @property
    def dtype(self) -> torch.dtype:
        """fp16 on CUDA as AutoAWQ; fp32 on CPU, where fp16 matmuls are slow and inexact."""
        return torch.float16 if torch.device(self.device).type == "cuda" else torch.float32


def _calibration_items(calib: str | Path | Sequence[CalibrationItem] | None) -> list[CalibrationItem]:
    if calib is None:
        return builtin_calibration()
    if isinstance(calib, (str, os.PathLike)):
        return load_calibration(calib)
    return list(calib)


# --- the run --------------------------------------------------------------------------------------------------
class _Run:
    def __init__(self, ckpt: Checkpoint, out: Path, opts: _Options, items: list[CalibrationItem], progress: bool):
        self.ckpt, self.out, self.opts, self.items, self.progress = ckpt, out, opts, items, progress
        self.cfg = ckpt.config
        self.n_layers = self.cfg.llm.num_hidden_layers
        self.device = torch.device(opts.device)
        self.dtype = opts.dtype
        self.fingerprint = calibration_fingerprint(items)
        self.key = self._key()
        self.work = out.parent / f".{out.name}.partial-{self.key[:WORK_KEY_CHARS]}"
        self.seconds: dict[str, float] = {}
        self.counted: torch.Tensor | None = None  # bool [windows, seq_len]: the positions the imatrix counts

    def _key(self) -> str:
        from r1v import __version__

        tensors = sorted((n, t.dtype, list(t.shape)) for n, t in self.ckpt.tensors.items())
        fields = {"state": STATE_VERSION, "r1v": __version__, "torch": torch.__version__,
                  "config": self.cfg.sha256, "tensors": tensors, "calibration": self.fingerprint,
                  **{k: getattr(self.opts, k) for k in _Options.__dataclass_fields__},
                  "device": torch.device(self.opts.device).type}
        return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()

    def say(self, message: str) -> None:
        if self.progress:
            print(message, file=sys.stderr, flush=True)

    # -- state
    def _open_work(self) -> int:
        """Create the work directory or resume it; the first layer still to quantize (-1: calibrate first)."""
        try:
            self.out.parent.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise ConversionError(f"{self.out.parent}: cannot create the output's parent ({e.strerror})") from None
        for stale in _work_dirs(self.out):
            if stale != self.work:
                self.say(f"removing {stale}: an unfinished run with other inputs or options")
                shutil.rmtree(stale, ignore_errors=True)
        state = self.work / STATE_FILE
        if state.is_file():
            data = json.loads(state.read_text())
            if data.get("key") == self.key and (self.work / _hidden_name(data["next_layer"])).is_file():
                return int(data["next_layer"])
            shutil.rmtree(self.work)
        self.work.mkdir(exist_ok=True)
        return -1

    def _save_state(self, next_layer: int) -> None:
        options = {k: getattr(self.opts, k) for k in _Options.__dataclass_fields__}
        data = {"key": self.key, "next_layer": next_layer, "n_layers": self.n_layers, "source": str(self.ckpt.path),
                "options": options}
        tmp = self.work / f".{STATE_FILE}.tmp"
        tmp.write_text(json.dumps(data, indent=2))
        os.replace(tmp, self.work / STATE_FILE)
        for old in self.work.glob("hidden-*.safetensors"):
            if old.name != _hidden_name(next_layer):
                old.unlink()

    # -- main
    def run(self, imatrix_out: Path | None) -> AWQResult:
        start = self._open_work()
        try:
            return self._run(start, imatrix_out)
        except BaseException:
            if self.work.is_dir():
                self.say(f"stopped; finished work is kept in {self.work}: run the same command again to resume")
            raise

    def _run(self, start: int, imatrix_out: Path | None) -> AWQResult:
        resumed_from = max(start, 0)
        if start > 0:
            self.say(f"resuming at layer {start} of {self.n_layers} from {self.work}")
        clock = time.perf_counter()
        static_parts = self._write_static_parts()
        self.seconds["static_parts"] = round(time.perf_counter() - clock, 3)
        imatrix = Imatrix(chunk_size=self.opts.seq_len, chunks=self.opts.n_samples,
                          datasets=[f"r1v calibration {self.fingerprint[:12]}, "
                                    f"{self.opts.imatrix_positions} positions"])
        if start < 0:
            hidden, calibration = self._calibrate(imatrix)
            start = 0
        else:
            hidden, calibration = self._load_hidden(start, imatrix)

        clock = time.perf_counter()
        positions = torch.arange(self.opts.seq_len, device=self.device)
        cos, sin = RotaryEmbedding(self.cfg.llm.head_dim, self.cfg.llm.rope_theta)(positions, self.dtype)
        bar = _bar(self.n_layers, start, self.progress)
        for i in range(start, self.n_layers):
            self._quantize_layer(i, hidden, cos, sin, imatrix)
            self._save_hidden(i + 1, hidden, imatrix, calibration)
            _release_freed_memory()
            bar.update(1)
        bar.close()
        self.seconds["layers"] = round(time.perf_counter() - clock, 3)
        self._record_output_stats(hidden, imatrix)
        del hidden

        clock = time.perf_counter()
        qconfig = quantization_config(self.opts.group_size, self._not_converted(), self.opts.bits)
        files = self._finish(static_parts, qconfig, calibration)
        written_imatrix = imatrix.save(imatrix_out) if imatrix_out else None
        self._publish()
        self.seconds["assemble"] = round(time.perf_counter() - clock, 3)
        return AWQResult(
            outdir=self.out, files=[self.out / f.name for f in files], quantization_config=qconfig,
            n_layers=self.n_layers, resumed_from=resumed_from, calibration=calibration,
            imatrix=written_imatrix, seconds=self.seconds,
        )

    def _calibrate(self, imatrix: Imatrix) -> tuple[torch.Tensor, dict[str, int]]:
        """The first layer's input for the calibration windows, saved as the run's first checkpoint."""
        clock = time.perf_counter()
        batch = build_calibration_batch(self.ckpt, self.items, self.opts.n_samples, self.opts.seq_len)
        calibration = dict(sorted(batch.stats.items()))  # the order a resumed run reads back
        self.say(f"calibration: {batch.input_ids.shape[0]} windows x {batch.input_ids.shape[1]} tokens, "
                 f"{batch.stats['images']} image places ({batch.stats['distinct_images']} distinct images, "
                 f"{batch.stats['tiles']} tiles to encode; {batch.stats['image_tokens']} image tokens)")
        hidden = embed_calibration_batch(self.ckpt, batch, self.device, self.dtype, progress=self.progress)
        text = torch.from_numpy(batch.input_ids != batch.image_token_id)
        self.counted = text if self.opts.imatrix_positions == "text" else torch.ones_like(text)
        self.seconds["calibration"] = round(time.perf_counter() - clock, 3)
        self._save_hidden(0, hidden, imatrix, calibration)
        return hidden, calibration

    def _finish(self, static_parts: list[Path], qconfig: dict[str, Any], calibration: dict[str, int]) -> list[Path]:
        """The complete checkpoint in the work directory's `out/`, from the finished parts."""
        parts = [static_parts[0], *(self.work / _layer_name(i) for i in range(self.n_layers)), *static_parts[1:]]
        config = awq_config(self.cfg.raw, qconfig, {"r1v_quantization": self._provenance(calibration)})
        staging = self.work / "out"
        shutil.rmtree(staging, ignore_errors=True)  # an assembly that was interrupted
        return assemble(parts, staging, config, self.ckpt.path)

    def _publish(self) -> None:
        """Rename the assembled checkpoint to OUTDIR (one rename: it appears whole) and drop the work."""
        if self.out.exists():
            self.out.rmdir()  # empty, checked at the start
        os.rename(self.work / "out", self.out)
        shutil.rmtree(self.work, ignore_errors=True)

    def _not_converted(self) -> list[str]:
        return ["mlp1"] if self.opts.vision == "int4" else ["vision_model", "mlp1"]

    def _provenance(self, calibration: dict[str, int]) -> dict[str, Any]:
        vision: dict[str, Any] = {"mode": self.opts.vision}
        if self.opts.vision == "int4":
            vision["format"] = f"AWQ GEMM, RTN, group {self.opts.group_size}, for {', '.join(VISION_LINEARS)}"
        return {"method": self.opts.method, "vision": vision, "source_config_sha256": self.cfg.sha256,
                "calibration": {"fingerprint": self.fingerprint, "n_samples": self.opts.n_samples,
                                "seq_len": self.opts.seq_len, **calibration}}

    # -- hidden states between layers (with the statistics so far)
    def _save_hidden(self, layer: int, hidden: torch.Tensor, imatrix: Imatrix, calibration: dict[str, int]) -> None:
        tensors = [array_tensor("hidden", hidden.cpu().numpy())]
        tensors += [array_tensor(f"imatrix/{name}", imatrix.sums[name]) for name in sorted(imatrix.sums)]
        tensors.append(array_tensor("imatrix_counted", self.counted.numpy().astype(np.uint8)))
        meta = {"imatrix_counts": json.dumps(imatrix.counts, sort_keys=True),
                "calibration": json.dumps(calibration, sort_keys=True)}
        write_part(self.work / _hidden_name(layer), tensors, meta)
        self._save_state(layer)

    def _load_hidden(self, layer: int, imatrix: Imatrix) -> tuple[torch.Tensor, dict[str, int]]:
        arrays, meta = read_part(self.work / _hidden_name(layer))
        imatrix.counts.update(json.loads(meta["imatrix_counts"]))
        for name in imatrix.counts:
            imatrix.sums[name] = arrays[f"imatrix/{name}"]
        self.counted = torch.from_numpy(arrays["imatrix_counted"].astype(bool))
        return torch.from_numpy(arrays["hidden"]).to(self.device), json.loads(meta["calibration"])

    # -- one decoder layer
    @torch.no_grad()
    def _quantize_layer(self, i: int, hidden: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                        imatrix: Imatrix) -> None:
        prefix = f"{LLM}layers.{i}."
        layer = load_module(self.ckpt, lambda: DecoderLayer(self.cfg.llm, i, nn.Linear), prefix, self.device,
                            self.dtype)
        kwargs = {"cos": cos, "sin": sin, "cache": None}
        rows = max(1, _CHUNK_ELEMENTS // (hidden.shape[1] * self.cfg.llm.intermediate_size))
        with imatrix.recording(layer, prefix=f"model.layers.{i}.", n_blocks=self.n_layers, keep=self.counted):
            for s in range(0, hidden.shape[0], rows):
                layer(hidden[s:s + rows], **kwargs)
        quantized = quantize_layer_awq(layer, hidden, kwargs, self.opts.group_size, self.opts.bits,
                                       QWEN2_TABLE, chunk_rows=rows, **METHOD_STEPS[self.opts.method])
        tensors = []
        for name, param in layer.named_parameters():
            module_name, _, leaf = name.rpartition(".")
            if module_name in quantized:
                if leaf == "weight":
                    packed = pack_awq(*quantized[module_name])
                    tensors += [array_tensor(f"{prefix}{module_name}.qweight", packed.qweight.cpu().numpy()),
                                array_tensor(f"{prefix}{module_name}.qzeros", packed.qzeros.cpu().numpy()),
                                array_tensor(f"{prefix}{module_name}.scales", packed.scales.cpu().numpy())]
                    continue
            # norms and biases (carrying the folded scales): stored fp16, so the next layer sees that value
            param.data = param.data.to(torch.float16).to(self.dtype)
            tensors.append(array_tensor(prefix + name, param.data.to(torch.float16).cpu().numpy()))
        write_part(self.work / _layer_name(i), tensors)
        for s in range(0, hidden.shape[0], rows):
            hidden[s:s + rows] = layer(hidden[s:s + rows], **kwargs)
        del layer, quantized

    @torch.no_grad()
    def _record_output_stats(self, hidden: torch.Tensor, imatrix: Imatrix) -> None:
        """The lm_head's inputs (the final norm's output) complete the importance matrix."""
        norm = load_module(self.ckpt, lambda: RMSNorm(self.cfg.llm.hidden_size, self.cfg.llm.rms_norm_eps),
                           f"{LLM}norm.", self.device, self.dtype)
        for s in range(0, hidden.shape[0], 8):
            imatrix.add("output.weight", norm(hidden[s:s + 8])[self.counted[s:s + 8].to(hidden.device)])

    # -- everything that is not a decoder layer
    def _write_static_parts(self) -> list[Path]:
        """embed.safetensors, head.safetensors and vision-<k>.safetensors (skipped when already there)."""
        ckpt = self.ckpt
        embed = f"{LLM}embed_tokens.weight"
        head_names = [f"{LLM}norm.weight"] + [n for n in ("language_model.lm_head.weight",) if n in ckpt.tensors]
        groups: list[tuple[str, list[PartTensor]]] = [
            ("embed.safetensors", [self._fp16_tensor(embed)]),
            ("head.safetensors", [self._fp16_tensor(n) for n in head_names]),
        ]
        vision_names = [t.name for t in ckpt.iter_tensors() if t.name.startswith(("vision_model.", "mlp1."))]
        current: list[PartTensor] = []
        size = 0
        for name in vision_names:
            for tensor in self._vision_tensors(name):
                if current and size + tensor.nbytes > MAX_SHARD_BYTES:
                    groups.append((f"vision-{len(groups) - 2:03d}.safetensors", current))
                    current, size = [], 0
                current.append(tensor)
                size += tensor.nbytes
        if current:
            groups.append((f"vision-{len(groups) - 2:03d}.safetensors", current))
        paths = []
        for file, tensors in groups:
            path = self.work / file
            if not path.is_file():
                write_part(path, tensors)
            paths.append(path)
        return paths

    def _fp16_tensor(self, name: str) -> PartTensor:
        info = self.ckpt.tensors[name]
        if len(info.shape) < 2:
            return PartTensor(name, "F16", info.shape, lambda: (self.ckpt.read(name, np.float32).astype(np.float16),))
        rows = max(1, (64 << 20) // (4 * int(np.prod(info.shape[1:]))))

        def blocks() -> Iterator[np.ndarray]:
            for s in range(0, info.shape[0], rows):
                yield self.ckpt.read_rows(name, s, s + rows, np.float32).astype(np.float16)

        return PartTensor(name, "F16", info.shape, blocks)

    def _vision_tensors(self, name: str) -> list[PartTensor]:
        module, _, leaf = name.rpartition(".")
        if self.opts.vision == "fp16" or leaf != "weight" or not module.endswith(VISION_LINEARS) \
                or not module.startswith("vision_model.encoder."):
            return [self._fp16_tensor(name)]
        out_f, in_f = self.ckpt.tensors[name].shape
        cache: dict[str, np.ndarray] = {}

        def value(key: str) -> Iterator[np.ndarray]:
            if not cache:  # computed once per linear, on first use, so memory stays at one tensor
                w = torch.from_numpy(self.ckpt.read(name, np.float32)).to(self.device)
                packed = pack_awq(*quantize_rtn(w.to(torch.float16), self.opts.group_size, self.opts.bits))
                cache.update(qweight=packed.qweight.cpu().numpy(), qzeros=packed.qzeros.cpu().numpy(),
                             scales=packed.scales.cpu().numpy())
            yield cache.pop(key)

        g = in_f // self.opts.group_size
        specs = [("qweight", "I32", (in_f, out_f // PACK)), ("qzeros", "I32", (g, out_f // PACK)),
                 ("scales", "F16", (g, out_f))]
        return [PartTensor(f"{module}.{key}", dtype, shape, lambda key=key: value(key)) for key, dtype, shape in specs]


# --- calibration inputs ---------------------------------------------------------------------------------------
@torch.no_grad()
def embed_calibration_batch(ckpt: Checkpoint, batch: CalibrationBatch, device: torch.device | str = "cpu",
                            dtype: torch.dtype = torch.float32, progress: bool = False) -> torch.Tensor:
    """The LLM's input for the calibration windows, [n_samples, seq_len, hidden]: token embeddings with the
    image embeddings at the <IMG_CONTEXT> positions (what R1VModel.embed_inputs gives, without loading the
    model: the embedding rows are read in blocks and the vision tower one layer at a time)."""
    ids = batch.input_ids
    hidden = torch.from_numpy(_embedding_rows(ckpt, ids)).to(device, dtype)
    if not batch.images:
        return hidden
    image_embeds = embed_images(ckpt, batch.images, device, dtype, progress=progress)
    for w, refs in enumerate(batch.image_refs):
        if not refs:
            continue
        mask = torch.from_numpy(ids[w] == batch.image_token_id).to(hidden.device)
        values = torch.cat([image_embeds[j].reshape(-1, hidden.shape[-1]) for j in refs])
        if int(mask.sum()) != values.shape[0]:
            raise RuntimeError(f"window {w}: {int(mask.sum())} <IMG_CONTEXT> tokens for {values.shape[0]} image "
                               "embeddings")
        hidden[w, mask] = values.to(dtype)
    return hidden


@torch.no_grad()
def embed_images(ckpt: Checkpoint, images: Sequence[np.ndarray], device: torch.device | str = "cpu",
                 dtype: torch.dtype = torch.float32, progress: bool = False) -> list[torch.Tensor]:
    """InternViT + pixel shuffle + mlp1 (runtime.model.extract_feature) over every tile of `images`
    (pixel values [tiles, 3, S, S] each), with one ViT layer in memory at a time. Per image:
    [tiles, tokens_per_tile, llm_hidden]. `progress`: a bar over the ViT layers (the calibration's long part)."""
    cfg = ckpt.config
    tiles = [t for image in images for t in image]
    embeddings = load_module(ckpt, lambda: VisionEmbeddings(cfg.vision), "vision_model.embeddings.", device, dtype)
    x = torch.cat([embeddings(torch.from_numpy(np.stack(tiles[s:s + 8])).to(device, dtype))
                   for s in range(0, len(tiles), 8)])
    del embeddings
    n = cfg.vision.num_hidden_layers
    n_run = cfg.select_layer if cfg.select_layer >= 0 else n + 1 + cfg.select_layer
    rows = max(1, _CHUNK_ELEMENTS // (x.shape[1] * cfg.vision.intermediate_size))
    bar = _bar(n_run, 0, progress, desc=f"vision tower, {len(tiles)} calibration tiles")
    for i in range(n_run):
        layer = load_module(ckpt, lambda: VisionLayer(cfg.vision, nn.Linear), f"vision_model.encoder.layers.{i}.",
                            device, dtype)
        for s in range(0, x.shape[0], rows):
            x[s:s + rows] = layer(x[s:s + rows])
        del layer
        bar.update(1)
    bar.close()
    x = x[:, 1:, :]
    side = int(x.shape[1] ** 0.5)
    x = pixel_shuffle(x.reshape(x.shape[0], side, side, -1), cfg.downsample_ratio, cfg.ps_version)
    x = x.reshape(x.shape[0], -1, x.shape[-1])
    mlp1 = load_module(ckpt, lambda: Projector(cfg.projector_input_size, cfg.llm.hidden_size), "mlp1.", device, dtype)
    x = torch.cat([mlp1(x[s:s + 8]) for s in range(0, x.shape[0], 8)])
    out, start = [], 0
    for image in images:
        out.append(x[start:start + image.shape[0]])
        start += image.shape[0]
    return out


def load_module(ckpt: Checkpoint, make: Callable[[], nn.Module], prefix: str, device: torch.device | str = "cpu",
                dtype: torch.dtype = torch.float32) -> nn.Module:
    """`make()` built on the meta device, each parameter then read from the checkpoint tensor `prefix` + its
    name (one tensor in memory at a time besides the module itself)."""
    with torch.device("meta"):
        module = make()
    for name, _ in list(module.named_parameters()):
        value = torch.from_numpy(ckpt.read(prefix + name, np.float32)).to(device, dtype)
        owner, _, leaf = name.rpartition(".")
        (module.get_submodule(owner) if owner else module)._parameters[leaf] = nn.Parameter(value, requires_grad=False)
    return module.eval()


# --- helpers --------------------------------------------------------------------------------------------------
def _work_dirs(out: Path) -> list[Path]:
    """The unfinished runs' work directories of OUTDIR `out`: `.<name>.partial-<16 hex digits>`, matched
    exactly (never as a glob pattern: `out` may hold `*` or `[`) so no other output's work is touched."""
    prefix = f".{out.name}.partial-"
    found = []
    for entry in out.parent.iterdir():
        key = entry.name.removeprefix(prefix)
        if entry.name.startswith(prefix) and len(key) == WORK_KEY_CHARS and all(c in _HEX for c in key):
            found.append(entry)
    return found


def _layer_name(i: int) -> str:
    return f"layer-{i:05d}.safetensors"


def _hidden_name(i: int) -> str:
    return f"hidden-{i:05d}.safetensors"


def _embedding_rows(ckpt: Checkpoint, ids: np.ndarray, block: int = 4096) -> np.ndarray:
    """embed_tokens rows for `ids` (float32, shape ids.shape + [hidden]), reading only the blocks of the
    table that hold a used id."""
    name = f"{LLM}embed_tokens.weight"
    vocab, width = ckpt.tensors[name].shape
    if ids.min() < 0 or ids.max() >= vocab:
        raise ConversionError(f"{ckpt.path}: token id {int(ids.max())} is outside the embedding table ({vocab} rows)")
    unique, inverse = np.unique(ids, return_inverse=True)
    rows = np.empty((unique.size, width), dtype=np.float32)
    for start in np.unique(unique // block) * block:
        sel = (unique >= start) & (unique < start + block)
        table = ckpt.read_rows(name, int(start), int(start) + block, np.float32)
        rows[sel] = table[unique[sel] - start]
    return rows[inverse.reshape(ids.shape)]


@functools.lru_cache(maxsize=1)
def _libc() -> Any:
    return ctypes.CDLL("libc.so.6") if sys.platform.startswith("linux") else None


def _release_freed_memory() -> None:
    """Give the heap's free pages back to the OS (glibc's malloc_trim). Tensors below glibc's mmap threshold
    (up to 32 MB) are freed into the heap, where fragmentation otherwise lets the resident set creep up layer
    after layer; larger ones are unmapped on free anyway."""
    try:
        libc = _libc()
        if libc is not None:
            libc.malloc_trim(0)
    except (OSError, AttributeError):  # not glibc
        pass


class _NoBar:
    def update(self, n: int) -> None:
        pass

    def close(self) -> None:
        pass


def _bar(total: int, initial: int, progress: bool, desc: str = "AWQ layers") -> Any:
    if not progress:
        return _NoBar()
    from tqdm import tqdm

    return tqdm(total=total, initial=initial, desc=desc, unit="layer")
