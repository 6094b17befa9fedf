"""The preprocess stage: landing zone -> normalized 512x512 image-text shards with patient-level splits.

``preprocess(cfg, raw_uri, out_uri)`` (contract in docs/stages.md; decisions in docs/preprocessing.md):

1. catalog: ``cfg.data.catalog`` (``builtin`` = the landing zone's ``catalog.yaml`` when present,
   else the paper's sources); every source's labels table is read on the driver;
2. Ray Data maps the file list in parallel: read bytes from file:// or s3://, reject decompression
   bombs on declared size, decode (DICOM in every common transfer syntax, PNG, JPEG, TIFF), quarantine
   burned-in annotations, apply the modality rule (section 4.1), resize + center crop (or tile whole
   slides), encode PNG, hash pixels. Patient ids are salted-hashed inside the worker that read them
   and assign the split (80/10/10, section 4.1), so no raw identifier reaches the driver. Each
   worker stages its rows (images included) in a file of its own and returns only metadata (ids,
   hashes, patient keys, where the row is staged): image bytes never pass through the driver;
3. the driver collects the metadata, logging rows/s and ETA, assigns patient splits and removes
   exact and near duplicates (keep one, report the rest), all on metadata;
4. a second Ray pass writes the shards: one task per shard reads its rows from the staged files
   and writes the shard into the dataset's staging directory or prefix (same rows, order and bytes
   as when the driver wrote them); the driver writes ``manifest.json``, ``rejected.jsonl``,
   ``duplicates.jsonl`` and publishes the version atomically with ``_COMPLETE`` last (Ray's
   ``write_parquet`` appends to an existing prefix, so it is never pointed at the output);
5. staged rows are removed (docs/preprocessing.md, How the driver scales);
6. the manifest is logged to MLflow as the run's dataset input.
"""

from __future__ import annotations

import contextlib
import csv
import errno
import hashlib
import json
import logging
import math
import os
import shutil
import stat
import time
import unicodedata
import uuid
from collections import Counter, defaultdict
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute  # noqa: F401 - pa.compute
import pyarrow.parquet as pq

from medisyn import storage
from medisyn.catalog import BUILTIN, Catalog, Source, load_catalog
from medisyn.config import RunConfig
from medisyn.data import dicom as dicom_io
from medisyn.data.images import (
    DecompressionBombError,
    RuleError,
    encode_png,
    hamming,
    image_to_uint8,
    open_image,
    perceptual_hash,
    pixel_hash,
    resize_center_crop,
    tiles,
)
from medisyn.progress import Progress
from medisyn.results import StageResult

log = logging.getLogger("medisyn.preprocess")

SPLITS = ("train", "val", "test")
SPLIT_RANK = {s: i for i, s in enumerate(SPLITS)}
LANDING_CATALOG = "catalog.yaml"
DATASET_CATALOG = "catalog.yaml"  # the copy beside the shards (medisyn.evaluate.gates.dataset_catalog)
MANIFEST_VERSION = 1

# Parquet columns of the dataset prefix (docs/stages.md); nothing else leaves preprocessing.
SHARD_SCHEMA = pa.schema(
    [
        ("image", pa.binary()),
        ("caption", pa.string()),
        ("specialty", pa.string()),
        ("image_type", pa.string()),
        ("label", pa.string()),
        ("source", pa.string()),
        ("split", pa.string()),
        ("patient_hash", pa.string()),
        ("image_hash", pa.string()),
        ("pixel_hash", pa.string()),
        ("width", pa.int32()),
        ("height", pa.int32()),
    ]
)
# PNG bytes do not compress, and snappy, dictionary pages or min/max statistics over them only cost
# the driver time (most of its CPU in the benchmark); the small columns keep all three.
SHARD_PARQUET_OPTIONS: dict[str, Any] = {
    "compression": {f.name: ("none" if f.name == "image" else "snappy") for f in SHARD_SCHEMA},
    "use_dictionary": [f.name for f in SHARD_SCHEMA if f.name != "image"],
    "write_statistics": [f.name for f in SHARD_SCHEMA if f.name != "image"],
}
# staging files live for one run on local disk: plain pages, written once and read once
_STAGING_PARQUET_OPTIONS: dict[str, Any] = {"compression": "none", "use_dictionary": False, "write_statistics": False}
_STAGING_EXTRA = [("phash", pa.string())]
STAGING_SCHEMA = pa.schema(list(SHARD_SCHEMA) + [pa.field(n, t) for n, t in _STAGING_EXTRA])
# What a worker returns per batch: staged rows (status ok) and rejections (status rejected) in one
# Arrow table, so no pandas conversion sits between the workers and the staging files.
RESULT_SCHEMA = pa.schema(
    list(STAGING_SCHEMA)
    + [pa.field(n, pa.string()) for n in ("status", "path", "fail_stage", "reason", "detail")]
    + [pa.field("file_done", pa.int8())]
)
# What a worker returns when it stages its own rows (settings["rows_uri"], the stage's case): the
# result rows without the image, plus where the staged row lives (file below rows_uri, row group).
# The driver reads nothing else, so its memory does not grow with image bytes (docs/preprocessing.md,
# How the driver scales).
META_SCHEMA = pa.schema(
    [f for f in RESULT_SCHEMA if f.name != "image"]
    + [pa.field("staged_file", pa.string()), pa.field("staged_row", pa.int32())]
)
# A staged row file holds one Parquet row group per row, so that a shard task reads exactly the rows
# it needs (a staged file holds rows of every split); footer and page headers cost ~1.5 KiB a row.
_STAGED_ROW_GROUP = 1


class PreprocessError(RuntimeError):
    """The stage failed as a whole (error rate past ``data.max_error_rate``, no input, bad catalog)."""


class _Quarantine(Exception):
    def __init__(self, stage: str, reason: str, detail: str = ""):
        super().__init__(detail or reason)
        self.stage, self.reason, self.detail = stage, reason, detail


@dataclass(frozen=True)
class PreprocessResult(StageResult):
    dataset_uri: str
    dataset_hash: str
    counts: dict[str, int]  # rows per split
    n_images: int
    n_rejected: int
    n_duplicates: int
    manifest: dict[str, Any]


# ----------------------------------------------------------------------------------------------
# Identifiers and splits
# ----------------------------------------------------------------------------------------------
def id_salt(cfg: RunConfig) -> str:
    """The salt for patient / image hashes: ``$<data.id_salt_env>``, else ``data.default_id_salt`` (demo
    configs only). Neither: :class:`~medisyn.config.ConfigError` naming both fields, before any work (#10):
    a public or guessable salt lets anyone rebuild candidate ids and reverse every patient hash."""
    from medisyn.config import ConfigError

    salt = os.environ.get(cfg.data.id_salt_env) or cfg.data.default_id_salt
    if not salt:
        raise ConfigError(
            f"data.id_salt_env: ${cfg.data.id_salt_env} is unset and data.default_id_salt is null: the patient-ID salt "
            "is required outside demo runs (set it from a Secret: the chart's idSalt.existingSecret)")
    return salt


def salted_hash(salt: str, *parts: str) -> str:
    """sha256(salt, parts...) hex: the only form in which identifiers leave preprocessing."""
    h = hashlib.sha256(salt.encode())
    for p in parts:
        h.update(b"\x1f" + str(p).encode())
    return h.hexdigest()


