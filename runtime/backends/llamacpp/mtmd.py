"""A thin, typed wrapper over libmtmd (llama.cpp's multimodal library) through llama-cpp-python's ctypes
bindings: open an mmproj beside a text model, tokenize a prompt with images, read how libmtmd tiled each
image, and run the vision tower + projector to get the image embeddings as numpy arrays.

What libmtmd does with an InternVL mmproj (llama.cpp as vendored by llama-cpp-python 0.3.36):

* it wraps every image in ``<img>`` ... ``</img>`` itself (text tokens around the image chunks), so a prompt
  carries only the media marker (`MtmdContext.marker`) where the image goes;
* it tiles the image its own way (llava-uhd): an image no larger than 448 in both sides becomes one 448x448
  tile; a larger one is fitted into the candidate grid (cols x rows, min_tiles <= cols*rows <= max_tiles) that
  keeps the most of its resolution, then the least wasted area - aspect-preserving resize with black padding
  (bicubic), cut in row order, plus a 448x448 overview of the whole image (stretched, bicubic) *after* the
  tiles. This is not InternVL's ``dynamic_preprocess`` (closest aspect ratio, stretched); see
  `TileLayout` and the tiling test for where the two disagree;
* each tile is one image chunk of ``tokens_per_tile`` tokens (256 for a 448 ViT with downsample 0.5);
* its InternVL graph appends the class token after the patches (llama.cpp #25814), so our files store the
  position rows patches-then-class; a llama.cpp with the fix (PR #25844) wants the checkpoint's order. An
  `MtmdContext` asks the library which it wants (`library_position_order`: a probe run once per library
  build, see `position_order`) and, where the file's order differs, opens a copy with the rows moved.

libmtmd does not expose the grid it chose; `TileLayout.grid` is read from its debug log line ("adding N
slices (R rows x C cols)"), which this module routes into Python logging (logger ``r1v.mtmd``) once the first
context is opened. No torch here: this module is on the GGUF side of the project.
"""
from __future__ import annotations

import ctypes
import logging
import os
import re
import threading
import weakref
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Literal, Sequence, Union

import numpy as np

import llama_cpp
from llama_cpp import llama_cpp as _ll
from llama_cpp import mtmd_cpp as _mt
from llama_cpp._logger import set_verbose as _set_llama_verbose

from . import position_order as _order
from .llama_params import model_params

__all__ = [
    "Chunk", "ImageEmbedding", "ImageSpan", "MtmdContext", "MtmdError", "TextModel", "TileLayout",
    "TokenizedPrompt", "library_position_order", "rgb_array",
]

log = logging.getLogger("r1v.mtmd")

ChunkKind = Literal["text", "image", "audio"]
_CHUNK_KINDS: dict[int, ChunkKind] = {
    _mt.MTMD_INPUT_CHUNK_TYPE_TEXT: "text",
    _mt.MTMD_INPUT_CHUNK_TYPE_IMAGE: "image",
    _mt.MTMD_INPUT_CHUNK_TYPE_AUDIO: "audio",
}
_TOKENIZE_ERRORS = {1: "the number of images does not match the number of media markers in the prompt",
                    2: "libmtmd could not preprocess an image"}


class MtmdError(RuntimeError):
    """libmtmd refused or failed an operation (loading, tokenizing, encoding)."""


# --- results ------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class TileLayout:
    """How libmtmd cut one image: ``grid`` (cols, rows) of tiles, (1, 1) when it did not slice the image, None
    if its log did not say; ``thumbnail`` when an overview of the whole image follows the tiles. ``n_tiles``
    counts the overview, like `r1v.runtime.image.PreparedImage.num_tiles`."""

    grid: tuple[int, int] | None
    n_tiles: int
    thumbnail: bool
    tokens_per_tile: tuple[int, ...]

    @property
    def n_tokens(self) -> int:
        return sum(self.tokens_per_tile)


@dataclass(frozen=True)
class Chunk:
    """One chunk of a tokenized prompt: text (with its token ids) or one media tile."""

    index: int
    kind: ChunkKind
    n_tokens: int
    n_pos: int
    tokens: tuple[int, ...] = ()  # text chunks only
    media_id: str | None = None  # media chunks only: the id of the image it belongs to


