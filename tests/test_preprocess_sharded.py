"""Sharded preprocessing (issue #14): Ray workers write the image rows and the final shards; the
driver sees only metadata. The output must equal what the driver-side writer produced before the
change, byte for byte in row content, with the same dataset hash (golden figures recorded from the
pre-change code on the landing zone built here), and no image bytes may reach the driver."""

from __future__ import annotations

import hashlib
import io
import json
import shutil
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from helpers import demo_config
from medisyn.demo.phantoms import write_landing_zone

SPLITS = ("train", "val", "test")


# ---------------------------------------------------------------------------------------------- the fixed input
def build_landing_zone(root: Path) -> str:
    """The demo landing zone (seed 0, 10 images per class per source: 4-5 patients per class, so every
    split has rows) plus what exercises dedup and quarantine: an exact copy and a near copy of a
    dermoscopy image filed under new patients, a file that is not an image, and a labels-table row
    with an unknown label. Deterministic."""
    zone = root / "lz"
    write_landing_zone(str(zone), n_per_class=10, seed=0)
    derm = zone / "dermoscopy"
    src = derm / "images" / "phantom-dermoscopy-0000" / "img-0.png"
    rows = []
    exact = derm / "images" / "copy-patient-a" / "img-0.png"
    exact.parent.mkdir(parents=True)
    shutil.copyfile(src, exact)
    rows.append("images/copy-patient-a/img-0.png,MEL,COPY-PATIENT-A")
    arr = np.array(Image.open(src))
    arr[0, 0] = (arr[0, 0].astype(np.int16) + 3).clip(0, 255).astype(np.uint8)  # one pixel off: a near copy
    near = derm / "images" / "copy-patient-b" / "img-0.png"
    near.parent.mkdir(parents=True)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    near.write_bytes(buf.getvalue())
    rows.append("images/copy-patient-b/img-0.png,NV,COPY-PATIENT-B")
    junk = derm / "images" / "junk-patient" / "img-0.png"
    junk.parent.mkdir(parents=True)
    junk.write_bytes(b"this is not an image" * 10)
    rows.append("images/junk-patient/img-0.png,NV,JUNK-PATIENT")
    rows.append("images/phantom-dermoscopy-0000/img-1.png,NOT_A_LABEL,PHANTOM-DERMOSCOPY-0000")
    with open(derm / "labels.csv", "a") as f:
        f.write("".join(r + "\n" for r in rows))
    return str(zone)


def content_digest(dataset: Path) -> dict:
    """Per split: row count, rows per shard, and sha256 over every column of every row in shard
    order (image bytes included); plus the dataset hash and the side files' sha256."""
    manifest = json.loads((dataset / "manifest.json").read_text())
    out: dict = {"dataset_hash": manifest["dataset_hash"], "splits": {}, "files": {}}
    for split in SPLITS:
        h = hashlib.sha256()
        rows_per_shard = []
        for entry in manifest["shards"][split]:
            t = pq.read_table(dataset / entry["file"])
            rows_per_shard.append(t.num_rows)
            names = t.schema.names
            h.update(("\t".join(names) + "\n").encode())
            for row in t.to_pylist():
                for name in names:
                    v = row[name]
                    h.update(name.encode() + b"=" + (v if isinstance(v, bytes) else repr(v).encode()) + b"\x1f")
                h.update(b"\n")
        out["splits"][split] = {"rows_per_shard": rows_per_shard, "sha256": h.hexdigest()}
    for name in ("rejected.jsonl", "duplicates.jsonl"):
        out["files"][name] = hashlib.sha256((dataset / name).read_bytes()).hexdigest()
    out["shard_files"] = {s: [e["sha256"] for e in manifest["shards"][s]] for s in SPLITS}
    out["counts"] = manifest["counts"]["by_split"]
    out["n_rejected"] = manifest["rejected"]["total"]
    out["n_duplicates"] = manifest["duplicates"]["total"]
    return out


def config(root: Path, rows_per_shard: int = 4):
    # 4 rows a shard: several shards per split and several staging buckets (the order across buckets matters)
    return demo_config(root, [f"data.rows_per_shard={rows_per_shard}", "data.ray_batch_size=3"])


