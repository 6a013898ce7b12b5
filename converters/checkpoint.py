"""Open a Skywork-R1V / InternVL-chat checkpoint directory and read it lazily, one tensor at a time.

A checkpoint is config.json + safetensors (one file, or shards with model.safetensors.index.json) +
tokenizer files + optional generation_config.json. Opening reads only headers and small JSON files;
tensor data is memory-mapped and copied only when a caller asks for it.
"""
from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator

import numpy as np

from .config import R1VConfig, check_token_ids, load_config
from .errors import CheckpointError
from .safetensors_io import MappedFile, TensorInfo, bf16_to_f32, read_header

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
# Tokens the R1V families use; whichever the tokenizer holds are reported with their ids.
R1V_SPECIAL_TOKENS = (
    "<img>", "</img>", "<IMG_CONTEXT>", "<|im_start|>", "<|im_end|>", "<|endoftext|>",
    "<think>", "</think>", "<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>", "<｜User｜>", "<｜Assistant｜>",
)


@dataclass
class TokenizerFiles:
    """What the checkpoint's tokenizer files say, read without building a tokenizer."""

    tokenizer_json: Path | None
    vocab_merges: tuple[Path, Path] | None
    tokenizer_config: dict[str, Any]
    added_tokens: dict[str, int]  # content -> id, from tokenizer.json / tokenizer_config / added_tokens.json
    chat_template: str | None

    def token_id(self, token: str) -> int | None:
        return self.added_tokens.get(token)


@dataclass
class Checkpoint:
    """An opened checkpoint: config, tensor index, tokenizer facts. Use as a context manager."""

    path: Path
    config: R1VConfig
    tensors: dict[str, TensorInfo]
    tokenizer: TokenizerFiles
    generation_config: dict[str, Any]
    _maps: dict[Path, MappedFile] = field(default_factory=dict, repr=False)

    # --- tensor access -------------------------------------------------------------------------
    def raw(self, name: str) -> np.ndarray:
        """The stored values as a read-only memory-mapped view (BF16 as uint16 bit patterns).

        Zero-copy, but the pages it touches stay resident; streaming code should use `read`."""
        info = self._info(name)
        return self._mapped(info).array(info)

    def read(self, name: str, dtype: np.dtype | type | None = np.float32) -> np.ndarray:
        """A private copy of the tensor converted to `dtype` (BF16 widened exactly to float32 first);
        `dtype=None` keeps the stored type (BF16 as uint16 bits). The mapped pages are released
        afterwards, so reading tensor after tensor keeps RSS at about one tensor."""
        info = self._info(name)
        return self._copy_rows(info, 0, info.shape[0] if info.shape else 1, dtype)

    def read_rows(self, name: str, start: int, stop: int, dtype: np.dtype | type | None = np.float32) -> np.ndarray:
        """Rows [start, stop) of the tensor (along its first axis) as a private copy, like `read`; lets a
        writer stream a 1.5 GB embedding table in small blocks."""
        return self._copy_rows(self._info(name), start, stop, dtype)

    def _copy_rows(self, info: TensorInfo, start: int, stop: int, dtype: np.dtype | type | None) -> np.ndarray:
        mapped = self._mapped(info)
        view = mapped.array(info)
        if info.shape:
            stop = min(stop, info.shape[0])
            view = view[start:stop]
        if dtype is None:
            values = view.copy()
        elif info.dtype == "BF16":
            values = bf16_to_f32(view).astype(dtype, copy=False)
        else:
            values = view.astype(dtype, copy=True)
        del view
        row_bytes = info.nbytes // info.shape[0] if info.shape and info.shape[0] else info.nbytes
        mapped.release(info.start + start * row_bytes, info.start + stop * row_bytes)
        return values

    def _mapped(self, info: TensorInfo) -> MappedFile:
        mapped = self._maps.get(info.file)
        if mapped is None:
            mapped = self._maps[info.file] = MappedFile(info.file)
        return mapped

    def iter_tensors(self, prefix: str = "") -> Iterator[TensorInfo]:
        """Tensor infos in file order (sequential reads), optionally only names under `prefix`."""
        for info in sorted(self.tensors.values(), key=lambda t: (str(t.file), t.start)):
            if info.name.startswith(prefix):
                yield info

    @property
    def name(self) -> str:
        """The checkpoint directory's own name (also for a relative path such as ".")."""
        return Path(os.path.abspath(self.path)).name

    def component(self, name: str) -> str:
        return self.config.family.component_of(name)

    def _info(self, name: str) -> TensorInfo:
        try:
            return self.tensors[name]
        except KeyError:
            raise CheckpointError(f"{self.path}: no tensor named {name!r} in the checkpoint") from None

    # --- special tokens and templates ----------------------------------------------------------
    def special_tokens(self) -> dict[str, int]:
        """R1V special tokens present in the tokenizer, with their ids."""
        return {t: i for t in R1V_SPECIAL_TOKENS if (i := self.tokenizer.token_id(t)) is not None}

    @property
    def eos_token_ids(self) -> list[int]:
        """EOS ids from generation_config.json, else llm_config, else tokenizer_config's eos token."""
        for value in (self.generation_config.get("eos_token_id"), self.config.llm.eos_token_id):
            if value is not None:
                return list(value) if isinstance(value, list) else [value]
        eos = _token_content(self.tokenizer.tokenizer_config.get("eos_token"))
        found = self.tokenizer.token_id(eos) if eos else None
        return [found] if found is not None else []

    # --- lifetime ------------------------------------------------------------------------------
    def close(self) -> None:
        for mapped in self._maps.values():
            mapped.close()
        self._maps.clear()

    def __enter__(self) -> Checkpoint:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def open_checkpoint(path: str | Path, *, check_shapes: bool = True) -> Checkpoint:
    """Open checkpoint directory `path`. Raises CheckpointError naming the file and tensor/field."""
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"{path}: not a checkpoint directory")
    config = load_config(path)
    tensors = _read_tensor_index(path)
    check_layer_counts(config, tensors, path / "config.json")  # before anything sized by the config
    if check_shapes:
        _check_shapes(path, config, tensors)
    generation_path = path / "generation_config.json"
    generation_config = read_json(generation_path, optional=True)
    check_token_ids(generation_config, str(generation_path), config.llm.vocab_size)
    return Checkpoint(
        path=path,
        config=config,
        tensors=tensors,
        tokenizer=read_tokenizer_files(path),
        generation_config=generation_config,
    )


