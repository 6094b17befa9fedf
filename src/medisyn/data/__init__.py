"""Reading the dataset prefix written by ``medisyn.data.preprocess`` (docs/stages.md).

Later stages never open Parquet themselves: ``read_split`` for small splits, ``iter_split`` to stream
large ones batch by batch, ``decode_png`` for the ``image`` column (PNG bytes, mode L or RGB).
Both readers refuse a prefix without ``_COMPLETE``.
"""

from __future__ import annotations

from typing import Iterator

import pandas as pd

from medisyn.data.images import decode_png

SPLITS = ("train", "val", "test")

__all__ = ["SPLITS", "dataset_hash", "decode_png", "iter_split", "read_manifest", "read_split", "split_files",
           "train_shards"]


def _check_split(split: str) -> None:
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")


def split_files(dataset_uri: str, split: str) -> list[str]:
    """URIs of a split's Parquet shards, in order."""
    from medisyn import storage

    _check_split(split)
    storage.require_complete(dataset_uri)
    return [u for u in storage.listdir(storage.join(dataset_uri, split)) if u.endswith(".parquet")]


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


def read_manifest(dataset_uri: str) -> dict:
    from medisyn import storage

    storage.require_complete(dataset_uri)
    return storage.read_json(storage.join(dataset_uri, "manifest.json"))


def iter_split(
    dataset_uri: str, split: str, columns: list[str] | None = None, batch_size: int = 256
) -> Iterator[pd.DataFrame]:
    """Stream a split as DataFrames of at most ``batch_size`` rows (shard order, then row order)."""
    import pyarrow.parquet as pq

    from medisyn import storage

    for uri in split_files(dataset_uri, split):
        fs, path = storage.pyarrow_filesystem(uri)
        pf = pq.ParquetFile(fs.open_input_file(path))
        for rb in pf.iter_batches(batch_size=batch_size, columns=columns):
            yield rb.to_pandas()


def read_split(dataset_uri: str, split: str, columns: list[str] | None = None) -> pd.DataFrame:
    """A whole split as one DataFrame (``image`` holds PNG bytes; see ``decode_png``)."""
    frames = list(iter_split(dataset_uri, split, columns=columns, batch_size=65536))
    if not frames:
        from medisyn.data.preprocess import SHARD_SCHEMA

        names = columns or SHARD_SCHEMA.names
        return SHARD_SCHEMA.empty_table().select(names).to_pandas()
    return pd.concat(frames, ignore_index=True)
