"""DICOM -> 8-bit pixels by the modality rules of section 4.1.

Decoding covers every common transfer syntax: implicit/explicit VR little endian, explicit big
endian, deflate, RLE lossless, JPEG baseline / extended / lossless, JPEG-LS and JPEG 2000 (pydicom's
own decoders plus the pylibjpeg plugins pylibjpeg-libjpeg, -openjpeg and -rle).

Order of operations in :func:`to_uint8` (greyscale):

1. decode one frame (multi-frame: the middle frame unless ``frame=`` is given);
2. Modality LUT: RescaleSlope / RescaleIntercept (or a Modality LUT Sequence) -> HU for CT;
3. the VOI LUT / window in the header is ignored, unless the rule says ``apply_voi_lut=True``
   (public repositories disagree on their windows; the paper's fixed rules are applied instead);
4. the rule: ``hu_window`` / ``percentile_clip`` / ``minmax`` / ``keep`` (see ``images.py``);
5. MONOCHROME1 is inverted (255 - v) so bright always means dense, as in MONOCHROME2.

Colour (RGB, YBR_* converted to RGB by the decoder, PALETTE COLOR through its LUT) is kept as RGB;
colour deeper than 8 bits is scaled linearly by its bit depth.
"""

from __future__ import annotations

import io
from typing import Any

import numpy as np
import pydicom
from pydicom.dataset import Dataset
from pydicom.pixels import apply_color_lut, apply_modality_lut, apply_voi_lut, get_decoder

from medisyn.data.images import (
    DecompressionBombError,
    RuleError,
    by_stored_value,
    hu_window,
    minmax,
    percentile_clip_stored,
)

DICOM_MAGIC_OFFSET = 128


class NotAnImageError(ValueError):
    """A DICOM object without pixel data (SR, RT plan, ...)."""


class HostileHeaderError(ValueError):
    """A header built to exhaust the reader: sequences nested too deep, too many elements, a huge
    non-pixel value, or pixel data shorter than the dimensions declare (issue #12)."""


# Header bounds (real files stay far below: enhanced multi-frame objects nest 3-4 levels and carry
# tens of thousands of elements; the longest text values, SR and reports, are kilobytes).
MAX_SEQUENCE_DEPTH = 16
MAX_HEADER_ELEMENTS = 200_000
MAX_VALUE_BYTES = 1 << 20  # one non-pixel element
_PIXEL_TAGS = {0x7FE00010, 0x7FE00008, 0x7FE00009}  # PixelData, FloatPixelData, DoubleFloatPixelData


def check_header(ds: Dataset) -> None:
    """Refuse a hostile header before any pixel is decoded (:class:`HostileHeaderError`). Walks the
    elements without converting their values (raw lengths), iteratively, so a deep nesting costs
    neither recursion nor memory."""
    stack: list[tuple[Dataset, int]] = [(ds, 0)]
    n = 0
    while stack:
        current, depth = stack.pop()
        for tag in list(current.keys()):
            n += 1
            if n > MAX_HEADER_ELEMENTS:
                raise HostileHeaderError(f"more than {MAX_HEADER_ELEMENTS} header elements")
            if int(tag) in _PIXEL_TAGS:
                continue
            raw = current.get_item(tag)
            vr = getattr(raw, "VR", None)
            length = getattr(raw, "length", None)
            if vr != "SQ" and isinstance(length, int) and 0 < length != 0xFFFFFFFF and length > MAX_VALUE_BYTES:
                raise HostileHeaderError(f"element {tag} ({vr}) holds {length} bytes > {MAX_VALUE_BYTES} "
                                         "(a huge non-pixel value)")
            if vr == "SQ":
                if depth + 1 > MAX_SEQUENCE_DEPTH:
                    raise HostileHeaderError(f"sequences nested deeper than {MAX_SEQUENCE_DEPTH} levels")
                stack.extend((item, depth + 1) for item in current[tag].value)


_NATIVE_SYNTAXES = {"1.2.840.10008.1.2", "1.2.840.10008.1.2.1", "1.2.840.10008.1.2.2", "1.2.840.10008.1.2.1.99"}