def _split_of(position: float, fractions: tuple[float, float, float]) -> str:
    if position < fractions[0]:
        return "train"
    if position < fractions[0] + fractions[1]:
        return "val"
    return "test"


def assign_splits(meta: pd.DataFrame, fractions: tuple[float, float, float] = (0.8, 0.1, 0.1)) -> dict[str, str]:
    """patient_hash -> train / val / test (section 4.1: patient-level, approximately 80/10/10).

    Patients are grouped by source and by their most frequent label (so every class of every
    source is split 80/10/10, which matters for small sources and for the utility gate's per-class
    AUROC), ordered by their salted hash, and patient i of n goes to the split that holds the
    quantile (i + 0.5) / n. Deterministic, independent of input order and of the Ray schedule; a
    patient's images all land in one split. The trade-off (docs/preprocessing.md): when a new
    dataset version adds patients, patients near a quantile boundary may change split between
    versions; each version is self-consistent and carries its own hash.
    """
    if meta.empty:
        return {}
    per_patient = (
        meta.groupby(["source", "patient_hash"])["label"]
        .agg(lambda s: sorted(Counter(s).items(), key=lambda kv: (-kv[1], kv[0]))[0][0])
        .reset_index()
    )
    out: dict[str, str] = {}
    for _, grp in per_patient.groupby(["source", "label"], sort=True):
        hashes = sorted(grp["patient_hash"])
        n = len(hashes)
        for i, ph in enumerate(hashes):
            out[ph] = _split_of((i + 0.5) / n, fractions)
    return out


# ----------------------------------------------------------------------------------------------
# Catalog and file listing (driver)
# ----------------------------------------------------------------------------------------------
def resolve_catalog(cfg: RunConfig, raw_uri: str) -> tuple[Catalog, str]:
    """(catalog, where it came from). ``builtin`` defers to the landing zone's own catalog.yaml."""
    if cfg.data.catalog == BUILTIN:
        landing = storage.join(raw_uri, LANDING_CATALOG)
        if not storage.is_remote(raw_uri) and os.path.lexists(storage.local_path(raw_uri) / LANDING_CATALOG):
            try:  # never a link or a FIFO: the catalog is read like any file of the zone
                os.close(open_inside_zone(str(storage.local_path(raw_uri)), [LANDING_CATALOG], "list"))
            except _Quarantine as q:
                raise PreprocessError(f"landing zone {LANDING_CATALOG} refused ({q.reason}): {q.detail}") from None
        if storage.exists(landing):
            return load_catalog(landing), f"landing:{LANDING_CATALOG}"
        return load_catalog(BUILTIN), BUILTIN
    return load_catalog(cfg.data.catalog), cfg.data.catalog


def _reject_row(path: str, source: str, stage: str, reason: str, detail: str = "") -> dict[str, Any]:
    return {"path": path, "source": source, "stage": stage, "reason": reason, "detail": detail[:300]}


def _catalog_text(origin: str, raw_uri: str) -> str:
    from medisyn.catalog import builtin_catalog_text

    if origin == BUILTIN:
        return builtin_catalog_text()
    if origin.startswith("landing:"):
        return storage.read_text(storage.join(raw_uri, LANDING_CATALOG))
    return storage.read_text(origin)


