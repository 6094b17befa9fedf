"""Pixel rules and geometry shared by every format (section 4.1).

* Intensity rules map stored values to 0..255 uint8:
  ``hu_window`` (CT, level 100 / width 700 HU), ``percentile_clip`` (MRI, mammography: clip to the
  0.5th and 99.5th percentiles), ``minmax`` (other greyscale deeper than 8 bits); 8-bit greyscale and
  RGB are kept as stored.
* Geometry: :func:`resize_center_crop` (shorter side -> 512, aspect kept, center crop 512x512) and
  :func:`tile_positions` (whole-slide images: 512 tiles with at most 10% overlap).
* Plain image files (PNG 8/16 bit, JPEG, TIFF) are opened with PIL after a decompression-bomb check.

All rule arithmetic is float64 then ``np.rint`` so a hand computation reproduces it bit for bit.
On integer pixels of at most 16 bits the rules run over the frame's value range instead of its
pixels: a lookup table (:func:`by_stored_value`) whose entries are the same float64 formula, and
for ``percentile_clip`` percentiles from the histogram of stored values. The output is identical,
and a 2500x2048 radiograph is read as 2 bytes a pixel instead of several float64 passes (the rules
were the largest, and the only memory-bound, share of the per-image work).
"""

from __future__ import annotations

import hashlib
import io
import math

import numpy as np
from PIL import Image

# Our own bomb guard (config data.max_pixels) runs on declared sizes before any decode; PIL's
# warning-then-error heuristic would otherwise fire at a fixed 89 Mpx on legitimate slides.
Image.MAX_IMAGE_PIXELS = None

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


class RuleError(ValueError):
    """An image cannot be brought to 0..255 by the requested rule (reason goes to rejected.jsonl)."""


class DecompressionBombError(ValueError):
    """Declared dimensions exceed ``data.max_pixels``: rejected before decoding."""


def _to_uint8(scaled01: np.ndarray) -> np.ndarray:
    return np.rint(np.clip(scaled01, 0.0, 1.0) * 255.0).astype(np.uint8)


def hu_window(hu: np.ndarray, level: float = 100.0, width: float = 700.0) -> np.ndarray:
    """Hounsfield units -> uint8 by a linear window: level - width/2 -> 0, level + width/2 -> 255
    (section 4.1: W 700 / L 100, after ref. 45). Values outside the window saturate."""
    if width <= 0:
        raise RuleError(f"hu_window width must be > 0, got {width}")
    lo = level - width / 2.0
    return _to_uint8((np.asarray(hu, dtype=np.float64) - lo) / width)


def percentile_clip(values: np.ndarray, low: float = 0.5, high: float = 99.5) -> np.ndarray:
    """Clip to the low/high percentiles then rescale to 0..255 (section 4.1, MRI and mammography).
    A constant image maps to 0. Percentiles as ``np.percentile`` (linear interpolation)."""
    v = np.asarray(values)
    if _lut_eligible(v):
        return percentile_clip_stored(v, None, low, high)
    _check_percentiles(low, high)
    v = v.astype(np.float64, copy=False)
    p_lo, p_hi = np.percentile(v, [low, high])
    return _rescale(v, p_lo, p_hi)


def percentile_clip_stored(stored: np.ndarray, to_values, low: float = 0.5, high: float = 99.5) -> np.ndarray:
    """``percentile_clip(to_values(stored))`` for integer pixels of at most 16 bits, without sorting.

    ``to_values`` (a modality LUT; None = identity) is evaluated once per stored value. The
    percentiles come from the histogram of stored values: the order statistics that
    ``np.percentile`` would pick, interpolated by its own formula (:func:`_percentile_of_sorted`),
    so the result equals the float64 path bit for bit (tested), for any map, monotone or not.
    """
    _check_percentiles(low, high)
    stored = np.asarray(stored)
    if not _lut_eligible(stored):
        return percentile_clip(stored if to_values is None else to_values(stored), low, high)
    lo, hi = int(stored.min()), int(stored.max())
    domain = np.arange(lo, hi + 1, dtype=stored.dtype)
    domain_values = np.asarray(domain if to_values is None else to_values(domain), dtype=np.float64)
    counts = np.zeros(hi - lo + 1, dtype=np.int64)
    for _, _, index in _index_chunks(stored, lo):
        counts += np.bincount(index, minlength=counts.size)
    present = counts > 0
    order = np.argsort(domain_values[present], kind="stable")
    sorted_values = domain_values[present][order]
    cumulative = np.cumsum(counts[present][order])
    p_lo, p_hi = (_percentile_of_sorted(sorted_values, cumulative, q) for q in (low, high))
    return _look_up(stored, lo, _rescale(domain_values, p_lo, p_hi))


