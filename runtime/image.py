"""Image preprocessing for InternVL-chat / Skywork-R1V models (PIL + numpy only).

The pipeline is InternVL's ``load_image``/``dynamic_preprocess``: decode to RGB, pick a tile grid
whose aspect ratio is closest to the image's, resize bicubically to ``cols*448 x rows*448``, cut
448-pixel tiles in row order, append a 448x448 thumbnail of the whole image when there is more
than one tile, then ``ToTensor`` + ImageNet ``Normalize``.  The result is a float32 array
``[num_tiles, 3, 448, 448]`` that the torch backend turns into a tensor and the GGUF backend hands
to libmtmd, which is why this module must not import torch.

Where we knowingly differ from upstream's ``Image.open(f).convert('RGB')``:

* transparent pixels are composited on white (upstream keeps whatever colour the transparent
  pixels happen to store, often black);
* 16-bit greyscale is scaled down to 8 bits (Pillow's ``convert`` clips it, so upstream turns
  most 16-bit images white);
* oversized images are refused from their header before any pixel is decoded.

Tiling, resizing and normalisation are bit-for-bit upstream's.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import functools
import io
import os
import re
import urllib.parse
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Iterator, Union

import numpy as np
from PIL import Image

from r1v.converters.config import IMAGENET_MEAN, IMAGENET_STD  # the model's pixel normalization (converters own it)

__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "ImageError",
    "ImageSource",
    "PreparedImage",
    "TilingConfig",
    "choose_grid",
    "image_size",
    "load_image",
    "normalize",
    "prepare_image",
    "tile_image",
]

ImageSource = Union[str, os.PathLike, bytes, bytearray, memoryview, Image.Image, BinaryIO]


class ImageError(ValueError):
    """An image could not be used: unreadable, undecodable, or larger than allowed."""


@dataclass(frozen=True)
class TilingConfig:
    """How an image is cut into ViT tiles (defaults: InternVL / Skywork-R1V config.json).

    ``max_pixels`` is the decompression-bomb limit: images whose header declares more pixels are
    refused before decoding.  Pillow's own ceiling (``2 * PIL.Image.MAX_IMAGE_PIXELS``) still
    applies on top of it; raise that too if you really need bigger images.
    """

    image_size: int = 448
    min_tiles: int = 1
    max_tiles: int = 12
    use_thumbnail: bool = True
    max_pixels: int = 89_478_485  # Pillow's default MAX_IMAGE_PIXELS

    def __post_init__(self) -> None:
        if self.image_size < 1:
            raise ValueError(f"image_size must be >= 1, got {self.image_size}")
        if not 1 <= self.min_tiles <= self.max_tiles:
            raise ValueError(
                f"need 1 <= min_tiles <= max_tiles, got min_tiles={self.min_tiles}, "
                f"max_tiles={self.max_tiles}"
            )
        if self.max_pixels < 1:
            raise ValueError(f"max_pixels must be >= 1, got {self.max_pixels}")


@dataclass
class PreparedImage:
    """Model-ready pixels of one image.

    ``pixel_values`` is float32 ``[num_tiles, 3, S, S]``; ``grid`` is (columns, rows) of the tile
    grid; ``num_tiles`` counts the thumbnail too (it is what the prompt needs: 256 tokens per tile).
    """

    pixel_values: np.ndarray
    grid: tuple[int, int]
    num_tiles: int


# --------------------------------------------------------------------------------------------
# Grid choice
# --------------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=64)
def _candidate_grids(min_tiles: int, max_tiles: int) -> tuple[tuple[int, int], ...]:
    """Upstream's ``target_ratios``: every (cols, rows) with min <= cols*rows <= max, by area.

    Built exactly as upstream does - the same generator into a ``set``, then a *stable* sort by
    area - because the order of equal-area grids is the set's iteration order, and that order can
    decide the result (see ``choose_grid``).  It is not random: the hash of a tuple of ints is not
    salted by PYTHONHASHSEED, so on a given interpreter the set's layout is a fixed function of
    the insertion sequence.  It is, however, not a simple rule (neither "by cols" nor "by rows");
    reproducing it by construction is the only faithful way.
    """
    grids = set(
        (i, j)
        for n in range(min_tiles, max_tiles + 1)
        for i in range(1, n + 1)
        for j in range(1, n + 1)
        if i * j <= max_tiles and i * j >= min_tiles
    )
    return tuple(sorted(grids, key=lambda g: g[0] * g[1]))


def choose_grid(width: int, height: int, cfg: TilingConfig = TilingConfig()) -> tuple[int, int]:
    """(columns, rows) of InternVL's tile grid for a ``width`` x ``height`` image.

    Upstream's ``find_closest_aspect_ratio``: walk the candidates in area order and keep the one
    whose cols/rows is closest to width/height.  On an exact tie (same float difference) the later,
    larger candidate replaces the current one only when the image has more than half the pixels
    of that grid.  Ties happen for equal ratios (1x1, 2x2, 3x3 for a square image) and, when
    ``min_tiles > 1`` leaves gaps between ratios, between equal-area grids that straddle the
    image's ratio symmetrically; only the latter depend on the set order kept above.
    """
    if width < 1 or height < 1:
        raise ValueError(f"image size must be positive, got {width}x{height}")
    aspect_ratio = width / height
    area = width * height
    best_diff = float("inf")
    best = (1, 1)
    for cols, rows in _candidate_grids(cfg.min_tiles, cfg.max_tiles):
        diff = abs(aspect_ratio - cols / rows)
        if diff < best_diff:
            best_diff = diff
            best = (cols, rows)
        elif diff == best_diff and area > 0.5 * cfg.image_size * cfg.image_size * cols * rows:
            best = (cols, rows)
    return best


def image_tiles(width: int, height: int, cfg: TilingConfig) -> int:
    """Tiles InternVL's tiling gives a width x height image (the thumbnail included)."""
    cols, rows = choose_grid(width, height, cfg)
    return cols * rows + int(cfg.use_thumbnail and cols * rows != 1)