# Recorded with the driver-side writer (the code before issue #14: the driver received every image,
# staged it in buckets and wrote the shards itself) on build_landing_zone(), config(rows_per_shard),
# $MEDISYN_ID_SALT unset (tests/tiny.yaml's demo salt). A batch size of 16 instead of 3 gave the
# same figures. Row content hashes: content_digest(). Re-recorded on 2026-12-08 when the demo's OCT
# phantom changed (issue #29: large filled drusen): from serial_reference(), which on the old phantoms
# reproduced every figure recorded from the driver-side writer; val and the side files are unchanged
# (their rows hold no OCT image).
GOLDEN_DATASET_HASH = "80820a2346eb36e47e72121a52b1cd52a33775a1776432a21e0c881f52f9463c"
GOLDEN_SIDE_FILES = {"rejected.jsonl": "828be07755fb56cc7f18c9f523faee98eb340d9fe1793d004181e8a36cee5846",
                     "duplicates.jsonl": "0e2e67119e96f2c23eb446d4b9f51445c55ccfccedc57eab7a8f3d04b02cdc78"}
GOLDEN_SPLITS = {
    4: {"train": {"rows_per_shard": [4] * 16 + [2],
                  "sha256": "c118cfcc68ab0239d449ef3618ee4b76cab99d34399ff16fe1a5056fe9ec0978"},
        "val": {"rows_per_shard": [4, 2], "sha256": "00aba80a0c9b01687ce8b3bf8491f9b376c488a9e0ef123bff975f8680b0d765"},
        "test": {"rows_per_shard": [4, 4, 4],
                 "sha256": "c7d15150e746fb57c8d100e758eddd297827ce021fb8470aa4e3ef1d1e9a20db"}},
    2048: {"train": {"rows_per_shard": [66],
                     "sha256": "0c7a7261e2acd25fc67304930fcd39e097d451cebdfe415f22e087d791d10053"},
           "val": {"rows_per_shard": [6],
                   "sha256": "6ede7e9a9b6da3b8b1929a22bdbc69c684b0a4c1399ee3ed774edfd91068096d"},
           "test": {"rows_per_shard": [12],
                    "sha256": "8d0d07abc8f6a4a79d1bde7ffb66e2f24e1606d8391fb6aa1ea8e3032b7ea86f"}},
}


# ---------------------------------------------------------------------------------------------- a serial reference
def serial_reference(cfg, zone: str, out: Path) -> None:
    """The stage as documented, in one process without Ray and without the stage's driver code: list,
    process every file (``process_task``), patient splits (``assign_splits``), dedup
    (``find_duplicates``), then every split's rows in (bucket, image hash) order, ``rows_per_shard`` a
    shard, bucket = first 32 bits of the image hash modulo ceil(listed files / rows_per_shard): the
    order the driver-side writer produced. Writes the shards, manifest, rejected and duplicates."""
    import math

    import pandas as pd
    import pyarrow as pa

    from medisyn.data import preprocess as pp

    catalog, origin = pp.resolve_catalog(cfg, zone)
    settings = pp.worker_settings(cfg)
    tasks, rejected = pp.list_inputs(catalog, "file://" + zone, settings["salt"])
    n_files = len(tasks) + len(rejected)  # listed files, the rejected ones included
    rows = []
    for task in tasks:
        for r in pp.process_task(task, settings):
            if r["status"] == "ok":
                rows.append(r)
            else:
                rejected.append(pp._reject_row(r["path"], r["source"], r["fail_stage"], r["reason"], r["detail"]))
    rejected.sort(key=lambda r: (r["path"], r["stage"]))
    meta = pd.DataFrame([{k: v for k, v in r.items() if k != "image"} for r in rows])
    split_of = pp.assign_splits(meta, cfg.data.split_fractions)
    meta["split"] = meta["patient_hash"].map(split_of)
    dups = pp.find_duplicates(meta, cfg.data.dedup_hamming)
    removed = {d["removed"] for d in dups}
    meta = meta[~meta["image_hash"].isin(removed)].reset_index(drop=True)
    image_of = {r["image_hash"]: r["image"] for r in rows}
    n_buckets = max(1, math.ceil(len(tasks) / cfg.data.rows_per_shard))
    shards = {}
    for split in SPLITS:
        part = meta[meta["split"] == split].to_dict("records")
        part.sort(key=lambda r: (int(r["image_hash"][:8], 16) % n_buckets, r["image_hash"]))
        chunks = [part[i : i + cfg.data.rows_per_shard] for i in range(0, len(part), cfg.data.rows_per_shard)] or [[]]
        shards[split] = []
        (out / split).mkdir(parents=True)
        for k, chunk in enumerate(chunks):
            table = pa.Table.from_pylist([{**r, "image": image_of[r["image_hash"]]} for r in chunk],
                                         schema=pp.SHARD_SCHEMA)
            path = out / split / f"part-{k:05d}.parquet"
            pq.write_table(table, path, **pp.SHARD_PARQUET_OPTIONS)
            shards[split].append({"file": f"{split}/{path.name}", "rows": len(chunk),
                                  "sha256": hashlib.sha256(path.read_bytes()).hexdigest()})
    dataset_hash = pp.dataset_content_hash(meta)
    manifest = pp.build_manifest(meta, rejected, dups, shards, n_files, catalog, origin,
                                 cfg, dataset_hash)
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    (out / "rejected.jsonl").write_bytes(pp._jsonl(rejected))
    (out / "duplicates.jsonl").write_bytes(pp._jsonl(sorted(dups, key=lambda d: (d["removed"], d["kept"]))))