def has_weights(path: Path) -> bool:
    """Whether directory `path` holds safetensors weights (an index, one file or shards)."""
    return (path / INDEX_FILE).is_file() or any(path.glob("*.safetensors"))


def load_checked_config(path: str | Path) -> R1VConfig:
    """config.json of `path` (a directory or the file itself), checked against the tensors when the directory
    holds weights (headers only are read), so a config whose layer counts disagree with them is refused."""
    path = Path(path)
    config = load_config(path)
    if path.is_dir() and has_weights(path):
        check_layer_counts(config, _read_tensor_index(path), path / "config.json")
    return config


def check_layer_counts(config: R1VConfig, names: Iterable[str], source: Path) -> None:
    """Each stack of layers in the tensors must be numbered 0..depth-1 with the depth config.json gives."""
    for stack in config.family.layer_stacks(config):
        pattern = re.compile(re.escape(stack.prefix) + r"(\d+)\.")
        found = {int(m.group(1)) for name in names if (m := pattern.match(name))}
        held = max(found) + 1 if found else 0
        if held != stack.depth:
            raise CheckpointError(f"{source}: {stack.field} is {stack.depth} but the checkpoint's tensors hold "
                                  f"{held} layers ({stack.prefix}N.*)")
        gaps = sorted(set(range(held)) - found)
        if gaps:
            raise CheckpointError(f"{source}: {stack.field} is {stack.depth} but the checkpoint has no tensors "
                                  f"for layer {gaps[0]} ({stack.prefix}{gaps[0]}.*)")


def read_json(path: Path, optional: bool = False) -> dict[str, Any]:
    if not path.is_file():
        if optional:
            return {}
        raise CheckpointError(f"{path}: file not found")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{path}: expected a JSON object")
    return data


def _read_tensor_index(path: Path) -> dict[str, TensorInfo]:
    index_path = path / INDEX_FILE
    if index_path.is_file():
        weight_map = read_json(index_path).get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise CheckpointError(f"{index_path}: missing or empty 'weight_map'")
        shards = sorted({_shard_name(index_path, name, shard) for name, shard in weight_map.items()})
    elif (path / SINGLE_FILE).is_file():
        weight_map, shards = None, [SINGLE_FILE]
    else:
        shards = sorted(p.name for p in path.glob("*.safetensors"))
        if not shards:
            raise CheckpointError(f"{path}: no {INDEX_FILE}, {SINGLE_FILE} or *.safetensors file")
        weight_map = None
    tensors: dict[str, TensorInfo] = {}
    for shard in shards:
        shard_path = path / shard
        if not shard_path.is_file():
            raise CheckpointError(f"{index_path}: lists shard {shard!r}, which is missing from {path}")
        infos, _ = read_header(shard_path)
        for name, info in infos.items():
            if name in tensors:
                raise CheckpointError(f"{shard_path}: tensor {name!r} also appears in {tensors[name].file.name}")
            tensors[name] = info
    if weight_map is not None:
        for name, shard in weight_map.items():
            info = tensors.get(name)
            if info is None or info.file.name != shard:
                where = f"found in {info.file.name}" if info else "found in no shard"
                raise CheckpointError(f"{index_path}: tensor {name!r} is listed in {shard!r} but {where}")
        extra = sorted(set(tensors) - set(weight_map))
        if extra:
            raise CheckpointError(f"{tensors[extra[0]].file}: tensor {extra[0]!r} is not listed in {INDEX_FILE}")
    return tensors


