"""Decoding dispatch of the preprocess workers: file bytes -> 8-bit images at the stage's resolution.

DICOM (every common transfer syntax, ``medisyn.data.dicom``) or PNG / JPEG / TIFF (PIL,
``medisyn.data.images``); declared sizes past ``data.max_pixels`` are refused before any pixel is
decoded, and so are PNG / JPEG / TIFF files that cannot hold their declared size (``truncated``) or
whose decoded image would exceed the per-image limit (``decode_budget``, :func:`max_decoded_bytes`);
burned-in annotations are quarantined, the modality rule applies (section 4.1), then resize + center
crop, or tiles for whole slides. Every refusal is a :class:`Quarantine` with its reason.
"""

from __future__ import annotations

import functools
import json
import os
from pathlib import Path
from typing import Any

import numpy as np

from medisyn.data import dicom as dicom_io
from medisyn.data.images import (
    DecodeBudgetError,
    DecompressionBombError,
    RuleError,
    TruncatedImageError,
    image_to_uint8,
    load_pixels,
    open_image,
    resize_center_crop,
    tiles,
)
from medisyn.data.quarantine import Quarantine

_PIL_FORMATS = {"PNG", "JPEG", "MPO", "TIFF"}

# With data.max_decoded_mb unset, a decoded image may take this fraction of a worker's memory share:
# turning a 6000x6000 PNG into the 512x512 sample peaked at 3.0 (16-bit grey), 3.5 (RGB, RGBA) and 4.0
# (8-bit grey) times its decoded bytes (decoded image, its RGB or L conversion, the numpy copy, the
# resize), so a fifth keeps the peak within the share with room for the worker itself.
DECODED_SHARE_OF_WORKER_MEMORY = 0.2


def max_decoded_bytes(settings: dict[str, Any]) -> int:
    """The per-image decoded-bytes limit: ``data.max_decoded_mb`` MiB, or when it is None
    ``DECODED_SHARE_OF_WORKER_MEMORY`` x :func:`worker_memory_share` (evaluated in the worker, on the
    machine that decodes: on a cluster the driver's pod is not the workers')."""
    mb = settings.get("max_decoded_mb")
    if mb:
        return int(mb) << 20
    return int(worker_memory_share() * DECODED_SHARE_OF_WORKER_MEMORY)


@functools.cache
def worker_memory_share(cgroup: Path = Path("/sys/fs/cgroup")) -> int:
    """Bytes one preprocess worker may use: the memory of the machine, or of the container when its
    cgroup limit is lower, divided by the CPUs the process may run on (the container's CPU quota when
    lower), since Ray runs one map task per CPU. Once per process."""
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    # cgroup v2 files, then v1's
    for limit in (_read_ints(cgroup / "memory.max"), _read_ints(cgroup / "memory/memory.limit_in_bytes")):
        if limit and 0 < limit[0] < memory:
            memory = limit[0]
    v1_quota = [(_read_ints(cgroup / f"cpu/cpu.cfs_{k}_us") or [0])[0] for k in ("quota", "period")]
    for quota in (_read_ints(cgroup / "cpu.max"), v1_quota):
        if quota and len(quota) == 2 and quota[0] > 0 and quota[1] > 0:  # quota, period (µs); -1 / "max": none
            cpus = min(cpus, max(1, -(-quota[0] // quota[1])))
    return memory // max(1, cpus)


def _read_ints(path: Path) -> list[int] | None:
    """The integers of a cgroup file ("max" and unreadable files: None)."""
    try:
        return [int(x) for x in path.read_text().split()]
    except (OSError, ValueError):
        return None


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
        img = open_image(data, settings["max_pixels"], max_decoded_bytes(settings))
    except DecompressionBombError as exc:
        raise Quarantine("decode", "decompression_bomb", str(exc)) from None
    except TruncatedImageError as exc:
        raise Quarantine("decode", "truncated", str(exc)) from None
    except DecodeBudgetError as exc:
        raise Quarantine("decode", "decode_budget", str(exc)) from None
    except Exception:  # noqa: BLE001 - PIL cannot identify it
        raise Quarantine("decode", "unsupported_format", "not DICOM, PNG, JPEG or TIFF") from None
    if img.format not in _PIL_FORMATS:
        raise Quarantine("decode", "unsupported_format", f"{img.format} is not DICOM, PNG, JPEG or TIFF")
    try:
        load_pixels(img)
    except TruncatedImageError as exc:
        raise Quarantine("decode", "truncated", str(exc)) from None
    except Exception as exc:  # noqa: BLE001 - corrupt
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

