"""Stored BiomedCLIP embeddings of the training split: computed once per dataset version, reused by
every later privacy gate run (issue #14; docs/gates.md).

Where: inside the dataset prefix, ``<dataset_uri>/embeddings/biomedclip-<key>/<group>/``, one
directory per (specialty, image type) group, where ``key`` digests the dataset hash and the model
identity (every file of the BiomedCLIP directory by content, the parameter dtype, the preprocessing
and the embedding recipe). Each group directory holds

* ``shard-NNNNN.rows.npy`` (int64 row ids of the train split, ascending) and ``shard-NNNNN.emb.npy``
  (float32 L2-normalised embeddings, ``SHARD_ROWS`` rows at most),
* ``embeddings.json``: format, dataset hash, model identity and its digest, the group, dim, count,
  the shards with their row counts and sha256, and how the embeddings were made (device, seconds),
* ``_COMPLETE``, written last: the directory is published with :func:`medisyn.storage.publish_dir`
  (local: written beside it and renamed into place; object storage: replace by version), so a killed
  run never leaves a directory that reads as complete.

Why inside the dataset prefix: the cache belongs to one dataset version and must go with it. A new
version published at the same URI replaces the whole prefix (local: one rename; object storage: the
swap removes every key the new version lacks), so the cache can never outlive its dataset there, and
the dataset's readers only ever list ``train/``, ``val/``, ``test/`` and ``manifest.json``. The
embeddings are still verified on every read (dataset hash, model identity, the group's row ids
against the dataset's, each shard's sha256 and shape); anything that does not match is recomputed
and replaced. Storing is best effort: a dataset prefix the gate may not write (read-only bucket)
costs a recomputation on every run, never the gate.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import shutil
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from medisyn import storage
from medisyn.data import decode_png, iter_rows
from medisyn.progress import Progress

log = logging.getLogger("medisyn.privacy")

FORMAT = 1
CACHE_DIR = "embeddings"  # inside the dataset prefix
META_FILE = "embeddings.json"
SHARD_ROWS = 32768  # rows per shard: 64 MiB at 512 dims
# What :func:`medisyn.models.biomedclip.image_embeddings` does to a training image; a change here
# (or there) must change the recipe, so stored embeddings are recomputed.
RECIPE = {"version": 1, "decode": "decode_png -> PIL, convert RGB", "transform": "open_clip preprocess",
          "output": "encode_image, float32, L2-normalised"}

Group = tuple[str, str]  # (specialty, image_type)


# ----------------------------------------------------------------------------------------------
# Identity
# ----------------------------------------------------------------------------------------------
_FILE_HASHES: dict[tuple[str, int, int], str] = {}


def _file_sha256(path: Path) -> str:
    st = path.stat()
    memo = (str(path.resolve()), st.st_size, st.st_mtime_ns)
    if memo not in _FILE_HASHES:
        _FILE_HASHES[memo] = storage.sha256(path)
    return _FILE_HASHES[memo]


def model_identity(model_uri: str, model: Any, preprocess: Any) -> dict[str, Any]:
    """What decides a BiomedCLIP embedding: every file of the model directory by content (config,
    weights, tokenizer; hidden files skipped), the parameter dtype, the preprocessing transform and
    the embedding recipe. The path itself is left out: a copy of the same model is the same model."""
    from medisyn.models.sdxl import local_model_dir

    base = local_model_dir(str(model_uri))
    files = {}
    for p in sorted(base.rglob("*")):
        rel = p.relative_to(base)
        if p.is_file() and not any(part.startswith(".") for part in rel.parts):
            files[rel.as_posix()] = _file_sha256(p)
    params = list(model.parameters())
    return {"files": files, "dtype": str(params[0].dtype) if params else "none",
            "preprocess": re.sub(r" at 0x[0-9a-fA-F]+", "", repr(preprocess)),  # no process-specific addresses
            "recipe": RECIPE}


def digest(obj: Any, n: int = 16) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:n]


def group_id(group: Group) -> str:
    """A directory name for a group: readable, and unique through a digest of the exact values."""
    slug = re.sub(r"[^a-z0-9]+", "-", f"{group[0]}--{group[1]}".lower()).strip("-")[:48] or "group"
    return f"{slug}-{digest(list(group), 8)}"


def train_group_rows(dataset_uri: str, groups: Sequence[Group] | None = None) -> dict[Group, np.ndarray]:
    """{(specialty, image_type): ascending row ids of the train split} (two small columns only)."""
    wanted = None if groups is None else set(groups)
    out: dict[Group, list[np.ndarray]] = {}
    for ids, cols in iter_rows(dataset_uri, "train", ["specialty", "image_type"], batch_size=65536):
        spec = np.asarray(cols["specialty"], dtype=object)
        itype = np.asarray(cols["image_type"], dtype=object)
        for g in set(zip(cols["specialty"], cols["image_type"], strict=True)):
            if wanted is None or g in wanted:
                out.setdefault(g, []).append(ids[(spec == g[0]) & (itype == g[1])])
    rows = {g: np.concatenate(parts).astype(np.int64) for g, parts in out.items()}
    for g in wanted or ():
        rows.setdefault(g, np.zeros(0, dtype=np.int64))
    return rows


# ----------------------------------------------------------------------------------------------
# One group's embeddings
# ----------------------------------------------------------------------------------------------
@dataclass
class GroupEmbeddings:
    """The embeddings of one group's training images, as local shard files (read one at a time)."""

    group: Group
    uri: str  # where they are stored (or were meant to be)
    status: str  # "reused" | "computed"
    count: int
    dim: int
    shards: list[tuple[Path, Path]]  # (rows .npy, emb .npy), local
    stored: bool = True  # False when storing failed (computed but not reusable)
    note: str = ""

    def chunks(self) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """(row ids, float32 embeddings) shard by shard (memory-mapped: one shard in RAM at most)."""
        for rows_path, emb_path in self.shards:
            yield np.load(rows_path), np.load(emb_path, mmap_mode="r")

    def summary(self) -> dict[str, Any]:
        out = {"status": self.status, "images": self.count, "uri": self.uri, "stored": self.stored}
        if self.note:
            out["note"] = self.note
        return out