@dataclass(frozen=True)
class ImageSpan:
    """One image of a prompt: the indices of its chunks (tiles in row order, then the overview) and layout."""

    media_id: str
    chunks: tuple[int, ...]
    layout: TileLayout


@dataclass(frozen=True)
class ImageEmbedding:
    """The projector's output for one image: ``embeddings`` [n_tiles, tokens_per_tile, n_embd] float32, tiles
    in libmtmd's order (row-major tiles, then the overview)."""

    layout: TileLayout
    embeddings: np.ndarray


# --- logging: libmtmd's log goes to Python logging, and tokenize() reads the tile grid from it -------------

# ggml_log_level: NONE 0, DEBUG 1, INFO 2, WARN 3, ERROR 4, CONT 5 (continues the previous message)
_LOG_LEVELS = {0: logging.CRITICAL, 1: logging.DEBUG, 2: logging.INFO, 3: logging.WARNING, 4: logging.ERROR}
_LOG_CONT = 5
_SLICES_RE = re.compile(r"adding (\d+) slices \((\d+) rows x (\d+) cols\)")
_capture_lock = threading.RLock()
_capture: list[str] | None = None
_last_level = logging.DEBUG


@_ll.llama_log_callback
def _log_callback(level: int, text: bytes, user_data: ctypes.c_void_p) -> None:
    global _last_level
    message = text.decode("utf-8", "replace") if text else ""
    if _capture is not None:
        _capture.append(message)
    if level != _LOG_CONT:
        _last_level = _LOG_LEVELS.get(level, logging.DEBUG)
    if message.strip():
        log.log(_last_level, message.rstrip("\n"))


_log_installed = False


def _install_log() -> None:
    global _log_installed
    if not _log_installed:
        _mt.mtmd_log_set(_log_callback, None)
        _log_installed = True


@contextmanager
def _capturing() -> Iterator[list[str]]:
    global _capture
    with _capture_lock:
        _capture = lines = []
        try:
            yield lines
        finally:
            _capture = None


# --- text model ---------------------------------------------------------------------------------------------

_backend_ready = False


def _backend_init() -> None:
    global _backend_ready
    if not _backend_ready:
        _ll.llama_backend_init()
        _backend_ready = True


class TextModel:
    """A llama.cpp text model loaded from a GGUF file, owned by this object (``close()`` frees it).

    libmtmd needs one beside the mmproj: for its vocabulary (the ``<img>`` tokens and the prompt text) and
    its embedding width. ``vocab_only=True`` loads no weights, enough to tokenize and encode images.
    """

    def __init__(self, path: str | os.PathLike[str], *, vocab_only: bool = False, n_gpu_layers: int = 0,
                 extra_buffers: bool | None = None, verbose: bool = False):
        path = Path(path)
        if not path.is_file():
            raise MtmdError(f"{path}: text model file not found")
        _backend_init()
        _set_llama_verbose(verbose)  # as llama_cpp.Llama does: quiet llama.cpp's loader
        # the AMX guard (llama_params): no AMX weight buffers where they would crash, unless asked for
        params = model_params(vocab_only=vocab_only, n_gpu_layers=n_gpu_layers, extra_buffers=extra_buffers)
        model = _ll.llama_model_load_from_file(str(path).encode(), params)
        if not model:
            raise MtmdError(f"{path}: llama.cpp could not load the text model")
        self.path = path
        self.model = model
        self._finalizer = weakref.finalize(self, _ll.llama_model_free, model)

    @property
    def n_embd(self) -> int:
        return int(_ll.llama_model_n_embd_inp(self.model))

    def close(self) -> None:
        self._finalizer()

    def __enter__(self) -> TextModel:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _model_pointer(text_model: Any) -> Any:
    if isinstance(text_model, TextModel):
        if not text_model._finalizer.alive:
            raise MtmdError("the text model is closed")
        return text_model.model
    if isinstance(text_model, llama_cpp.Llama):
        return text_model.model
    return text_model  # a raw llama_model_p


# --- images -------------------------------------------------------------------------------------------------

ImageLike = Union[np.ndarray, Any]  # an [H, W, 3] uint8 array, or a PIL image


