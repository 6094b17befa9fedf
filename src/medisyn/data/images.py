"""Pixel rules and geometry shared by every format (section 4.1).

* Intensity rules map stored values to 0..255 uint8:
  ``hu_window`` (CT, level 100 / width 700 HU), ``percentile_clip`` (MRI, mammography: clip to the
  0.5th and 99.5th percentiles), ``minmax`` (other greyscale deeper than 8 bits); 8-bit greyscale and
  RGB are kept as stored.
* Geometry: :func:`resize_center_crop` (shorter side -> 512, aspect kept, center crop 512x512) and
  :func:`tile_positions` (whole-slide images: 512 tiles with at most 10% overlap).
* Plain image files (PNG 8/16 bit, JPEG, TIFF) are opened with PIL after checks on the header alone
  (:func:`open_image`): a decompression-bomb check on the declared pixels, a truncation check (a PNG or
  Huffman-coded JPEG must hold at least the compressed data its declared size needs) and a limit on
  the bytes the decoded image takes (issue #21); :func:`load_pixels` decodes with PIL's
  ``LOAD_TRUNCATED_IMAGES`` off.

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
import re

import numpy as np
from PIL import Image, ImageFile

# Our own bomb guard (config data.max_pixels) runs on declared sizes before any decode; PIL's
# warning-then-error heuristic would otherwise fire at a fixed 89 Mpx on legitimate slides.
Image.MAX_IMAGE_PIXELS = None

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


class RuleError(ValueError):
    """An image cannot be brought to 0..255 by the requested rule (reason goes to rejected.jsonl)."""


class DecompressionBombError(ValueError):
    """Declared dimensions exceed ``data.max_pixels``: rejected before decoding."""


class DecodeBudgetError(ValueError):
    """The decoded image would take more bytes than ``data.max_decoded_mb``: rejected before decoding."""


class TruncatedImageError(ValueError):
    """The file holds less data than its declared size needs (before decoding), or the decoder ran out."""


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


def open_image(data: bytes, max_pixels: int, max_decoded_bytes: int | None = None) -> Image.Image:
    """PIL image from PNG/JPEG/TIFF bytes; nothing is decoded, and the header is checked in this order:

    1. declared pixels (every frame) against ``max_pixels``: :class:`DecompressionBombError`;
    2. PNG and Huffman-coded JPEG: the compressed data must be able to hold the declared size
       (:func:`png_shortfall`, :func:`jpeg_shortfall`): :class:`TruncatedImageError`. libjpeg pads a
       scan that ends early with grey and PIL drops its warning: a JPEG closed (EOI) before its data
       is caught here or not at all;
    3. the decoded image's bytes (:func:`decoded_bytes`) against ``max_decoded_bytes`` (None: no
       limit): :class:`DecodeBudgetError`.

    Decode with :func:`load_pixels`.
    """
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
    check = {"PNG": png_shortfall, "JPEG": jpeg_shortfall, "MPO": jpeg_shortfall}.get(img.format or "")
    shortfall = check(data) if check else None
    if shortfall:
        raise TruncatedImageError(shortfall)
    need = decoded_bytes(img)
    if max_decoded_bytes is not None and need > max_decoded_bytes:
        raise DecodeBudgetError(f"declared {w}x{h} {img.mode} decodes to {need:,} bytes ({need / 2**20:,.0f} MiB) "
                                f"> the limit of {max_decoded_bytes:,} bytes ({max_decoded_bytes / 2**20:,.0f} MiB, "
                                "data.max_decoded_mb)")
    return img


# Bytes a pixel takes in PIL's decoded image (libImaging/Storage.c): one for 1, L and P, two for the
# 16-bit greyscale modes, four for every other mode (RGB is stored as RGBX, LA in four bytes too).
# A palette image counts as the RGB that image_to_uint8 expands it to before anything else.
_DECODED_PIXEL_BYTES = {"1": 1, "L": 1, "P": 4, "I;16": 2, "I;16L": 2, "I;16B": 2, "I;16N": 2}


def decoded_bytes(img: Image.Image) -> int:
    """Bytes of ``img``'s first frame once decoded (width x height x bytes a pixel), from the header."""
    w, h = img.size
    return w * h * _DECODED_PIXEL_BYTES.get(img.mode, 4)


def load_pixels(img: Image.Image) -> None:
    """Decode ``img`` (from :func:`open_image`). A file that ends before its pixels do raises
    :class:`TruncatedImageError`: PIL's ``LOAD_TRUNCATED_IMAGES`` (a process-wide flag a library may
    set, which makes PIL keep a partly decoded image) is off while this decodes."""
    previous = ImageFile.LOAD_TRUNCATED_IMAGES
    ImageFile.LOAD_TRUNCATED_IMAGES = False
    try:
        img.load()
    except OSError as exc:
        if "truncated" in str(exc):  # PIL: "image file is truncated (n bytes not processed)"
            raise TruncatedImageError(f"{img.format} {img.size[0]}x{img.size[1]}: {exc}") from None
        raise
    finally:
        ImageFile.LOAD_TRUNCATED_IMAGES = previous


# Deflate's largest ratio: a 258-byte match coded in two bits (one-bit length and distance codes), 1032:1.
_DEFLATE_MAX_RATIO = 1032
_PNG_CHANNELS = {0: 1, 2: 3, 3: 1, 4: 2, 6: 4}  # by IHDR colour type


