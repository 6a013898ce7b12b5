"""Image preprocessing against a verbatim transcription of InternVL's upstream tiling code."""

from __future__ import annotations

import base64
import io
import struct
import warnings
import zlib

import numpy as np
import pytest
from PIL import Image

from r1v.runtime.image import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    ImageError,
    PreparedImage,
    TilingConfig,
    choose_grid,
    load_image,
    normalize,
    prepare_image,
    tile_image,
)

# ---------------------------------------------------------------------------------------------
# Oracle: InternVL / Skywork-R1V inference code, transcribed verbatim (only comments removed).
# ---------------------------------------------------------------------------------------------


def find_closest_aspect_ratio(aspect_ratio, target_ratios, width, height, image_size):
    best_ratio_diff = float('inf')
    best_ratio = (1, 1)
    area = width * height
    for ratio in target_ratios:
        target_aspect_ratio = ratio[0] / ratio[1]
        ratio_diff = abs(aspect_ratio - target_aspect_ratio)
        if ratio_diff < best_ratio_diff:
            best_ratio_diff = ratio_diff
            best_ratio = ratio
        elif ratio_diff == best_ratio_diff:
            if area > 0.5 * image_size * image_size * ratio[0] * ratio[1]:
                best_ratio = ratio
    return best_ratio


