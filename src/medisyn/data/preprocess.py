"""The preprocess stage: landing zone -> normalized 512x512 image-text shards with patient-level splits.

``preprocess(cfg, raw_uri, out_uri)`` (contract in docs/stages.md; decisions in docs/preprocessing.md):

1. catalog: ``cfg.data.catalog`` (``builtin`` = the landing zone's ``catalog.yaml`` when present,
   else the paper's sources); every source's labels table is read on the driver;
2. Ray Data maps the file list in parallel: read bytes from file:// or s3://, reject decompression
   bombs on declared size, decode (DICOM in every common transfer syntax, PNG, JPEG, TIFF), quarantine
   burned-in annotations, apply the modality rule (section 4.1), resize + center crop (or tile whole
   slides), encode PNG, hash pixels. Patient ids are salted-hashed inside the worker that read them
   and assign the split (80/10/10, section 4.1), so no raw identifier reaches the driver. Each
   worker stages its rows (images included) in a file of its own and returns only metadata (ids,
   hashes, patient keys, where the row is staged): image bytes never pass through the driver;
3. the driver collects the metadata, logging rows/s and ETA, assigns patient splits and removes
   exact and near duplicates (keep one, report the rest), all on metadata;
4. a second Ray pass writes the shards: one task per shard reads its rows from the staged files
   and writes the shard into the dataset's staging directory or prefix (same rows, order and bytes
   as when the driver wrote them); the driver writes ``manifest.json``, ``rejected.jsonl``,
   ``duplicates.jsonl`` and publishes the version atomically with ``_COMPLETE`` last (Ray's
   ``write_parquet`` appends to an existing prefix, so it is never pointed at the output);
5. staged rows are removed (docs/preprocessing.md, How the driver scales);
6. the manifest is logged to MLflow as the run's dataset input.

This module holds the stage function, the per-file work the Ray map runs (:func:`process_task`,
:func:`process_batch`) and the Ray plan. Its parts, one purpose each: :mod:`~medisyn.data.zone`
(catalog and landing-zone walk), :mod:`~medisyn.data.decode` (decoding dispatch),
:mod:`~medisyn.data.splits` (identifiers, splits, dedup), :mod:`~medisyn.data.shards` (staging
and shard writing), :mod:`~medisyn.data.manifest` and :mod:`~medisyn.data.schema` (the layout).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import os
import shutil
import time
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd
import pyarrow as pa
import pyarrow.compute  # noqa: F401 - pa.compute

from medisyn import storage
from medisyn.config import RunConfig
from medisyn.data.decode import decode_samples, final_images
from medisyn.data.images import encode_png, perceptual_hash, pixel_hash
from medisyn.data.manifest import build_manifest, dataset_content_hash, jsonl_bytes
from medisyn.data.quarantine import PreprocessError, Quarantine, reject_row
from medisyn.data.schema import DATASET_CATALOG, RESULT_SCHEMA, SPLITS, STAGING_SCHEMA
from medisyn.data.schema import META_SCHEMA as META_SCHEMA
from medisyn.data.schema import SHARD_PARQUET_OPTIONS as SHARD_PARQUET_OPTIONS
from medisyn.data.schema import SHARD_SCHEMA as SHARD_SCHEMA
from medisyn.data.shards import assemble_shard, plan_shards, shard_rows, stage_rows
from medisyn.data.splits import assign_splits, find_duplicates, id_salt, salted_hash
from medisyn.data.zone import catalog_text, list_inputs, read_inside_zone, resolve_catalog, zone_parts
from medisyn.progress import Progress
from medisyn.results import StageResult

# The golden preprocessing tests (tests/test_preprocess*.py), left unchanged by issue #22 as the proof
# that splitting this module changed no behaviour, still reach through this module the three schema
# constants re-exported above (``X as X``) and these old private names.
_reject_row, _shard_rows, _jsonl = reject_row, shard_rows, jsonl_bytes

log = logging.getLogger("medisyn.preprocess")


@dataclass(frozen=True)
class PreprocessResult(StageResult):
    dataset_uri: str
    dataset_hash: str
    counts: dict[str, int]  # rows per split
    n_images: int
    n_rejected: int
    n_duplicates: int
    manifest: dict[str, Any]


# ----------------------------------------------------------------------------------------------
# Per-file work (Ray workers; also callable in a plain loop)
# ----------------------------------------------------------------------------------------------
def worker_settings(cfg: RunConfig) -> dict[str, Any]:
    d = cfg.data
    return {
        "resolution": d.resolution,
        "max_pixels": d.max_pixels,
        "max_decoded_mb": d.max_decoded_mb,  # None: derived in each worker (decode.max_decoded_bytes)
        "multiframe_policy": d.multiframe_policy,
        "quarantine_burned_in": d.quarantine_burned_in,
        "tile_max_overlap": d.tile_max_overlap,
        "split_fractions": list(d.split_fractions),
        "png_compress_level": d.png_compress_level,
        "worker_heap_mb": d.worker_heap_mb,
        "worker_max_tries": d.worker_max_tries,
        "salt": id_salt(cfg),
        # config values are the paper's defaults; a catalog source's rule_params override them
        "rule_defaults": {"level": d.hu_window_level, "width": d.hu_window_width,
                          "low": d.percentile_low, "high": d.percentile_high},
    }



def process_task(task: dict[str, Any], settings: dict[str, Any]) -> list[dict[str, Any]]:
    """One listed file -> result rows (one per image/frame/tile, or one rejection)."""

    def rejected(stage: str, reason: str, detail: str = "") -> list[dict[str, Any]]:
        return [{"status": "rejected", "path": task["path"], "source": task["source"], "fail_stage": stage,
                 "reason": reason, "detail": detail[:300], "file_done": 1}]

    try:
        if task.get("zone"):  # local landing zone: opened below its root, never through a link
            data = read_inside_zone(task["zone"], zone_parts(task["path"], "read"))
        else:
            zone_parts(task["path"], "read")
            data = storage.read_bytes(task["uri"])
    except Quarantine as q:
        return rejected(q.stage, q.reason, q.detail)
    except Exception as exc:  # noqa: BLE001
        return rejected("read", "read_error", f"{type(exc).__name__}: {exc}")
    if not data:
        return rejected("read", "empty_file", "0 bytes")
    try:
        samples, pid = decode_samples(data, task["rel"], task, settings)
        images = final_images(samples, int(task.get("tile_size") or 0), settings)
    except Quarantine as q:
        return rejected(q.stage, q.reason, q.detail)
    except Exception as exc:  # noqa: BLE001 - the run goes on; the reason is reported
        return rejected("normalize", "normalize_error", f"{type(exc).__name__}: {exc}")
    salt = settings["salt"]
    patient_hash = task.get("patient_hash") or ""
    if not patient_hash:
        # no patient id in the table: the DICOM tag (hashed here, in the worker), else the image id
        key = pid if pid else "image:" + task["rel"]
        patient_hash = salted_hash(salt, "patient", task["source"], key)
    rows = []
    for i, (suffix, arr) in enumerate(images):
        rows.append(
            {
                "status": "ok",
                "image": encode_png(arr, settings["png_compress_level"]),
                "caption": task["caption"],
                "specialty": task["specialty"],
                "image_type": task["image_type"],
                "label": task["label"],
                "source": task["source"],
                "split": "",  # assigned on the driver once every patient is known (assign_splits)
                "patient_hash": patient_hash,
                "image_hash": salted_hash(salt, "image", task["source"], task["rel"], suffix),
                "pixel_hash": pixel_hash(arr),
                "phash": format(perceptual_hash(arr), "016x"),
                "width": int(arr.shape[1]),
                "height": int(arr.shape[0]),
                "file_done": 1 if i == 0 else 0,
            }
        )
    return rows


_HEAP_TUNED: set[int] = set()


def retain_freed_memory(heap_mb: int) -> bool:
    """Serve buffers below ``heap_mb`` MiB from the heap and keep freed memory (glibc; once per process).

    Decoding a 2500x2048 radiograph allocates several 5-20 MiB buffers (file bytes, pixel data,
    decoded frame, the 8-bit frame). Above glibc's mmap threshold each one is fresh pages from the
    kernel that fault on first touch; whether the dynamic threshold rises to avoid that depends on
    the order of allocations, and in Ray workers it did not: 34 ms an image instead of 27 ms
    (docs/preprocessing.md, Benchmark). A worker then holds on to its peak heap, which is what a
    process that decodes frames of the same size in a loop wants. No-op off glibc or for 0.
    """
    if heap_mb <= 0 or os.getpid() in _HEAP_TUNED:
        return False
    _HEAP_TUNED.add(os.getpid())
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
        m_trim_threshold, m_mmap_threshold = -1, -3  # malloc.h
        return (bool(libc.mallopt(m_mmap_threshold, heap_mb << 20))
                and bool(libc.mallopt(m_trim_threshold, 2 * heap_mb << 20)))
    except (OSError, AttributeError):  # not glibc (musl, macOS): leave malloc alone
        return False


def _attempt_marker(settings: dict[str, Any], task: dict[str, Any]) -> Path | None:
    """The file counting the tries of ``task`` whose worker never came back (``settings["attempts_dir"]``)."""
    root = settings.get("attempts_dir")
    if not root:
        return None
    return Path(root) / hashlib.sha256(task["path"].encode()).hexdigest()[:32]


def process_batch(batch: pa.Table, settings: dict[str, Any]) -> pa.Table:
    """Ray Data ``map_batches`` function: a batch of listed files -> result rows (``RESULT_SCHEMA``);
    with ``settings["rows_uri"]`` (the stage), the ok rows are staged there by this worker and only
    their metadata is returned (``META_SCHEMA``, see :func:`stage_rows`).

    A file whose worker is killed by the OS or Ray (out of memory, say) would be retried forever
    (issue #12). So each file leaves a marker holding its number of tries while it is processed,
    removed when it is done: a marker still there when the batch is retried means the worker died
    on that file, and past ``data.worker_max_tries`` the file is quarantined (``worker_killed``)
    without being opened again, and the run goes on."""
    retain_freed_memory(settings.get("worker_heap_mb", 0))
    max_tries = int(settings.get("worker_max_tries", 2))
    rows: list[dict[str, Any]] = []
    for task in batch.to_pylist():
        marker = _attempt_marker(settings, task)
        if marker is not None:
            tries = int(marker.read_text() or 0) if marker.exists() else 0
            if tries >= max_tries:
                rows.append({"status": "rejected", "path": task["path"], "source": task["source"],
                             "fail_stage": "decode", "reason": "worker_killed", "file_done": 1,
                             "detail": f"the worker processing this file was killed {tries} times (out of memory?);"
                                       f" quarantined after data.worker_max_tries={max_tries}"})
                continue
            marker.parent.mkdir(parents=True, exist_ok=True)
            marker.write_text(str(tries + 1))
        rows.extend(process_task(task, settings))
        if marker is not None:
            marker.unlink(missing_ok=True)
    table = pa.Table.from_pylist(rows, schema=RESULT_SCHEMA)
    if not settings.get("rows_uri"):  # a plain loop (tests, benchmark): the rows themselves
        return table
    return stage_rows(table, batch.column("path").to_pylist(), settings["rows_uri"])


# ----------------------------------------------------------------------------------------------
# Ray
# ----------------------------------------------------------------------------------------------
def _start_ray(cfg: RunConfig) -> bool:
    """Connect to the cluster (RAY_ADDRESS, set by KubeRay) or start a local Ray; True if we started it."""
    import ray

    if ray.is_initialized():
        return False
    if os.environ.get("RAY_ADDRESS"):
        ray.init(address=os.environ["RAY_ADDRESS"], log_to_driver=False)
    else:
        ray.init(num_cpus=cfg.data.ray_num_cpus, include_dashboard=False, log_to_driver=False)
    return True


def _run_ray(tasks: list[dict[str, Any]], settings: dict[str, Any], batch_size: int):
    import ray

    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False  # our Progress lines read the same in pods and terminals
    # Resource reservation keeps a share of the CPUs for each operator so that one operator cannot
    # starve the next. This dataset has a single map operator; with reservation on, Ray Data ran
    # one task at a time on a 2-CPU node (logged "backpressured:tasks(ResourceBudget)"), halving
    # throughput. Off, the map operator may use every CPU (docs/preprocessing.md, Benchmark).
    ctx.op_resource_reservation_enabled = False
    n_blocks = max(1, math.ceil(len(tasks) / batch_size))
    items = ray.data.from_items(tasks, override_num_blocks=n_blocks)
    # Ray types the function as taking the batch alone; it cannot express the fn_kwargs passed below.
    remote_args = _worker_env()
    # A worker killed by the OS or Ray is retried a bounded number of times (never forever, issue #12):
    # one more than data.worker_max_tries, so that the last try quarantines the file (process_batch).
    remote_args["max_retries"] = int(settings.get("worker_max_tries", 2)) + 1
    ds = items.map_batches(process_batch, batch_size=batch_size, batch_format="pyarrow",  # type: ignore[arg-type]
                           fn_kwargs={"settings": settings}, **remote_args)
    yield from ds.iter_batches(batch_size=None, batch_format="pyarrow")


def _worker_env() -> dict[str, Any]:
    """Ray remote arguments that give workers the object store the driver was configured for
    (storage.configure exports the endpoint and retry policy): a Ray cluster started before that, or
    elsewhere, would not have them in its environment."""
    env = {k: os.environ[k] for k in (storage.ENDPOINT_ENV, storage.RETRY_ENV) if os.environ.get(k)}
    return {"runtime_env": {"env_vars": env}} if env else {}


def _run_assemble(jobs: list[tuple[pa.Table, str]], rows_uri: str, out_uri: str, max_retries: int):
    """The second distributed pass: one Ray task per shard (``assemble_shard``), at most two per CPU
    in flight; yields each shard's manifest entry as it completes (small dicts: no image reaches the
    driver). A task that fails for good fails the stage; a worker that dies is retried."""
    import ray

    task = ray.remote(num_cpus=1, max_retries=max_retries, **_worker_env())(assemble_shard)
    window = max(2, 2 * int(ray.cluster_resources().get("CPU", 1)))
    pending: list[Any] = []
    todo = iter(jobs)
    try:
        while True:
            for rows, file in todo:
                pending.append(task.remote(rows, rows_uri, out_uri, file))
                if len(pending) >= window:
                    break
            if not pending:
                return
            done, pending = ray.wait(pending, num_returns=1)
            yield ray.get(done[0])
    finally:
        for ref in pending:  # a failure: stop the rest before the staging is removed
            ray.cancel(ref, force=True)


def _rows_staging_uri(out_uri: str, scratch: Path) -> str:
    """Where workers stage their rows: the scratch directory for a local output, a hidden prefix
    beside an object-storage output (``.<name>.staging-<owner>``, removed by the next run's
    :func:`medisyn.storage.recover` if this one is killed)."""
    if not storage.is_remote(out_uri):
        return "file://" + str(scratch / "rows")
    parent, name = out_uri.rstrip("/").rsplit("/", 1)
    return f"{parent}/.{name}.staging-{storage.owner_token()}"


def _write_shards(plan: dict[str, list[pd.DataFrame]], rows_uri: str, out_uri: str,
                  max_retries: int) -> dict[str, list[dict[str, Any]]]:
    """Every split's shards, written by Ray tasks from the staged rows (an empty split's single empty
    shard by the driver: no image involved); the manifest's ``shards`` entry. Logs rows/s and ETA."""
    jobs: list[tuple[pa.Table, str]] = []
    entries: dict[str, dict[str, Any]] = {}
    for split in SPLITS:
        for k, part in enumerate(plan[split]):
            file = f"{split}/part-{k:05d}.parquet"
            if len(part):
                jobs.append((shard_rows(part), file))
            else:
                entries[file] = assemble_shard(shard_rows(part), rows_uri, out_uri, file)
    progress = Progress(sum(j[0].num_rows for j in jobs), "preprocess shards", unit="rows")
    for entry in (_run_assemble(jobs, rows_uri, out_uri, max_retries) if jobs else []):
        entries[entry["file"]] = entry
        progress.update(entry["rows"])
    progress.close()
    return {split: [entries[f"{split}/part-{k:05d}.parquet"] for k in range(len(plan[split]))] for split in SPLITS}