@pytest.fixture(scope="module")
def zone(tmp_path_factory) -> tuple[Path, str]:
    root = tmp_path_factory.mktemp("sharded")
    return root, build_landing_zone(root)


@pytest.fixture(autouse=True)
def _demo_salt(monkeypatch):
    monkeypatch.delenv("MEDISYN_ID_SALT", raising=False)  # the golden figures use tiny.yaml's demo salt


# ---------------------------------------------------------------------------------------------- (a) same output
@pytest.mark.parametrize("rows_per_shard", [4, 2048])
def test_sharded_output_equals_the_driver_written_output(zone, ray_local, rows_per_shard):
    """Row for row, column for column (image bytes included), split by split in order, the same
    dataset hash, the same rejected and duplicates files: the golden figures of the pre-change code,
    and a serial reference built here from the documented functions, file for file."""
    from medisyn.data.preprocess import preprocess

    root, lz = zone
    cfg = config(root / f"cfg-{rows_per_shard}", rows_per_shard)
    out = root / f"dataset-{rows_per_shard}"
    result = preprocess(cfg, lz, str(out))
    got = content_digest(out)
    assert result.dataset_hash == got["dataset_hash"] == GOLDEN_DATASET_HASH
    assert got["splits"] == GOLDEN_SPLITS[rows_per_shard]
    assert got["files"] == GOLDEN_SIDE_FILES
    assert got["counts"] == {"train": 66, "val": 6, "test": 12}
    assert (got["n_rejected"], got["n_duplicates"]) == (2, 2)  # the junk file and unknown label; exact + near copy

    ref = root / f"reference-{rows_per_shard}"
    serial_reference(cfg, lz, ref)
    want = content_digest(ref)
    assert got == want  # shard files byte-identical too (their sha256 in the manifest)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest == json.loads((ref / "manifest.json").read_text())
    assert sorted(p.name for p in root.iterdir() if p.name.startswith(".")) == []  # no staging left


# ---------------------------------------------------------------------------------------------- (b) no image bytes
def test_the_driver_never_receives_image_bytes(zone, ray_local, monkeypatch, tmp_path):
    """Everything that reaches the driver from the workers (the map's result batches, the shard
    tasks' results) is metadata: no image column, a few hundred bytes a row, however large the
    images; and the driver process writes no image itself (workers are other processes, so a patch
    here sees only the driver's writes)."""
    import pyarrow as pa

    from medisyn.data import preprocess as pp

    root, lz = zone
    received: list[pa.Table] = []
    results: list[dict] = []
    real_run, real_assemble, real_write = pp._run_ray, pp._run_assemble, pq.write_table

    def run_ray(*a, **k):
        for batch in real_run(*a, **k):
            received.append(batch)
            yield batch

    def run_assemble(*a, **k):
        for r in real_assemble(*a, **k):
            results.append(r)
            yield r

    def write_table(table, where, **k):
        assert "image" not in table.schema.names or table.num_rows == 0, f"the driver wrote images to {where}"
        return real_write(table, where, **k)

    monkeypatch.setattr(pp, "_run_ray", run_ray)
    monkeypatch.setattr(pp, "_run_assemble", run_assemble)
    monkeypatch.setattr(pq, "write_table", write_table)
    out = tmp_path / "dataset"
    result = pp.preprocess(config(tmp_path, 4), lz, str(out))
    monkeypatch.undo()
    assert result.dataset_hash == GOLDEN_DATASET_HASH
    assert received and all("image" not in b.schema.names for b in received)
    assert all(set(b.schema.names) == set(pp.META_SCHEMA.names) for b in received)
    assert sum(r["rows"] for r in results) == result.n_images
    assert all(set(r) == {"file", "rows", "sha256"} for r in results)
    image_bytes = sum(pq.read_table(f, columns=["image"])["image"].nbytes for f in out.rglob("part-*.parquet"))
    metadata_bytes = sum(b.nbytes for b in received)
    n_rows = sum(b.num_rows for b in received)
    assert metadata_bytes / n_rows < 1024  # bytes a row: identifiers and hashes, not pixels
    assert image_bytes > 0