def list_inputs(catalog: Catalog, raw_uri: str, salt: str) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(tasks for the workers, rejections found while listing: missing files, unknown labels, and
    anything that is not a regular file inside the landing zone, see docs/preprocessing.md, Hostile input)."""
    tasks: list[dict[str, Any]] = []
    rejected: list[dict[str, Any]] = []
    zone = "" if storage.is_remote(raw_uri) else str(storage.local_path(raw_uri))
    for src in catalog.sources:
        try:
            prefix_parts = zone_parts(src.prefix)
        except _Quarantine as q:
            raise PreprocessError(f"source {src.name}: prefix {src.prefix!r} is not inside the landing zone "
                                  f"({q.detail})") from None
        prefix = storage.join(raw_uri, *prefix_parts)
        if not storage.exists(prefix):
            log.info("source %s: no files under %s, skipped", src.name, src.prefix)
            continue
        for entry in _source_entries(src, prefix, zone, prefix_parts):
            if isinstance(entry, dict):
                rejected.append(entry)
                continue
            rel, raw_label, raw_pid = entry
            path = f"{src.prefix}/{rel}"
            try:
                parts = zone_parts(rel, "list")
                if zone:  # lstat every component below the zone root: no link, a regular file at the end
                    os.close(open_inside_zone(zone, prefix_parts + parts, stage="list"))
            except _Quarantine as q:
                rejected.append(_reject_row(path, src.name, q.stage, q.reason, q.detail))
                continue
            path = "/".join(prefix_parts + parts)
            rel = "/".join(parts)
            try:
                texts = src.label_texts(raw_label)
                caption = src.caption_for(raw_label)
            except KeyError as exc:
                rejected.append(_reject_row(path, src.name, "labels", "unknown_label", str(exc.args[0])))
                continue
            if has_control_characters(caption) or any(has_control_characters(t) for t in texts):
                rejected.append(_reject_row(path, src.name, "labels", "control_characters",
                                            f"the caption or label of {raw_label!r} (catalog label_map / "
                                            "caption_template) contains control characters"))
                continue
            uri = storage.join(prefix, rel)
            tasks.append(
                {
                    "uri": uri,
                    "zone": zone,  # local zones: the worker opens path below it without following links
                    "path": path,
                    "rel": rel,
                    "source": src.name,
                    "specialty": src.specialty,
                    "image_type": src.image_type,
                    "caption": caption,
                    "label": "|".join(texts),
                    # a patient id from the labels table is hashed here and never travels further
                    "patient_hash": salted_hash(salt, "patient", src.name, raw_pid) if raw_pid else "",
                    "patient_tag": src.patient_id_dicom_tag or "",
                    "rule": src.rule,
                    "rule_params": json.dumps(src.rule_params, sort_keys=True),
                    "tile_size": int((src.tile or {}).get("size", 0)),
                }
            )
    tasks.sort(key=lambda t: t["path"])
    return tasks, rejected


# ----------------------------------------------------------------------------------------------
# The landing zone's boundary (docs/preprocessing.md, Hostile input)
# ----------------------------------------------------------------------------------------------
_CONTROL_CATEGORIES = frozenset({"Cc", "Cf", "Zl", "Zp"})  # C0/C1 controls, format (bidi overrides), separators


def has_control_characters(text: str) -> bool:
    return any(unicodedata.category(c) in _CONTROL_CATEGORIES for c in text)


def zone_parts(rel: str, stage: str = "list") -> list[str]:
    """Components of a path relative to the landing zone (or a source prefix). Absolute paths and
    ``..`` are refused (``outside_landing_zone``); ``.`` and empty components are dropped."""
    if rel.startswith(("/", "\\")):
        raise _Quarantine(stage, "outside_landing_zone", f"absolute path {rel[:200]!r}")
    parts = [p for p in rel.split("/") if p not in ("", ".")]
    if ".." in parts:
        raise _Quarantine(stage, "outside_landing_zone", f"'..' in {rel[:200]!r}")
    if not parts:
        raise _Quarantine(stage, "outside_landing_zone", "empty path")
    return parts


def _file_kind(mode: int) -> str:
    for test, name in ((stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a FIFO"), (stat.S_ISCHR, "a character device"),
                       (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket")):
        if test(mode):
            return name
    return "a special file"


def open_inside_zone(zone: str, parts: list[str], stage: str = "read") -> int:
    """A read-only descriptor of the regular file ``zone/parts...``, opened component by component
    below the zone root (``dir_fd``): every component is lstat'ed first (a symbolic link anywhere,
    even one pointing inside the zone, is refused; a FIFO or device at the end is never opened, so
    nothing blocks), then opened with ``O_NOFOLLOW`` and checked again on the descriptor, so a file
    swapped after the check is refused too. Raises :class:`_Quarantine` with the reason."""
    base = os.O_RDONLY | getattr(os, "O_CLOEXEC", 0)
    fd = os.open(zone, base | os.O_DIRECTORY)
    try:
        for i, part in enumerate(parts):
            last = i == len(parts) - 1
            where = "/".join(parts[: i + 1])
            try:
                st = os.stat(part, dir_fd=fd, follow_symlinks=False)
            except FileNotFoundError:
                raise _Quarantine(stage, "missing_file", f"{where} not found") from None
            except OSError as exc:
                raise _Quarantine(stage, "read_error", f"{where}: {exc.strerror}") from None
            if stat.S_ISLNK(st.st_mode):
                raise _Quarantine(stage, "symlink", f"{where} is a symbolic link (never followed)")
            if not last and not stat.S_ISDIR(st.st_mode):
                raise _Quarantine(stage, "missing_file", f"{where} is not a directory")
            if last and not stat.S_ISREG(st.st_mode):
                raise _Quarantine(stage, "not_a_regular_file", f"{where} is {_file_kind(st.st_mode)}")
            flags = base | os.O_NOFOLLOW | (os.O_NONBLOCK if last else os.O_DIRECTORY)
            try:
                nfd = os.open(part, flags, dir_fd=fd)
            except OSError as exc:
                if exc.errno in (errno.ELOOP, errno.ENOTDIR, errno.EMLINK):
                    raise _Quarantine(stage, "symlink", f"{where} became a symbolic link") from None
                raise _Quarantine(stage, "read_error", f"{where}: {exc.strerror}") from None
            os.close(fd)
            fd = nfd
            now = os.fstat(fd)
            same = (now.st_dev, now.st_ino, stat.S_IFMT(now.st_mode)) == (st.st_dev, st.st_ino, stat.S_IFMT(st.st_mode))
            if not same:
                raise _Quarantine(stage, "not_a_regular_file", f"{where} changed while being opened")
        return fd
    except BaseException:
        os.close(fd)
        raise


def read_inside_zone(zone: str, parts: list[str], stage: str = "read") -> bytes:
    fd = open_inside_zone(zone, parts, stage)
    with os.fdopen(fd, "rb") as f:
        return f.read()


def _source_entries(src: Source, prefix: str, zone: str,
                    prefix_parts: list[str]) -> Iterable[tuple[str, str, str | None] | dict[str, Any]]:
    """(path relative to the source prefix, raw label, raw patient id or None) per listed file, or a
    rejection row (a labels-table line or a whole table that cannot be read)."""
    if src.labels_table is None:  # one folder per class
        for rel in _list_files(prefix, zone):
            parts = rel.split("/")
            if len(parts) < 2 or any(p.startswith(".") for p in parts) or parts[-1] == storage.COMPLETE_MARKER:
                continue
            yield rel, parts[-2], None
        return
    table_path = f"{src.prefix}/{src.labels_table}"
    try:
        table_parts = prefix_parts + zone_parts(src.labels_table)
        if zone:
            data = read_inside_zone(zone, table_parts, stage="labels")
        else:
            table_uri = storage.join(prefix, src.labels_table)
            if not storage.exists(table_uri):
                raise _Quarantine("labels", "missing_file", "not found")
            data = storage.read_bytes(table_uri)
    except _Quarantine as q:
        if q.reason == "missing_file":
            raise PreprocessError(f"source {src.name}: labels table {table_path} not found") from None
        yield _reject_row(table_path, src.name, "labels", q.reason, f"labels table {table_path}: {q.detail}")
        return
    header, rows, bad = _read_labels_table(data, table_path, src.name)
    yield from bad
    if header is None:
        return
    for col in [src.path_column, src.label_column] + ([src.patient_id_column] if src.patient_id_column else []):
        if col not in header:
            raise PreprocessError(f"source {src.name}: labels table {table_path} has no column {col!r}")
    files = None if zone else set(_list_files(prefix, zone))
    for line, rec in rows:
        rel = (rec.get(src.path_column) or "").strip()
        label = rec.get(src.label_column) or ""
        pid = (rec.get(src.patient_id_column) or "").strip() if src.patient_id_column else ""
        if any(has_control_characters(v) for v in (rel, label, pid)):
            yield _reject_row(f"{table_path}#line={line}", src.name, "labels", "control_characters",
                              f"labels table {table_path} line {line}: control characters in the path, "
                              "label or patient id")
            continue
        if files is not None:  # object storage: no links or special files, only keys to look up
            try:
                missing = "/".join(zone_parts(rel)) not in files
            except _Quarantine:
                missing = False  # refused by list_inputs, with its reason
            if missing:
                yield _reject_row(f"{src.prefix}/{rel}", src.name, "list", "missing_file",
                                  "listed in the labels table, not found")
                continue
        yield rel, label, pid or None


def _read_labels_table(data: bytes, table_path: str,
                       source: str) -> tuple[list[str] | None, list[tuple[int, dict[str, str]]], list[dict[str, Any]]]:
    """(header or None, [(line number, row)], rejections) of a CSV labels table.

    Decoded line by line as UTF-8: a line that is not UTF-8 is quarantined (``invalid_utf8``, with
    the table and line), the rest is read; a table whose header cannot be decoded or parsed is
    quarantined whole. Never raises on the table's content."""
    bad: list[dict[str, Any]] = []
    lines: list[tuple[int, str]] = []
    for n, raw in enumerate(data.split(b"\n"), 1):
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            detail = (f"labels table {table_path} line {n}: invalid UTF-8 "
                      f"(byte {raw[exc.start]:#04x} at column {exc.start + 1})")
            if n == 1:
                return None, [], [_reject_row(table_path, source, "labels", "invalid_utf8", detail + "; table refused")]
            bad.append(_reject_row(f"{table_path}#line={n}", source, "labels", "invalid_utf8", detail))
            continue
        lines.append((n, text.lstrip("\ufeff") if n == 1 else text))
    numbers = [n for n, _ in lines]
    reader = csv.reader((text + "\n" for _, text in lines), strict=False)
    header: list[str] | None = None
    rows: list[tuple[int, dict[str, str]]] = []
    seen = 0
    try:
        for fields in reader:
            line, seen = numbers[seen], reader.line_num
            if not fields or all(not f.strip() for f in fields):
                continue
            if header is None:
                header = [f.strip() for f in fields]
                continue
            rows.append((line, dict(zip(header, fields, strict=False))))
    except csv.Error as exc:
        line = numbers[min(seen, len(numbers) - 1)] if numbers else 1
        return None, [], bad + [_reject_row(table_path, source, "labels", "bad_labels_table",
                                            f"labels table {table_path} line {line}: {exc}; table refused")]
    if header is None:
        return None, [], bad + [_reject_row(table_path, source, "labels", "bad_labels_table",
                                            f"labels table {table_path}: no header line; table refused")]
    return header, rows, bad