def rgb_array(image: ImageLike) -> np.ndarray:
    """A C-contiguous [H, W, 3] uint8 array from an RGB array or a PIL image (converted to RGB)."""
    if not isinstance(image, np.ndarray):
        if not hasattr(image, "convert"):
            raise TypeError(f"expected an [H, W, 3] uint8 array or a PIL image, got {type(image).__name__}")
        image = np.asarray(image.convert("RGB"))
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise ValueError(f"expected an [H, W, 3] uint8 RGB array, got shape {image.shape} dtype {image.dtype}")
    if image.shape[0] < 1 or image.shape[1] < 1:
        raise ValueError(f"empty image {image.shape[1]}x{image.shape[0]}")
    return np.ascontiguousarray(image)


# --- tokenized prompt ---------------------------------------------------------------------------------------

class TokenizedPrompt:
    """The chunks libmtmd made of one prompt. Owns native memory: use as a context manager or ``close()``."""

    def __init__(self, handle: Any, chunks: list[Chunk], images: list[ImageSpan]):
        self._handle = handle
        self._finalizer = weakref.finalize(self, _mt.mtmd_input_chunks_free, handle)
        self.chunks = chunks
        self.images = images

    @property
    def n_tokens(self) -> int:
        return sum(c.n_tokens for c in self.chunks)

    @property
    def n_pos(self) -> int:
        return sum(c.n_pos for c in self.chunks)

    def native_chunk(self, index: int) -> Any:
        """The mtmd_input_chunk pointer of chunk `index`, valid while this object is open."""
        if not self._finalizer.alive:
            raise MtmdError("the tokenized prompt is closed")
        if not 0 <= index < len(self.chunks):
            raise IndexError(f"chunk {index} out of range (0..{len(self.chunks) - 1})")
        return _mt.mtmd_input_chunks_get(self._handle, index)

    def close(self) -> None:
        self._finalizer()

    def __enter__(self) -> TokenizedPrompt:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _read_chunks(handle: Any) -> list[Chunk]:
    chunks: list[Chunk] = []
    for i in range(_mt.mtmd_input_chunks_size(handle)):
        ptr = _mt.mtmd_input_chunks_get(handle, i)
        kind = _CHUNK_KINDS.get(_mt.mtmd_input_chunk_get_type(ptr))
        if kind is None:
            raise MtmdError(f"chunk {i} has an unknown type {_mt.mtmd_input_chunk_get_type(ptr)}")
        n_tokens = int(_mt.mtmd_input_chunk_get_n_tokens(ptr))
        n_pos = int(_mt.mtmd_input_chunk_get_n_pos(ptr))
        if kind == "text":
            n = ctypes.c_size_t(0)
            tokens_ptr = _mt.mtmd_input_chunk_get_tokens_text(ptr, ctypes.byref(n))
            tokens = tuple(tokens_ptr[j] for j in range(n.value)) if n.value else ()
            chunks.append(Chunk(i, kind, n_tokens, n_pos, tokens=tokens))
        else:
            media_id = _mt.mtmd_input_chunk_get_id(ptr)
            chunks.append(Chunk(i, kind, n_tokens, n_pos, media_id=media_id.decode() if media_id else None))
    return chunks


def _group_images(chunks: list[Chunk], ids: list[str], log_lines: list[str]) -> list[ImageSpan]:
    """One ImageSpan per bitmap id, in prompt order; grids from libmtmd's "adding N slices" log lines, which
    it writes once per sliced image, in order."""
    grids = [(int(m.group(3)), int(m.group(2))) for line in log_lines if (m := _SLICES_RE.search(line))]
    sliced = 0
    spans: list[ImageSpan] = []
    for media_id in ids:
        members = [c for c in chunks if c.kind == "image" and c.media_id == media_id]
        if not members:
            raise MtmdError(f"libmtmd produced no chunk for image {media_id!r}")
        tokens = tuple(c.n_tokens for c in members)
        if len(members) == 1:  # not sliced: the one chunk is the whole image
            layout = TileLayout(grid=(1, 1), n_tiles=1, thumbnail=False, tokens_per_tile=tokens)
        else:
            grid = grids[sliced] if sliced < len(grids) else None
            sliced += 1
            if grid is not None and grid[0] * grid[1] != len(members) - 1:
                grid = None  # the log does not describe these chunks: say unknown rather than guess
            layout = TileLayout(grid=grid, n_tiles=len(members), thumbnail=True, tokens_per_tile=tokens)
        spans.append(ImageSpan(media_id, tuple(c.index for c in members), layout))
    return spans


