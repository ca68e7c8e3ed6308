"""Image loading and InternVL3 tiling, bit-identical to transformers' GotOcr2ImageProcessorPil
(crop_to_patches=True as InternVLProcessor passes it); spec section 6."""

from __future__ import annotations

import base64
import binascii
import hashlib
import io
import math
import os
import re
import struct
import threading
import urllib.parse
import urllib.request
from collections import OrderedDict
from contextlib import contextmanager
from functools import lru_cache
from pathlib import Path

import numpy as np
import PIL.Image
import PIL.ImageOps
import torch

from ..constants import MAX_TILES, MIN_TILES, TILE_SIZE
from ..errors import ImageError, MediaTooLargeError, PromptError
from ..ops import load_extension
from .media import MediaPolicy, fetch_url

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
MAX_TILES_LIMIT = 64
DEFAULT_POLICY = MediaPolicy()  # the Python API's: trusts its caller (any local file, any host, no caps)


def describe_source(source, limit: int = 80) -> str:
    """Short printable name of an image/video source for error messages."""
    try:
        return _describe(source, limit)
    except Exception:  # a caller's broken object (its mode or size raising) is still named
        return f"object of type {type(source).__name__}"


def _describe(source, limit: int) -> str:
    if isinstance(source, (str, Path)):
        s = str(source)
        if len(s) > limit:
            s = s[: limit - 3] + "..."
        return repr(s)
    if isinstance(source, np.ndarray):
        return f"array of shape {tuple(source.shape)} dtype {source.dtype}"
    if isinstance(source, PIL.Image.Image):
        return f"PIL image mode {source.mode} size {source.size}"
    return f"object of type {type(source).__name__}"


def sniff_format(data: bytes) -> str | None:
    """The Pillow format whose signature `data` starts with, read as Image.open reads it (each plugin's accept() on
    the first 16 bytes) without opening anything; None when no signature matches."""
    PIL.Image.init()
    prefix = data[:16]
    for fmt in PIL.Image.ID:
        accept = PIL.Image.OPEN[fmt][1]
        try:
            ok = accept is not None and accept(prefix)
        except (SyntaxError, IndexError, TypeError, struct.error):  # a short prefix: skipped, as Image.open does
            continue
        if ok and not isinstance(ok, str):  # (a str is Pillow's "not this, and warn")
            return fmt
    return None


