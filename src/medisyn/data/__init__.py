"""Reading the dataset prefix written by ``medisyn.data.preprocess`` (docs/stages.md).

The one dataset reader: later stages (training, FID, the gates) never open Parquet themselves.
``read_split`` for small splits, ``iter_split`` to stream large ones batch by batch as DataFrames,
``iter_rows`` to stream chosen columns with stable row ids and an equality filter (bounded memory:
a second pass can fetch exactly the rows a first pass chose), ``decode_png`` for the ``image``
column (PNG bytes, mode L or RGB). Every reader refuses a prefix without ``_COMPLETE`` and reads
a split's shards in sorted order, so row order (hence row ids) is reproducible.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from medisyn.data.images import decode_png
from medisyn.data.schema import SHARD_SCHEMA, SPLITS

if TYPE_CHECKING:
    import pyarrow as pa

__all__ = ["SPLITS", "dataset_hash", "decode_png", "iter_rows", "iter_split", "read_manifest", "read_split",
           "split_files", "train_shards"]


def _check_split(split: str) -> None:
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")


def split_files(dataset_uri: str, split: str) -> list[str]:
    """URIs of a split's Parquet shards, sorted (so row order, hence row ids, are reproducible)."""
    from medisyn import storage

    _check_split(split)
    storage.require_complete(dataset_uri)
    return sorted(u for u in storage.listdir(storage.join(dataset_uri, split)) if u.endswith(".parquet"))


def train_shards(dataset_uri: str) -> list[str]:
    """The train split's shards; an empty train split is an error (nothing to encode or score)."""
    shards = split_files(dataset_uri, "train")
    if not shards:
        raise FileNotFoundError(f"no train Parquet shards under {dataset_uri}/train")
    return shards


def dataset_hash(dataset_uri: str) -> str:
    """The dataset version: ``manifest.json``'s ``dataset_hash``; for a prefix without one, a sha256
    of the train shards' bytes. Keys the latent cache and the cached real FID statistics."""
    import hashlib
    import logging

    from medisyn import storage

    manifest_uri = storage.join(dataset_uri, "manifest.json")
    if storage.exists(manifest_uri):
        value = storage.read_json(manifest_uri).get("dataset_hash")
        if value:
            return str(value)
    logging.getLogger("medisyn.data").warning(
        "%s has no manifest dataset_hash; hashing the train shards instead", dataset_uri)
    h = hashlib.sha256()
    for uri in train_shards(dataset_uri):
        storage.hash_into(h, uri)
    return h.hexdigest()


def read_manifest(dataset_uri: str) -> dict[str, Any]:
    from medisyn import storage

    storage.require_complete(dataset_uri)
    manifest: dict[str, Any] = storage.read_json(storage.join(dataset_uri, "manifest.json"))
    return manifest


def _iter_batches(
    dataset_uri: str, split: str, columns: Sequence[str] | None, batch_size: int
) -> Iterator[pa.RecordBatch]:
    """Record batches of at most ``batch_size`` rows of a split: shard order, then row order. Only
    ``columns`` are read (None = all); each shard is closed once read."""
    import pyarrow.parquet as pq

    from medisyn import storage

    cols = None if columns is None else list(columns)
    for uri in split_files(dataset_uri, split):
        fs, path = storage.pyarrow_filesystem(uri)
        with fs.open_input_file(path) as fh:
            yield from pq.ParquetFile(fh).iter_batches(batch_size=batch_size, columns=cols)


def iter_split(
    dataset_uri: str, split: str, columns: list[str] | None = None, batch_size: int = 256
) -> Iterator[pd.DataFrame]:
    """Stream a split as DataFrames of at most ``batch_size`` rows (shard order, then row order)."""
    for rb in _iter_batches(dataset_uri, split, columns, batch_size):
        yield rb.to_pandas()


def iter_rows(
    dataset_uri: str,
    split: str,
    columns: Sequence[str],
    batch_size: int = 256,
    where: Mapping[str, str] | None = None,
) -> Iterator[tuple[np.ndarray, dict[str, list[Any]]]]:
    """Yield ``(row_ids, {column: values})`` batches of a split, filtered on equality ``where``.

    ``row_ids`` number the rows of the split in shard order, before filtering, so a second pass can
    fetch exactly the rows a first pass chose without holding the split in memory. Only the
    requested columns (and the ``where`` columns) are read; the ``image`` column is the heavy one.
    A batch the filter empties is skipped.
    """
    import pyarrow.compute as pc

    where = dict(where or {})
    cols = list(dict.fromkeys([*columns, *where]))
    offset = 0
    for batch in _iter_batches(dataset_uri, split, cols, batch_size):
        n = batch.num_rows
        ids = np.arange(offset, offset + n)
        offset += n
        if where:
            mask: Any = None
            for key, value in where.items():
                m = pc.equal(batch.column(key), value)
                mask = m if mask is None else pc.and_(mask, m)
            keep = np.asarray(mask.to_numpy(zero_copy_only=False), dtype=bool)
            if not keep.any():
                continue
            batch = batch.filter(mask)
            ids = ids[keep]
        yield ids, {c: batch.column(c).to_pylist() for c in columns}


def read_split(dataset_uri: str, split: str, columns: list[str] | None = None) -> pd.DataFrame:
    """A whole split as one DataFrame (``image`` holds PNG bytes; see ``decode_png``)."""
    frames = list(iter_split(dataset_uri, split, columns=columns, batch_size=65536))
    if not frames:
        names = columns or SHARD_SCHEMA.names
        return SHARD_SCHEMA.empty_table().select(names).to_pandas()
    return pd.concat(frames, ignore_index=True)