def _percentile_of_sorted(sorted_values: np.ndarray, cumulative: np.ndarray, q: float) -> float:
    """``np.percentile(x, q)`` (method linear) where x, sorted, is ``sorted_values[i]`` repeated up to
    ``cumulative[i]``: numpy's virtual index, neighbours and ``_lerp`` replayed in float64."""
    n = int(cumulative[-1])

    def kth(k: int) -> float:
        return float(sorted_values[np.searchsorted(cumulative, k, side="right")])

    virtual = (n - 1) * float(np.true_divide(q, 100))
    if virtual >= n - 1:
        return kth(n - 1)
    if virtual < 0:
        return kth(0)
    previous = math.floor(virtual)
    a, b, t = kth(previous), kth(previous + 1), virtual - previous
    diff = b - a
    return b - diff * (1 - t) if t >= 0.5 else a + diff * t


def _check_percentiles(low: float, high: float) -> None:
    if not 0 <= low < high <= 100:
        raise RuleError(f"percentile_clip needs 0 <= low < high <= 100, got {low}, {high}")


def _rescale(v: np.ndarray, lo: float, hi: float) -> np.ndarray:
    """[lo, hi] -> 0..255, saturating; a degenerate range maps to 0."""
    if not hi > lo:
        return np.zeros(v.shape, dtype=np.uint8)
    return _to_uint8((v - lo) / (hi - lo))


def minmax(values: np.ndarray) -> np.ndarray:
    """Rescale [min, max] to 0..255 (greyscale deeper than 8 bits without a modality rule)."""
    v = np.asarray(values)
    if _lut_eligible(v):  # the domain's ends are the frame's min and max, so the table is exact
        return by_stored_value(v, _minmax_float)
    return _minmax_float(v)


def _minmax_float(values: np.ndarray) -> np.ndarray:
    v = np.asarray(values, dtype=np.float64)
    return _rescale(v, float(v.min()), float(v.max()))


_LUT_CHUNK = 1 << 17  # pixels per lookup call: 1 MiB of intp indices


def _lut_eligible(arr: np.ndarray) -> bool:
    return arr.dtype.kind in "iu" and arr.dtype.itemsize <= 2 and arr.size > 0


def by_stored_value(arr: np.ndarray, fn) -> np.ndarray:
    """``fn`` over the integers ``arr.min() .. arr.max()``, then looked up per pixel.

    Equals ``fn(arr)`` bit for bit when ``fn`` is elementwise (a modality LUT, a window), and also
    for ``minmax`` of a monotone map of ``arr``: the table's first and last entries come from the
    frame's own min and max. ``arr``: integers of at most 16 bits (anything else: ``fn(arr)``). The
    table has at most 65,536 entries; the per-pixel work is one subtraction and one lookup.
    """
    arr = np.asarray(arr)
    if not _lut_eligible(arr):
        return fn(arr)
    lo, hi = int(arr.min()), int(arr.max())
    return _look_up(arr, lo, np.asarray(fn(np.arange(lo, hi + 1, dtype=arr.dtype))))


def _look_up(arr: np.ndarray, lo: int, table: np.ndarray) -> np.ndarray:
    """``table[arr - lo]``, chunk by chunk."""
    out = np.empty(arr.size, dtype=table.dtype)
    for start, stop, index in _index_chunks(arr, lo):
        np.take(table, index, out=out[start:stop])
    return out.reshape(arr.shape)


