"""The dataset prefix's layout facts (docs/stages.md): split names, side-file names and the Arrow
schemas of the preprocess stage, the published shards' and the ones its workers stage and return.

A bottom module (it imports only pyarrow): the reader (``medisyn.data``) and the writer
(``medisyn.data.preprocess`` and its parts) both take these facts from here.
"""

from __future__ import annotations

from typing import Any

import pyarrow as pa

SPLITS = ("train", "val", "test")
SPLIT_RANK = {s: i for i, s in enumerate(SPLITS)}
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
STAGING_PARQUET_OPTIONS: dict[str, Any] = {"compression": "none", "use_dictionary": False, "write_statistics": False}
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
STAGED_ROW_GROUP = 1
# The columns a shard task receives per row from the driver: everything but the image, and where
# the staged row lives. Small: the driver builds them from the metadata it holds.
SHARD_META_COLS = [n for n in SHARD_SCHEMA.names if n != "image"] + ["staged_file", "staged_row"]