def _shard_name(index_path: Path, tensor: str, shard: Any) -> str:
    """A weight_map entry must name a file in the checkpoint directory itself: a bare file name, so no
    absolute path and no `..`. Checked on the name, not on where the file resolves: hub snapshots are
    symlinks into ../../blobs."""
    if not isinstance(shard, str) or not shard:
        raise CheckpointError(f"{index_path}: tensor {tensor!r} maps to {shard!r}, not a shard file name")
    if shard in (".", "..") or "/" in shard or "\\" in shard:
        raise CheckpointError(f"{index_path}: tensor {tensor!r} maps to {shard!r}, which is not a file "
                              "name in the checkpoint directory; shards sit beside the index (no paths, no '..')")
    return shard


def _check_shapes(path: Path, config: R1VConfig, tensors: dict[str, TensorInfo]) -> None:
    expected = config.family.expected_shapes(config)
    for name, shape in expected.items():
        info = tensors.get(name)
        if info is None:
            raise CheckpointError(f"{path}: tensor {name!r} required by config.json is missing")
        if info.shape != shape:
            raise CheckpointError(
                f"{info.file}: tensor {name!r} has shape {list(info.shape)} "
                f"but config.json implies {list(shape)}"
            )
    for name, info in tensors.items():
        if info.dtype not in ("BF16", "F16", "F32"):
            raise CheckpointError(f"{info.file}: tensor {name!r} has dtype {info.dtype}; expected BF16, F16 or F32")


def _token_content(token: Any) -> str | None:
    """tokenizer_config stores special tokens as strings or as {"content": ...} objects."""
    if isinstance(token, dict):
        token = token.get("content")
    return token if isinstance(token, str) else None


def token_id(value: Any, where: Path | str, token: str) -> int:
    """`value` as a token id: a non-negative integer, else an error naming the file and the token."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise CheckpointError(f"{where}: token {token!r} has id {value!r}; a token id is a non-negative integer")
    return value


def added_token_entries(path: Path, tokenizer_json: dict[str, Any], tokenizer_config: dict[str, Any]
                        ) -> list[tuple[str, int, bool]]:
    """(content, id, special) of every added token: tokenizer.json's (its parsed `tokenizer_json`), then
    tokenizer_config.json's added_tokens_decoder, then added_tokens.json (no special flag); readers let the
    first source that names a token win. Each id is checked, naming the file and the token."""
    entries: list[tuple[str, int, bool]] = []
    where = path / "tokenizer.json"
    config_path = path / "tokenizer_config.json"
    listed, decoder = tokenizer_json.get("added_tokens") or [], tokenizer_config.get("added_tokens_decoder") or {}
    if not isinstance(listed, list):
        raise CheckpointError(f"{where}: added_tokens must be a list, got {type(listed).__name__}")
    if not isinstance(decoder, dict):
        raise CheckpointError(f"{config_path}: added_tokens_decoder must be an object of id -> token, "
                              f"got {type(decoder).__name__}")
    for entry in listed:
        content = _entry_content(entry, where)
        entries.append((content, token_id(entry.get("id"), where, content), bool(entry.get("special", False))))
    for key, entry in decoder.items():
        content = _entry_content(entry, config_path)
        key = int(key) if key.isdecimal() else key  # JSON object keys are strings
        entries.append((content, token_id(key, config_path, content), bool(entry.get("special", False))))
    added_path = path / "added_tokens.json"
    for content, value in read_json(added_path, optional=True).items():
        entries.append((content, token_id(value, added_path, content), False))
    return entries


def _entry_content(entry: Any, where: Path) -> str:
    content = entry.get("content") if isinstance(entry, dict) else None
    if not isinstance(content, str):
        raise CheckpointError(f"{where}: added token entry {entry!r} has no string 'content'")
    return content


def read_tokenizer_files(path: Path) -> TokenizerFiles:
    """Find the tokenizer (tokenizer.json, or vocab.json + merges.txt) and its added tokens and template."""
    tokenizer_json = path / "tokenizer.json"
    vocab, merges = path / "vocab.json", path / "merges.txt"
    if not tokenizer_json.is_file() and not (vocab.is_file() and merges.is_file()):
        raise CheckpointError(f"{path}: missing tokenizer: neither tokenizer.json nor vocab.json + merges.txt")
    tokenizer_config = read_json(path / "tokenizer_config.json", optional=True)
    data = read_json(tokenizer_json) if tokenizer_json.is_file() else {}
    if tokenizer_json.is_file() and not isinstance(data.get("model"), dict):
        raise CheckpointError(f"{tokenizer_json}: missing field 'model'")
    added: dict[str, int] = {}
    for content, value, _ in added_token_entries(path, data, tokenizer_config):
        added.setdefault(content, value)
    template = tokenizer_config.get("chat_template")
    jinja_file = path / "chat_template.jinja"
    if template is None and jinja_file.is_file():
        template = jinja_file.read_text(encoding="utf-8")
    if isinstance(template, list):  # [{"name": "default", "template": ...}, ...]
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = named.get("default") or next(iter(named.values()), None)
    return TokenizerFiles(
        tokenizer_json=tokenizer_json if tokenizer_json.is_file() else None,
        vocab_merges=(vocab, merges) if vocab.is_file() and merges.is_file() else None,
        tokenizer_config=tokenizer_config,
        added_tokens=added,
        chat_template=template,
    )