def check_native_length(ds: Dataset) -> None:
    """Uncompressed pixel data must hold what Rows x Columns x frames x samples x bits declare: huge
    dimensions over a few bytes of data are refused before the decoder allocates the frame."""
    syntax = str(getattr(ds, "file_meta", Dataset()).get("TransferSyntaxUID", ""))
    if syntax not in _NATIVE_SYNTAXES or "PixelData" not in ds:
        return
    bits = int(ds.get("BitsAllocated", 8) or 8)
    expected = int(ds.Rows) * int(ds.Columns) * n_frames(ds) * _samples(ds) * bits // 8
    have = len(ds.PixelData)
    if have < expected:
        raise HostileHeaderError(f"pixel data holds {have} bytes, the header declares {expected} "
                                 f"({ds.Rows}x{ds.Columns}x{n_frames(ds)}x{_samples(ds)} at {bits} bits)")


def is_dicom(data: bytes) -> bool:
    return len(data) >= 132 and data[DICOM_MAGIC_OFFSET : DICOM_MAGIC_OFFSET + 4] == b"DICM"


def n_frames(ds: Dataset) -> int:
    try:
        return max(1, int(ds.get("NumberOfFrames", 1) or 1))
    except (TypeError, ValueError):
        return 1


def _samples(ds: Dataset) -> int:
    try:
        return max(1, int(ds.get("SamplesPerPixel", 1) or 1))
    except (TypeError, ValueError):
        return 1


def check_dimensions(ds: Dataset, max_pixels: int) -> None:
    """Refuse huge declared dimensions before any pixel is decoded (decompression bombs):
    Rows x Columns x NumberOfFrames x SamplesPerPixel from the header."""
    rows, cols = int(ds.get("Rows", 0) or 0), int(ds.get("Columns", 0) or 0)
    if rows <= 0 or cols <= 0:
        raise NotAnImageError("DICOM object has no Rows/Columns (not an image)")
    declared = rows * cols * n_frames(ds) * _samples(ds)
    if declared > max_pixels:
        raise DecompressionBombError(f"declared {rows}x{cols}x{n_frames(ds)} pixels x {_samples(ds)} samples "
                                     f"exceeds max_pixels={max_pixels}")


# Encapsulated transfer syntaxes whose decoders size their output from the codestream, not the header
_JPEG_SYNTAXES = {f"1.2.840.10008.1.2.4.{n}" for n in (50, 51, 57, 70, 80, 81)}  # JPEG, JPEG lossless, JPEG-LS
_J2K_SYNTAXES = {f"1.2.840.10008.1.2.4.{n}" for n in (90, 91, 92, 93, 201, 202, 203)}  # JPEG 2000, HTJ2K
# JPEG start-of-frame markers: SOF0-3, 5-7, 9-11, 13-15 and JPEG-LS SOF55
_SOF_MARKERS = {0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF, 0xF7}


def jpeg_frame_size(buf: bytes) -> tuple[int, int, int] | None:
    """(width, height, components) from a JPEG / JPEG-LS codestream's SOF segment, walking the
    marker segments from SOI; None when there is no SOF before the first scan."""
    if buf[:2] != b"\xff\xd8":
        return None
    i = 2
    while i + 4 <= len(buf):
        if buf[i] != 0xFF:
            return None
        marker = buf[i + 1]
        if marker == 0xFF:  # fill byte
            i += 1
            continue
        if marker == 0x01 or 0xD0 <= marker <= 0xD8:  # segments without a length
            i += 2
            continue
        if marker in (0xDA, 0xD9):  # start of scan / end of image before any frame header
            return None
        if marker in _SOF_MARKERS:
            if i + 10 > len(buf):
                return None
            height, width = int.from_bytes(buf[i + 5 : i + 7], "big"), int.from_bytes(buf[i + 7 : i + 9], "big")
            return width, height, buf[i + 9]
        i += 2 + int.from_bytes(buf[i + 2 : i + 4], "big")
    return None


def j2k_frame_size(buf: bytes) -> tuple[int, int, int] | None:
    """(width, height, components) from a JPEG 2000 codestream's SIZ segment (raw codestream or the
    contiguous codestream box of a JP2 file); None when there is none."""
    at = buf.find(b"\xff\x4f\xff\x51")  # SOC then SIZ
    if at < 0 or at + 44 > len(buf):
        return None
    siz = at + 2

    def u32(k: int) -> int:
        return int.from_bytes(buf[siz + k : siz + k + 4], "big")

    x, y, x0, y0 = u32(6), u32(10), u32(14), u32(18)
    if x0 > x or y0 > y:
        return None
    return x - x0, y - y0, int.from_bytes(buf[siz + 38 : siz + 40], "big")