# ----------------------------------------------------------------------------------------------
# The stage
# ----------------------------------------------------------------------------------------------
def preprocess(cfg: RunConfig, raw_uri: str, out_uri: str) -> PreprocessResult:
    """Landing zone at ``raw_uri`` -> dataset prefix at ``out_uri`` (docs/stages.md), atomically."""
    raw_uri, out_uri = storage.normalize(raw_uri), storage.normalize(out_uri)
    t0 = time.monotonic()
    catalog, catalog_origin = resolve_catalog(cfg, raw_uri)
    settings = worker_settings(cfg)
    if not os.environ.get(cfg.data.id_salt_env):
        log.warning("$%s is unset: hashing ids with data.default_id_salt (a demo config: phantom data only)",
                    cfg.data.id_salt_env)
    tasks, rejected = list_inputs(catalog, raw_uri, settings["salt"])
    n_files = len(tasks) + len(rejected)
    if n_files == 0:
        raise PreprocessError(f"no input files under {raw_uri} for catalog {catalog_origin} "
                              f"(sources: {', '.join(catalog.names)})")
    t_listed = t_mapped = time.monotonic()
    log.info("preprocess: %d files from %d sources (catalog %s)", n_files, len(catalog.sources), catalog_origin)

    # Image rows are staged by the workers themselves (process_batch -> stage_rows): below the
    # scratch directory for a local output (one machine), in a hidden prefix beside an object-storage
    # output (reachable from every node). The driver receives only metadata (META_SCHEMA).
    staging = storage.scratch_dir("preprocess")  # named with its owner: a later run removes it if killed
    settings["attempts_dir"] = str(staging / "attempts")  # tries of files whose worker died (process_batch)
    rows_uri = _rows_staging_uri(out_uri, staging)
    settings["rows_uri"] = rows_uri
    n_buckets = max(1, math.ceil(len(tasks) / cfg.data.rows_per_shard))
    started = _start_ray(cfg) if tasks else False
    t_written = t_mapped
    try:
        try:
            batches = _run_ray(tasks, settings, cfg.data.ray_batch_size) if tasks else []
            meta = _collect_metadata(batches, len(tasks), rejected)
            t_mapped = time.monotonic()
            rejected.sort(key=lambda r: (r["path"], r["stage"]))
            _check_error_rate(rejected, n_files, cfg.data.max_error_rate)
            meta, dups = _split_and_dedup(meta, cfg)
            dataset_hash = dataset_content_hash(meta)
            plan = plan_shards(meta, n_buckets, cfg.data.rows_per_shard)
            with storage.staged_prefix(out_uri) as (out_staging, out, publish):
                shards = _write_shards(plan, rows_uri, out_staging, max_retries=int(settings["worker_max_tries"]) + 1)
                t_written = time.monotonic()
                manifest = build_manifest(meta, rejected, dups, shards, n_files, catalog, catalog_origin, cfg,
                                          dataset_hash)
                (out / "manifest.json").write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
                # The catalog travels with the dataset: the gates read their prompts and tasks from it.
                (out / DATASET_CATALOG).write_text(catalog_text(catalog_origin, raw_uri))
                (out / "rejected.jsonl").write_bytes(jsonl_bytes(rejected))
                (out / "duplicates.jsonl").write_bytes(
                    jsonl_bytes(sorted(dups, key=lambda d: (d["removed"], d["kept"]))))
                publish({"dataset_hash": dataset_hash})
        finally:
            if started:
                import ray

                ray.shutdown()  # before the staging is removed: no worker writes into it afterwards
    finally:
        shutil.rmtree(staging, ignore_errors=True)
        if storage.is_remote(rows_uri):
            with contextlib.suppress(Exception):  # best effort: recover() removes what is left
                storage.remove(rows_uri)

    counts = dict(manifest["counts"]["by_split"])
    elapsed = time.monotonic() - t0
    log.info("preprocess phases: list %.1fs, decode/normalize/stage (Ray) %.1fs, dedup + shards (Ray) %.1fs, "
             "publish %.1fs", t_listed - t0, t_mapped - t_listed, t_written - t_mapped, time.monotonic() - t_written)
    log.info("preprocess done: %d images %s, %d rejected, %d duplicates removed, %.1fs (%.2f files/s), hash %s",
             len(meta), counts, len(rejected), len(dups), elapsed, n_files / max(elapsed, 1e-9), dataset_hash[:12])
    result = PreprocessResult(out_uri, dataset_hash, counts, int(len(meta)), len(rejected), len(dups), manifest)
    _log_to_mlflow(cfg, result, elapsed)
    return result


