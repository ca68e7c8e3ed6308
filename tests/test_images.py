"""Host image preprocessing on the extension (csrc/cpu/images.cpp) against its reference, the installed Pillow: the
bicubic resize byte for byte over sizes that shrink, grow and keep either axis (both pass orders), the tile layout
and normalisation against the numpy fallback, the probe that reads Pillow's pass order, bad taps, and images
preprocessed concurrently. test_processor.py compares the whole processor with transformers."""
import importlib.util
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import PIL.Image
import pytest

from internvl_engine.processor import images

BUILT = importlib.util.find_spec("internvl_engine._C") is not None
pytestmark = pytest.mark.skipif(not BUILT, reason="needs the C++ extension (CI builds it and checks it loads)")


@pytest.fixture(autouse=True)
def native_on():
    """Every test here exercises the C++ path: a built extension with no native path would mean the probe found the
    installed Pillow's bytes unmatched, and the comparisons below would compare Pillow with itself."""
    assert images.native_images() is not None


def _image(h, w, c=3, seed=0):
    """Noise in the bottom half, black/white bands in the top half (the bands drive the filter's overshoot into the
    clipping both passes do)."""
    rng = np.random.default_rng(seed + 31 * h + w)
    img = rng.integers(0, 256, (h, w, c), dtype=np.uint8)
    img[: h // 2] = (img[: h // 2] > 127) * np.uint8(255)
    return img


def _pil(img, w, h):
    mode = "L" if img.shape[2] == 1 else "RGB"
    out = np.asarray(PIL.Image.fromarray(img[..., 0] if mode == "L" else img, mode).resize((w, h), PIL.Image.BICUBIC))
    return out.reshape(h, w, -1)


SIZES = [(1, 1), (7, 1), (2, 3), (5, 17), (448, 448), (449, 447), (1024, 768), (768, 1024), (2000, 100),
         (37, 2000), (333, 333), (3000, 20)]  # (width, height)
TARGETS = [(448, 448), (1344, 896), (1792, 1344), (896, 448), (1, 1), (5, 3), (447, 449)]


@pytest.mark.parametrize("w,h", SIZES, ids=[f"{w}x{h}" for w, h in SIZES])
def test_resize_matches_pillow(w, h):
    img = _image(h, w)
    for ow, oh in TARGETS + [(w, h), (w, 448), (448, h), (w + 1, max(1, h // 3))]:
        np.testing.assert_array_equal(images.resize_bicubic(img, ow, oh), _pil(img, ow, oh), err_msg=f"to {ow}x{oh}")


def test_resize_one_channel_and_random_sizes():
    rng = np.random.default_rng(7)
    for i in range(40):
        w, h, ow, oh = (int(v) for v in rng.integers(1, 700, 4))
        img = _image(h, w, c=1 if i % 4 == 0 else 3, seed=i)
        np.testing.assert_array_equal(images.resize_bicubic(img, ow, oh), _pil(img, ow, oh),
                                      err_msg=f"{w}x{h} -> {ow}x{oh}")


def test_channel_counts_and_fallback():
    img = _image(30, 40, c=1)
    with images.native_pixels(False):
        np.testing.assert_array_equal(images.resize_bicubic(img, 17, 9), _pil(img, 17, 9))
    with pytest.raises(ValueError, match="3 or 1"):
        images.resize_bicubic(_image(30, 40, c=4), 17, 9)  # Pillow resizes RGBA premultiplied


def test_probe_tells_the_pass_orders_apart():
    """The probe only identifies Pillow's order if the two orders differ on it; both sides of the rule are also
    resized above (449x447 from 448x448 shrinks the height first under Pillow 13)."""
    ext, order = images._native_module()
    assert order in ("height_shrink_first", "horizontal_first")
    probe = np.random.default_rng(0).integers(0, 256, (61, 23, 3), dtype=np.uint8)
    a = images._resize_native(ext, "height_shrink_first", probe, 20, 17, threads=1)
    b = images._resize_native(ext, "horizontal_first", probe, 20, 17, threads=1)
    assert not np.array_equal(a, b)


@pytest.mark.parametrize("w,h,max_tiles", [(1024, 768, 1), (1024, 768, 12), (300, 2000, 6), (448, 448, 12)])
def test_preprocess_matches_the_pil_numpy_path(w, h, max_tiles):
    img = _image(h, w)
    native = images.preprocess_image(img, max_tiles=max_tiles)
    with images.native_pixels(False):
        assert images.native_images() is None
        fallback = images.preprocess_image(img, max_tiles=max_tiles)
    assert native.dtype == np.float32 and native.shape == fallback.shape
    assert np.array_equal(native.view(np.uint32), fallback.view(np.uint32))  # bit for bit


def test_tiles_normalize_layout():
    """Grid [rows * tile, cols * tile, 3] -> tiles row-major, channels first, each value through its table row."""
    tile, rows, cols = 4, 2, 3
    grid = np.arange(rows * tile * cols * tile * 3, dtype=np.uint32).reshape(rows * tile, cols * tile, 3) % 256
    grid = grid.astype(np.uint8)
    out = images.normalize_grids([grid], tile, (0.5, 0.5, 0.5), (0.25, 0.5, 1.0))
    table = images._normalize_table((0.5, 0.5, 0.5), (0.25, 0.5, 1.0))
    for t in range(rows * cols):
        r, c = divmod(t, cols)
        block = grid[r * tile:(r + 1) * tile, c * tile:(c + 1) * tile]
        for ch in range(3):
            np.testing.assert_array_equal(out[t, ch], table[ch][block[..., ch]])


def test_bad_taps_raise_instead_of_reading_past_the_image():
    ext = images.native_images()
    img = _image(8, 8)
    out = np.empty((8, 4, 3), np.uint8)  # width only
    bounds, coeffs = images.bicubic_taps(8, 4)
    bounds = bounds.copy()
    bounds[-1, 0] = 7  # 7 + its tap count > 8 input columns
    with pytest.raises(ValueError, match="horizontal taps out of range"):
        ext.resize_u8(out.ctypes.data, img.ctypes.data, 8, 8, 8, 4, 3, bounds.ctypes.data, coeffs.ctypes.data,
                      coeffs.shape[1], 0, 0, 0, False, 1)
    with pytest.raises(ValueError, match="width changes"):
        ext.resize_u8(out.ctypes.data, img.ctypes.data, 8, 8, 8, 4, 3, 0, 0, 0, 0, 0, 0, False, 1)


def test_concurrent_images_share_threads_and_agree():
    imgs = [_image(600 + 10 * i, 800, seed=i) for i in range(6)]
    alone = [images.preprocess_image(im, max_tiles=6) for im in imgs]
    with ThreadPoolExecutor(6) as pool:
        together = list(pool.map(lambda im: images.preprocess_image(im, max_tiles=6), imgs))
    for a, b in zip(alone, together):
        assert np.array_equal(a, b)
    assert images._active == 0