# ---------------------------------------------------------------------------------------------- the shard task
def test_a_shard_task_reads_only_the_rows_it_names_and_checks_them(tmp_path):
    """Rows staged by a worker come back in the order the plan asks, from their row groups; a plan
    that points at the wrong row fails loudly instead of writing a wrong image."""
    import pyarrow as pa

    from medisyn.data import preprocess as pp

    lz = build_landing_zone(tmp_path)
    cfg = config(tmp_path)
    settings = pp.worker_settings(cfg)
    tasks, _ = pp.list_inputs(pp.resolve_catalog(cfg, lz)[0], "file://" + lz, settings["salt"])
    tasks = [t for t in tasks if t["source"] == "oct"][:5]
    rows_uri = "file://" + str(tmp_path / "rows")
    meta = pp.process_batch(pa.Table.from_pylist(tasks), {**settings, "rows_uri": rows_uri})
    assert "image" not in meta.schema.names and meta.num_rows == 5
    assert len(list((tmp_path / "rows").glob("batch-*.parquet"))) == 1
    plain = pp.process_batch(pa.Table.from_pylist(tasks), settings)  # without staging: the rows themselves
    images = dict(zip(plain["image_hash"].to_pylist(), plain["image"].to_pylist(), strict=True))

    df = meta.to_pandas().assign(split="train").iloc[[3, 0, 4]]
    shard = tmp_path / "out" / "train" / "part-00000.parquet"
    entry = pp.assemble_shard(pp._shard_rows(df), rows_uri, f"file://{tmp_path / 'out'}", "train/part-00000.parquet")
    t = pq.read_table(shard)
    assert entry["rows"] == 3 and t.schema.equals(pp.SHARD_SCHEMA)
    assert t["image_hash"].to_pylist() == df["image_hash"].tolist()
    assert t["image"].to_pylist() == [images[h] for h in df["image_hash"]]
    assert entry["sha256"] == hashlib.sha256(shard.read_bytes()).hexdigest()

    wrong = df.assign(staged_row=[0, 1, 2])
    with pytest.raises(RuntimeError, match="do not match"):
        pp.assemble_shard(pp._shard_rows(wrong), rows_uri, "file://" + str(tmp_path / "out2"), "train/part-0.parquet")
    assert not (tmp_path / "out2" / "train" / "part-0.parquet").exists()


# ---------------------------------------------------------------------------------------------- object storage
@pytest.mark.s3
def test_sharded_output_on_object_storage_equals_the_golden_figures(zone, s3_endpoint, ray_local, tmp_path):
    """Workers stage rows and write shards under hidden prefixes beside the S3 output; the published
    dataset is the same, and nothing is left beside it."""
    from helpers import S3_BUCKET
    from medisyn import storage
    from medisyn.data.preprocess import preprocess

    root, lz = zone
    out = f"s3://{S3_BUCKET}/sharded/dataset"
    cfg = demo_config(tmp_path, ["data.rows_per_shard=4", "data.ray_batch_size=3",
                                 f"storage.s3_endpoint_url={s3_endpoint}"])
    result = preprocess(cfg, lz, out)
    assert result.dataset_hash == GOLDEN_DATASET_HASH and storage.is_complete(out)
    local = storage.download_dir(out, tmp_path / "copy")
    got = content_digest(local)
    assert got["splits"] == GOLDEN_SPLITS[4] and got["files"] == GOLDEN_SIDE_FILES
    fs, _ = storage.filesystem(out)
    fs.invalidate_cache()
    assert [p.rsplit("/", 1)[-1] for p in fs.ls(f"{S3_BUCKET}/sharded")] == ["dataset"]  # no staging prefix left