def dynamic_preprocess(image, min_num=1, max_num=12, image_size=448, use_thumbnail=False):
    orig_width, orig_height = image.size
    aspect_ratio = orig_width / orig_height

    target_ratios = set(
        (i, j) for n in range(min_num, max_num + 1) for i in range(1, n + 1) for j in range(1, n + 1) if
        i * j <= max_num and i * j >= min_num)
    target_ratios = sorted(target_ratios, key=lambda x: x[0] * x[1])

    target_aspect_ratio = find_closest_aspect_ratio(
        aspect_ratio, target_ratios, orig_width, orig_height, image_size)

    target_width = image_size * target_aspect_ratio[0]
    target_height = image_size * target_aspect_ratio[1]
    blocks = target_aspect_ratio[0] * target_aspect_ratio[1]

    resized_img = image.resize((target_width, target_height))
    processed_images = []
    for i in range(blocks):
        box = (
            (i % (target_width // image_size)) * image_size,
            (i // (target_width // image_size)) * image_size,
            ((i % (target_width // image_size)) + 1) * image_size,
            ((i // (target_width // image_size)) + 1) * image_size
        )
        split_img = resized_img.crop(box)
        processed_images.append(split_img)
    assert len(processed_images) == blocks
    if use_thumbnail and len(processed_images) != 1:
        thumbnail_img = image.resize((image_size, image_size))
        processed_images.append(thumbnail_img)
    return processed_images


def oracle_grid(width, height, min_num=1, max_num=12, image_size=448):
    """The grid upstream picks, through the same two code paths as dynamic_preprocess."""
    target_ratios = set(
        (i, j) for n in range(min_num, max_num + 1) for i in range(1, n + 1) for j in range(1, n + 1) if
        i * j <= max_num and i * j >= min_num)
    target_ratios = sorted(target_ratios, key=lambda x: x[0] * x[1])
    return find_closest_aspect_ratio(width / height, target_ratios, width, height, image_size)


# ---------------------------------------------------------------------------------------------
# Grid choice
# ---------------------------------------------------------------------------------------------

SIZES = [
    (1, 1), (1, 2), (2, 1), (3, 7), (10, 5), (100, 100), (447, 448), (448, 448), (449, 449),
    (448, 5376), (5376, 448), (100, 5000), (5000, 100), (1, 12), (12, 1), (1, 1000), (1000, 1),
    (634, 634), (635, 635), (896, 896), (1000, 1000), (1344, 1344), (2000, 2000),
    (1400, 700), (700, 1400), (800, 400), (1500, 500), (500, 1500), (1920, 1080), (1080, 1920),
    (640, 480), (480, 640), (1024, 768), (500, 400), (1000, 800), (1300, 1200), (5000, 2000),
    (4032, 3024), (3024, 4032), (1792, 1344), (2688, 448), (299, 1024), (96, 4000), (7, 3),
]
CONFIGS = [(mn, mx) for mn in (1, 2) for mx in (1, 6, 12) if mn <= mx]


@pytest.mark.parametrize("min_tiles,max_tiles", CONFIGS)
@pytest.mark.parametrize("width,height", SIZES)
def test_choose_grid_matches_upstream(width, height, min_tiles, max_tiles):
    cfg = TilingConfig(min_tiles=min_tiles, max_tiles=max_tiles)
    assert choose_grid(width, height, cfg) == oracle_grid(width, height, min_tiles, max_tiles)


def test_choose_grid_sweep_matches_upstream():
    sides = list(range(1, 80, 7)) + list(range(80, 6000, 151)) + [224, 448, 672, 896, 1344]
    for min_tiles, max_tiles in CONFIGS + [(1, 4), (1, 9), (3, 12)]:
        cfg = TilingConfig(min_tiles=min_tiles, max_tiles=max_tiles)
        for w in sides:
            for h in sides:
                assert choose_grid(w, h, cfg) == oracle_grid(w, h, min_tiles, max_tiles), (w, h, cfg)


def test_known_grids():
    cfg = TilingConfig()
    assert choose_grid(448, 5376, cfg) == (1, 12)
    assert choose_grid(5376, 448, cfg) == (12, 1)
    # Square images tie on 1x1, 2x2, 3x3: the larger grid wins only with > half its pixels.
    assert choose_grid(448, 448, cfg) == (1, 1)
    assert choose_grid(634, 634, cfg) == (2, 2)  # 401956 > 0.5 * 448^2 * 4 = 401408
    assert choose_grid(1000, 1000, cfg) == (3, 3)
    # 2:1 ties on 2x1 and 4x2.
    assert choose_grid(800, 400, cfg) == (2, 1)
    assert choose_grid(1400, 700, cfg) == (4, 2)


@pytest.mark.parametrize(
    "width,height,min_tiles,max_tiles",
    [(500, 400, 2, 2), (1000, 800, 2, 2), (500, 400, 2, 3), (500, 800, 4, 4),
     (500, 200, 4, 4), (5000, 2000, 4, 4), (1500, 400, 6, 6)],
)
def test_set_order_ties_match_upstream(width, height, min_tiles, max_tiles):
    """Equal-area grids that tie exactly: the answer depends on the set's iteration order."""
    cfg = TilingConfig(min_tiles=min_tiles, max_tiles=max_tiles)
    assert choose_grid(width, height, cfg) == oracle_grid(width, height, min_tiles, max_tiles)


def test_set_order_is_not_a_simple_rule():
    """Why the module mirrors upstream's set: no plain sort key reproduces it on these ties."""
    def with_key(w, h, mn, mx, key):
        ratios = sorted({(i, j) for i in range(1, mx + 1) for j in range(1, mx + 1) if mn <= i * j <= mx},
                        key=key)
        return find_closest_aspect_ratio(w / h, ratios, w, h, 448)

    cases = [(500, 400, 2, 2), (500, 200, 4, 4), (5000, 2000, 4, 4), (1500, 400, 6, 6)]
    for key in (lambda g: (g[0] * g[1], g[0]), lambda g: (g[0] * g[1], g[1])):
        assert any(with_key(*c, key) != oracle_grid(*c) for c in cases)


# ---------------------------------------------------------------------------------------------
# Tiles
# ---------------------------------------------------------------------------------------------


def noise(width, height, seed=0):
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8), "RGB")


@pytest.mark.parametrize("width,height", [(1000, 600), (300, 900), (1000, 1000), (2000, 170), (333, 333), (5, 60)])
@pytest.mark.parametrize("use_thumbnail", [True, False])
def test_tiles_match_upstream_pixels(width, height, use_thumbnail):
    img = noise(width, height, seed=width * 7 + height)
    cfg = TilingConfig(use_thumbnail=use_thumbnail)
    ours = tile_image(img, cfg)
    ref = dynamic_preprocess(img, 1, 12, 448, use_thumbnail)
    assert len(ours) == len(ref)
    for a, b in zip(ours, ref):
        assert a.size == b.size == (448, 448)
        assert np.array_equal(np.asarray(a), np.asarray(b))


def test_tile_row_order():
    # A 3x2 grid image whose blocks each have one flat colour: tiles come left to right, top to bottom.
    cols, rows = 3, 2
    arr = np.zeros((rows * 448, cols * 448, 3), dtype=np.uint8)
    for r in range(rows):
        for c in range(cols):
            arr[r * 448:(r + 1) * 448, c * 448:(c + 1) * 448] = (40 * (r * cols + c), 0, 0)
    tiles = tile_image(Image.fromarray(arr, "RGB"), TilingConfig())
    assert choose_grid(cols * 448, rows * 448) == (cols, rows)
    assert len(tiles) == cols * rows + 1
    for k in range(cols * rows):
        assert np.all(np.asarray(tiles[k])[..., 0] == 40 * k)


def test_single_tile_has_no_thumbnail():
    assert len(tile_image(noise(448, 448), TilingConfig())) == 1
    assert len(tile_image(noise(896, 448), TilingConfig(max_tiles=1))) == 1


def test_one_pixel_image_end_to_end():
    prepared = prepare_image(Image.new("RGB", (1, 1), (255, 0, 0)))
    assert isinstance(prepared, PreparedImage)
    assert prepared.grid == (1, 1)
    assert prepared.num_tiles == 1
    assert prepared.pixel_values.shape == (1, 3, 448, 448)
    assert prepared.pixel_values.dtype == np.float32
    expected_red = (1.0 - IMAGENET_MEAN[0]) / IMAGENET_STD[0]
    assert np.allclose(prepared.pixel_values[0, 0], expected_red, atol=1e-6)


def test_prepare_image_counts_thumbnail():
    prepared = prepare_image(noise(900, 450))
    assert prepared.grid == oracle_grid(900, 450) == (2, 1)
    assert prepared.num_tiles == 3
    assert prepared.pixel_values.shape == (3, 3, 448, 448)


# ---------------------------------------------------------------------------------------------
# Normalisation
# ---------------------------------------------------------------------------------------------


def test_normalize_matches_torchvision_formula():
    tiles = [noise(448, 448, seed=s) for s in range(3)]
    out = normalize(tiles)
    assert out.shape == (3, 3, 448, 448) and out.dtype == np.float32 and out.flags.c_contiguous
    x = np.stack([np.asarray(t, dtype=np.float64) for t in tiles]).transpose(0, 3, 1, 2) / 255.0
    mean = np.array([0.485, 0.456, 0.406]).reshape(1, 3, 1, 1)
    std = np.array([0.229, 0.224, 0.225]).reshape(1, 3, 1, 1)
    assert np.max(np.abs(out - (x - mean) / std)) < 1e-6


def test_normalize_extremes():
    out = normalize([Image.new("RGB", (448, 448), (0, 255, 0))])
    assert np.allclose(out[0, 0], -0.485 / 0.229, atol=1e-6)
    assert np.allclose(out[0, 1], (1 - 0.456) / 0.224, atol=1e-6)
    assert np.allclose(out[0, 2], -0.406 / 0.225, atol=1e-6)


# ---------------------------------------------------------------------------------------------
# Loading: sources and modes
# ---------------------------------------------------------------------------------------------


def png_bytes(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, "PNG")
    return buf.getvalue()


def test_sources_give_same_pixels(tmp_path):
    img = noise(37, 23, seed=5)
    data = png_bytes(img)
    path = tmp_path / "x.png"
    path.write_bytes(data)
    url = "data:image/png;base64," + base64.b64encode(data).decode()
    expected = np.asarray(img)
    for source in (path, str(path), data, bytearray(data), url, img, io.BytesIO(data)):
        out = load_image(source)
        assert out.mode == "RGB"
        assert np.array_equal(np.asarray(out), expected), type(source)


def test_data_url_variants():
    img = noise(9, 4, seed=1)
    b64 = base64.b64encode(png_bytes(img)).decode()
    wrapped = "\n".join(b64[i:i + 60] for i in range(0, len(b64), 60))
    for url in (f"data:image/png;base64,{wrapped}", f"data:image/png;base64,{b64.rstrip('=')}",
                f"DATA:image/png;charset=x;base64,{b64.replace('+', '%2B').replace('/', '%2F')}"):
        assert np.array_equal(np.asarray(load_image(url)), np.asarray(img))
    with pytest.raises(ImageError, match="data URL"):
        load_image("data:image/png;base64,@@@not-base64@@@")
    with pytest.raises(ImageError, match="data URL"):
        load_image("data:image/png;base64")


def test_rgba_composited_on_white():
    rgba = np.array([[[10, 20, 30, 255], [10, 20, 30, 0], [200, 100, 0, 128], [0, 0, 0, 1]]], dtype=np.uint8)
    rgb = rgba[..., :3].astype(np.int64)
    a = rgba[..., 3:].astype(np.int64)
    expected = np.rint(rgb * a / 255 + 255 * (1 - a / 255)).astype(np.uint8)
    assert expected[0, 1].tolist() == [255, 255, 255]
    img = Image.fromarray(rgba, "RGBA")
    for source in (img, png_bytes(img)):
        assert np.array_equal(np.asarray(load_image(source)), expected)


def test_palette_and_greyscale_modes():
    palette = [0, 0, 0, 255, 0, 0, 0, 255, 0, 0, 0, 255] + [7] * (256 * 3 - 12)
    idx = np.array([[0, 1], [2, 3]], dtype=np.uint8)
    p = Image.fromarray(idx, "P")
    p.putpalette(palette)
    expected_p = np.array(palette[:12], dtype=np.uint8).reshape(4, 3)[idx]
    for source in (p, png_bytes(p)):
        assert np.array_equal(np.asarray(load_image(source)), expected_p)

    # Palette transparency (tRNS): index 1 is transparent, so it turns white.
    p.info["transparency"] = 1
    expected_t = expected_p.copy()
    expected_t[0, 1] = 255
    buf = io.BytesIO()
    p.save(buf, "PNG", transparency=1)
    for source in (p, buf.getvalue()):
        assert np.array_equal(np.asarray(load_image(source)), expected_t)

    grey = np.array([[0, 50], [128, 255]], dtype=np.uint8)
    expected_l = np.repeat(grey[..., None], 3, axis=2)
    l_img = Image.fromarray(grey, "L")
    for source in (l_img, png_bytes(l_img)):
        assert np.array_equal(np.asarray(load_image(source)), expected_l)

    la = Image.fromarray(np.dstack([grey, np.array([[255, 0], [255, 255]], np.uint8)]), "LA")
    expected_la = expected_l.copy()
    expected_la[0, 1] = 255
    assert np.array_equal(np.asarray(load_image(la)), expected_la)

    one = Image.fromarray(np.array([[0, 255]], dtype=np.uint8), "L").convert("1")
    assert np.array_equal(np.asarray(load_image(one)), np.array([[[0] * 3, [255] * 3]], np.uint8))


def test_sixteen_bit_greyscale_is_scaled_not_clipped():
    raw = np.array([[0, 255, 256, 32768, 65535]], dtype=np.uint16)
    img = Image.fromarray(raw)
    assert img.mode == "I;16"
    expected = np.repeat((raw >> 8).astype(np.uint8)[..., None], 3, axis=2)
    for source in (img, png_bytes(img)):
        assert np.array_equal(np.asarray(load_image(source)), expected)


# ---------------------------------------------------------------------------------------------
# Refusals: decompression bombs, corrupt input
# ---------------------------------------------------------------------------------------------


def _chunk(kind: bytes, payload: bytes) -> bytes:
    return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))


def header_only_png(width: int, height: int) -> bytes:
    """A PNG whose header declares width x height but whose pixel data is garbage.

    Refusing it with a *size* error (not a decode error) shows the check runs before decoding.
    """
    ihdr = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)  # 1-bit greyscale
    return (b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", ihdr)
            + _chunk(b"IDAT", zlib.compress(b"\x00" * 64)) + _chunk(b"IEND", b""))


def test_bomb_refused_from_header():
    data = header_only_png(20000, 20000)
    with pytest.raises(ImageError) as info:
        load_image(data)
    msg = str(info.value)
    assert "400000000" in msg and str(TilingConfig().max_pixels) in msg
    assert "bytes" in msg  # names the source


def test_bomb_warning_range_refused(tmp_path):
    # Above Pillow's warning limit, below its error limit: our own check must refuse it,
    # with warnings shown or turned into errors.
    path = tmp_path / "big.png"
    path.write_bytes(header_only_png(10000, 10000))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(ImageError, match="100000000"):
            load_image(path)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(ImageError, match="100000000") as info:
            load_image(path)
    assert str(path) in str(info.value)


def test_configurable_pixel_limit():
    cfg = TilingConfig(max_pixels=1_000_000)
    with pytest.raises(ImageError) as info:
        load_image(header_only_png(3000, 3000), cfg)
    assert "9000000" in str(info.value) and "1000000" in str(info.value)

    small = TilingConfig(max_pixels=5000)
    img = noise(100, 100)
    for source in (png_bytes(img), img):
        with pytest.raises(ImageError) as info:
            prepare_image(source, small)
        assert "10000" in str(info.value) and "5000" in str(info.value)
    assert load_image(noise(50, 100), small).size == (50, 100)


def test_corrupt_file_names_path(tmp_path):
    junk = tmp_path / "junk.png"
    junk.write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00garbage" * 10)
    with pytest.raises(ImageError, match="junk.png"):
        load_image(junk)

    truncated = tmp_path / "truncated.png"
    truncated.write_bytes(png_bytes(noise(64, 64))[:200])
    with pytest.raises(ImageError, match="truncated.png"):
        load_image(truncated)

    with pytest.raises(ImageError, match="missing.png"):
        load_image(tmp_path / "missing.png")
    with pytest.raises(ImageError, match="bytes"):
        load_image(b"not an image")
    assert issubclass(ImageError, ValueError)


def test_remote_url_not_fetched():
    with pytest.raises(ImageError, match="remote"):
        load_image("https://example.com/cat.png")


def test_config_validation():
    with pytest.raises(ValueError):
        TilingConfig(min_tiles=3, max_tiles=2)
    with pytest.raises(ValueError):
        TilingConfig(min_tiles=0)
    with pytest.raises(ValueError):
        TilingConfig(max_pixels=0)


def test_module_does_not_import_torch():
    """The GGUF path uses this module without torch: load its file with torch made unimportable."""
    import subprocess
    import sys

    import r1v.runtime.image as module

    code = (
        "import importlib.util, sys\n"
        "sys.modules['torch'] = None  # any 'import torch' now raises ImportError\n"
        f"spec = importlib.util.spec_from_file_location('image_alone', {module.__file__!r})\n"
        "mod = importlib.util.module_from_spec(spec)\n"
        "sys.modules['image_alone'] = mod\n"
        "spec.loader.exec_module(mod)\n"
        "print(mod.prepare_image(mod.Image.new('RGB', (3, 2))).pixel_values.shape)\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    # Area plays no part outside exact ties: a 3x2-pixel image gets the 3x2 grid plus a thumbnail.
    assert "(7, 3, 448, 448)" in result.stdout