def _ico_frame_sizes(data: bytes) -> list[tuple[int, int]]:
    """(width, height) of every image in an ICO file, each from its own header: Pillow's ICO plugin decodes one
    inside Image.open, before its size can be checked, and an embedded PNG may be any size whatever the
    directory's one-byte sides say."""
    sizes = []
    for i in range(int.from_bytes(data[4:6], "little")):
        entry = data[6 + 16 * i:22 + 16 * i]
        if len(entry) < 16:
            break
        offset = int.from_bytes(entry[12:16], "little")
        head = data[offset:offset + 24]
        if head[:8] == b"\x89PNG\r\n\x1a\n" and len(head) == 24:  # IHDR: big-endian width, height
            sizes.append((int.from_bytes(head[16:20], "big"), int.from_bytes(head[20:24], "big")))
        elif len(head) >= 12 and int.from_bytes(head[:4], "little") == 12:  # BITMAPCOREHEADER; height holds 2 masks
            sizes.append((int.from_bytes(head[4:6], "little"), int.from_bytes(head[6:8], "little") // 2))
        elif len(head) >= 12:  # BITMAPINFOHEADER and later
            sizes.append((abs(int.from_bytes(head[4:8], "little", signed=True)),
                          abs(int.from_bytes(head[8:12], "little", signed=True)) // 2))
        else:
            sizes.append((entry[0] or 256, entry[1] or 256))
    return sizes


# formats whose Pillow plugin decodes pixels inside Image.open: their sizes are read here first
_SIZES_BEFORE_OPEN = {"ICO": _ico_frame_sizes}


def _open_bytes(data: bytes, name: str, policy: MediaPolicy | None = None) -> PIL.Image.Image:
    """The image in `data`, decoded only after its format and size passed the policy (from the header)."""
    what = f"image {name}"
    if policy is not None:
        fmt = sniff_format(data)
        if policy.image_formats is not None and fmt is not None:
            policy.check_image_format(fmt, what)
        for w, h in _SIZES_BEFORE_OPEN.get(fmt, lambda d: ())(data):
            policy.check_image_size(w, h, what)
    try:  # with an allowlist, Pillow tries no other plugin (a file no signature matched cannot reach one)
        img = PIL.Image.open(io.BytesIO(data), formats=None if policy is None else policy.image_formats)
    except Exception as e:  # PIL raises many types (UnidentifiedImageError, OSError, SyntaxError, ...)
        raise ImageError(f"cannot decode image {name}: {type(e).__name__}: {e}") from e
    if policy is not None:
        policy.check_image_size(img.width, img.height, what)  # from the header, before decoding
    try:
        img.load()  # force full decode so truncated files fail here
    except Exception as e:
        raise ImageError(f"cannot decode image {name}: {type(e).__name__}: {e}") from e
    return img


def _finish(img: PIL.Image.Image, name: str) -> PIL.Image.Image:
    try:
        out = PIL.ImageOps.exif_transpose(img)
    except Exception as e:
        raise ImageError(f"cannot apply EXIF orientation to image {name}: {e}") from e
    if out is None:
        out = img
    _check_size(out, name)
    return out


def _check_size(img: PIL.Image.Image, name: str) -> None:
    if img.width == 0 or img.height == 0:
        raise ImageError(f"image {name} is empty (size {img.width}x{img.height})")


def check_array(arr: np.ndarray, name: str | None = None) -> np.ndarray:
    """Validate a uint8 HxW / HxWxC (C in 1,3,4) image array."""
    name = name or describe_source(arr)
    if arr.dtype != np.uint8:
        raise ImageError(f"image {name}: expected dtype uint8, got {arr.dtype}")
    if arr.ndim not in (2, 3) or (arr.ndim == 3 and arr.shape[2] not in (1, 3, 4)):
        raise ImageError(f"image {name}: expected shape HxW or HxWxC with C in (1, 3, 4), got {tuple(arr.shape)}")
    if arr.shape[0] == 0 or arr.shape[1] == 0:
        raise ImageError(f"image {name} is empty (shape {tuple(arr.shape)})")
    return arr


_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*)://")


def load_image(source, policy: MediaPolicy | None = None) -> PIL.Image.Image:
    """PIL image from a PIL image, uint8 array, path, file:// URI, data: URI or http(s) URL (mode kept). Paths, URLs
    and data: URIs meet the media policy (None: the default, permissive one) before any of their bytes is read."""
    if isinstance(source, PIL.Image.Image):
        name = describe_source(source)
        try:
            w, h = source.size
        except Exception as e:
            raise ImageError(f"image {name} has no readable size: {type(e).__name__}: {e}") from e
        _check_size(source, name)
        (policy or DEFAULT_POLICY).check_image_size(w, h, f"image {name}")
        return source
    if isinstance(source, np.ndarray):
        arr = check_array(source)
        (policy or DEFAULT_POLICY).check_image_size(arr.shape[1], arr.shape[0], f"image {describe_source(arr)}")
        if arr.ndim == 3 and arr.shape[2] == 1:
            arr = arr[:, :, 0]
        return PIL.Image.fromarray(np.ascontiguousarray(arr))
    if isinstance(source, Path):
        source = str(source)
    if not isinstance(source, str):
        raise ImageError(
            f"unsupported image source {describe_source(source)}: expected a PIL image, uint8 array, path or URL"
        )
    policy = policy or DEFAULT_POLICY
    name = describe_source(source)
    if source.startswith("data:"):
        policy.check_data_uri(source, "data: URI")
        head, sep, payload = source.partition(",")
        if not sep or ";base64" not in head:
            raise ImageError(f"image data URI {name} is not of the form data:image/...;base64,<data>")
        try:
            data = base64.b64decode(payload, validate=False)
        except (binascii.Error, ValueError) as e:
            raise ImageError(f"image data URI {name} has invalid base64: {e}") from e
        return _finish(_open_bytes(data, name, policy), name)
    scheme = _SCHEME.match(source)
    scheme = scheme.group(1).lower() if scheme else None
    if scheme in ("http", "https"):
        return _finish(_open_bytes(fetch_url(source, policy, f"image URL {name}"), name, policy), name)
    if scheme not in (None, "file"):
        raise ImageError(f"unsupported image source {name}: URL scheme {scheme!r} (http, https, file and data "
                         f"are read)")
    path = source
    if scheme == "file":
        path = urllib.request.url2pathname(urllib.parse.urlparse(source).path)
    path = policy.local_path(path, f"image file {name}")  # before opening it, or saying whether it exists
    if not os.path.exists(path):
        raise ImageError(f"image file not found: {name}")
    if not os.path.isfile(path):
        raise ImageError(f"image path is not a file: {name}")
    cap = policy.max_download_bytes  # a local image is read whole, as a download is: the same byte cap
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            if cap is not None and size > cap:
                raise MediaTooLargeError(f"image file {name} is {size} bytes, over the {cap}-byte limit "
                                         f"(media_policy.max_download_bytes)")
            data = f.read() if cap is None else f.read(cap + 1)  # (a file still growing stops at the cap)
    except OSError as e:
        raise ImageError(f"cannot read image file {name}: {e}") from e
    if cap is not None and len(data) > cap:
        raise MediaTooLargeError(f"image file {name} is over the {cap}-byte limit (media_policy.max_download_bytes)")
    return _finish(_open_bytes(data, name, policy), name)


def to_rgb_array(image) -> np.ndarray:
    """uint8 HxWx3, same as transformers.image_transforms.convert_to_rgb (alpha composited on white)."""
    if isinstance(image, PIL.Image.Image):
        try:
            return _pil_to_rgb(image)
        except ImageError:
            raise
        except Exception as e:  # a caller's image object (a subclass, a lazily loaded file) that fails to convert
            raise ImageError(f"cannot read the pixels of image {describe_source(image)}: {type(e).__name__}: {e}"
                             ) from e
    if isinstance(image, np.ndarray):
        arr = check_array(image)
        if arr.ndim == 2:
            arr = arr[:, :, None]
        c = arr.shape[2]
        if c == 1:
            return np.repeat(arr, 3, axis=-1)
        if c == 4:
            # HF's numpy formula: float64 blend onto white, np.round, back to uint8
            alpha = arr[..., 3:4] / 255
            comp = alpha * arr[..., :3] + (1 - alpha) * 255
            return np.round(comp).astype(np.uint8)
        return arr
    return to_rgb_array(load_image(image))


def _pil_to_rgb(image: PIL.Image.Image) -> np.ndarray:
    _check_size(image, describe_source(image))
    if "A" in image.getbands() or image.info.get("transparency") is not None:
        rgba = image.convert("RGBA")
        white = PIL.Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        rgb = PIL.Image.alpha_composite(white, rgba).convert("RGB")
    else:
        rgb = image if image.mode == "RGB" else image.convert("RGB")  # (an RGB convert is a copy)
    arr = np.asarray(rgb, dtype=np.uint8)
    if arr.shape != (image.height, image.width, 3):  # an object whose pixels do not match its stated size
        raise ImageError(f"image {describe_source(image)} gave pixels of shape {arr.shape}")
    return arr


@lru_cache(maxsize=64)
def _candidate_grids(min_tiles: int, max_tiles: int) -> tuple[tuple[int, int], ...]:
    grids = [
        (c, r)
        for c in range(1, max_tiles + 1)
        for r in range(1, max_tiles + 1)
        if min_tiles <= c * r <= max_tiles
    ]
    grids.sort(key=lambda g: g[0] * g[1])  # stable
    return tuple(grids)


def validate_tile_limits(min_tiles: int, max_tiles: int) -> None:
    if not (isinstance(min_tiles, int) and isinstance(max_tiles, int)):
        raise PromptError(f"min/max tiles must be integers, got {min_tiles!r} and {max_tiles!r}")
    if not (1 <= min_tiles <= max_tiles <= MAX_TILES_LIMIT):
        raise PromptError(
            f"invalid tile limits min_tiles={min_tiles}, max_tiles={max_tiles}: "
            f"need 1 <= min_tiles <= max_tiles <= {MAX_TILES_LIMIT}"
        )


def select_grid(width: int, height: int, min_tiles: int, max_tiles: int, tile: int = TILE_SIZE) -> tuple[int, int]:
    """(cols, rows), same as transformers' get_optimal_tiled_canvas."""
    aspect = width / height
    area = width * height
    best_diff = float("inf")
    best = (1, 1)
    for cols, rows in _candidate_grids(min_tiles, max_tiles):
        diff = abs(aspect - cols / rows)
        if diff < best_diff:
            best_diff = diff
            best = (cols, rows)
        elif diff == best_diff and area > 0.5 * tile * tile * cols * rows:
            best = (cols, rows)
    return best


def num_tiles(width: int, height: int, min_tiles: int = MIN_TILES, max_tiles: int = MAX_TILES,
              tile: int = TILE_SIZE) -> int:
    if max_tiles <= 1:
        return 1
    cols, rows = select_grid(width, height, min_tiles, max_tiles, tile)
    return 1 if cols * rows == 1 else cols * rows + 1


@lru_cache(maxsize=8)
def _normalize_table(mean: tuple, std: tuple) -> np.ndarray:
    """[3, 256] float32: every value one channel's uint8 can normalise to, computed as transformers does (rescale:
    float64 multiply then cast to float32; normalize: float32 (x - mean) / std)."""
    x = (np.arange(256, dtype=np.float64) * (1 / 255)).astype(np.float32)
    m = np.array(mean, dtype=np.float32).reshape(3, 1)
    s = np.array(std, dtype=np.float32).reshape(3, 1)
    return (x[None, :] - m) / s


# ---- host pixel work: the C++ extension's threads when it is built, PIL and numpy otherwise ------------------------
# Both paths give identical bytes (tests/test_images.py); `native_pixels(False)` picks the fallback, for tests and the
# before/after benchmark (benchmarks/preprocess.py).
_native_enabled = os.environ.get("INTERNVL_ENGINE_NATIVE_IMAGES", "1") != "0"
_active_lock = threading.Lock()
_active = 0


@lru_cache(maxsize=1)
def _native_module():
    """(`_C.images`, Pillow's pass order) once a probe resize matched the installed Pillow byte for byte, else
    (None, None). Pillow 13 runs the vertical pass first when the height shrinks by more than twice what the width
    does, older Pillow never; on the probe the two orders give different bytes, so the probe tells them apart."""
    ext = getattr(load_extension()[0], "images", None)
    if ext is None:
        return None, None
    rng = np.random.default_rng(0)
    probe = rng.integers(0, 256, (61, 23, 3), dtype=np.uint8)
    want = np.asarray(PIL.Image.fromarray(probe).resize((20, 17), resample=PIL.Image.BICUBIC))
    order = next((o for o in PASS_ORDERS if np.array_equal(_resize_native(ext, o, probe, 20, 17, threads=1), want)),
                 None)
    # a few more shapes (down, up, mixed, one axis) guard against a Pillow whose coefficients round differently
    for w, h, ow, oh in ((97, 64, 40, 131), (300, 41, 448, 17), (50, 50, 50, 449), (640, 480, 448, 448)):
        img = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        want = np.asarray(PIL.Image.fromarray(img).resize((ow, oh), resample=PIL.Image.BICUBIC))
        if order is None or not np.array_equal(_resize_native(ext, order, img, ow, oh, threads=1), want):
            return None, None
    return ext, order


def native_images():
    """The extension's image launchers (`_C.images`), or None when it is not built, does not reproduce the installed
    Pillow, or is switched off."""
    return _native_module()[0] if _native_enabled else None


@contextmanager
def native_pixels(enabled: bool):
    global _native_enabled
    saved, _native_enabled = _native_enabled, bool(enabled)
    try:
        yield
    finally:
        _native_enabled = saved


@contextmanager
def _thread_share():
    """OpenMP threads for one image: what is left of torch's intra-op thread count by the images in flight, at
    least one (LLM preprocesses a batch on a thread pool; without sharing each image would start a full team, and
    the threads in use stay below that count plus the number of images)."""
    global _active
    with _active_lock:
        n = max(1, torch.get_num_threads() - _active)
        _active += n
    try:
        yield n
    finally:
        with _active_lock:
            _active -= n


def _bicubic(x: np.ndarray) -> np.ndarray:
    """Keys' cubic with a = -0.5, written in the operation order of Pillow's bicubic_filter (the coefficients must
    round exactly as Pillow's do)."""
    x = np.abs(x)
    near = (1.5 * x - 2.5) * x * x + 1  # ((a + 2) x - (a + 3)) x x + 1
    far = (((x - 5) * x + 8) * x - 4) * -0.5  # (((x - 5) x + 8) x - 4) a
    return np.where(x < 1.0, near, np.where(x < 2.0, far, 0.0))


# Taps are kept for the sizes seen most recently, up to this many bytes (a photo's are tens of KB; the taps of an
# axis are about 16 bytes per input pixel, so a size-bounded cache cannot be made to hold gigabytes by odd widths).
TAPS_CACHE_BYTES = 32 << 20
_taps_cache: OrderedDict = OrderedDict()
_taps_lock = threading.Lock()
_taps_bytes = 0


def bicubic_taps(in_size: int, out_size: int) -> tuple[np.ndarray, np.ndarray]:
    """Pillow's bicubic taps for one axis of Image.resize (box 0..in_size): int32 bounds [out, 2] (first input
    index, tap count) and int32 coefficients [out, ksize] in its fixed point (2^22 = 1.0); read-only, as they may
    be shared through the cache."""
    global _taps_bytes
    key = (in_size, out_size)
    with _taps_lock:
        taps = _taps_cache.get(key)
        if taps is not None:
            _taps_cache.move_to_end(key)
            return taps
    taps = _compute_taps(in_size, out_size)
    for a in taps:
        a.setflags(write=False)
    size = taps[0].nbytes + taps[1].nbytes
    if size <= TAPS_CACHE_BYTES // 8:
        with _taps_lock:
            if key not in _taps_cache:
                _taps_cache[key] = taps
                _taps_bytes += size
                while _taps_bytes > TAPS_CACHE_BYTES:
                    _, old = _taps_cache.popitem(last=False)
                    _taps_bytes -= old[0].nbytes + old[1].nbytes
    return taps


def taps_cache_bytes() -> int:
    """Bytes the tap cache holds now."""
    return _taps_bytes


def _compute_taps(in_size: int, out_size: int) -> tuple[np.ndarray, np.ndarray]:
    """The double arithmetic follows Pillow's precompute_coeffs and normalize_coeffs_8bpc step by step, so the
    integer passes of csrc/cpu/images.cpp reproduce PIL's bytes."""
    scale = float(np.float32(in_size)) / out_size  # Pillow's box edges are float32 (exact below 2^24 pixels)
    filterscale = max(scale, 1.0)  # downsampling stretches the filter (antialiasing)
    support = 2.0 * filterscale
    ksize = int(math.ceil(support)) * 2 + 1
    center = (np.arange(out_size, dtype=np.float64) + 0.5) * scale
    first = np.maximum(np.trunc(center - support + 0.5), 0).astype(np.int64)
    count = np.minimum(np.trunc(center + support + 0.5).astype(np.int64), in_size) - first
    taps = np.arange(ksize)
    w = _bicubic(((taps[None, :] + first[:, None]) - center[:, None] + 0.5) * (1.0 / filterscale))
    w[taps[None, :] >= count[:, None]] = 0.0
    total = np.zeros(out_size)
    for t in range(ksize):  # summed tap by tap, in Pillow's order
        total += w[:, t]
    w = np.divide(w, total[:, None], out=w, where=total[:, None] != 0.0)
    scaled = w * float(1 << 22)
    coeffs = np.where(w < 0, np.trunc(-0.5 + scaled), np.trunc(0.5 + scaled)).astype(np.int32)
    bounds = np.stack([first, count], axis=1).astype(np.int32)
    return bounds, coeffs


PASS_ORDERS = ("height_shrink_first", "horizontal_first")


def _vertical_first(order: str, in_w: int, in_h: int, out_w: int, out_h: int) -> bool:
    return order == "height_shrink_first" and in_h - out_h > 0 and in_h - out_h > (in_w - out_w) * 2


def _resize_native(ext, order: str, rgb: np.ndarray, width: int, height: int, threads: int) -> np.ndarray:
    h, w, c = rgb.shape
    rgb = np.ascontiguousarray(rgb)
    out = np.empty((height, width, c), dtype=np.uint8)
    hb, hk = bicubic_taps(w, width) if width != w else (None, None)  # an unchanged axis is no pass, as in Pillow
    vb, vk = bicubic_taps(h, height) if height != h else (None, None)
    addr = lambda a: 0 if a is None else a.ctypes.data  # noqa: E731
    ext.resize_u8(out.ctypes.data, rgb.ctypes.data, h, w, height, width, c, addr(hb), addr(hk),
                  0 if hk is None else hk.shape[1], addr(vb), addr(vk), 0 if vk is None else vk.shape[1],
                  _vertical_first(order, w, h, width, height), threads)
    return out


# A bicubic downscale's taps (Pillow's and ours alike) take about 4 coefficients per input pixel of the axis, and
# computing them several times that in doubles: a 40,000,000 x 1 image needed gigabytes to make one row of tiles.
# An axis longer than this is first shrunk by an integer box average (Image.reduce, what Pillow's reducing_gap does)
# to at most this length; shorter axes, every real photograph's, are resized exactly as before.
MAX_RESAMPLE_SIDE = 1 << 18


def _reduce_factor(in_size: int, out_size: int) -> int:
    return -(-in_size // MAX_RESAMPLE_SIDE) if in_size > max(out_size, MAX_RESAMPLE_SIDE) else 1


def resize_bicubic(rgb: np.ndarray, width: int, height: int) -> np.ndarray:
    """uint8 [H, W, C] with C = 3 (RGB) or 1 (L) -> [height, width, C], the bytes of PIL's
    Image.resize((width, height), BICUBIC). (Pillow resizes LA and RGBA premultiplied, which this does not.) An
    axis longer than MAX_RESAMPLE_SIDE is box-reduced first, so memory stays near the image's own size."""
    if rgb.dtype != np.uint8 or rgb.ndim != 3 or rgb.shape[2] not in (1, 3):
        raise ValueError(f"resize_bicubic: uint8 [H, W, 3 or 1] expected, got {rgb.dtype} {tuple(rgb.shape)}")
    fx, fy = _reduce_factor(rgb.shape[1], width), _reduce_factor(rgb.shape[0], height)
    if fx > 1 or fy > 1:
        im = PIL.Image.fromarray(rgb if rgb.shape[2] == 3 else rgb[..., 0]).reduce((fx, fy))
        rgb = np.asarray(im).reshape(im.height, im.width, -1)
    ext, order = _native_module() if _native_enabled else (None, None)
    if ext is None:
        im = PIL.Image.fromarray(rgb if rgb.shape[2] == 3 else rgb[..., 0])
        return np.asarray(im.resize((width, height), resample=PIL.Image.BICUBIC)).reshape(height, width, -1)
    with _thread_share() as threads:
        return _resize_native(ext, order, rgb, width, height, threads)


def normalize_grids(grids: list[np.ndarray], tile: int, mean, std) -> np.ndarray:
    """HWC uint8 grids of tiles ([rows * tile, cols * tile, 3] each) -> float32 [T, 3, tile, tile], tiles row-major,
    grid after grid, each value through its channel's table (the values of transformers' float arithmetic)."""
    table = _normalize_table(tuple(float(v) for v in mean), tuple(float(v) for v in std))
    shapes = [(g.shape[0] // tile, g.shape[1] // tile) for g in grids]
    out = np.empty((sum(r * c for r, c in shapes), 3, tile, tile), dtype=np.float32)
    ext = native_images()
    t = 0
    for g, (rows, cols) in zip(grids, shapes):
        n = rows * cols
        if ext is not None:
            g = np.ascontiguousarray(g)
            with _thread_share() as threads:
                ext.tiles_normalize(out[t].ctypes.data, g.ctypes.data, rows, cols, tile, 3, table.ctypes.data, threads)
        else:
            v = g.reshape(rows, tile, cols, tile, 3).transpose(0, 2, 4, 1, 3).reshape(n, 3, tile, tile)
            for c in range(3):
                np.take(table[c], v[:, c], out=out[t:t + n, c])
        t += n
    return out


def content_digest(pixels_u8, *params) -> bytes:
    """SHA-256 of uint8 pixels (one array or a list; shapes included) and the parameters that turn them into model
    input (mean, std). Normalisation is a per-channel injective map of uint8, so this identifies the float pixel
    tensor exactly while hashing a quarter of its bytes (the media content key of the prefix and vision caches).
    SHA-256 rather than the caches' blake2b: it hashes megabytes per image, and with the SHA extensions of current
    CPUs it runs at about twice blake2b's speed (1.9 vs 1.05 GB/s on the development machine)."""
    arrays = pixels_u8 if isinstance(pixels_u8, (list, tuple)) else [pixels_u8]
    h = hashlib.sha256()
    h.update(repr(([a.shape for a in arrays], params)).encode())
    for a in arrays:
        h.update(memoryview(np.ascontiguousarray(a)))
    return h.digest()


def preprocess_image(image, *, tile: int = TILE_SIZE, mean=IMAGENET_MEAN, std=IMAGENET_STD, **tiling) -> np.ndarray:
    """float32 [T, 3, tile, tile]: tiles row-major, then a thumbnail when T > 1 (tiling: image_grids_u8's)."""
    return normalize_grids(image_grids_u8(image, tile=tile, **tiling), tile, mean, std)


def image_grids_u8(
    image,
    *,
    tile: int = TILE_SIZE,
    min_tiles: int = MIN_TILES,
    max_tiles: int = MAX_TILES,
    crop_to_patches: bool = True,
) -> list[np.ndarray]:
    """The image resized, as uint8 HWC grids of tiles before normalisation: the canvas [rows * tile, cols * tile, 3]
    (read tile by tile, row-major), then a [tile, tile, 3] thumbnail when the canvas holds more than one tile."""
    validate_tile_limits(min_tiles, max_tiles)
    rgb = to_rgb_array(image)
    h, w = rgb.shape[:2]
    if crop_to_patches and max_tiles > 1:
        cols, rows = select_grid(w, h, min_tiles, max_tiles, tile)
        grids = [resize_bicubic(rgb, cols * tile, rows * tile)]
        if cols * rows > 1:
            grids.append(resize_bicubic(rgb, tile, tile))
        return grids
    return [resize_bicubic(rgb, tile, tile)]