# --------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------

_PIL_BOMB_PIXELS = re.compile(r"\((\d+) pixels\)")


def _short(text: str, limit: int = 80) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _decode_data_url(url: str) -> tuple[str, bytes]:
    """(display name, payload bytes) of a ``data:[<mime>][;base64],<data>`` URL."""
    header, sep, payload = url.partition(",")
    params = [p.strip() for p in header[len("data:") :].split(";")]
    mime = params[0] or "text/plain"
    name = f"data URL ({_short(mime, 40)}, {len(url)} chars)"
    if not sep:
        raise ImageError(f"{name}: malformed data URL (no ',' before the payload)")
    if "base64" in (p.lower() for p in params[1:]):
        # Clients wrap long base64 lines, percent-encode '+' and '/', or drop the padding.
        text = "".join(urllib.parse.unquote(payload).split())
        text += "=" * (-len(text) % 4)
        try:
            return name, base64.b64decode(text, validate=True)
        except (binascii.Error, ValueError) as e:
            raise ImageError(f"{name}: invalid base64 payload: {e}") from e
    return name, urllib.parse.unquote_to_bytes(payload)


def _open_source(source: ImageSource) -> tuple[str, BinaryIO]:
    """(display name, readable binary stream) for anything but a PIL image."""
    if isinstance(source, (bytes, bytearray, memoryview)):
        data = bytes(source)
        return f"<{len(data)} bytes>", io.BytesIO(data)
    if isinstance(source, str) and source[:5].lower() == "data:":
        name, data = _decode_data_url(source)
        return name, io.BytesIO(data)
    if isinstance(source, str) and source.split("://", 1)[0].lower() in ("http", "https", "ftp"):
        raise ImageError(f"{_short(source)}: remote URLs are not fetched; download the file first")
    if isinstance(source, (str, os.PathLike)):
        path = Path(source)
        try:
            return str(path), open(path, "rb")
        except OSError as e:
            raise ImageError(f"{path}: cannot read image file: {e.strerror or e}") from e
    if hasattr(source, "read"):
        return str(getattr(source, "name", None) or f"<{type(source).__name__}>"), source
    raise ImageError(f"unsupported image source type {type(source).__name__}")