def _index_chunks(arr: np.ndarray, lo: int):
    """(start, stop, arr.flat[start:stop] - lo) in chunks of ``_LUT_CHUNK`` pixels.

    arr - lo lies in [0, max - lo], which fits the unsigned type of the same width; wrap-around
    subtraction on that view computes it for signed pixels too. Chunks keep numpy's intp copy of the
    indices in cache (one call over a whole radiograph is twice as slow).
    """
    native = arr.dtype.newbyteorder("=")  # big-endian DICOM decodes to '>i2': its bytes cannot be viewed as native
    unsigned = np.dtype(f"u{arr.dtype.itemsize}")
    offset = unsigned.type(lo % (1 << (8 * arr.dtype.itemsize)))
    flat = np.ascontiguousarray(arr, dtype=native).reshape(-1).view(unsigned)
    for start in range(0, flat.size, _LUT_CHUNK):
        stop = min(start + _LUT_CHUNK, flat.size)
        yield start, stop, flat[start:stop] - offset


def resized_shape(height: int, width: int, size: int = 512) -> tuple[int, int]:
    """(h, w) after scaling the shorter side to ``size`` with the aspect ratio kept (rounded)."""
    if height <= width:
        return size, max(size, int(round(width * size / height)))
    return max(size, int(round(height * size / width))), size


def resize_center_crop(array: np.ndarray, size: int = 512) -> np.ndarray:
    """Resize the shorter side to ``size`` (longer side proportional) then center crop size x size.

    Section 4.1. Interpolation: PIL bicubic, which widens its kernel when downscaling, so it is
    antialiased both ways. The crop offset is ``(long - size) // 2``. Accepts HxW or HxWx3 uint8 and
    returns the same layout. An image already ``size`` x ``size`` is returned unchanged.
    """
    arr = np.asarray(array)
    if arr.dtype != np.uint8 or arr.ndim not in (2, 3) or (arr.ndim == 3 and arr.shape[2] != 3):
        raise ValueError(f"resize_center_crop expects HxW or HxWx3 uint8, got {arr.shape} {arr.dtype}")
    h, w = arr.shape[:2]
    if h == size and w == size:
        return arr
    nh, nw = resized_shape(h, w, size)
    img = Image.fromarray(arr)
    if (nh, nw) != (h, w):
        img = img.resize((nw, nh), Image.Resampling.BICUBIC)
    top, left = (nh - size) // 2, (nw - size) // 2
    return np.asarray(img.crop((left, top, left + size, top + size)))


