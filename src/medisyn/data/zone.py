"""The landing zone: which catalog applies, and the walk that lists its files (preprocess, driver side).

``list_inputs`` turns the catalog's sources into one task per file for the workers and quarantines,
while listing, whatever must never be opened: links, FIFOs and devices, paths outside the zone,
labels-table lines that are not UTF-8 or carry control characters (docs/preprocessing.md, Hostile
input). ``open_inside_zone`` is the one way a worker opens a file of a local zone.
"""

from __future__ import annotations

import csv
import errno
import json
import logging
import os
import stat
import unicodedata
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from medisyn import storage
from medisyn.catalog import BUILTIN, Catalog, Source, load_catalog
from medisyn.config import RunConfig
from medisyn.data.quarantine import PreprocessError, Quarantine, reject_row
from medisyn.data.splits import salted_hash

log = logging.getLogger("medisyn.preprocess")

LANDING_CATALOG = "catalog.yaml"


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
            except Quarantine as q:
                raise PreprocessError(f"landing zone {LANDING_CATALOG} refused ({q.reason}): {q.detail}") from None
        if storage.exists(landing):
            return load_catalog(landing), f"landing:{LANDING_CATALOG}"
        return load_catalog(BUILTIN), BUILTIN
    return load_catalog(cfg.data.catalog), cfg.data.catalog


def catalog_text(origin: str, raw_uri: str) -> str:
    """The text of the catalog ``resolve_catalog`` chose (copied beside the shards: the gates read it)."""
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
        except Quarantine as q:
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
            except Quarantine as q:
                rejected.append(reject_row(path, src.name, q.stage, q.reason, q.detail))
                continue
            path = "/".join(prefix_parts + parts)
            rel = "/".join(parts)
            try:
                texts = src.label_texts(raw_label)
                caption = src.caption_for(raw_label)
            except KeyError as exc:
                rejected.append(reject_row(path, src.name, "labels", "unknown_label", str(exc.args[0])))
                continue
            if has_control_characters(caption) or any(has_control_characters(t) for t in texts):
                rejected.append(reject_row(path, src.name, "labels", "control_characters",
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
        raise Quarantine(stage, "outside_landing_zone", f"absolute path {rel[:200]!r}")
    parts = [p for p in rel.split("/") if p not in ("", ".")]
    if ".." in parts:
        raise Quarantine(stage, "outside_landing_zone", f"'..' in {rel[:200]!r}")
    if not parts:
        raise Quarantine(stage, "outside_landing_zone", "empty path")
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
    swapped after the check is refused too. Raises :class:`Quarantine` with the reason."""
    base = os.O_RDONLY | getattr(os, "O_CLOEXEC", 0)
    fd = os.open(zone, base | os.O_DIRECTORY)
    try:
        for i, part in enumerate(parts):
            last = i == len(parts) - 1
            where = "/".join(parts[: i + 1])
            try:
                st = os.stat(part, dir_fd=fd, follow_symlinks=False)
            except FileNotFoundError:
                raise Quarantine(stage, "missing_file", f"{where} not found") from None
            except OSError as exc:
                raise Quarantine(stage, "read_error", f"{where}: {exc.strerror}") from None
            if stat.S_ISLNK(st.st_mode):
                raise Quarantine(stage, "symlink", f"{where} is a symbolic link (never followed)")
            if not last and not stat.S_ISDIR(st.st_mode):
                raise Quarantine(stage, "missing_file", f"{where} is not a directory")
            if last and not stat.S_ISREG(st.st_mode):
                raise Quarantine(stage, "not_a_regular_file", f"{where} is {_file_kind(st.st_mode)}")
            flags = base | os.O_NOFOLLOW | (os.O_NONBLOCK if last else os.O_DIRECTORY)
            try:
                nfd = os.open(part, flags, dir_fd=fd)
            except OSError as exc:
                if exc.errno in (errno.ELOOP, errno.ENOTDIR, errno.EMLINK):
                    raise Quarantine(stage, "symlink", f"{where} became a symbolic link") from None
                raise Quarantine(stage, "read_error", f"{where}: {exc.strerror}") from None
            os.close(fd)
            fd = nfd
            now = os.fstat(fd)
            same = (now.st_dev, now.st_ino, stat.S_IFMT(now.st_mode)) == (st.st_dev, st.st_ino, stat.S_IFMT(st.st_mode))
            if not same:
                raise Quarantine(stage, "not_a_regular_file", f"{where} changed while being opened")
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
                raise Quarantine("labels", "missing_file", "not found")
            data = storage.read_bytes(table_uri)
    except Quarantine as q:
        if q.reason == "missing_file":
            raise PreprocessError(f"source {src.name}: labels table {table_path} not found") from None
        yield reject_row(table_path, src.name, "labels", q.reason, f"labels table {table_path}: {q.detail}")
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
            yield reject_row(f"{table_path}#line={line}", src.name, "labels", "control_characters",
                             f"labels table {table_path} line {line}: control characters in the path, "
                             "label or patient id")
            continue
        if files is not None:  # object storage: no links or special files, only keys to look up
            try:
                missing = "/".join(zone_parts(rel)) not in files
            except Quarantine:
                missing = False  # refused by list_inputs, with its reason
            if missing:
                yield reject_row(f"{src.prefix}/{rel}", src.name, "list", "missing_file",
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
                return None, [], [reject_row(table_path, source, "labels", "invalid_utf8", detail + "; table refused")]
            bad.append(reject_row(f"{table_path}#line={n}", source, "labels", "invalid_utf8", detail))
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
        return None, [], bad + [reject_row(table_path, source, "labels", "bad_labels_table",
                                           f"labels table {table_path} line {line}: {exc}; table refused")]
    if header is None:
        return None, [], bad + [reject_row(table_path, source, "labels", "bad_labels_table",
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

