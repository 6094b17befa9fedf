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

__all__ = ["SPLITS", "decode_png", "iter_split", "read_manifest", "read_split", "split_files"]


def _check_split(split: str) -> None:
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")


def split_files(dataset_uri: str, split: str) -> list[str]:
    """URIs of a split's Parquet shards, in order."""
    from medisyn import storage

    _check_split(split)
    storage.require_complete(dataset_uri)
    return [u for u in storage.listdir(storage.join(dataset_uri, split)) if u.endswith(".parquet")]


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
