"""``manifest.json`` of a dataset version: counts (the paper's Extended Data Tables 1 and 2),
rejections, duplicates, shards and the content hash that names the version. Deterministic: no
timestamps, so the same input gives the same bytes."""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from typing import Any

import pandas as pd

from medisyn.catalog import Catalog
from medisyn.config import RunConfig
from medisyn.data.schema import MANIFEST_VERSION, SPLIT_RANK, SPLITS


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


def jsonl_bytes(rows: list[dict]) -> bytes:
    """Rows as JSON Lines with sorted keys (``rejected.jsonl``, ``duplicates.jsonl``)."""
    return "".join(json.dumps(r, sort_keys=True) + "\n" for r in rows).encode()