def _check_pixels(size: tuple[int, int], cfg: TilingConfig, name: str) -> None:
    width, height = size
    if width < 1 or height < 1:
        raise ImageError(f"{name}: image has an empty size {width}x{height}")
    if width * height > cfg.max_pixels:
        raise ImageError(
            f"{name}: image is {width}x{height} = {width * height} pixels, more than the limit "
            f"of {cfg.max_pixels} pixels (TilingConfig.max_pixels); refused before decoding"
        )


_ALPHA_MODES = frozenset({"RGBA", "RGBa", "LA", "La", "PA"})
_HIGH_BIT_GREY_MODES = frozenset({"I", "I;16", "I;16L", "I;16B", "I;16N"})


def _has_alpha(im: Image.Image) -> bool:
    if im.mode in _ALPHA_MODES or "transparency" in im.info:
        return True
    # A palette may carry alpha itself (e.g. converted from RGBA without a tRNS entry).
    return im.mode == "P" and im.palette is not None and im.palette.mode == "RGBA"


def _to_rgb(im: Image.Image) -> Image.Image:
    """A new RGB image: alpha composited on white, 16-bit grey scaled to 8 bits."""
    if im.mode in _HIGH_BIT_GREY_MODES:
        # Pillow's convert() clips these to 0..255; keep the high byte instead, as Pillow does
        # for 16-bit RGB PNGs (and as stb_image in llama.cpp does for 16-bit files).
        # Mode "I" is treated as 16-bit too: that is what Pillow produces from 16-bit PNG/TIFF.
        raw = np.asarray(im).astype(np.int64)
        grey = (np.clip(raw, 0, 65535) >> 8).astype(np.uint8)
        transparent = im.info.get("transparency")
        if isinstance(transparent, int):
            grey[raw == transparent] = 255
        return Image.fromarray(np.repeat(grey[:, :, None], 3, axis=2), "RGB")
    if not _has_alpha(im):
        return im.convert("RGB")
    rgba = np.asarray(im.convert("RGBA"), dtype=np.uint32)
    rgb, alpha = rgba[:, :, :3], rgba[:, :, 3:]
    # Integer "over" on a white background, rounded: rgb*a/255 + 255*(1 - a/255).
    out = (rgb * alpha + 255 * (255 - alpha) + 127) // 255
    return Image.fromarray(out.astype(np.uint8), "RGB")


@contextlib.contextmanager
def _opened(source: ImageSource, cfg: TilingConfig) -> Iterator[tuple[str, Image.Image]]:
    """(display name, opened image) of a source that is not a PIL image, its header checked against
    ``cfg.max_pixels``; what fails while opening it or inside the ``with`` (decoding) becomes an
    ``ImageError`` naming the source."""
    name, stream = _open_source(source)
    # Close only what we opened; a caller's file object stays theirs.
    owned = not hasattr(source, "read")
    try:
        try:
            # Image.open reads the header only; the pixels are decoded by load() in the caller, so
            # the size check here is what stops a decompression bomb.
            with Image.open(stream) as im:
                _check_pixels(im.size, cfg, name)
                yield name, im
        except ImageError:
            raise
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
            # Pillow's own check fires inside open() (error above 2x its limit) or, when warnings
            # are errors, as a warning above its limit - before our check sees the size.
            match = _PIL_BOMB_PIXELS.search(str(e))
            declared = f"{match.group(1)} pixels" if match else "too many pixels"
            raise ImageError(
                f"{name}: image has {declared}, more than the limit of {cfg.max_pixels} pixels "
                f"(TilingConfig.max_pixels); refused before decoding ({e})"
            ) from e
        except MemoryError:
            raise
        except Exception as e:  # Pillow's decoders raise OSError, SyntaxError, ValueError, EOFError...
            raise ImageError(f"{name}: cannot decode image: {e}") from e
    finally:
        if owned:
            stream.close()


