"""Identifiers, patient-level splits and de-duplication of the preprocess stage (section 4.1).

Runs on metadata only (salted hashes, labels, perceptual hashes): no raw identifier and no image
reaches these functions. docs/preprocessing.md gives the decisions and their trade-offs.
"""

from __future__ import annotations

import hashlib
import os
from collections import Counter, defaultdict
from typing import Any

import pandas as pd

from medisyn.config import RunConfig
from medisyn.data.images import hamming
from medisyn.data.schema import SPLIT_RANK


# ----------------------------------------------------------------------------------------------
# Identifiers
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


# ----------------------------------------------------------------------------------------------
# Splits
# ----------------------------------------------------------------------------------------------
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