def _projection_dim(mmproj: Path) -> int:
    import gguf  # the GGUF side's own dependency; only its header reader is used

    field = gguf.GGUFReader(mmproj).get_field(gguf.Keys.ClipVision.PROJECTION_DIM)
    if field is None:
        raise MtmdError(f"{mmproj}: no clip.vision.projection_dim; open it with a full (not vocab-only) text model")
    return int(field.contents())


# --- the context --------------------------------------------------------------------------------------------

class MtmdContext:
    """An mmproj opened with libmtmd beside a text model (a `TextModel`, a `llama_cpp.Llama`, or a raw
    llama_model pointer, which must outlive this context). ``close()`` frees the native context."""

    def __init__(self, mmproj: str | os.PathLike[str], text_model: TextModel | Any, *,
                 n_threads: int | None = None, use_gpu: bool = True, warmup: bool = False,
                 media_marker: str | None = None, match_position_order: bool = True):
        """`match_position_order`: give libmtmd an InternVL file's position rows in the order this library
        build wants (`library_position_order`), through a cached copy where the file's order differs;
        `loaded_path` says which file libmtmd opened."""
        mmproj = Path(mmproj)
        if not mmproj.is_file():
            raise MtmdError(f"{mmproj}: mmproj file not found")
        _backend_init()
        _install_log()
        model = _model_pointer(text_model)
        self.loaded_path = _matching_file(mmproj, model) if match_position_order else mmproj
        params = _mt.mtmd_context_params_default()
        params.use_gpu = use_gpu
        params.n_threads = n_threads or max(1, os.cpu_count() or 1)
        params.print_timings = False
        params.warmup = warmup
        marker = (media_marker or _mt.mtmd_default_marker().decode()).encode()
        params.media_marker = marker
        with _capturing() as lines:
            ctx = _mt.mtmd_init_from_file(str(self.loaded_path).encode(), model, params)
        if not ctx:
            errors = " ".join(line.strip() for line in lines
                              if any(word in line.lower() for word in ("error", "failed", "mismatch")))
            raise MtmdError(f"{mmproj}: libmtmd could not load the mmproj{': ' + errors if errors else ''}")
        self.path = mmproj
        self._ctx = ctx
        self._text_model = text_model  # keep it alive as long as the context
        self._marker = marker
        # A vocab-only text model reports width 0; the mmproj then says how wide its output is.
        self._n_embd = int(_ll.llama_model_n_embd_inp(model)) or _projection_dim(mmproj)
        self._finalizer = weakref.finalize(self, _mt.mtmd_free, ctx)
        if not _mt.mtmd_support_vision(ctx):
            self.close()
            raise MtmdError(f"{mmproj}: the mmproj has no vision encoder")

    # --- facts ------------------------------------------------------------------------------------------
    @property
    def marker(self) -> str:
        """The text that stands for one image in a prompt."""
        return self._marker.decode()

    @property
    def n_embd(self) -> int:
        """Width of the projector's output (= the text model's input embedding width)."""
        return self._n_embd

    # --- tokenizing -------------------------------------------------------------------------------------
    def tokenize(self, prompt: str, images: Sequence[ImageLike] = (), *, add_special: bool = False,
                 parse_special: bool = True) -> TokenizedPrompt:
        """Split `prompt` into text and image chunks; each marker in it takes the next image, in order."""
        arrays = [rgb_array(image) for image in images]
        return self._tokenize(prompt, [(a.shape[1], a.shape[0], a) for a in arrays], add_special, parse_special)

    def layout_for_size(self, width: int, height: int) -> TileLayout:
        """How libmtmd would tile a `width` x `height` image, without any pixels (a placeholder bitmap)."""
        with self._tokenize(self.marker, [(width, height, None)], False, False) as tokenized:
            return tokenized.images[0].layout

    def _tokenize(self, prompt: str, bitmaps: list[tuple[int, int, np.ndarray | None]], add_special: bool,
                  parse_special: bool) -> TokenizedPrompt:
        ctx = self._live()
        n_markers = prompt.count(self.marker)
        if n_markers != len(bitmaps):
            raise MtmdError(f"the prompt has {n_markers} media markers ({self.marker!r}) but {len(bitmaps)} images")
        natives, ids = [], []
        try:
            for i, (width, height, data) in enumerate(bitmaps):
                if width < 1 or height < 1:
                    raise ValueError(f"image {i}: empty size {width}x{height}")
                pointer = None if data is None else data.ctypes.data_as(ctypes.POINTER(ctypes.c_uint8))
                bitmap = _mt.mtmd_bitmap_init(width, height, pointer)  # copies the pixels
                if not bitmap:
                    raise MtmdError(f"image {i}: libmtmd could not make a {width}x{height} bitmap")
                natives.append(bitmap)
                ids.append(f"image-{i}")
                _mt.mtmd_bitmap_set_id(bitmap, ids[-1].encode())
            text = prompt.encode()
            inp = _mt.mtmd_input_text(text, len(text), add_special, parse_special)
            handle = _mt.mtmd_input_chunks_init()
            if not handle:
                raise MtmdError("libmtmd could not allocate input chunks")
            array = (_mt.mtmd_bitmap_p_ctypes * max(1, len(natives)))(*natives)
            try:
                with _capturing() as lines:
                    rc = _mt.mtmd_tokenize(ctx, handle, ctypes.byref(inp), array, len(natives))
                if rc != 0:
                    raise MtmdError(f"mtmd_tokenize failed ({rc}): {_TOKENIZE_ERRORS.get(rc, 'unknown error')}")
                chunks = _read_chunks(handle)
                images = _group_images(chunks, ids, lines)
            except BaseException:
                _mt.mtmd_input_chunks_free(handle)
                raise
            return TokenizedPrompt(handle, chunks, images)
        finally:
            for bitmap in natives:
                _mt.mtmd_bitmap_free(bitmap)

    # --- encoding ---------------------------------------------------------------------------------------
    def encode_chunk(self, prompt: TokenizedPrompt, index: int) -> np.ndarray:
        """Run the vision tower + projector on image chunk `index`: float32 [n_tokens, n_embd] (a copy)."""
        ctx = self._live()
        chunk = prompt.chunks[index]
        if chunk.kind != "image":
            raise MtmdError(f"chunk {index} is a {chunk.kind} chunk, not an image")
        rc = _mt.mtmd_encode_chunk(ctx, prompt.native_chunk(index))
        if rc != 0:
            raise MtmdError(f"mtmd_encode_chunk failed ({rc}) on chunk {index}")
        out = _mt.mtmd_get_output_embd(ctx)
        if not out:
            raise MtmdError(f"libmtmd returned no embeddings for chunk {index}")
        values = np.ctypeslib.as_array(out, shape=(chunk.n_tokens * self.n_embd,))
        return values.reshape(chunk.n_tokens, self.n_embd).copy()

    def eval_image_chunk(self, prompt: TokenizedPrompt, index: int, llama_ctx: Any, n_past: int, *,
                         seq_id: int = 0, n_batch: int = 512, logits_last: bool = False) -> int:
        """Encode image chunk `index` and decode its embeddings into `llama_ctx` (a llama_context pointer)
        at position `n_past`; returns the position after it."""
        ctx = self._live()
        if prompt.chunks[index].kind != "image":
            raise MtmdError(f"chunk {index} is a {prompt.chunks[index].kind} chunk, not an image")
        new_n_past = _ll.llama_pos(0)
        rc = _mt.mtmd_helper_eval_chunk_single(ctx, llama_ctx, prompt.native_chunk(index), _ll.llama_pos(n_past),
                                               _ll.llama_seq_id(seq_id), n_batch, logits_last,
                                               ctypes.byref(new_n_past))
        if rc != 0:
            raise MtmdError(f"mtmd_helper_eval_chunk_single failed ({rc}) on chunk {index}")
        return int(new_n_past.value)

    def eval_into_llama(self, llama: Any, prompt: TokenizedPrompt) -> int:
        """Evaluate a whole tokenized prompt into a `llama_cpp.Llama` after its current tokens (text through
        `Llama.eval`, images through libmtmd), as llama-cpp-python's own multimodal chat handler does: the
        plain llama-cpp-python baseline of tests and benchmarks. Returns the new `llama.n_tokens`."""
        for chunk in prompt.chunks:
            if chunk.kind == "text":
                llama.eval(list(chunk.tokens))
            else:
                llama.n_tokens = self.eval_image_chunk(prompt, chunk.index, llama.ctx, llama.n_tokens,
                                                       n_batch=llama.n_batch)
        return llama.n_tokens

    def embed_image(self, image: ImageLike) -> ImageEmbedding:
        """Tile one image as libmtmd does and return its projector output per tile."""
        with self.tokenize(self.marker, [image]) as tokenized:
            span = tokenized.images[0]
            tiles = [self.encode_chunk(tokenized, i) for i in span.chunks]
        return ImageEmbedding(span.layout, np.stack(tiles))

    # --- lifetime ---------------------------------------------------------------------------------------
    def _live(self) -> Any:
        if not self._finalizer.alive:
            raise MtmdError("the mtmd context is closed")
        return self._ctx

    def close(self) -> None:
        self._finalizer()

    def __enter__(self) -> MtmdContext:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# --- the class token's place (llama.cpp #25814) -------------------------------------------------------------