def tile_positions(length: int, size: int = 512, max_overlap: float = 0.10) -> list[int]:
    """Start offsets of tiles of ``size`` along an axis of ``length``, overlap <= ``max_overlap`` x size.

    Section 4.1 ("patches with a maximum overlap of 10%"). The fewest evenly spread tiles that cover
    the axis without gaps are used when their overlap respects the cap; when it cannot (the axis is
    just over a multiple of ``size``) the cap wins and thin gaps between tiles are left (whole-slide
    borders are background). A single tile is centered. ``length < size`` gives no tile.
    """
    if length < size:
        return []
    span = length - size
    if span == 0:
        return [0]
    min_stride = math.ceil(size * (1.0 - max_overlap))  # integer, so floor offsets keep the cap
    n_steps = math.ceil(span / size)  # fewest steps without gaps
    if n_steps * min_stride > span:  # would overlap too much: fewer steps, gaps allowed
        n_steps = span // min_stride
    if n_steps == 0:
        return [span // 2]
    stride = span / n_steps
    return [int(math.floor(i * stride)) for i in range(n_steps)] + [span]


def tiles(array: np.ndarray, size: int = 512, max_overlap: float = 0.10) -> list[tuple[int, int, np.ndarray]]:
    """(y, x, tile) for every tile of a large image (row-major)."""
    h, w = array.shape[:2]
    return [
        (y, x, array[y : y + size, x : x + size])
        for y in tile_positions(h, size, max_overlap)
        for x in tile_positions(w, size, max_overlap)
    ]


def open_image(data: bytes, max_pixels: int) -> Image.Image:
    """PIL image from PNG/JPEG/TIFF bytes; the declared size is checked before pixels are decoded."""
    img = Image.open(io.BytesIO(data))  # reads the header only: nothing is decoded before .load()
    w, h = img.size
    # Every page / frame counts (multi-page TIFF, APNG), although only the first is decoded: the
    # declared total is what a hostile file claims, and it is refused as a whole.
    frames = max(1, int(getattr(img, "n_frames", 1) or 1))
    if w * h * frames > max_pixels:
        pages = f" x {frames} frames" if frames > 1 else ""
        raise DecompressionBombError(f"declared {w}x{h} pixels{pages} exceeds max_pixels={max_pixels}")
    if frames > 1:
        img.seek(0)
    return img


def image_to_uint8(img: Image.Image, rule: str = "auto", **params) -> np.ndarray:
    """PIL image -> HxW or HxWx3 uint8 by the named rule.

    ``auto``: 8-bit greyscale and colour are kept (palette, CMYK, alpha -> RGB; alpha dropped);
    16-bit / 32-bit / float greyscale -> ``minmax``. Multi-page TIFF: the first page.
    """
    if getattr(img, "n_frames", 1) > 1:
        img.seek(0)
    mode = img.mode
    if mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        arr = np.asarray(img)
        if rule in ("auto", "minmax"):
            return minmax(arr)
        if rule == "percentile_clip":
            return percentile_clip(arr, params.get("low", 0.5), params.get("high", 99.5))
        if rule == "hu_window":
            return hu_window(arr, params.get("level", 100.0), params.get("width", 700.0))
        raise RuleError(f"rule {rule!r} cannot keep {mode} pixels as 8 bit; use minmax")
    if mode in ("1", "L"):
        arr = np.asarray(img.convert("L"))
    elif mode == "LA":
        arr = np.asarray(img.convert("L"))
    else:  # RGB, RGBA, P, CMYK, YCbCr, ... -> RGB
        arr = np.asarray(img.convert("RGB"))
    if rule in ("auto", "keep"):
        return np.ascontiguousarray(arr)
    grey = arr if arr.ndim == 2 else None
    if grey is None:
        raise RuleError(f"rule {rule!r} needs greyscale pixels, got colour ({mode})")
    if rule == "minmax":
        return minmax(grey)
    if rule == "percentile_clip":
        return percentile_clip(grey, params.get("low", 0.5), params.get("high", 99.5))
    raise RuleError(f"rule {rule!r} does not apply to 8-bit {mode} images (no Hounsfield units)")


def encode_png(array: np.ndarray, compress_level: int = 3) -> bytes:
    """PNG bytes (mode L or RGB). No metadata chunks, so the bytes depend only on the pixels."""
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG", compress_level=compress_level)
    return buf.getvalue()


def decode_png(data: bytes) -> Image.Image:
    """PNG bytes from a dataset shard -> PIL image (mode L or RGB, as stored). Greyscale images are
    stored as one channel; models that want RGB call ``.convert("RGB")`` (channel replicated)."""
    img = Image.open(io.BytesIO(data))
    img.load()
    return img


def pixel_hash(array: np.ndarray) -> str:
    """sha256 over shape and normalized pixels: equal iff the dataset images are identical."""
    h = hashlib.sha256(f"{array.shape}|{array.dtype}".encode())
    h.update(np.ascontiguousarray(array).tobytes())
    return h.hexdigest()


def perceptual_hash(array: np.ndarray) -> int:
    """64-bit DCT perceptual hash (imagehash.phash on the greyscale image) for near-duplicates."""
    import imagehash

    img = Image.fromarray(array).convert("L")
    bits = imagehash.phash(img, hash_size=8).hash.flatten()
    return int("".join("1" if b else "0" for b in bits), 2)


def hamming(a: int, b: int) -> int:
    return (a ^ b).bit_count()