def check_codestreams(ds: Dataset, max_pixels: int) -> None:
    """Encapsulated JPEG / JPEG-LS / JPEG 2000: the size declared inside every frame's codestream is
    what the decoder allocates, whatever the DICOM header says. Refuse it, before any decoding, when
    it exceeds ``max_pixels`` or the header's Rows x Columns x SamplesPerPixel; a frame without a
    readable frame header is refused as undecodable. Other syntaxes are sized by the header."""
    syntax = str(ds.file_meta.TransferSyntaxUID)
    kind = "JPEG" if syntax in _JPEG_SYNTAXES else "JPEG 2000" if syntax in _J2K_SYNTAXES else None
    if kind is None or "PixelData" not in ds:
        return
    from pydicom.encaps import generate_frames

    rows, cols, samples, nf = int(ds.Rows), int(ds.Columns), _samples(ds), n_frames(ds)
    parse = jpeg_frame_size if kind == "JPEG" else j2k_frame_size
    for index, frame in enumerate(generate_frames(ds.PixelData, number_of_frames=nf)):
        size = parse(frame)
        if size is None:
            raise ValueError(f"frame {index}: no {kind} frame header in the codestream")
        width, height, comps = size
        if width == 0 or height == 0:  # height given later (DNL): unknown before decoding
            raise DecompressionBombError(f"frame {index}: {kind} codestream declares {width}x{height}")
        if width * height * comps > max_pixels or width * height * comps > rows * cols * samples:
            raise DecompressionBombError(
                f"frame {index}: {kind} codestream declares {width}x{height}x{comps} pixels, the header "
                f"{cols}x{rows}x{samples} (max_pixels={max_pixels})")
        if index + 1 >= nf:
            break


def read_dataset(data: bytes, max_pixels: int = 20_000 * 20_000, force: bool = False) -> Dataset:
    """Parse DICOM bytes and check the declared size (header, and the codestream of every compressed
    frame) before any pixel is decoded. ``force`` reads files without the preamble."""
    try:
        ds = pydicom.dcmread(io.BytesIO(data), force=force)
        check_header(ds)
    except RecursionError:  # sequences nested deeper than the parser's stack
        raise HostileHeaderError("sequences nested too deep to parse") from None
    if not any(k in ds for k in ("PixelData", "FloatPixelData", "DoubleFloatPixelData")):
        raise NotAnImageError("DICOM object has no pixel data")
    check_dimensions(ds, max_pixels)
    if "TransferSyntaxUID" not in getattr(ds, "file_meta", Dataset()):
        # files without meta header: pydicom guessed the encoding while reading; record it for the decoder
        ds.file_meta = getattr(ds, "file_meta", None) or pydicom.dataset.FileMetaDataset()
        ds.file_meta.TransferSyntaxUID = (
            pydicom.uid.ImplicitVRLittleEndian if ds.is_implicit_VR else pydicom.uid.ExplicitVRLittleEndian
        )
    check_codestreams(ds, max_pixels)
    check_native_length(ds)
    return ds


def is_colour(ds: Dataset) -> bool:
    return (int(ds.get("SamplesPerPixel", 1) or 1) == 3
            or str(ds.get("PhotometricInterpretation", "")) == "PALETTE COLOR")


def resolve_rule(ds: Dataset, rule: str = "auto") -> str:
    """The rule ``auto`` picks per file (issue: modality rules):
    CT -> hu_window; MR, MG -> percentile_clip; other greyscale deeper than 8 bits (or signed, or
    float) -> minmax; 8-bit greyscale and colour -> keep."""
    if rule != "auto":
        return rule
    if is_colour(ds):
        return "keep"
    modality = str(ds.get("Modality", "")).upper()
    if modality == "CT":
        return "hu_window"
    if modality in ("MR", "MG"):
        return "percentile_clip"
    bits = int(ds.get("BitsStored", ds.get("BitsAllocated", 8)) or 8)
    signed = int(ds.get("PixelRepresentation", 0) or 0) == 1
    if bits > 8 or signed or "PixelData" not in ds:
        return "minmax"
    return "keep"