_LIBRARY_ORDER: dict[str, str] = {}


def _library_key() -> str:
    import llama_cpp as package

    return _order.library_key([_ll._lib._name, _mt._libmtmd._name], package.__version__)


def library_position_order(text_model: TextModel | Any, *, refresh: bool = False) -> str:
    """The position-row order this llama.cpp build's InternVL graph wants ("patches,cls" while it appends the
    class token after the patches, "cls,patches" once it puts it first): found by encoding one tile of the
    `position_order` probe mmproj beside `text_model` (any loaded text model: only its width is used), once
    per library build (kept in memory and on disk; `refresh` probes again)."""
    key = _library_key()
    found = None if refresh else (_LIBRARY_ORDER.get(key) or _order.stored_order(key))
    if found is None:
        found = probe_position_order(text_model).order
        _order.store_order(key, found)
    _LIBRARY_ORDER[key] = found
    return found


def probe_position_order(text_model: TextModel | Any) -> _order.ProbeResult:
    """Run the probe (no cache): encode a black tile with the probe mmproj and read which tokens came out."""
    import tempfile

    model = _model_pointer(text_model)
    n_embd = int(_ll.llama_model_n_embd_inp(model)) or 8  # a vocab-only model reports 0: any width will do
    with tempfile.TemporaryDirectory(prefix="r1v-mtmd-probe-") as tmp:
        probe = _order.write_probe_mmproj(Path(tmp) / "probe-mmproj.gguf", n_embd)
        with MtmdContext(probe, text_model, n_threads=1, use_gpu=False, match_position_order=False) as ctx:
            size = _order.PROBE_IMAGE_SIZE
            embedding = ctx.embed_image(np.zeros((size, size, 3), np.uint8))
    if embedding.embeddings.shape[0] != 1:
        raise MtmdError(f"the position-order probe's {size}-pixel image became {embedding.embeddings.shape[0]} tiles")
    try:
        result = _order.order_from_probe(embedding.embeddings[0])
    except ValueError as e:
        raise MtmdError(str(e)) from None
    log.debug("libmtmd position-order probe: tokens %s live -> %s", result.live_tokens, result.order)
    return result


def _matching_file(mmproj: Path, model: Any) -> Path:
    """`mmproj`, or a cached copy of it with the position rows in the order this library wants."""
    import gguf

    reader = gguf.GGUFReader(mmproj)
    projector = reader.get_field(gguf.Keys.Clip.PROJECTOR_TYPE)
    if projector is None or projector.contents() != "internvl":
        return mmproj
    try:
        have = _order.file_order(mmproj)
    except ValueError as e:
        raise MtmdError(str(e)) from None
    want = library_position_order(model)
    if have == want:
        return mmproj
    log.info("%s: position rows are %s, this llama.cpp wants %s: using a reordered copy", mmproj, have, want)
    return _order.reordered_mmproj(mmproj, want)