# every column but the image: what the driver keeps of each row (small, whatever the images' size)
_META_COLS = [c for c in STAGING_SCHEMA.names if c != "image"] + ["staged_file", "staged_row"]


def _collect_metadata(batches: Iterable[pa.Table], n_tasks: int, rejected: list[dict[str, Any]]) -> pd.DataFrame:
    """The map's result batches -> the ok rows' metadata (``_META_COLS``); rejections are appended to
    ``rejected``. Logs files/s and ETA."""
    meta_parts: list[pa.Table] = []
    progress = Progress(n_tasks, "preprocess", unit="files")
    for batch in batches:
        if "image" in batch.schema.names:  # never: workers stage their rows (settings["rows_uri"])
            raise RuntimeError("a worker returned image bytes to the driver")
        progress.update(int(pa.compute.sum(batch.column("file_done")).as_py() or 0))
        status = batch.column("status")
        bad = batch.filter(pa.compute.equal(status, "rejected"))
        for r in bad.select(["path", "source", "fail_stage", "reason", "detail"]).to_pylist():
            rejected.append(reject_row(r["path"], r["source"], r["fail_stage"], r["reason"], r["detail"] or ""))
        good = batch.filter(pa.compute.equal(status, "ok"))
        if good.num_rows:
            meta_parts.append(good.select(_META_COLS))
    progress.close()
    if not meta_parts:
        return pd.DataFrame({c: pd.Series(dtype=object) for c in _META_COLS})
    return pa.concat_tables(meta_parts).to_pandas()


