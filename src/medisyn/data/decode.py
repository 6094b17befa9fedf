"""Decoding dispatch of the preprocess workers: file bytes -> 8-bit images at the stage's resolution.

DICOM (every common transfer syntax, ``medisyn.data.dicom``) or PNG / JPEG / TIFF (PIL,
``medisyn.data.images``); declared sizes past ``data.max_pixels`` are refused before any pixel is
decoded, burned-in annotations are quarantined, the modality rule applies (section 4.1), then
resize + center crop, or tiles for whole slides. Every refusal is a :class:`Quarantine` with its reason.
"""

from __future__ import annotations

import json
from typing import Any

import numpy as np

from medisyn.data import dicom as dicom_io
from medisyn.data.images import (
    DecompressionBombError,
    RuleError,
    image_to_uint8,
    open_image,
    resize_center_crop,
    tiles,
)
from medisyn.data.quarantine import Quarantine

_PIL_FORMATS = {"PNG", "JPEG", "MPO", "TIFF"}


def decode_samples(data: bytes, name: str, task: dict[str, Any],
                   settings: dict[str, Any]) -> tuple[list[tuple[str, np.ndarray]], str | None]:
    """File bytes -> ([(sample suffix, HxW[x3] uint8 before resizing)], raw DICOM patient id or None)."""
    params = {**settings["rule_defaults"], **json.loads(task.get("rule_params") or "{}")}
    rule = task.get("rule") or "auto"
    pid = None
    looks_dicom = dicom_io.is_dicom(data)
    if looks_dicom or name.lower().endswith((".dcm", ".dicom")):
        try:
            ds = dicom_io.read_dataset(data, settings["max_pixels"], force=not looks_dicom)
        except DecompressionBombError as exc:
            raise Quarantine("decode", "decompression_bomb", str(exc)) from None
        except dicom_io.NotAnImageError as exc:
            raise Quarantine("decode", "not_an_image", str(exc)) from None
        except dicom_io.HostileHeaderError as exc:
            raise Quarantine("decode", "hostile_header", str(exc)) from None
        except Exception as exc:  # noqa: BLE001 - any parse failure is a quarantine reason
            raise Quarantine("decode", "decode_error", f"{type(exc).__name__}: {exc}") from None
        if settings["quarantine_burned_in"] and dicom_io.burned_in_annotation(ds):
            raise Quarantine("privacy", "burned_in_annotation", "BurnedInAnnotation=YES")
        if task.get("patient_tag"):
            pid = dicom_io.patient_id(ds, task["patient_tag"])
        nf = dicom_io.n_frames(ds)
        frames = list(range(nf)) if (nf > 1 and settings["multiframe_policy"] == "all") else [nf // 2]
        out = []
        for f in frames:
            try:
                arr = dicom_io.to_uint8(ds, rule, frame=f, **params)
            except RuleError as exc:
                raise Quarantine("rule", "rule_failed", str(exc)) from None
            except Exception as exc:  # noqa: BLE001
                raise Quarantine("decode", "decode_error", f"{type(exc).__name__}: {exc}") from None
            out.append((f"frame={f}" if nf > 1 else "", arr))
        return out, pid
    try:
        img = open_image(data, settings["max_pixels"])
    except DecompressionBombError as exc:
        raise Quarantine("decode", "decompression_bomb", str(exc)) from None
    except Exception:  # noqa: BLE001 - PIL cannot identify it
        raise Quarantine("decode", "unsupported_format", "not DICOM, PNG, JPEG or TIFF") from None
    if img.format not in _PIL_FORMATS:
        raise Quarantine("decode", "unsupported_format", f"{img.format} is not DICOM, PNG, JPEG or TIFF")
    try:
        img.load()
    except Exception as exc:  # noqa: BLE001 - truncated or corrupt
        raise Quarantine("decode", "decode_error", f"{type(exc).__name__}: {exc}") from None
    try:
        return [("", image_to_uint8(img, rule, **params))], None
    except RuleError as exc:
        raise Quarantine("rule", "rule_failed", str(exc)) from None


def final_images(samples: list[tuple[str, np.ndarray]], tile_size: int,
                 settings: dict[str, Any]) -> list[tuple[str, np.ndarray]]:
    """Resize + center crop, or cut large images into tiles first (section 4.1)."""
    size = settings["resolution"]
    out = []
    for suffix, arr in samples:
        if tile_size and min(arr.shape[:2]) >= tile_size and max(arr.shape[:2]) > tile_size:
            for y, x, t in tiles(arr, tile_size, settings["tile_max_overlap"]):
                out.append((f"{suffix}tile={y},{x}", resize_center_crop(np.ascontiguousarray(t), size)))
        else:
            out.append((suffix, resize_center_crop(arr, size)))
    return out