def _list_files(prefix: str, zone: str) -> list[str]:
    """Paths below ``prefix`` relative to it, sorted. Local zones are walked without following links:
    symbolic links (to files or directories), FIFOs, devices and sockets are listed as entries, so
    that each becomes a quarantine record instead of being followed or opened."""
    if not zone:
        fs, root = storage.filesystem(prefix)
        return sorted(f[len(root) :].lstrip("/") for f in fs.find(root))
    top = storage.local_path(prefix)
    out: list[str] = []

    def walk(directory: Path, rel: str) -> None:
        with os.scandir(directory) as it:
            for entry in it:
                sub = f"{rel}{entry.name}"
                if entry.is_dir(follow_symlinks=False):
                    walk(Path(entry.path), sub + "/")
                else:
                    out.append(sub)

    walk(top, "")
    return sorted(out)


# ----------------------------------------------------------------------------------------------
# Per-file work (Ray workers; also callable in a plain loop)
# ----------------------------------------------------------------------------------------------
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
            raise _Quarantine("decode", "decompression_bomb", str(exc)) from None
        except dicom_io.NotAnImageError as exc:
            raise _Quarantine("decode", "not_an_image", str(exc)) from None
        except dicom_io.HostileHeaderError as exc:
            raise _Quarantine("decode", "hostile_header", str(exc)) from None
        except Exception as exc:  # noqa: BLE001 - any parse failure is a quarantine reason
            raise _Quarantine("decode", "decode_error", f"{type(exc).__name__}: {exc}") from None
        if settings["quarantine_burned_in"] and dicom_io.burned_in_annotation(ds):
            raise _Quarantine("privacy", "burned_in_annotation", "BurnedInAnnotation=YES")
        if task.get("patient_tag"):
            pid = dicom_io.patient_id(ds, task["patient_tag"])
        nf = dicom_io.n_frames(ds)
        frames = list(range(nf)) if (nf > 1 and settings["multiframe_policy"] == "all") else [nf // 2]
        out = []
        for f in frames:
            try:
                arr = dicom_io.to_uint8(ds, rule, frame=f, **params)
            except RuleError as exc:
                raise _Quarantine("rule", "rule_failed", str(exc)) from None
            except Exception as exc:  # noqa: BLE001
                raise _Quarantine("decode", "decode_error", f"{type(exc).__name__}: {exc}") from None
            out.append((f"frame={f}" if nf > 1 else "", arr))
        return out, pid
    try:
        img = open_image(data, settings["max_pixels"])
    except DecompressionBombError as exc:
        raise _Quarantine("decode", "decompression_bomb", str(exc)) from None
    except Exception:  # noqa: BLE001 - PIL cannot identify it
        raise _Quarantine("decode", "unsupported_format", "not DICOM, PNG, JPEG or TIFF") from None
    if img.format not in _PIL_FORMATS:
        raise _Quarantine("decode", "unsupported_format", f"{img.format} is not DICOM, PNG, JPEG or TIFF")
    try:
        img.load()
    except Exception as exc:  # noqa: BLE001 - truncated or corrupt
        raise _Quarantine("decode", "decode_error", f"{type(exc).__name__}: {exc}") from None
    try:
        return [("", image_to_uint8(img, rule, **params))], None
    except RuleError as exc:
        raise _Quarantine("rule", "rule_failed", str(exc)) from None


def _final_images(samples: list[tuple[str, np.ndarray]], tile_size: int,
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


def process_task(task: dict[str, Any], settings: dict[str, Any]) -> list[dict[str, Any]]:
    """One listed file -> result rows (one per image/frame/tile, or one rejection)."""

    def rejected(stage: str, reason: str, detail: str = "") -> list[dict[str, Any]]:
        return [{"status": "rejected", "path": task["path"], "source": task["source"], "fail_stage": stage,
                 "reason": reason, "detail": detail[:300], "file_done": 1}]

    try:
        if task.get("zone"):  # local landing zone: opened below its root, never through a link
            data = read_inside_zone(task["zone"], zone_parts(task["path"], "read"))
        else:
            zone_parts(task["path"], "read")
            data = storage.read_bytes(task["uri"])
    except _Quarantine as q:
        return rejected(q.stage, q.reason, q.detail)
    except Exception as exc:  # noqa: BLE001
        return rejected("read", "read_error", f"{type(exc).__name__}: {exc}")
    if not data:
        return rejected("read", "empty_file", "0 bytes")
    try:
        samples, pid = decode_samples(data, task["rel"], task, settings)
        images = _final_images(samples, int(task.get("tile_size") or 0), settings)
    except _Quarantine as q:
        return rejected(q.stage, q.reason, q.detail)
    except Exception as exc:  # noqa: BLE001 - the run goes on; the reason is reported
        return rejected("normalize", "normalize_error", f"{type(exc).__name__}: {exc}")
    salt = settings["salt"]
    patient_hash = task.get("patient_hash") or ""
    if not patient_hash:
        # no patient id in the table: the DICOM tag (hashed here, in the worker), else the image id
        key = pid if pid else "image:" + task["rel"]
        patient_hash = salted_hash(salt, "patient", task["source"], key)
    rows = []
    for i, (suffix, arr) in enumerate(images):
        rows.append(
            {
                "status": "ok",
                "image": encode_png(arr, settings["png_compress_level"]),
                "caption": task["caption"],
                "specialty": task["specialty"],
                "image_type": task["image_type"],
                "label": task["label"],
                "source": task["source"],
                "split": "",  # assigned on the driver once every patient is known (assign_splits)
                "patient_hash": patient_hash,
                "image_hash": salted_hash(salt, "image", task["source"], task["rel"], suffix),
                "pixel_hash": pixel_hash(arr),
                "phash": format(perceptual_hash(arr), "016x"),
                "width": int(arr.shape[1]),
                "height": int(arr.shape[0]),
                "file_done": 1 if i == 0 else 0,
            }
        )
    return rows


_HEAP_TUNED: set[int] = set()


def retain_freed_memory(heap_mb: int) -> bool:
    """Serve buffers below ``heap_mb`` MiB from the heap and keep freed memory (glibc; once per process).

    Decoding a 2500x2048 radiograph allocates several 5-20 MiB buffers (file bytes, pixel data,
    decoded frame, the 8-bit frame). Above glibc's mmap threshold each one is fresh pages from the
    kernel that fault on first touch; whether the dynamic threshold rises to avoid that depends on
    the order of allocations, and in Ray workers it did not: 34 ms an image instead of 27 ms
    (docs/preprocessing.md, Benchmark). A worker then holds on to its peak heap, which is what a
    process that decodes frames of the same size in a loop wants. No-op off glibc or for 0.
    """
    if heap_mb <= 0 or os.getpid() in _HEAP_TUNED:
        return False
    _HEAP_TUNED.add(os.getpid())
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
        m_trim_threshold, m_mmap_threshold = -1, -3  # malloc.h
        return (bool(libc.mallopt(m_mmap_threshold, heap_mb << 20))
                and bool(libc.mallopt(m_trim_threshold, 2 * heap_mb << 20)))
    except (OSError, AttributeError):  # not glibc (musl, macOS): leave malloc alone
        return False


def _attempt_marker(settings: dict[str, Any], task: dict[str, Any]) -> Path | None:
    """The file counting the tries of ``task`` whose worker never came back (``settings["attempts_dir"]``)."""
    root = settings.get("attempts_dir")
    if not root:
        return None
    return Path(root) / hashlib.sha256(task["path"].encode()).hexdigest()[:32]


def process_batch(batch: pa.Table, settings: dict[str, Any]) -> pa.Table:
    """Ray Data ``map_batches`` function: a batch of listed files -> result rows (``RESULT_SCHEMA``);
    with ``settings["rows_uri"]`` (the stage), the ok rows are staged there by this worker and only
    their metadata is returned (``META_SCHEMA``, see :func:`_stage_rows`).

    A file whose worker is killed by the OS or Ray (out of memory, say) would be retried forever
    (issue #12). So each file leaves a marker holding its number of tries while it is processed,
    removed when it is done: a marker still there when the batch is retried means the worker died
    on that file, and past ``data.worker_max_tries`` the file is quarantined (``worker_killed``)
    without being opened again, and the run goes on."""
    retain_freed_memory(settings.get("worker_heap_mb", 0))
    max_tries = int(settings.get("worker_max_tries", 2))
    rows: list[dict[str, Any]] = []
    for task in batch.to_pylist():
        marker = _attempt_marker(settings, task)
        if marker is not None:
            tries = int(marker.read_text() or 0) if marker.exists() else 0
            if tries >= max_tries:
                rows.append({"status": "rejected", "path": task["path"], "source": task["source"],
                             "fail_stage": "decode", "reason": "worker_killed", "file_done": 1,
                             "detail": f"the worker processing this file was killed {tries} times (out of memory?);"
                                       f" quarantined after data.worker_max_tries={max_tries}"})
                continue
            marker.parent.mkdir(parents=True, exist_ok=True)
            marker.write_text(str(tries + 1))
        rows.extend(process_task(task, settings))
        if marker is not None:
            marker.unlink(missing_ok=True)
    table = pa.Table.from_pylist(rows, schema=RESULT_SCHEMA)
    if not settings.get("rows_uri"):  # a plain loop (tests, benchmark): the rows themselves
        return table
    return _stage_rows(table, batch.column("path").to_pylist(), settings["rows_uri"])


def _stage_rows(table: pa.Table, paths: list[str], rows_uri: str) -> pa.Table:
    """Write a batch's ok rows (images included) to a new file below ``rows_uri``; return the result
    rows without the image column (``META_SCHEMA``), each ok row pointing at its row group.

    The file name is the batch's identity plus a random part: a retried batch (its worker killed)
    writes its own file, and the driver only ever reads the files named in the results it received,
    so a dead try's file is never read. Written to a temporary name and renamed (local) or in one PUT
    (object storage): a file that exists is complete."""
    ok_mask = pa.compute.equal(table.column("status"), "ok")
    ok = table.filter(ok_mask)
    n_ok = ok.num_rows
    name = None
    if n_ok:
        key = hashlib.sha256("\n".join(paths).encode()).hexdigest()[:16]
        name = f"batch-{key}-{uuid.uuid4().hex[:8]}.parquet"
        _write_parquet(storage.join(rows_uri, name), ok.select(STAGING_SCHEMA.names).cast(STAGING_SCHEMA),
                       row_group_size=_STAGED_ROW_GROUP, **_STAGING_PARQUET_OPTIONS)
    is_ok = ok_mask.to_pylist()
    staged_file, staged_row, i = [], [], 0
    for flag in is_ok:
        staged_file.append(name if flag else None)
        staged_row.append(i if flag else None)
        i += bool(flag)
    meta = table.drop_columns(["image"])
    meta = meta.append_column("staged_file", pa.array(staged_file, pa.string()))
    meta = meta.append_column("staged_row", pa.array(staged_row, pa.int32()))
    return meta.cast(META_SCHEMA)


def _write_parquet(uri: str, table: pa.Table, **options: Any) -> str:
    """Write ``table`` as one Parquet file at ``uri``, whole or not at all; returns its sha256.

    Local: a temporary name in the same directory, then a rename. Object storage: a local temporary
    file, uploaded in one request (with the storage retry policy), then removed."""
    if not storage.is_remote(uri):
        path = storage.local_path(uri)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex[:8]}")
        try:
            pq.write_table(table, tmp, **options)
            digest = storage.sha256(tmp)
            os.replace(tmp, path)
        finally:  # a full disk (ENOSPC) leaves no partial temp file behind
            tmp.unlink(missing_ok=True)
        return digest
    import tempfile

    fd, tmp_name = tempfile.mkstemp(prefix="medisyn-part-", suffix=".parquet")
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        pq.write_table(table, tmp, **options)
        digest = storage.sha256(tmp)
        fs, key = storage.filesystem(uri)
        storage.with_retries("upload", uri, lambda: fs.put_file(str(tmp), key))
        return digest
    finally:
        tmp.unlink(missing_ok=True)


def worker_settings(cfg: RunConfig) -> dict[str, Any]:
    d = cfg.data
    return {
        "resolution": d.resolution,
        "max_pixels": d.max_pixels,
        "multiframe_policy": d.multiframe_policy,
        "quarantine_burned_in": d.quarantine_burned_in,
        "tile_max_overlap": d.tile_max_overlap,
        "split_fractions": list(d.split_fractions),
        "png_compress_level": d.png_compress_level,
        "worker_heap_mb": d.worker_heap_mb,
        "worker_max_tries": d.worker_max_tries,
        "salt": id_salt(cfg),
        # config values are the paper's defaults; a catalog source's rule_params override them
        "rule_defaults": {"level": d.hu_window_level, "width": d.hu_window_width,
                          "low": d.percentile_low, "high": d.percentile_high},
    }


# ----------------------------------------------------------------------------------------------
# De-duplication
# ----------------------------------------------------------------------------------------------
def find_duplicates(meta: pd.DataFrame, max_hamming: int) -> list[dict[str, Any]]:
    """Rows to remove as duplicates of a kept row: [{kept, removed, kind, hamming}] (image hashes).

    Keep order: train before val before test, then image hash, so a copy in train survives and its
    twins leave val/test (a held-out image the model trained on would flatter FID and hide
    memorization, section 4.3.4). Exact = same normalized pixels (any source); near = perceptual
    hashes within ``max_hamming`` bits, compared within one specialty and image type. Near search
    uses the pigeonhole index: two 64-bit hashes within d bits share one of d+1 disjoint chunks.
    """
    if meta.empty:
        return []
    m = meta.assign(_rank=meta["split"].map(SPLIT_RANK)).sort_values(["_rank", "image_hash"], kind="mergesort")
    dups: list[dict[str, Any]] = []
    first_by_pixels: dict[str, str] = {}
    survivors = []
    for row in m.itertuples(index=False):
        kept = first_by_pixels.get(row.pixel_hash)
        if kept is not None:
            dups.append({"kept": kept, "removed": row.image_hash, "kind": "exact", "hamming": 0})
            continue
        first_by_pixels[row.pixel_hash] = row.image_hash
        survivors.append(row)
    n_chunks = min(max_hamming + 1, 16)
    bounds = [round(i * 64 / n_chunks) for i in range(n_chunks + 1)]
    index: dict[tuple, dict[tuple[int, int], list[tuple[int, str]]]] = defaultdict(lambda: defaultdict(list))
    brute = max_hamming + 1 > 16
    for row in survivors:
        group = (row.specialty, row.image_type)
        h = int(row.phash, 16)
        keys = [(i, (h >> (64 - bounds[i + 1])) & ((1 << (bounds[i + 1] - bounds[i])) - 1)) for i in range(n_chunks)]
        seen: dict[str, int] = {}
        if brute:
            pools = [index[group][(0, 0)]]
        else:
            pools = [index[group][k] for k in keys]
        for pool in pools:
            for other_h, other_id in pool:
                if other_id not in seen:
                    seen[other_id] = hamming(h, other_h)
        close = [(d, oid) for oid, d in seen.items() if d <= max_hamming]
        if close:
            d, oid = min(close)
            dups.append({"kept": oid, "removed": row.image_hash, "kind": "near", "hamming": int(d)})
            continue
        for k in ([(0, 0)] if brute else keys):
            index[group][k].append((h, row.image_hash))
    return dups


# ----------------------------------------------------------------------------------------------
# Writing
# ----------------------------------------------------------------------------------------------
# The columns a shard task receives per row from the driver: everything but the image, and where
# the staged row lives. Small: the driver builds them from the metadata it holds.
_SHARD_META_COLS = [n for n in SHARD_SCHEMA.names if n != "image"] + ["staged_file", "staged_row"]


def shard_order_key(image_hashes: Iterable[str], n_buckets: int) -> list[tuple[int, str]]:
    """The row order of every split's shards: (bucket, image hash), bucket = the first 32 bits of the
    image hash modulo ``n_buckets`` (one bucket per ``rows_per_shard`` listed files). This is the
    order the driver-side writer produced before shards were written by workers (it staged rows in
    buckets and wrote bucket after bucket, each sorted by image hash), kept so that a dataset
    version's shards stay identical, file for file."""
    return [(int(h[:8], 16) % n_buckets, h) for h in image_hashes]


def plan_shards(meta: pd.DataFrame, n_buckets: int, rows_per_shard: int) -> dict[str, list[pd.DataFrame]]:
    """split -> the metadata rows of each of its shards, in order (driver; metadata only). A split
    with no rows still gets one (empty) shard with the schema."""
    plan: dict[str, list[pd.DataFrame]] = {}
    for split in SPLITS:
        rows = meta[meta["split"] == split]
        if len(rows):
            key = shard_order_key(rows["image_hash"], n_buckets)
            order = sorted(range(len(rows)), key=key.__getitem__)
            rows = rows.iloc[order]
        plan[split] = [rows.iloc[i : i + rows_per_shard] for i in range(0, len(rows), rows_per_shard)] or [rows]
    return plan


def _read_staged(rows_uri: str, name: str, row_groups: list[int]) -> pa.Table:
    """The image and image hash of the given row groups of one staged file (``_stage_rows``)."""
    uri = storage.join(rows_uri, name)

    def read() -> pa.Table:
        if storage.is_remote(uri):
            fs, path = storage.pyarrow_filesystem(uri)
            with fs.open_input_file(path) as f:
                return pq.ParquetFile(f, pre_buffer=True).read_row_groups(row_groups, columns=["image", "image_hash"])
        return pq.ParquetFile(storage.local_path(uri)).read_row_groups(row_groups, columns=["image", "image_hash"])

    return storage.with_retries("read", uri, read) if storage.is_remote(uri) else read()


def assemble_shard(rows: pa.Table, rows_uri: str, out_uri: str, file: str) -> dict[str, Any]:
    """One final shard (a Ray task; the driver runs it only for an empty split): ``rows`` holds the
    shard's rows in order without their images (``_SHARD_META_COLS``); the images are read from the
    staged files, checked against the row's image hash, and the shard is written to ``out_uri/file``
    (the dataset's staging directory or prefix). Returns the manifest entry {file, rows, sha256}."""
    n = rows.num_rows
    if n:
        files = rows.column("staged_file").to_pylist()
        groups = rows.column("staged_row").to_pylist()
        wanted: dict[str, set[int]] = defaultdict(set)
        for f, g in zip(files, groups, strict=True):
            wanted[f].add(int(g))
        pieces, offset, where = [], 0, {}
        for f in sorted(wanted):
            idx = sorted(wanted[f])
            pieces.append(_read_staged(rows_uri, f, idx))
            where.update({(f, g): offset + k for k, g in enumerate(idx)})
            offset += len(idx)
        staged = pa.concat_tables(pieces)
        take = pa.array([where[(f, int(g))] for f, g in zip(files, groups, strict=True)], pa.int64())
        staged = staged.take(take)
        if staged.column("image_hash").to_pylist() != rows.column("image_hash").to_pylist():
            raise RuntimeError(f"{file}: staged rows do not match the plan (image hashes differ)")
        image = staged.column("image")
    else:
        image = pa.chunked_array([], pa.binary())
    table = rows.drop_columns(["staged_file", "staged_row"]).append_column("image", image)
    table = table.select(SHARD_SCHEMA.names).cast(SHARD_SCHEMA)
    digest = _write_parquet(storage.join(out_uri, file), table, **SHARD_PARQUET_OPTIONS)
    return {"file": file, "rows": n, "sha256": digest}


def _shard_rows(part: pd.DataFrame) -> pa.Table:
    """A shard's metadata rows as the Arrow table ``assemble_shard`` takes."""
    schema = pa.schema([SHARD_SCHEMA.field(n) for n in _SHARD_META_COLS[:-2]]
                       + [pa.field("staged_file", pa.string()), pa.field("staged_row", pa.int32())])
    return pa.Table.from_pandas(part[_SHARD_META_COLS], schema=schema, preserve_index=False)


def dataset_content_hash(meta: pd.DataFrame) -> str:
    """sha256 over every kept row's identity and content (pixels via pixel_hash), split by split in
    image-hash order: equal iff the dataset version is the same, whatever the Parquet writer."""
    h = hashlib.sha256(f"medisyn-dataset-v{MANIFEST_VERSION}\n".encode())
    cols = ["split", "image_hash", "pixel_hash", "caption", "label", "specialty", "image_type", "source",
            "patient_hash", "width", "height"]
    m = meta.assign(_rank=meta["split"].map(SPLIT_RANK)).sort_values(["_rank", "image_hash"], kind="mergesort")
    for row in m[cols].itertuples(index=False):
        h.update(("\t".join(str(v) for v in row) + "\n").encode())
    return h.hexdigest()


def _counts_table(meta: pd.DataFrame, key: str | list[str]) -> dict[str, dict[str, int]]:
    out: dict[str, dict[str, int]] = {}
    if meta.empty:
        return out
    keys = [key] if isinstance(key, str) else key
    for k, grp in meta.groupby(keys, sort=True):
        name = "/".join(k) if isinstance(k, tuple) else str(k)
        c = {s: int((grp["split"] == s).sum()) for s in SPLITS}
        c["total"] = int(len(grp))
        out[name] = c
    return out


def build_manifest(meta: pd.DataFrame, rejected: list[dict], dups: list[dict], shards: dict[str, list[dict]],
                   n_files: int, catalog: Catalog, catalog_origin: str, cfg: RunConfig,
                   dataset_hash: str) -> dict[str, Any]:
    """manifest.json: the paper's Extended Data Tables 1 and 2 (counts per specialty, image type and
    split), rejections, duplicates and the content hash. Deterministic: no timestamps."""
    by_split = {s: int((meta["split"] == s).sum()) if not meta.empty else 0 for s in SPLITS}
    return {
        "manifest_version": MANIFEST_VERSION,
        "dataset_hash": dataset_hash,
        "resolution": cfg.data.resolution,
        "catalog": {"origin": catalog_origin, "digest": catalog.digest},
        "settings": {
            "split_fractions": list(cfg.data.split_fractions),
            "hu_window": {"level": cfg.data.hu_window_level, "width": cfg.data.hu_window_width},
            "percentile_clip": {"low": cfg.data.percentile_low, "high": cfg.data.percentile_high},
            "multiframe_policy": cfg.data.multiframe_policy,
            "tile_max_overlap": cfg.data.tile_max_overlap,
            "quarantine_burned_in": cfg.data.quarantine_burned_in,
            "dedup_hamming": cfg.data.dedup_hamming,
            "max_pixels": cfg.data.max_pixels,
        },
        "inputs": {"files": n_files},
        "counts": {
            "total": int(len(meta)),
            "by_split": by_split,
            "by_specialty": _counts_table(meta, "specialty"),
            "by_image_type": _counts_table(meta, ["specialty", "image_type"]),
            "by_source": _counts_table(meta, "source"),
            "by_label": _counts_table(meta, ["source", "label"]),
            "patients": {s: int(meta.loc[meta["split"] == s, "patient_hash"].nunique()) if not meta.empty else 0
                         for s in SPLITS},
        },
        "rejected": {
            "total": len(rejected),
            "by_reason": dict(sorted(Counter(r["reason"] for r in rejected).items())),
            "by_stage": dict(sorted(Counter(r["stage"] for r in rejected).items())),
        },
        "duplicates": {
            "total": len(dups),
            "exact": sum(d["kind"] == "exact" for d in dups),
            "near": sum(d["kind"] == "near" for d in dups),
            "hamming_threshold": cfg.data.dedup_hamming,
        },
        "shards": shards,
    }


def _jsonl(rows: list[dict]) -> bytes:
    return "".join(json.dumps(r, sort_keys=True) + "\n" for r in rows).encode()


# ----------------------------------------------------------------------------------------------
# Ray
# ----------------------------------------------------------------------------------------------
def _start_ray(cfg: RunConfig) -> bool:
    """Connect to the cluster (RAY_ADDRESS, set by KubeRay) or start a local Ray; True if we started it."""
    import ray

    if ray.is_initialized():
        return False
    if os.environ.get("RAY_ADDRESS"):
        ray.init(address=os.environ["RAY_ADDRESS"], log_to_driver=False)
    else:
        ray.init(num_cpus=cfg.data.ray_num_cpus, include_dashboard=False, log_to_driver=False)
    return True


def _run_ray(tasks: list[dict[str, Any]], settings: dict[str, Any], batch_size: int):
    import ray

    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False  # our Progress lines read the same in pods and terminals
    # Resource reservation keeps a share of the CPUs for each operator so that one operator cannot
    # starve the next. This dataset has a single map operator; with reservation on, Ray Data ran
    # one task at a time on a 2-CPU node (logged "backpressured:tasks(ResourceBudget)"), halving
    # throughput. Off, the map operator may use every CPU (docs/preprocessing.md, Benchmark).
    ctx.op_resource_reservation_enabled = False
    n_blocks = max(1, math.ceil(len(tasks) / batch_size))
    items = ray.data.from_items(tasks, override_num_blocks=n_blocks)
    # Ray types the function as taking the batch alone; it cannot express the fn_kwargs passed below.
    remote_args = _worker_env()
    # A worker killed by the OS or Ray is retried a bounded number of times (never forever, issue #12):
    # one more than data.worker_max_tries, so that the last try quarantines the file (process_batch).
    remote_args["max_retries"] = int(settings.get("worker_max_tries", 2)) + 1
    ds = items.map_batches(process_batch, batch_size=batch_size, batch_format="pyarrow",  # type: ignore[arg-type]
                           fn_kwargs={"settings": settings}, **remote_args)
    yield from ds.iter_batches(batch_size=None, batch_format="pyarrow")


def _worker_env() -> dict[str, Any]:
    """Ray remote arguments that give workers the object store the driver was configured for
    (storage.configure exports the endpoint and retry policy): a Ray cluster started before that, or
    elsewhere, would not have them in its environment."""
    env = {k: os.environ[k] for k in (storage.ENDPOINT_ENV, storage.RETRY_ENV) if os.environ.get(k)}
    return {"runtime_env": {"env_vars": env}} if env else {}


def _run_assemble(jobs: list[tuple[pa.Table, str]], rows_uri: str, out_uri: str, max_retries: int):
    """The second distributed pass: one Ray task per shard (``assemble_shard``), at most two per CPU
    in flight; yields each shard's manifest entry as it completes (small dicts: no image reaches the
    driver). A task that fails for good fails the stage; a worker that dies is retried."""
    import ray

    task = ray.remote(num_cpus=1, max_retries=max_retries, **_worker_env())(assemble_shard)
    window = max(2, 2 * int(ray.cluster_resources().get("CPU", 1)))
    pending: list[Any] = []
    todo = iter(jobs)
    try:
        while True:
            for rows, file in todo:
                pending.append(task.remote(rows, rows_uri, out_uri, file))
                if len(pending) >= window:
                    break
            if not pending:
                return
            done, pending = ray.wait(pending, num_returns=1)
            yield ray.get(done[0])
    finally:
        for ref in pending:  # a failure: stop the rest before the staging is removed
            ray.cancel(ref, force=True)


def _rows_staging_uri(out_uri: str, scratch: Path) -> str:
    """Where workers stage their rows: the scratch directory for a local output, a hidden prefix
    beside an object-storage output (``.<name>.staging-<owner>``, removed by the next run's
    :func:`medisyn.storage.recover` if this one is killed)."""
    if not storage.is_remote(out_uri):
        return "file://" + str(scratch / "rows")
    parent, name = out_uri.rstrip("/").rsplit("/", 1)
    return f"{parent}/.{name}.staging-{storage.owner_token()}"


def _write_shards(plan: dict[str, list[pd.DataFrame]], rows_uri: str, out_uri: str,
                  max_retries: int) -> dict[str, list[dict[str, Any]]]:
    """Every split's shards, written by Ray tasks from the staged rows (an empty split's single empty
    shard by the driver: no image involved); the manifest's ``shards`` entry. Logs rows/s and ETA."""
    jobs: list[tuple[pa.Table, str]] = []
    entries: dict[str, dict[str, Any]] = {}
    for split in SPLITS:
        for k, part in enumerate(plan[split]):
            file = f"{split}/part-{k:05d}.parquet"
            if len(part):
                jobs.append((_shard_rows(part), file))
            else:
                entries[file] = assemble_shard(_shard_rows(part), rows_uri, out_uri, file)
    progress = Progress(sum(j[0].num_rows for j in jobs), "preprocess shards", unit="rows")
    for entry in (_run_assemble(jobs, rows_uri, out_uri, max_retries) if jobs else []):
        entries[entry["file"]] = entry
        progress.update(entry["rows"])
    progress.close()
    return {split: [entries[f"{split}/part-{k:05d}.parquet"] for k in range(len(plan[split]))] for split in SPLITS}


# ----------------------------------------------------------------------------------------------
# The stage
# ----------------------------------------------------------------------------------------------
def preprocess(cfg: RunConfig, raw_uri: str, out_uri: str) -> PreprocessResult:
    """Landing zone at ``raw_uri`` -> dataset prefix at ``out_uri`` (docs/stages.md), atomically."""
    raw_uri, out_uri = storage.normalize(raw_uri), storage.normalize(out_uri)
    t0 = time.monotonic()
    catalog, catalog_origin = resolve_catalog(cfg, raw_uri)
    settings = worker_settings(cfg)
    if not os.environ.get(cfg.data.id_salt_env):
        log.warning("$%s is unset: hashing ids with data.default_id_salt (a demo config: phantom data only)",
                    cfg.data.id_salt_env)
    tasks, rejected = list_inputs(catalog, raw_uri, settings["salt"])
    n_files = len(tasks) + len(rejected)
    if n_files == 0:
        raise PreprocessError(f"no input files under {raw_uri} for catalog {catalog_origin} "
                              f"(sources: {', '.join(catalog.names)})")
    t_listed = t_mapped = time.monotonic()
    log.info("preprocess: %d files from %d sources (catalog %s)", n_files, len(catalog.sources), catalog_origin)

    # Image rows are staged by the workers themselves (process_batch -> _stage_rows): below the
    # scratch directory for a local output (one machine), in a hidden prefix beside an object-storage
    # output (reachable from every node). The driver receives only metadata (META_SCHEMA).
    staging = storage.scratch_dir("preprocess")  # named with its owner: a later run removes it if killed
    settings["attempts_dir"] = str(staging / "attempts")  # tries of files whose worker died (process_batch)
    rows_uri = _rows_staging_uri(out_uri, staging)
    settings["rows_uri"] = rows_uri
    n_buckets = max(1, math.ceil(len(tasks) / cfg.data.rows_per_shard))
    meta_parts: list[pa.Table] = []  # every column but the image: small enough for the driver
    meta_cols = [c for c in STAGING_SCHEMA.names if c != "image"] + ["staged_file", "staged_row"]
    started = _start_ray(cfg) if tasks else False
    t_written = t_mapped
    try:
        try:
            progress = Progress(len(tasks), "preprocess", unit="files")
            for batch in (_run_ray(tasks, settings, cfg.data.ray_batch_size) if tasks else []):
                if "image" in batch.schema.names:  # never: workers stage their rows (settings["rows_uri"])
                    raise RuntimeError("a worker returned image bytes to the driver")
                progress.update(int(pa.compute.sum(batch.column("file_done")).as_py() or 0))
                status = batch.column("status")
                bad = batch.filter(pa.compute.equal(status, "rejected"))
                for r in bad.select(["path", "source", "fail_stage", "reason", "detail"]).to_pylist():
                    rejected.append(_reject_row(r["path"], r["source"], r["fail_stage"], r["reason"],
                                                r["detail"] or ""))
                good = batch.filter(pa.compute.equal(status, "ok"))
                if good.num_rows:
                    meta_parts.append(good.select(meta_cols))
            progress.close()
            t_mapped = time.monotonic()
            meta = (pa.concat_tables(meta_parts).to_pandas() if meta_parts
                    else pd.DataFrame({c: pd.Series(dtype=object) for c in meta_cols}))
            del meta_parts
            rejected.sort(key=lambda r: (r["path"], r["stage"]))
            n_rej_files = len({r["path"] for r in rejected})
            error_rate = n_rej_files / n_files
            if error_rate > cfg.data.max_error_rate:
                top = Counter(r["reason"] for r in rejected).most_common(5)
                raise PreprocessError(
                    f"{n_rej_files}/{n_files} files rejected ({error_rate:.1%}) > data.max_error_rate="
                    f"{cfg.data.max_error_rate:.1%}; top reasons: {top}. Nothing was published."
                )
            split_of = assign_splits(meta, cfg.data.split_fractions)
            meta["split"] = meta["patient_hash"].map(split_of)
            dups = find_duplicates(meta, cfg.data.dedup_hamming)
            removed = {d["removed"] for d in dups}
            meta = meta[~meta["image_hash"].isin(removed)].reset_index(drop=True)
            dataset_hash = dataset_content_hash(meta)
            plan = plan_shards(meta, n_buckets, cfg.data.rows_per_shard)
            with storage.staged_prefix(out_uri) as (out_staging, out, publish):
                shards = _write_shards(plan, rows_uri, out_staging, max_retries=int(settings["worker_max_tries"]) + 1)
                t_written = time.monotonic()
                manifest = build_manifest(meta, rejected, dups, shards, n_files, catalog, catalog_origin, cfg,
                                          dataset_hash)
                (out / "manifest.json").write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
                # The catalog travels with the dataset: the gates read their prompts and tasks from it.
                (out / DATASET_CATALOG).write_text(_catalog_text(catalog_origin, raw_uri))
                (out / "rejected.jsonl").write_bytes(_jsonl(rejected))
                (out / "duplicates.jsonl").write_bytes(_jsonl(sorted(dups, key=lambda d: (d["removed"], d["kept"]))))
                publish({"dataset_hash": dataset_hash})
        finally:
            if started:
                import ray

                ray.shutdown()  # before the staging is removed: no worker writes into it afterwards
    finally:
        shutil.rmtree(staging, ignore_errors=True)
        if storage.is_remote(rows_uri):
            with contextlib.suppress(Exception):  # best effort: recover() removes what is left
                storage.remove(rows_uri)

    counts = dict(manifest["counts"]["by_split"])
    elapsed = time.monotonic() - t0
    log.info("preprocess phases: list %.1fs, decode/normalize/stage (Ray) %.1fs, dedup + shards (Ray) %.1fs, "
             "publish %.1fs", t_listed - t0, t_mapped - t_listed, t_written - t_mapped, time.monotonic() - t_written)
    log.info("preprocess done: %d images %s, %d rejected, %d duplicates removed, %.1fs (%.2f files/s), hash %s",
             len(meta), counts, len(rejected), len(dups), elapsed, n_files / max(elapsed, 1e-9), dataset_hash[:12])
    result = PreprocessResult(out_uri, dataset_hash, counts, int(len(meta)), len(rejected), len(dups), manifest)
    _log_to_mlflow(cfg, result, elapsed)
    return result


def _log_to_mlflow(cfg: RunConfig, result: PreprocessResult, elapsed: float) -> None:
    """The manifest becomes the run's dataset input (digest = dataset hash) plus an artifact."""
    from medisyn import tracking

    with tracking.stage_run(cfg, "preprocess", tags={"medisyn.dataset_hash": result.dataset_hash}) as run:
        if run is None:
            return
        import mlflow

        mlflow.log_params({"dataset_uri": result.dataset_uri, "resolution": cfg.data.resolution,
                           "catalog_digest": result.manifest["catalog"]["digest"][:16]})
        mlflow.log_metrics({"n_images": result.n_images, "n_rejected": result.n_rejected,
                            "n_duplicates": result.n_duplicates, "seconds": elapsed,
                            **{f"n_{s}": n for s, n in result.counts.items()}})
        tracking.log_json(result.manifest, "dataset/manifest.json")
        try:
            from mlflow.data.http_dataset_source import HTTPDatasetSource
            from mlflow.data.meta_dataset import MetaDataset

            # mlflow.data.Dataset marks `profile` abstract but is no ABC: MetaDataset is meant to be instantiated
            ds = MetaDataset(source=HTTPDatasetSource(result.dataset_uri), name=f"{cfg.name}-dataset",  # type: ignore[abstract]
                             digest=result.dataset_hash[:36])
            mlflow.log_input(ds, context="preprocess")
        except Exception as exc:  # noqa: BLE001 - the artifact above already carries the manifest
            log.warning("could not log the dataset input to MLflow: %s", exc)