def _check_error_rate(rejected: list[dict[str, Any]], n_files: int, max_error_rate: float) -> None:
    """Fail the stage, publishing nothing, when more than ``data.max_error_rate`` of the files were rejected."""
    n_rej_files = len({r["path"] for r in rejected})
    error_rate = n_rej_files / n_files
    if error_rate > max_error_rate:
        top = Counter(r["reason"] for r in rejected).most_common(5)
        raise PreprocessError(
            f"{n_rej_files}/{n_files} files rejected ({error_rate:.1%}) > data.max_error_rate="
            f"{max_error_rate:.1%}; top reasons: {top}. Nothing was published."
        )


def _split_and_dedup(meta: pd.DataFrame, cfg: RunConfig) -> tuple[pd.DataFrame, list[dict[str, Any]]]:
    """Patient-level splits, then duplicates removed (a copy in train survives, ``find_duplicates``)."""
    split_of = assign_splits(meta, cfg.data.split_fractions)
    meta["split"] = meta["patient_hash"].map(split_of)
    dups = find_duplicates(meta, cfg.data.dedup_hamming)
    removed = {d["removed"] for d in dups}
    return meta[~meta["image_hash"].isin(removed)].reset_index(drop=True), dups


def _log_to_mlflow(cfg: RunConfig, result: PreprocessResult, elapsed: float) -> None:
    """The manifest becomes the run's dataset input (digest = dataset hash) plus an artifact."""
    from medisyn import tracking

    with tracking.stage_run(cfg, "preprocess", tags={"medisyn.dataset_hash": result.dataset_hash}) as run:
        if run is None:
            return
        import mlflow

        mlflow.log_params({"dataset_uri": result.dataset_uri, "resolution": cfg.data.resolution,
                           "catalog_digest": result.manifest["catalog"]["digest"][:16]})
        mlflow.log_metrics({"n_images": result.n_images, "n_rejected": result.n_rejected,
                            "n_duplicates": result.n_duplicates, "seconds": elapsed,
                            **{f"n_{s}": n for s, n in result.counts.items()}})
        tracking.log_json(result.manifest, "dataset/manifest.json")
        try:
            from mlflow.data.http_dataset_source import HTTPDatasetSource
            from mlflow.data.meta_dataset import MetaDataset

            # mlflow.data.Dataset marks `profile` abstract but is no ABC: MetaDataset is meant to be instantiated
            ds = MetaDataset(source=HTTPDatasetSource(result.dataset_uri), name=f"{cfg.name}-dataset",  # type: ignore[abstract]
                             digest=result.dataset_hash[:36])
            mlflow.log_input(ds, context="preprocess")
        except Exception as exc:  # noqa: BLE001 - the artifact above already carries the manifest
            log.warning("could not log the dataset input to MLflow: %s", exc)