def png_shortfall(data: bytes) -> str | None:
    """Why a PNG's IDAT data cannot inflate to the size its IHDR declares, or None.

    The scanlines of a w x h image take at least ``h * ceil(w * bits * channels / 8)`` bytes once
    inflated, and deflate never compresses better than 1032:1, so the IDAT chunks must hold at least
    1/1032 of that. A structure this walk does not understand gives None (PIL then decides).
    """
    if not data.startswith(PNG_SIGNATURE) or data[12:16] != b"IHDR" or len(data) < 33:
        return None
    w, h = int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")
    bits, colour, interlaced = data[24], data[25], data[28]
    if colour not in _PNG_CHANNELS:
        return None
    raw = h * ((w * bits * _PNG_CHANNELS[colour] + 7) // 8) + (0 if interlaced else h)  # + filter bytes
    idat, i = 0, 8
    while i + 8 <= len(data):
        length, kind = int.from_bytes(data[i : i + 4], "big"), data[i + 4 : i + 8]
        if kind == b"IDAT":
            idat += min(length, len(data) - i - 8)
        elif kind == b"IEND":
            break
        i += 12 + length
    need = -(-raw // _DEFLATE_MAX_RATIO)
    if idat < need:
        return (f"PNG declares {w}x{h} ({raw:,} bytes of scanlines): deflate needs at least {need:,} bytes "
                f"of IDAT data for that, the file holds {idat:,}")
    return None


# A scan's entropy-coded data ends at the first marker that is not a stuffed 0xFF00 or a restart marker.
_SCAN_END = re.compile(rb"\xff[^\x00\xd0-\xd7]")
_HUFFMAN_SOF = {0xC0, 0xC1, 0xC2, 0xC3}  # baseline, extended, progressive, lossless
_OTHER_SOF = {0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF}  # hierarchical, arithmetic


def jpeg_shortfall(data: bytes) -> str | None:
    """Why a Huffman-coded JPEG's scans cannot hold the size its frame header declares, or None.

    Every 8x8 block of a component is coded in a sequential scan, and in a progressive file's DC
    scans, by at least one bit (a Huffman code is at least one bit long; a DC refinement bit is one
    bit), so such a scan must hold at least blocks / 8 bytes; every component must appear in one.
    libjpeg fills a scan that ends early with grey blocks and PIL ignores the warning: a 335-byte
    JPEG declaring 19000x19000 became a blank image at a 1.4 GB peak (issue #21). Arithmetic-coded and
    hierarchical JPEGs have no such bound (None), nor has a structure this walk does not understand.
    """
    if data[:2] != b"\xff\xd8":
        return None
    frame: tuple[int, int, int, dict[int, int]] | None = None  # marker, width, height, blocks by component id
    covered: set[int] = set()
    i = 2
    while i + 4 <= len(data):
        if data[i] != 0xFF:  # libjpeg skips bytes before a marker (with a warning): so does this walk
            i = data.find(b"\xff", i)
            if i < 0:
                break
            continue
        marker = data[i + 1]
        if marker == 0xFF or marker == 0x01 or 0xD0 <= marker <= 0xD8:  # fill byte, segments without a length
            i += 1 if marker == 0xFF else 2
            continue
        if marker == 0xD9:  # end of image
            break
        length = int.from_bytes(data[i + 2 : i + 4], "big")
        segment = data[i + 4 : i + 2 + length]
        if marker in _OTHER_SOF and frame is None:
            return None
        if marker in _HUFFMAN_SOF and frame is None:
            frame = _jpeg_frame(marker, segment)
            if frame is None:
                return None
        i += 2 + length
        if marker != 0xDA:
            continue
        if frame is None or not segment:  # a scan before any frame header: PIL refuses it
            return None
        sof, width, height, blocks = frame
        ids = [segment[1 + 2 * k] for k in range(segment[0]) if 1 + 2 * k < len(segment)]
        end_match = _SCAN_END.search(data, i)
        end = end_match.start() if end_match else len(data)
        spectral_start = segment[1 + 2 * len(ids)] if 1 + 2 * len(ids) < len(segment) else 0
        if sof != 0xC2 or spectral_start == 0:  # every block coded: sequential, lossless, or a DC scan
            need_bits = sum(blocks.get(c, 0) for c in ids)
            if (end - i) * 8 < need_bits:
                return (f"JPEG declares {width}x{height}: its scan of component(s) {ids} codes {need_bits:,} "
                        f"blocks, at least one bit each ({-(-need_bits // 8):,} bytes), and holds "
                        f"{end - i:,} bytes")
            covered.update(ids)
        i = end
    if frame is None:
        return None
    sof, width, height, blocks = frame
    missing = sorted(set(blocks) - covered)
    if missing and width and height:
        return f"JPEG declares {width}x{height}: the file ends before a scan codes component(s) {missing}"
    return None


def _jpeg_frame(marker: int, segment: bytes) -> tuple[int, int, int, dict[int, int]] | None:
    """(marker, width, height, {component id: 8x8 blocks}) from a SOF segment's body, or None."""
    if len(segment) < 6:
        return None
    height, width, n = int.from_bytes(segment[1:3], "big"), int.from_bytes(segment[3:5], "big"), segment[5]
    comps = [(segment[6 + 3 * k], segment[7 + 3 * k] >> 4, segment[7 + 3 * k] & 15)
             for k in range(n) if 8 + 3 * k < len(segment)]
    if not comps or any(hs == 0 or vs == 0 for _, hs, vs in comps):
        return None
    h_max, v_max = max(c[1] for c in comps), max(c[2] for c in comps)
    blocks = {}
    for cid, hs, vs in comps:  # a component's samples, rounded up to whole blocks (T.81 A.1.1)
        cw, ch = -(-width * hs // h_max), -(-height * vs // v_max)
        blocks[cid] = -(-cw // 8) * -(-ch // 8)
    return marker, width, height, blocks


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
