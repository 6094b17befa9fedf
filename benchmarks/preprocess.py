"""Preprocess throughput: the Ray Data stage vs a plain serial loop (pydicom + PIL, same rules).

Two corpora of uncompressed DICOM, generated on the fly: 512x512 CT slices (hu_window) and
2500x2048 X-ray-sized 12-bit radiographs (minmax). Four figures per corpus, best of ``--repeats``:

* plain serial loop: the baseline the issue asks for, pydicom + numpy + PIL with the paper's rules
  written out in float64 (:func:`plain_loop`); its pixels are checked equal to the stage's. Run with
  glibc's default malloc and with the stage workers' heap setting; the faster one is the baseline;
* stage code, serial: the stage's own per-file function in one process, what one Ray worker does
  (so ``Ray Data stage / stage code`` is the parallel efficiency, and ``stage code / plain`` is what
  the per-image code gains: the rules as lookup tables);
* Ray Data map alone: the stage's map over the files with the results dropped (what Ray Data's
  overhead leaves of two workers, before anything is written);
* Ray Data stage: ``medisyn.data.preprocess.preprocess`` end to end (listing, decoding in Ray
  workers, de-duplication, Parquet shards, manifest, atomic publish). Ray's start-up is excluded
  and reported apart; a warm-up run loads the imports in every worker first.

Scaling (issue #14, run first, before anything else grows this process): the stage end to end on
1x, 4x and 16x each corpus (``--scales``; the larger corpora are the smaller ones plus more files,
hard links of one generated set), with the driver's peak RSS sampled every 10 ms by a thread of
the driver process (Ray's workers, raylet and GCS are other processes, not counted). Reported per
scale: images/s and its ratio to the plain serial loop (goal on the radiographs: >= 1.8x at every
scale), and the driver's peak RSS and its ratio to the 1x figure (goal: within 10%, i.e. <= 1.10).

    .venv/bin/python benchmarks/preprocess.py [--n-ct 96] [--n-xray 32] [--num-cpus 2] [--scales 1,4,16]
    .venv/bin/python benchmarks/preprocess.py --quick   # a small smoke run (minutes): checks it works

Prints images/s, driver RSS and the ratios, and writes benchmarks/results/preprocess.json.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np

os.environ.setdefault("RAY_AUTH_MODE", "disabled")

REPO = Path(__file__).resolve().parents[1]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n-ct", type=int, default=96, help="number of 512x512 CT slices")
    p.add_argument("--n-xray", type=int, default=32, help="number of 2500x2048 radiographs")
    p.add_argument("--num-cpus", type=int, default=2, help="Ray CPUs (the machine's cores)")
    p.add_argument("--batch-size", type=int, default=None, help="data.ray_batch_size (default: the config's)")
    p.add_argument("--repeats", type=int, default=2,
                   help="best of this many runs, for the serial loop and the stage alike")
    p.add_argument("--workdir", default=None, help="scratch directory (default: a temp dir, removed)")
    p.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "preprocess.json"),
                   help="JSON results path")
    p.add_argument("--scales", default="1,4,16", help="corpus multiples for the scaling run (driver RSS, images/s)")
    p.add_argument("--n-ct-scaling", type=int, default=128,
                   help="CT slices at 1x in the scaling run (16x: 2048 files, 1 GB)")
    p.add_argument("--n-xray-scaling", type=int, default=64,
                   help="radiographs at 1x in the scaling run (16x: 1024 files, 10.5 GB of DICOM)")
    p.add_argument("--skip-throughput", action="store_true",
                   help="only the scaling run and the plain serial loop (no stage-code / map-only breakdown)")
    p.add_argument("--quick", action="store_true",
                   help="smoke run: 8 CT slices and 4 radiographs at 1x, scales 1,2, one repeat")
    args = p.parse_args(argv)
    if args.quick:
        args.n_ct, args.n_xray, args.scales, args.repeats = 8, 4, "1,2", 1
        args.n_ct_scaling, args.n_xray_scaling = 8, 4
        if args.out == p.get_default("out"):
            args.out = str(REPO / "benchmarks" / "results" / "preprocess-quick.json")
    args.scales = sorted({int(x) for x in str(args.scales).split(",") if x.strip()})
    return args


def _dicom(pixels: np.ndarray, modality: str, intercept: float | None) -> bytes:
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.2"
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID = generate_uid()
    ds.Modality = modality
    ds.PatientID = "BENCH-" + generate_uid()[-8:]
    ds.Rows, ds.Columns = pixels.shape
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    if intercept is not None:
        ds.RescaleSlope, ds.RescaleIntercept = 1, intercept
    ds.PixelData = pixels.astype(np.uint16).tobytes()
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def make_corpus(root: Path, kind: str, n: int, seed: int = 0) -> Path:
    """A landing zone with one source of ``n`` DICOM files and its catalog.yaml."""
    import pandas as pd
    import yaml

    rng = np.random.default_rng(seed)
    src = root / kind / "files"
    src.mkdir(parents=True)
    shape, modality, intercept, rule = (
        ((512, 512), "CT", -1024.0, "hu_window") if kind == "ct" else ((2500, 2048), "DX", None, "auto")
    )
    yy, xx = np.mgrid[0 : shape[0], 0 : shape[1]]
    # one noise field, rolled by a random offset per image: every image is different (no duplicates
    # for the stage to remove) and a 16x corpus of radiographs is generated in minutes
    noise = rng.normal(1000, 200, shape)
    rows = []
    for i in range(n):
        cy, cx = rng.uniform(0.3, 0.7) * shape[0], rng.uniform(0.3, 0.7) * shape[1]
        r = rng.uniform(0.1, 0.3) * shape[0]
        pixels = np.roll(noise, (int(rng.integers(shape[0])), int(rng.integers(shape[1]))), axis=(0, 1))
        y0, y1 = max(0, int(cy - r)), min(shape[0], int(cy + r) + 2)  # the blob, within its bounding box
        x0, x1 = max(0, int(cx - r)), min(shape[1], int(cx + r) + 2)
        inside = (yy[y0:y1, x0:x1] - cy) ** 2 + (xx[y0:y1, x0:x1] - cx) ** 2 < r**2
        pixels[y0:y1, x0:x1] += inside * 1500
        np.clip(pixels, 0, 4095, out=pixels)
        (src / f"{i:05d}.dcm").write_bytes(_dicom(pixels, modality, intercept))
        rows.append({"file": f"{i:05d}.dcm", "label": "a" if i % 2 else "b", "patient_id": f"p{i // 2}"})
    pd.DataFrame(rows).to_csv(src / "labels.csv", index=False)
    catalog = {"sources": {kind: {
        "prefix": "files", "patient_id_column": "patient_id", "specialty": "radiology", "image_type": kind,
        "caption_template": "Benchmark image showing {label}.", "label_map": {"a": "class a", "b": "class b"},
        "rule": rule,
    }}}
    (root / kind / "catalog.yaml").write_text(yaml.safe_dump(catalog))
    return root / kind


def _files(landing: Path) -> tuple[dict, list[Path]]:
    import yaml

    cat = yaml.safe_load((landing / "catalog.yaml").read_text())
    (src,) = cat["sources"].values()
    return src, sorted((landing / src["prefix"]).glob("*.dcm"))


def plain_loop(landing: Path, cfg, keep: int = 0) -> tuple[int, float, list[np.ndarray]]:
    """The baseline: a plain serial loop, pydicom + numpy + PIL, the paper's rules written out.

    Per file: read, refuse huge declared sizes, ``pixel_array``, the modality LUT, the rule in float64
    (CT: HU window level 100 / width 700; radiographs: min-max), resize the shorter side to 512
    (bicubic) and center crop, PNG-encode, hash the pixels, perceptual hash. The same output as the
    stage, pixel for pixel (checked by ``main`` on the first files); returns the first ``keep`` images.
    """
    import hashlib

    import imagehash
    import pydicom
    from PIL import Image
    from pydicom.pixels import apply_modality_lut

    d = cfg.data
    size = d.resolution
    _, files = _files(landing)
    kept: list[np.ndarray] = []
    t0 = time.perf_counter()
    for f in files:
        ds = pydicom.dcmread(f)
        if ds.Rows * ds.Columns > d.max_pixels:
            raise ValueError(f"{f}: decompression bomb")
        values = np.asarray(apply_modality_lut(ds.pixel_array, ds), dtype=np.float64)
        if ds.Modality == "CT":
            scaled = (values - (d.hu_window_level - d.hu_window_width / 2)) / d.hu_window_width
        else:
            lo, hi = values.min(), values.max()
            scaled = (values - lo) / (hi - lo)
        pixels = np.rint(np.clip(scaled, 0, 1) * 255).astype(np.uint8)
        img = Image.fromarray(pixels)
        h, w = pixels.shape
        if (h, w) != (size, size):
            nh, nw = (size, max(size, round(w * size / h))) if h <= w else (max(size, round(h * size / w)), size)
            img = img.resize((nw, nh), Image.Resampling.BICUBIC)
            top, left = (nh - size) // 2, (nw - size) // 2
            img = img.crop((left, top, left + size, top + size))
        img.save(io.BytesIO(), format="PNG", compress_level=d.png_compress_level)
        out = np.asarray(img)
        hashlib.sha256(out.tobytes()).hexdigest()
        imagehash.phash(img, hash_size=8)
        if len(kept) < keep:
            kept.append(out)
    return len(files), time.perf_counter() - t0, kept


def _listed(landing: Path, cfg) -> tuple[dict, list[dict]]:
    """(worker settings, the stage's task list) for a landing zone, as ``preprocess`` builds them."""
    from medisyn.data.preprocess import worker_settings
    from medisyn.data.splits import id_salt
    from medisyn.data.zone import list_inputs, resolve_catalog

    catalog, _ = resolve_catalog(cfg, str(landing))
    return worker_settings(cfg), list_inputs(catalog, f"file://{landing}", id_salt(cfg))[0]


def stage_code_loop(landing: Path, cfg, keep: int = 0) -> tuple[int, float, list[np.ndarray]]:
    """The stage's own per-file function (``process_task``: read, decode, rule, resize, PNG, hashes),
    file after file in this process: what one Ray worker does, without Ray."""
    from medisyn.data.images import decode_png
    from medisyn.data.preprocess import process_task

    settings, tasks = _listed(landing, cfg)
    kept: list[np.ndarray] = []
    t0 = time.perf_counter()
    for task in tasks:
        (row,) = process_task(task, settings)
        assert row["status"] == "ok", row
        if len(kept) < keep:
            kept.append(row)
    elapsed = time.perf_counter() - t0
    return len(tasks), elapsed, [np.asarray(decode_png(r["image"])) for r in kept]


def ray_map_only(landing: Path, cfg) -> tuple[int, float]:
    """The stage's Ray Data map over the listed files, results counted and dropped: the stage minus
    listing, de-duplication, shard writing and publishing."""
    from medisyn.data.preprocess import _run_ray

    settings, tasks = _listed(landing, cfg)
    rows = Path(tempfile.mkdtemp(prefix="medisyn-bench-rows-"))
    settings["rows_uri"] = f"file://{rows}"  # the workers stage their rows, as in the stage
    try:
        t0 = time.perf_counter()
        n = sum(int(b.num_rows) for b in _run_ray(tasks, settings, cfg.data.ray_batch_size))
        return n, time.perf_counter() - t0
    finally:
        shutil.rmtree(rows, ignore_errors=True)


class PeakRSS:
    """``with PeakRSS() as m: ...; m.peak_mib``: this process's resident set, sampled every
    ``interval_s`` by a thread (``/proc/self/statm``; child processes such as Ray's are not counted)."""

    def __init__(self, interval_s: float = 0.01):
        import threading

        self.interval_s = interval_s
        self.page = os.sysconf("SC_PAGE_SIZE")
        self.start_mib = self.peak_mib = self.rss_mib()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def rss_mib(self) -> float:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * self.page / 2**20

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak_mib = max(self.peak_mib, self.rss_mib())
            self._stop.wait(self.interval_s)

    def __enter__(self) -> PeakRSS:
        self.start_mib = self.peak_mib = self.rss_mib()
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak_mib = max(self.peak_mib, self.rss_mib())


def scaled_corpora(root: Path, kind: str, n: int, scales: list[int], seed: int = 2) -> dict[int, Path]:
    """Landing zones of ``n * s`` files for every scale ``s``: one set of ``n * max(scales)`` files is
    generated and every zone hard-links its first ``n * s`` (regular files to the stage: only symbolic
    links are refused), with a labels table listing them."""
    import pandas as pd

    full = make_corpus(root / "full", kind, n * max(scales), seed=seed)
    src, files = _files(full)
    table = pd.read_csv(full / src["prefix"] / "labels.csv")
    out = {}
    for s in scales:
        zone = root / f"x{s}" / kind
        (zone / src["prefix"]).mkdir(parents=True)
        for f in files[: n * s]:
            os.link(f, zone / src["prefix"] / f.name)
        table.iloc[: n * s].to_csv(zone / src["prefix"] / "labels.csv", index=False)
        shutil.copyfile(full / "catalog.yaml", zone / "catalog.yaml")
        out[s] = zone
    shutil.rmtree(full, ignore_errors=True)  # the zones hold the links
    return out


def scaling_run(args, cfg, work: Path, kinds: dict[str, int]) -> dict:
    """The stage end to end at every scale of every corpus: images/s and the driver's peak RSS."""
    import gc

    from medisyn.data.preprocess import preprocess

    out: dict = {}
    for kind, n in kinds.items():
        zones = scaled_corpora(work / "scaling" / kind, kind, n, args.scales)
        rows = {}
        for s, zone in zones.items():
            gc.collect()
            target = work / "scaling-out" / f"{kind}-x{s}"
            with PeakRSS() as rss:
                t0 = time.perf_counter()
                r = preprocess(cfg, str(zone), str(target))
                seconds = time.perf_counter() - t0
            assert r.n_rejected == 0, r.manifest["rejected"]
            images = r.n_images + r.n_duplicates
            rows[s] = {"images": images, "seconds": round(seconds, 2), "images_per_s": round(images / seconds, 2),
                       "driver_peak_rss_mib": round(rss.peak_mib, 1),
                       "driver_rss_at_start_mib": round(rss.start_mib, 1),
                       "driver_rss_growth_mib": round(rss.peak_mib - rss.start_mib, 1)}
            shutil.rmtree(target, ignore_errors=True)
            print(f"scaling {kind:5s} x{s:<3d} {images:5d} images: {rows[s]['images_per_s']:7.2f} img/s, "
                  f"driver peak RSS {rss.peak_mib:7.1f} MiB (at start {rss.start_mib:.1f})", flush=True)
        shutil.rmtree(work / "scaling" / kind, ignore_errors=True)
        out[kind] = rows
    return out


def scaling_summary(scaling: dict, best: dict, args) -> dict:
    """Ratios of the scaling run: images/s to the plain serial loop (same image size, same run) and
    the driver's peak RSS to its 1x figure; printed, and the goals checked (on the radiographs)."""
    out: dict = {}
    for kind, rows in scaling.items():
        serial = best[kind]["plain_serial"]
        rss_1x = rows[min(rows)]["driver_peak_rss_mib"]
        for r in rows.values():
            r["vs_plain_serial"] = round(r["images_per_s"] / serial, 2)
            r["driver_peak_rss_vs_1x"] = round(r["driver_peak_rss_mib"] / rss_1x, 3)
        worst_speed = min(r["vs_plain_serial"] for r in rows.values())
        worst_rss = max(r["driver_peak_rss_vs_1x"] for r in rows.values())
        out[kind] = {"plain_serial_images_per_s": round(serial, 2), "by_scale": {f"x{k}": v for k, v in rows.items()},
                     "min_vs_plain_serial": worst_speed, "max_driver_peak_rss_vs_1x": worst_rss,
                     "goal_throughput_1_8x": worst_speed >= 1.8, "goal_driver_rss_within_10pct": worst_rss <= 1.10}
        print(f"scaling {kind}: plain serial loop {serial:.2f} img/s", flush=True)
        for k, r in rows.items():
            print(f"   x{k:<3d} {r['images']:5d} images: {r['images_per_s']:7.2f} img/s ="
                  f" {r['vs_plain_serial']:.2f}x the"
                  f" serial loop | driver peak RSS {r['driver_peak_rss_mib']:.1f} MiB ="
                  f" {r['driver_peak_rss_vs_1x']:.3f}x the 1x run", flush=True)
        print(f"   goals: >= 1.8x the serial loop at every scale: {'met' if worst_speed >= 1.8 else 'NOT met'}"
              f" (min {worst_speed:.2f}x); driver RSS within 10%: {'met' if worst_rss <= 1.10 else 'NOT met'}"
              f" (max {worst_rss:.3f}x)", flush=True)
    return out


def main(argv=None) -> dict:
    import logging

    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s %(message)s")
    logging.getLogger("medisyn").setLevel(logging.INFO)  # progress lines (rows/s, ETA) and phase timings
    sys.path.insert(0, str(REPO / "src"))
    import ray

    from medisyn.config import load_config
    from medisyn.data.preprocess import preprocess, retain_freed_memory

    work = Path(args.workdir or tempfile.mkdtemp(prefix="medisyn-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    results: dict = {"machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "ray": ray.__version__,
                                 "load_avg_1min_at_start": os.getloadavg()[0]},
                     "num_cpus": args.num_cpus, "cases": {}}
    try:
        t0 = time.perf_counter()
        # Ray starts its workers at nice 15; the serial baseline runs at nice 0. Same priority for both,
        # or a busy machine starves the workers and the comparison measures the scheduler, not the stage.
        ray.init(num_cpus=args.num_cpus, include_dashboard=False, log_to_driver=False,
                 _system_config={"worker_niceness": 0})
        results["ray_startup_s"] = round(time.perf_counter() - t0, 2)
        os.environ.setdefault("MEDISYN_ID_SALT", "benchmark-salt")
        overrides = ["data.max_error_rate=0.0", f"data.ray_num_cpus={args.num_cpus}"]
        if args.batch_size:
            overrides.append(f"data.ray_batch_size={args.batch_size}")
        cfg = load_config(None, overrides)
        results["batch_size"] = cfg.data.ray_batch_size
        # warm-up: the first tasks import pydicom/PIL/pyarrow in each worker; two batches per CPU
        # so that every worker has run one before the clock starts
        warm = make_corpus(work / "warm", "ct", 2 * args.num_cpus * cfg.data.ray_batch_size)
        preprocess(cfg, str(warm), str(work / "warm-out"))
        # 0. scaling first: the driver's RSS before the serial loops below grow this process
        scaling = scaling_run(args, cfg, work, {"ct": args.n_ct_scaling, "xray": args.n_xray_scaling})
        kinds = {"ct": args.n_ct, "xray": args.n_xray}
        landings = {kind: make_corpus(work / "corpus", kind, n, seed=1) for kind, n in kinds.items()}
        best: dict[str, dict[str, float]] = {kind: {} for kind in kinds}

        def measure(name: str, kind: str, fn) -> None:
            for _ in range(args.repeats):
                n_done, seconds = fn()
                assert n_done == kinds[kind]
                best[kind][name] = max(best[kind].get(name, 0.0), n_done / seconds)

        # 1. the plain loop with glibc's default malloc, then with the heap setting the stage's workers
        # use (data.worker_heap_mb; it cannot be undone within a process, hence this order). The
        # baseline is the faster of the two, so the setting is not counted as the stage's gain.
        plain_first: dict[str, list[np.ndarray]] = {}
        for malloc in ("default_malloc", "worker_heap"):
            if malloc == "worker_heap":
                retain_freed_memory(cfg.data.worker_heap_mb)
            for kind, landing in landings.items():
                plain_first[kind] = plain_loop(landing, cfg, keep=3)[2]
                measure(f"plain_serial_{malloc}", kind, lambda landing=landing: plain_loop(landing, cfg)[:2])
        for kind in kinds:
            best[kind]["plain_serial"] = max(best[kind]["plain_serial_default_malloc"],
                                             best[kind]["plain_serial_worker_heap"])
        # 2. the stage's per-file code in this process, with the same heap setting
        for kind, landing in ([] if args.skip_throughput else landings.items()):
            stage_first = stage_code_loop(landing, cfg, keep=3)[2]
            for a, b in zip(plain_first[kind], stage_first, strict=True):  # same rules, same pixels
                np.testing.assert_array_equal(a, b)
            measure("stage_code_serial", kind, lambda landing=landing: stage_code_loop(landing, cfg)[:2])
        # 3. Ray Data's map alone (decode and stage the rows in the workers, metadata back to the driver)
        for kind, landing in ([] if args.skip_throughput else landings.items()):
            measure("ray_data_map_only", kind, lambda landing=landing: ray_map_only(landing, cfg))
        # 4. the Ray Data stage end to end
        for kind, landing in ([] if args.skip_throughput else landings.items()):
            outs = iter(range(args.repeats))

            def stage(landing: Path = landing, kind: str = kind, outs: Iterator[int] = outs) -> tuple[int, float]:
                t0 = time.perf_counter()
                r = preprocess(cfg, str(landing), str(work / f"out-{kind}-{next(outs)}"))
                assert r.n_rejected == 0, r.manifest["rejected"]
                return r.n_images + r.n_duplicates, time.perf_counter() - t0

            measure("ray_data_stage", kind, stage)
        for kind, n in ([] if args.skip_throughput else kinds.items()):
            b = best[kind]
            case = {
                "images": n,
                "image_shape": [512, 512] if kind == "ct" else [2500, 2048],
                "images_per_s": {k: round(v, 2) for k, v in b.items()},
                "speedup_vs_plain_serial": round(b["ray_data_stage"] / b["plain_serial"], 2),
                "speedup_vs_stage_code_serial": round(b["ray_data_stage"] / b["stage_code_serial"], 2),
                "map_only_vs_stage_code_serial": round(b["ray_data_map_only"] / b["stage_code_serial"], 2),
                "per_image_code_vs_plain": round(b["stage_code_serial"] / b["plain_serial"], 2),
                "repeats": args.repeats,
                "load_avg_1min": round(os.getloadavg()[0], 2),
            }
            results["cases"][kind] = case
            print(f"{kind:5s} {n:4d} images {case['image_shape']}: plain serial loop {b['plain_serial']:7.2f} img/s | "
                  f"stage code, serial {b['stage_code_serial']:7.2f} img/s | "
                  f"Ray Data stage {b['ray_data_stage']:7.2f} img/s"
                  f" | {case['speedup_vs_plain_serial']:.2f}x the plain loop"
                  f" ({case['per_image_code_vs_plain']:.2f}x per-image code"
                  f" x {case['speedup_vs_stage_code_serial']:.2f}x parallel)",
                  flush=True)
            print(f"      Ray Data map alone (nothing written) {b['ray_data_map_only']:7.2f} img/s:"
                  f" {case['map_only_vs_stage_code_serial']:.2f}x the stage code, serial", flush=True)
        results["scaling"] = scaling_summary(scaling, best, args)
        results["machine"]["load_avg_1min_at_end"] = os.getloadavg()[0]
    finally:
        ray.shutdown()
        if not args.workdir:
            shutil.rmtree(work, ignore_errors=True)
    print(f"Ray start-up (excluded): {results.get('ray_startup_s')} s; "
          f"load average {results['machine']['load_avg_1min_at_start']:.1f}"
          f" on {results['machine']['cpus']} cores at start")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {out}")
    return results


if __name__ == "__main__":
    main()
