"""Where the preprocess stage's image rows go: staged by the workers, then assembled into shards.

A worker stages the ok rows of its batch (images included) in a file of its own (:func:`stage_rows`)
and returns only metadata; the driver plans each split's shards on that metadata (:func:`plan_shards`,
in the row order of :func:`shard_order_key`); one task per shard reads its rows back from the staged
files and writes the shard (:func:`assemble_shard`). Image bytes never pass through the driver
(docs/preprocessing.md, How the driver scales). Every file is written whole or not at all.
"""

from __future__ import annotations

import hashlib
import os
import uuid
from collections import defaultdict
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import pandas as pd
import pyarrow as pa
import pyarrow.compute  # noqa: F401 - pa.compute
import pyarrow.parquet as pq

from medisyn import storage
from medisyn.data.schema import (
    META_SCHEMA,
    SHARD_META_COLS,
    SHARD_PARQUET_OPTIONS,
    SHARD_SCHEMA,
    SPLITS,
    STAGED_ROW_GROUP,
    STAGING_PARQUET_OPTIONS,
    STAGING_SCHEMA,
)


# ----------------------------------------------------------------------------------------------
# Staging (workers)
# ----------------------------------------------------------------------------------------------
def stage_rows(table: pa.Table, paths: list[str], rows_uri: str) -> pa.Table:
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
                       row_group_size=STAGED_ROW_GROUP, **STAGING_PARQUET_OPTIONS)
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


# ----------------------------------------------------------------------------------------------
# Shards (driver plans, Ray tasks write)
# ----------------------------------------------------------------------------------------------
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
    """The image and image hash of the given row groups of one staged file (``stage_rows``)."""
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
    shard's rows in order without their images (``SHARD_META_COLS``); the images are read from the
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


def shard_rows(part: pd.DataFrame) -> pa.Table:
    """A shard's metadata rows as the Arrow table ``assemble_shard`` takes."""
    schema = pa.schema([SHARD_SCHEMA.field(n) for n in SHARD_META_COLS[:-2]]
                       + [pa.field("staged_file", pa.string()), pa.field("staged_row", pa.int32())])
    return pa.Table.from_pandas(part[SHARD_META_COLS], schema=schema, preserve_index=False)