def load_image(source: ImageSource, cfg: TilingConfig = TilingConfig()) -> Image.Image:
    """Decode ``source`` to a new RGB image.

    ``source`` may be a path (str or PathLike), raw bytes, a ``data:image/...;base64,...`` URL, an
    open binary file, or a PIL image.  Raises ``ImageError`` (a ``ValueError``) naming the source
    when it cannot be read or decoded, or when its header declares more than ``cfg.max_pixels``.
    Like upstream, EXIF orientation is not applied and animated images give their first frame.
    """
    if isinstance(source, Image.Image):
        name = f"<PIL image {source.width}x{source.height} {source.mode}>"
        _check_pixels(source.size, cfg, name)
        return _to_rgb(source)
    with _opened(source, cfg) as (_, im):
        im.load()
        return _to_rgb(im)


def image_size(source: ImageSource, cfg: TilingConfig = TilingConfig()) -> tuple[int, int]:
    """(width, height) of ``source`` read from its header, no pixel decoded: the checks ``load_image``
    makes before decoding (readable, a known format, at most ``cfg.max_pixels``), at a fraction of
    the cost, so a caller can budget pixels and context positions before anything is decoded.  A
    damaged pixel stream is found only by ``load_image``."""
    if isinstance(source, Image.Image):
        _check_pixels(source.size, cfg, f"<PIL image {source.width}x{source.height} {source.mode}>")
        return source.size
    with _opened(source, cfg) as (_, im):
        return im.size


# --------------------------------------------------------------------------------------------
# Tiling and normalisation
# --------------------------------------------------------------------------------------------


def tile_image(img: Image.Image, cfg: TilingConfig = TilingConfig()) -> list[Image.Image]:
    """Upstream's ``dynamic_preprocess``: grid tiles in row order, then the optional thumbnail."""
    size = cfg.image_size
    cols, rows = choose_grid(img.width, img.height, cfg)
    # Upstream calls resize() without a filter, which is BICUBIC for RGB; say so explicitly.
    resized = img.resize((cols * size, rows * size), Image.Resampling.BICUBIC)
    tiles = [
        resized.crop((c * size, r * size, (c + 1) * size, (r + 1) * size))
        for r in range(rows)
        for c in range(cols)
    ]
    if cfg.use_thumbnail and len(tiles) != 1:
        # The thumbnail is resized from the original image, not from the tiled one.
        tiles.append(img.resize((size, size), Image.Resampling.BICUBIC))
    return tiles


def normalize(tiles: list[Image.Image]) -> np.ndarray:
    """float32 ``[n, 3, S, S]``: torchvision ``ToTensor`` then ``Normalize(IMAGENET_MEAN, STD)``.

    Same float32 operation order as torchvision (divide by 255, subtract mean, divide by std), so
    the values match the reference pipeline bit for bit, not just approximately.
    """
    if not tiles:
        raise ValueError("normalize() needs at least one tile")
    pixels = np.stack([np.asarray(t.convert("RGB"), dtype=np.uint8) for t in tiles])
    x = pixels.astype(np.float32) / np.float32(255.0)
    mean = np.asarray(IMAGENET_MEAN, dtype=np.float32)
    std = np.asarray(IMAGENET_STD, dtype=np.float32)
    x = (x - mean) / std
    return np.ascontiguousarray(x.transpose(0, 3, 1, 2))


def prepare_image(source: ImageSource, cfg: TilingConfig = TilingConfig()) -> PreparedImage:
    """Load, tile and normalise one image for the vision tower."""
    img = load_image(source, cfg)
    grid = choose_grid(img.width, img.height, cfg)
    tiles = tile_image(img, cfg)
    return PreparedImage(pixel_values=normalize(tiles), grid=grid, num_tiles=len(tiles))