class TrainEmbeddings:
    """The privacy gate's search database: the train split's embeddings, group by group, from the
    store when a verified copy is there, else computed in one pass over the train split and stored.

    ``embed(images) -> float32 (n, dim)`` embeds PIL images; ``scratch`` is a local directory the
    caller removes (shards are computed, or downloaded from object storage, into it).
    """

    def __init__(self, dataset_uri: str, dataset_hash: str, identity: dict[str, Any], scratch: Path,
                 embed: Callable[[list], np.ndarray], batch_size: int, device: str = ""):
        self.dataset_uri = storage.normalize(dataset_uri)
        self.dataset_hash = dataset_hash
        self.identity = identity
        self.identity_digest = digest(identity)
        self.key = digest({"dataset_hash": dataset_hash, "model": self.identity_digest, "format": FORMAT})
        self.root_uri = storage.join(self.dataset_uri, CACHE_DIR, f"biomedclip-{self.key}")
        self.scratch = Path(scratch)
        self.embed = embed
        self.batch_size = max(1, batch_size)
        self.device = device
        self.images_embedded = 0  # training images embedded by this process (0 when all were reused)

    def group_uri(self, group: Group) -> str:
        return storage.join(self.root_uri, group_id(group))

    # -- reading ---------------------------------------------------------------------------------
    def load(self, group: Group, rows: np.ndarray) -> tuple[GroupEmbeddings | None, str]:
        """The stored embeddings of ``group`` if complete and valid for ``rows``, else (None, why)."""
        uri = self.group_uri(group)
        try:
            if not storage.is_complete(uri):
                return None, "absent" if not storage.exists(uri) else f"incomplete (no {storage.COMPLETE_MARKER})"
            meta = storage.read_json(storage.join(uri, META_FILE))
            expect = {"format": FORMAT, "dataset_hash": self.dataset_hash, "model_digest": self.identity_digest,
                      "specialty": group[0], "image_type": group[1], "count": int(len(rows))}
            for k, v in expect.items():
                if meta.get(k) != v:
                    return None, f"{k} is {meta.get(k)!r}, expected {v!r}"
            dim = int(meta["dim"])
            local = self._local_copy(uri, group, meta)
            shards: list[tuple[Path, Path]] = []
            at = 0
            for entry, (rows_path, emb_path) in zip(meta["shards"], local, strict=True):
                for name, path in (("rows", rows_path), ("emb", emb_path)):
                    if storage.sha256(path) != entry[f"{name}_sha256"]:
                        return None, f"{path.name}: sha256 differs from {META_FILE}"
                r = np.load(rows_path)
                e = np.load(emb_path, mmap_mode="r")
                n = int(entry["count"])
                if r.dtype != np.int64 or r.shape != (n,) or e.dtype != np.float32 or e.shape != (n, dim):
                    return None, f"{emb_path.name}: shape/dtype {e.shape}/{e.dtype} do not match {META_FILE}"
                if not np.array_equal(r, rows[at:at + n]):
                    return None, f"{rows_path.name}: row ids differ from the dataset's {group[0]}/{group[1]} rows"
                at += n
                shards.append((rows_path, emb_path))
            if at != len(rows):
                return None, f"shards hold {at} rows, the dataset {len(rows)}"
            return GroupEmbeddings(group, uri, "reused", len(rows), dim, shards), ""
        except (OSError, ValueError, KeyError, TypeError, json.JSONDecodeError) as exc:
            return None, f"unreadable: {type(exc).__name__}: {exc}"

    def _local_copy(self, uri: str, group: Group, meta: dict) -> list[tuple[Path, Path]]:
        names = [(s["rows"], s["emb"]) for s in meta["shards"]]
        if not storage.is_remote(uri):
            base = storage.local_path(uri)
            return [(base / r, base / e) for r, e in names]
        dest = self.scratch / "stored" / group_id(group)
        dest.mkdir(parents=True, exist_ok=True)
        out = []
        for r, e in names:
            for name in (r, e):
                (dest / name).write_bytes(storage.read_bytes(storage.join(uri, name)))
            out.append((dest / r, dest / e))
        return out

    # -- the whole database ----------------------------------------------------------------------
    def prepare(self, group_rows: dict[Group, np.ndarray]) -> dict[Group, GroupEmbeddings]:
        """Every group's embeddings: verified stored ones reused, the rest computed in ONE pass over
        the train split and stored (each group published atomically)."""
        out: dict[Group, GroupEmbeddings] = {}
        todo: dict[Group, tuple[np.ndarray, str]] = {}
        for group, rows in sorted(group_rows.items()):
            found, why = self.load(group, rows)
            if found is not None:
                log.info("privacy: train embeddings of %s/%s reused (%d images) from %s", group[0], group[1],
                         found.count, found.uri)
                out[group] = found
            else:
                if why != "absent":
                    log.warning("privacy: stored train embeddings of %s/%s not used: %s; recomputing",
                                group[0], group[1], why)
                todo[group] = (rows, why)
        if todo:
            out.update(self._compute({g: r for g, (r, _) in todo.items()}, {g: w for g, (_, w) in todo.items()}))
        return out

    def _compute(self, group_rows: dict[Group, np.ndarray], why: dict[Group, str]) -> dict[Group, GroupEmbeddings]:
        t0 = time.monotonic()
        order = sorted(group_rows)
        top = max((int(r[-1]) for r in group_rows.values() if len(r)), default=-1)
        owner = np.full(top + 1, -1, dtype=np.int32)  # row id -> index of its group in ``order``, -1: not wanted
        for i, g in enumerate(order):
            owner[group_rows[g]] = i
        writers = {g: _ShardWriter(self.scratch / "computed" / group_id(g)) for g in order}
        total = sum(len(r) for r in group_rows.values())
        prog = Progress(total, "privacy: embed train", unit="img")
        for ids, cols in iter_rows(self.dataset_uri, "train", ["image"], self.batch_size):
            ids = np.asarray(ids, dtype=np.int64)
            gi = np.where(ids <= top, owner[np.minimum(ids, top)], -1) if top >= 0 else np.full(len(ids), -1)
            keep = np.flatnonzero(gi >= 0)
            if not len(keep):
                continue
            images = cols["image"]
            emb = np.asarray(self.embed([decode_png(images[i]) for i in keep]), dtype=np.float32)
            for i in np.unique(gi[keep]):
                sel = gi[keep] == i
                writers[order[i]].add(ids[keep][sel], emb[sel])
            self.images_embedded += len(keep)
            prog.update(len(keep))
        prog.close()
        seconds = time.monotonic() - t0
        log.info("privacy: embedded %d training images of %d groups in %.1fs", total, len(group_rows), seconds)
        out = {}
        for g, rows in group_rows.items():
            w = writers[g]
            shards = w.close()
            written = np.concatenate([np.load(r) for r, _ in shards]) if shards else np.zeros(0, dtype=np.int64)
            if not np.array_equal(written, rows):
                raise RuntimeError(f"embedding pass over {g[0]}/{g[1]} saw {len(written)} rows, expected {len(rows)}")
            meta = {
                "format": FORMAT, "dataset_hash": self.dataset_hash, "dataset_uri": self.dataset_uri,
                "model_digest": self.identity_digest, "model_identity": self.identity,
                "specialty": g[0], "image_type": g[1], "count": int(len(rows)), "dim": w.dim,
                "dtype": "float32", "rows_first": int(rows[0]) if len(rows) else None,
                "rows_last": int(rows[-1]) if len(rows) else None,
                "shards": [{"rows": r.name, "emb": e.name, "count": int(len(np.load(r))),
                            "rows_sha256": storage.sha256(r), "emb_sha256": storage.sha256(e)} for r, e in shards],
                "computed": {"device": self.device, "seconds_all_groups": round(seconds, 3),
                             "at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())},
            }
            (w.directory / META_FILE).write_text(json.dumps(meta, indent=1, sort_keys=True) + "\n")
            uri = self.group_uri(g)
            stored, note = True, ""
            try:
                storage.publish_dir(w.directory, uri, {"dataset_hash": self.dataset_hash,
                                                       "model_digest": self.identity_digest})
                (w.directory / storage.COMPLETE_MARKER).unlink(missing_ok=True)
            except Exception as exc:  # noqa: BLE001 - the cache is an optimisation; the gate goes on
                stored, note = False, f"not stored: {type(exc).__name__}: {exc}"
                log.warning("privacy: could not store the train embeddings of %s/%s at %s (%s); the next run"
                            " recomputes them", g[0], g[1], uri, note)
            if why.get(g, "absent") != "absent":
                note = "; ".join(x for x in (f"stored copy not used: {why[g]}", note) if x)
            out[g] = GroupEmbeddings(g, uri, "computed", int(len(rows)), w.dim, shards, stored, note)
        return out


@dataclass
class _ShardWriter:
    directory: Path
    dim: int = 0
    _rows: list[np.ndarray] = field(default_factory=list)
    _emb: list[np.ndarray] = field(default_factory=list)
    _buffered: int = 0
    _files: list[tuple[Path, Path]] = field(default_factory=list)

    def __post_init__(self) -> None:
        shutil.rmtree(self.directory, ignore_errors=True)
        self.directory.mkdir(parents=True)

    def add(self, rows: np.ndarray, emb: np.ndarray) -> None:
        self.dim = int(emb.shape[1])
        self._rows.append(rows)
        self._emb.append(emb)
        self._buffered += len(rows)
        while self._buffered >= SHARD_ROWS:
            self._flush(SHARD_ROWS)

    def _flush(self, n: int) -> None:
        rows, emb = np.concatenate(self._rows), np.concatenate(self._emb)
        i = len(self._files)
        r_path, e_path = self.directory / f"shard-{i:05d}.rows.npy", self.directory / f"shard-{i:05d}.emb.npy"
        np.save(r_path, np.ascontiguousarray(rows[:n], dtype=np.int64))
        np.save(e_path, np.ascontiguousarray(emb[:n], dtype=np.float32))
        self._files.append((r_path, e_path))
        self._rows, self._emb = [rows[n:]], [emb[n:]]
        self._buffered = len(rows) - n

    def close(self) -> list[tuple[Path, Path]]:
        if self._buffered:
            self._flush(self._buffered)
        return self._files