def decode_frame(ds: Dataset, frame: int | None = None) -> np.ndarray:
    """One frame as stored (colour as RGB). ``frame=None``: the middle frame of a multi-frame object."""
    nf = n_frames(ds)
    index = nf // 2 if frame is None else int(frame)
    if not 0 <= index < nf:
        raise IndexError(f"frame {index} out of range (object has {nf})")
    if "PixelData" not in ds:  # float pixel data: no compression, the dataset property decodes it
        arr = ds.pixel_array
        return arr[index] if nf > 1 else arr
    decoder = get_decoder(ds.file_meta.TransferSyntaxUID)
    # pydicom annotates the options as `**kwargs: DecodeOptions` (meant: Unpack[DecodeOptions])
    arr, _ = decoder.as_array(ds, index=index if nf > 1 else None, as_rgb=True)  # type: ignore[arg-type]
    return arr


def _colour_to_uint8(arr: np.ndarray, ds: Dataset) -> np.ndarray:
    if str(ds.get("PhotometricInterpretation", "")) == "PALETTE COLOR":
        arr = apply_color_lut(arr, ds)
        if arr.dtype != np.uint8:  # 16-bit LUT entries
            return np.rint(arr.astype(np.float64) / 257.0).astype(np.uint8)
        return arr
    if arr.dtype == np.uint8:
        return arr
    bits = int(ds.get("BitsStored", 16) or 16)
    return np.rint(np.clip(arr.astype(np.float64) / (2**bits - 1), 0, 1) * 255.0).astype(np.uint8)


def to_uint8(ds: Dataset, rule: str = "auto", *, frame: int | None = None, **params: Any) -> np.ndarray:
    """A DICOM dataset -> HxW (greyscale) or HxWx3 (RGB) uint8, before resizing.

    ``rule``: ``auto`` | ``hu_window`` (params ``level`` = 100, ``width`` = 700 HU) |
    ``percentile_clip`` (``low`` = 0.5, ``high`` = 99.5 percent) | ``minmax`` | ``keep``.
    ``apply_voi_lut=True`` applies the header's VOI LUT / window before ``minmax``.
    Raises :class:`RuleError` when the rule cannot apply (e.g. CT without rescale, keep on 16 bit).
    """
    rule = resolve_rule(ds, rule)
    arr = decode_frame(ds, frame)
    if is_colour(ds):
        if rule != "keep":
            raise RuleError(f"rule {rule!r} needs greyscale pixels, got {ds.get('PhotometricInterpretation')}")
        return np.ascontiguousarray(_colour_to_uint8(arr, ds))
    if arr.ndim != 2:
        raise RuleError(f"unexpected greyscale frame shape {arr.shape}")
    if rule == "hu_window":
        is_ct = str(ds.get("Modality", "")).upper() == "CT"
        if is_ct and "RescaleIntercept" not in ds and "ModalityLUTSequence" not in ds:
            raise RuleError("CT without RescaleIntercept: Hounsfield units unknown")
        level, width = float(params.get("level", 100.0)), float(params.get("width", 700.0))
        out = by_stored_value(arr, lambda stored: hu_window(apply_modality_lut(stored, ds), level, width))
    elif rule == "percentile_clip":
        out = percentile_clip_stored(arr, lambda stored: apply_modality_lut(stored, ds),
                                     float(params.get("low", 0.5)), float(params.get("high", 99.5)))
    elif rule == "minmax":
        if params.get("apply_voi_lut") or "ModalityLUTSequence" in ds:
            # LUT tables need not be monotone: min and max must come from the frame's values
            values = apply_modality_lut(arr, ds)
            out = minmax(apply_voi_lut(values, ds) if params.get("apply_voi_lut") else values)
        else:
            # rescale slope/intercept is monotone, so the frame's extremes map to the values' extremes
            out = by_stored_value(arr, lambda stored: minmax(apply_modality_lut(stored, ds)))
    elif rule == "keep":
        values = apply_modality_lut(arr, ds)
        if values.min() < 0 or values.max() > 255:
            raise RuleError("rule 'keep' needs 8-bit values; use minmax or a modality rule")
        out = np.asarray(values).astype(np.uint8)
    else:
        raise RuleError(f"unknown rule {rule!r}")
    if str(ds.get("PhotometricInterpretation", "")) == "MONOCHROME1":
        out = 255 - out
    return np.ascontiguousarray(out)


def patient_id(ds: Dataset, keyword: str = "PatientID") -> str | None:
    """The raw patient id (to be hashed at once by the caller; never stored or logged)."""
    value = ds.get(keyword)
    text = str(value).strip() if value is not None else ""
    return text or None


def burned_in_annotation(ds: Dataset) -> bool:
    return str(ds.get("BurnedInAnnotation", "")).strip().upper() == "YES"
