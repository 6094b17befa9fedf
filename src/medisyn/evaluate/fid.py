"""Per-epoch FID: pick the checkpoint the paper would pick (section 4.2).

"We selected the checkpoint with the lowest FID, calculated between 10,000 synthetic images and
10,000 real images randomly sampled from our training dataset. The synthetic images were generated
using the corresponding text captions of the 10,000 real images." (section 4.2; sampling: CFG 7,
Euler, 50 steps, section 4.3)

How this module does it:

* The real sample: ``fid.num_samples`` rows of the train split drawn with ``fid.seed``, in a random
  order (so any prefix is itself a random sample: successive halving uses prefixes). Its Inception
  features, mean and covariance square root are computed once per (dataset hash, extractor
  identity, N, seed) and cached under ``<storage.root>/fid-real-stats/``; every epoch, and every later run on the
  same dataset version,
  reuses them.
* The synthetic sample of an epoch: image ``i`` is generated from real caption ``i`` with seed
  ``fid.seed * 1_000_003 + i``: the same seeds for every epoch, so epochs are compared on paired
  noise. Its features are stored per epoch in the output prefix, so a rerun after a new epoch lands
  scores only the new epoch (scoring "as training produces it"), and re-scoring at a larger N only
  generates the missing images.
* Sampling is data-parallel when ``torch.distributed`` is initialised (each rank its own captions
  and seeds; features are gathered); only rank 0 writes outputs and logs to MLflow.
* FID per specialty (on the rows of that specialty) and a percentile bootstrap interval for the
  pooled FID of the selected epoch (real and synthetic features resampled independently).
* Successive halving (``fid.successive_halving``): every epoch at ``fid.halving_small_n``, the best
  ``fid.halving_keep`` re-scored at full N; the choice and both scores are reported and logged.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import re
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from PIL import Image

from medisyn import storage, tracking
from medisyn.config import RunConfig
from medisyn.data import dataset_hash, train_shards
from medisyn.evaluate.fid_distance import (
    bootstrap_fid_interval,
    feature_statistics,
    fid_against_sqrt,
    fid_from_features,
    frechet_distance,
    paired_bootstrap_fid_differences,
    psd_sqrt,
)
from medisyn.results import StageResult

log = logging.getLogger("medisyn.fid")

__all__ = [  # the stage and its pieces; the distance and its bootstraps re-exported from fid_distance
    "GRID_PER_SPECIALTY", "REAL_CACHE_DIR", "SEED_STRIDE", "RealSample", "ScoreResult", "bootstrap_fid_interval",
    "epoch_of", "extract_features", "feature_statistics", "fid_from_features", "frechet_distance",
    "list_epoch_checkpoints", "load_real_sample", "paired_bootstrap_fid_differences", "psd_sqrt", "score_checkpoints",
]

REAL_CACHE_DIR = "fid-real-stats"
GRID_PER_SPECIALTY = 8  # images per specialty in the sample grid figure
SEED_STRIDE = 1_000_003  # keeps the per-image seeds of different fid.seed values apart


# ----------------------------------------------------------------------------------------------
# Features
# ----------------------------------------------------------------------------------------------
def _to_uint8_nchw(images: list[Image.Image]) -> torch.Tensor:
    arrays = [np.asarray(img.convert("RGB"), dtype=np.uint8) for img in images]
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous()


@torch.inference_mode()
def extract_features(extractor: torch.nn.Module, images: list[Image.Image], batch_size: int, device) -> np.ndarray:
    """(N, D) float32 features of PIL images (converted to RGB uint8; the extractor resizes)."""
    out = []
    for start in range(0, len(images), batch_size):
        batch = _to_uint8_nchw(images[start:start + batch_size]).to(device)
        out.append(extractor(batch).float().cpu().numpy())
    if not out:
        return np.zeros((0, getattr(extractor, "feature_dim", 0)), dtype=np.float32)
    return np.concatenate(out).astype(np.float32)


def _npz_bytes(**arrays) -> bytes:
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    return buf.getvalue()


def _load_npz(uri: str) -> dict[str, np.ndarray]:
    with np.load(io.BytesIO(storage.read_bytes(uri)), allow_pickle=False) as z:
        return {k: z[k] for k in z.files}


# ----------------------------------------------------------------------------------------------
# The real sample and its cached statistics
# ----------------------------------------------------------------------------------------------
@dataclass
class RealSample:
    captions: list[str]
    specialties: list[str]
    features: np.ndarray  # (N, D) float32, row i = real image i
    cache_uri: str
    cached: bool  # True when the features came from the cache
    mu: np.ndarray | None = None  # real mean, float64
    sigma_sqrt: np.ndarray | None = None  # S_real^{1/2}: the costly half of every epoch's distance, cached
    sigma_trace: float = 0.0

    def fid(self, fake: np.ndarray) -> float:
        """Pooled FID of ``fake`` features against the whole real sample, from the cached statistics."""
        if self.mu is None or self.sigma_sqrt is None:
            self.mu, sigma = feature_statistics(self.features)
            self.sigma_sqrt, self.sigma_trace = psd_sqrt(sigma), float(np.trace(sigma))
        return fid_against_sqrt(self.mu, self.sigma_sqrt, self.sigma_trace, fake)


def _real_cache_key(cfg: RunConfig, dhash: str, identity: dict[str, str], n: int) -> str:
    blob = json.dumps({"dataset": dhash, "extractor": identity, "n": n, "seed": cfg.fid.seed, "split": "train",
                       "format": 2}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:24]


def load_real_sample(cfg: RunConfig, dataset_uri: str, extractor, device, identity: dict[str, str]) -> RealSample:
    """The real sample's captions, specialties and features: from the cache, else computed and cached."""
    import pyarrow.parquet as pq

    storage.require_complete(dataset_uri)
    dhash = dataset_hash(dataset_uri)
    shards = train_shards(dataset_uri)
    # Row counts come from the Parquet footers: cheap, and they fix N before the cache lookup.
    counts = []
    for uri in shards:
        fs, path = storage.pyarrow_filesystem(uri)
        with fs.open_input_file(path) as f:
            counts.append(pq.ParquetFile(f).metadata.num_rows)
    total = int(sum(counts))
    n = min(cfg.fid.num_samples, total)
    if n < cfg.fid.num_samples:
        log.warning("train split has %d rows < fid.num_samples=%d: FID on all %d", total, cfg.fid.num_samples, n)
    if n < 2:
        raise ValueError(f"FID needs at least 2 real train images, the dataset has {total}")
    key = _real_cache_key(cfg, dhash, identity, n)
    cache_uri = storage.join(storage.normalize(cfg.storage.root), REAL_CACHE_DIR, f"{key}.npz")
    if storage.exists(cache_uri):
        z = _load_npz(cache_uri)
        log.info("real FID statistics: cache hit %s", cache_uri)
        return RealSample(list(z["captions"]), list(z["specialties"]), z["features"], cache_uri, True,
                          z["mu"], z["sigma_sqrt"], float(z["sigma_trace"]))

    # A random permutation prefix: any prefix (successive halving's small N) is a random sample too.
    order = np.random.default_rng(cfg.fid.seed).permutation(total)[:n]
    position = {int(g): i for i, g in enumerate(order)}
    captions: list[str | None] = [None] * n
    specialties: list[str | None] = [None] * n
    images: list[Image.Image | None] = [None] * n
    offset = 0
    for uri, count in zip(shards, counts, strict=True):
        wanted = [g for g in range(offset, offset + count) if g in position]
        if wanted:
            fs, path = storage.pyarrow_filesystem(uri)
            with fs.open_input_file(path) as f:
                pf = pq.ParquetFile(f)
                row = offset
                for batch in pf.iter_batches(columns=["image", "caption", "specialty"], batch_size=256):
                    cols = batch.to_pydict()
                    for j in range(batch.num_rows):
                        i = position.get(row + j)
                        if i is not None:
                            images[i] = Image.open(io.BytesIO(cols["image"][j])).convert("RGB")
                            captions[i] = cols["caption"][j]
                            specialties[i] = cols["specialty"][j]
                    row += batch.num_rows
        offset += count
    t0 = time.perf_counter()
    features = extract_features(extractor, images, cfg.fid.batch_size, device)  # type: ignore[arg-type]
    log.info("real FID features: %d images in %.1fs", n, time.perf_counter() - t0)
    mu, sigma = feature_statistics(features)
    sample = RealSample(list(captions), list(specialties), features, cache_uri, False,  # type: ignore[arg-type]
                        mu, psd_sqrt(sigma), float(np.trace(sigma)))
    rank, _ = _rank_world()
    if rank == 0:
        storage.write_bytes(cache_uri, _npz_bytes(
            features=features, captions=np.array(captions, dtype=str), specialties=np.array(specialties, dtype=str),
            rows=order.astype(np.int64), mu=sample.mu, sigma_sqrt=sample.sigma_sqrt,
            sigma_trace=np.array(sample.sigma_trace),
        ))
    return sample


# ----------------------------------------------------------------------------------------------
# Scoring
# ----------------------------------------------------------------------------------------------
def _rank_world() -> tuple[int, int]:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def _gather(indices: list[int], feats: np.ndarray, n_total: int) -> np.ndarray:
    """Assemble every rank's (indices, features) into one (n_total, D) array on every rank."""
    rank, world = _rank_world()
    if world == 1:
        out = np.empty((n_total, feats.shape[1]), dtype=np.float32)
        out[indices] = feats
        return out
    parts: list[Any] = [None] * world
    torch.distributed.all_gather_object(parts, (indices, feats))
    dim = next(p[1].shape[1] for p in parts if len(p[0]))
    out = np.empty((n_total, dim), dtype=np.float32)
    for idx, f in parts:
        if len(idx):
            out[idx] = f
    return out


def epoch_of(checkpoint_uri: str) -> int:
    m = re.search(r"epoch-(\d+)", checkpoint_uri.rstrip("/").rsplit("/", 1)[-1])
    if not m:
        raise ValueError(f"{checkpoint_uri} is not an epoch-NNNN checkpoint")
    return int(m.group(1))


def list_epoch_checkpoints(checkpoints_uri: str) -> list[str]:
    """Complete ``epoch-*`` checkpoints, oldest first (the training engineer's listing when present)."""
    try:
        from medisyn.train import list_checkpoints
    except ImportError:  # pragma: no cover - the trainer package is optional for scoring
        out = [u for u in storage.listdir(checkpoints_uri)
               if re.fullmatch(r"epoch-\d+", u.rsplit("/", 1)[-1]) and storage.is_complete(u)]
        return sorted(out, key=epoch_of)
    return list_checkpoints(checkpoints_uri, kind="epoch")


def _checkpoint_identity(checkpoint_uri: str) -> str:
    """Cheap identity of a checkpoint: its metadata files and the U-Net's config and file sizes."""
    parts: dict[str, Any] = {}
    for name in ("checkpoint.json", storage.COMPLETE_MARKER, "unet/config.json"):
        uri = storage.join(checkpoint_uri, name)
        parts[name] = hashlib.sha256(storage.read_bytes(uri)).hexdigest() if storage.exists(uri) else None
    fs, path = storage.filesystem(storage.join(checkpoint_uri, "unet"))
    parts["unet_files"] = sorted((e["name"].rsplit("/", 1)[-1], e.get("size")) for e in fs.ls(path, detail=True))
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:24]


@dataclass(frozen=True)
class ScoreResult(StageResult):
    out_uri: str  # FID report prefix (result.json, figures, per-epoch features)
    best_epoch: int
    best_checkpoint_uri: str
    best_fid: float
    fid_by_epoch: dict[int, float]  # at full N (successive halving: only the re-scored epochs)
    fid_by_specialty: dict[str, float]  # the best epoch's, per specialty
    fid_ci: tuple[float, float] | None  # bootstrap interval of the best epoch's pooled FID
    num_samples: int
    seed: int
    mode: str  # "full" | "successive_halving"
    provenance: dict[str, Any]  # implementation, weights_sha256, resize_filter, n, seed, sampling
    dataset_hash: str
    real_stats_uri: str
    real_stats_cached: bool
    fid_by_epoch_specialty: dict[int, dict[str, float]] = field(default_factory=dict)
    halving: dict[str, Any] | None = None  # small_n, small-N FID per epoch, the re-scored epochs
    seconds_by_epoch: dict[int, float] = field(default_factory=dict)
    run_id: str | None = None
    # paired bootstrap 95% interval of FID(epoch) - FID(best epoch), per full-N epoch (issue #29): an
    # interval containing 0 = not distinguishable from the selected epoch at this N
    fid_diff_ci_by_epoch: dict[int, tuple[float, float]] = field(default_factory=dict)

    @property
    def epochs_indistinguishable_from_best(self) -> list[int]:
        """Epochs whose FID difference to the selected one is not resolved at this N (interval holds 0)."""
        return sorted(e for e, (lo, hi) in self.fid_diff_ci_by_epoch.items()
                      if e != self.best_epoch and lo <= 0.0 <= hi)

    @property
    def learning_detected(self) -> bool | None:
        """Whether the first full-N epoch is worse than the selected one beyond the paired interval (the
        learning-curve check); None when there is no second epoch or no interval."""
        first = min(self.fid_by_epoch) if self.fid_by_epoch else None
        if first is None or first == self.best_epoch or first not in self.fid_diff_ci_by_epoch:
            return None
        return self.fid_diff_ci_by_epoch[first][0] > 0.0


class _EpochScorer:
    """Generates, featurises and caches one epoch's synthetic sample, any prefix length at a time."""

    def __init__(self, cfg: RunConfig, real: RealSample, extractor, device, feat_key: str, out_uri: str):
        self.cfg, self.real, self.extractor, self.device = cfg, real, extractor, device
        self.feat_key, self.out_uri = feat_key, out_uri
        self.seeds = [cfg.fid.seed * SEED_STRIDE + i for i in range(len(real.captions))]
        self.samples: dict[int, list[tuple[str, Image.Image]]] = {}  # a few images per specialty, for grids

    def grid_samples(self, checkpoint_uri: str) -> list[tuple[str, Image.Image]]:
        """A few images per specialty for the sample grid (regenerated when the features were cached)."""
        from medisyn.generate import load_model, sample

        epoch = epoch_of(checkpoint_uri)
        if self.samples.get(epoch):
            return self.samples[epoch]
        picked: dict[str, list[int]] = {}
        for i, spec in enumerate(self.real.specialties):
            if len(picked.setdefault(spec, [])) < GRID_PER_SPECIALTY:
                picked[spec].append(i)
        idx = [i for ids in picked.values() for i in ids]
        pipe = load_model(self.cfg, storage.join(checkpoint_uri, "unet"))
        images = sample(pipe, [self.real.captions[i] for i in idx],
                        [self.seeds[i] for i in idx], self.cfg.fid_sampling(), self.cfg.sampling_resolution(),
                        desc="fid grid")
        self.samples[epoch] = [(self.real.specialties[i], img) for i, img in zip(idx, images, strict=True)]
        return self.samples[epoch]

    def features(self, checkpoint_uri: str, n: int) -> tuple[np.ndarray, float]:
        """Synthetic features for images [0, n), generating only the ones not cached yet."""
        from medisyn.generate import load_model, sample_distributed

        epoch = epoch_of(checkpoint_uri)
        key = hashlib.sha256((self.feat_key + _checkpoint_identity(checkpoint_uri)).encode()).hexdigest()[:16]
        feat_uri = storage.join(self.out_uri, "epochs", f"epoch-{epoch:04d}", f"features-{key}.npz")
        have = _load_npz(feat_uri)["features"] if storage.exists(feat_uri) else np.zeros((0, 0), np.float32)
        if len(have) >= n:
            return have[:n], 0.0
        t0 = time.perf_counter()
        # Only the U-Net is read: an s3:// checkpoint's training_state/ (optimizer) is never downloaded.
        pipe = load_model(self.cfg, storage.join(checkpoint_uri, "unet"))
        todo = list(range(len(have), n))
        idx_local, images = sample_distributed(
            pipe, [self.real.captions[i] for i in todo], [self.seeds[i] for i in todo],
            self.cfg.fid_sampling(), self.cfg.sampling_resolution(), desc=f"fid epoch {epoch}",
        )
        feats = extract_features(self.extractor, images, self.cfg.fid.batch_size, self.device)
        new = _gather(idx_local, feats, len(todo))
        keep = self.samples.setdefault(epoch, [])
        for j, img in zip(idx_local, images, strict=True):
            spec = self.real.specialties[todo[j]]
            if sum(1 for s, _ in keep if s == spec) < GRID_PER_SPECIALTY:
                keep.append((spec, img))
        allf = new if len(have) == 0 else np.concatenate([have, new])
        del pipe
        if _rank_world()[0] == 0:
            storage.write_bytes(feat_uri, _npz_bytes(features=allf))
        return allf[:n], time.perf_counter() - t0


def _per_specialty(real: RealSample, fake: np.ndarray, n: int) -> dict[str, float]:
    specs = np.array(real.specialties[:n])
    out = {}
    for spec in sorted(set(specs.tolist())):
        mask = specs == spec
        if mask.sum() >= 2:  # a covariance needs two samples; tiny groups are reported with n in result.json
            out[spec] = fid_from_features(real.features[:n][mask], fake[:n][mask])
    return out


def _fid_curve_figure(fid_by_epoch: dict[int, float], small: dict[int, float] | None, n: int, small_n: int | None):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    if small:
        ax.plot(sorted(small), [small[e] for e in sorted(small)], "o--", color="0.6", label=f"N={small_n}")
    if fid_by_epoch:
        ax.plot(sorted(fid_by_epoch), [fid_by_epoch[e] for e in sorted(fid_by_epoch)], "o-", label=f"N={n}")
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # epochs are whole numbers
    ax.set_xlabel("epoch")
    ax.set_ylabel("FID (lower is better)")
    ax.set_title("FID per epoch")
    ax.legend()
    fig.tight_layout()
    return fig


def _grid_figure(spec: str, images: list[Image.Image], epoch: int):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cols = max(1, len(images))
    fig, axes = plt.subplots(1, cols, figsize=(2 * cols, 2.3), squeeze=False)
    for ax, img in zip(axes[0], images, strict=False):  # one axis per image (cols = len(images))
        ax.imshow(img)
        ax.axis("off")
    fig.suptitle(f"{spec} (epoch {epoch})", fontsize=9)
    fig.tight_layout()
    return fig


def score_checkpoints(cfg: RunConfig, dataset_uri: str, checkpoints_uri: str, out_uri: str) -> ScoreResult:
    """FID of every complete epoch checkpoint; the best is the one with the lowest full-N FID.

    Writes ``result.json`` (this result), ``fid_curve.png``, ``grids/<specialty>.png`` and per-epoch
    feature caches under ``out_uri``; ``_COMPLETE`` last. Logs the curve, per-specialty FIDs, the
    bootstrap interval and the figures to an MLflow stage run when tracking is configured.
    """
    from medisyn.models.inception import extractor_identity, load_feature_extractor
    from medisyn.models.sdxl import resolve_device

    out_uri = storage.normalize(out_uri)
    rank, _ = _rank_world()
    if rank == 0 and storage.is_complete(out_uri):
        # rescoring: not complete until done, and no stale result for register to read meanwhile
        storage.remove(storage.join(out_uri, storage.COMPLETE_MARKER))
        storage.remove(storage.join(out_uri, "result.json"))
    checkpoints = list_epoch_checkpoints(checkpoints_uri)
    if not checkpoints:
        raise FileNotFoundError(f"no complete epoch checkpoints under {checkpoints_uri}")
    device = resolve_device(cfg.runtime)
    weights = cfg.models.fid_inception_weights
    identity = extractor_identity(cfg.fid, weights)
    extractor = load_feature_extractor(cfg.fid, weights, device)
    real = load_real_sample(cfg, dataset_uri, extractor, device, identity)
    n = len(real.captions)
    sampling = cfg.fid_sampling().model_dump(mode="json") | {"resolution": cfg.sampling_resolution()}
    provenance = identity | {"n": n, "seed": cfg.fid.seed, "sampling": sampling, "split": "train",
                             "real_stats_uri": real.cache_uri,
                             "weights_file": storage.normalize(weights)}  # the sha256 above is its content
    feat_key = json.dumps({"real": real.cache_uri, "sampling": sampling, "seed": cfg.fid.seed}, sort_keys=True)
    scorer = _EpochScorer(cfg, real, extractor, device, feat_key, out_uri)
    by_uri = {epoch_of(u): u for u in checkpoints}

    halving = None
    small_scores: dict[int, float] = {}
    seconds: dict[int, float] = {}
    small_n = min(cfg.fid.halving_small_n, n)
    if cfg.fid.successive_halving and small_n < n and len(checkpoints) > cfg.fid.halving_keep:
        for epoch, uri in by_uri.items():
            feats, secs = scorer.features(uri, small_n)
            small_scores[epoch] = fid_from_features(real.features[:small_n], feats)
            seconds[epoch] = secs
            log.info("epoch %d: FID@%d = %.3f", epoch, small_n, small_scores[epoch])
        finalists = sorted(small_scores, key=lambda e: small_scores[e])[: cfg.fid.halving_keep]
        halving = {"small_n": small_n, "keep": cfg.fid.halving_keep, "fid_small_by_epoch": small_scores,
                   "rescored_epochs": sorted(finalists)}
        mode = "successive_halving"
    else:
        finalists = sorted(by_uri)
        mode = "full"

    fid_by_epoch: dict[int, float] = {}
    spec_by_epoch: dict[int, dict[str, float]] = {}
    fake_full: dict[int, np.ndarray] = {}
    for epoch in sorted(finalists):
        feats, secs = scorer.features(by_uri[epoch], n)
        seconds[epoch] = seconds.get(epoch, 0.0) + secs
        fid_by_epoch[epoch] = real.fid(feats)
        spec_by_epoch[epoch] = _per_specialty(real, feats, n) if cfg.fid.per_specialty else {}
        fake_full[epoch] = feats
        log.info("epoch %d: FID@%d = %.3f", epoch, n, fid_by_epoch[epoch])
    best = min(fid_by_epoch, key=lambda e: (fid_by_epoch[e], e))
    ci = None
    diff_ci: dict[int, tuple[float, float]] = {}
    if cfg.fid.bootstrap_resamples > 0:
        ci = bootstrap_fid_interval(real.features, fake_full[best], cfg.fid.bootstrap_resamples, cfg.fid.seed)
        if len(fake_full) > 1:
            diff_ci = paired_bootstrap_fid_differences(real.features, fake_full, best,
                                                       cfg.fid.bootstrap_resamples, cfg.fid.seed)

    result = ScoreResult(
        out_uri=out_uri, best_epoch=best, best_checkpoint_uri=by_uri[best], best_fid=fid_by_epoch[best],
        fid_by_epoch=fid_by_epoch, fid_by_specialty=spec_by_epoch.get(best, {}), fid_ci=ci, num_samples=n,
        seed=cfg.fid.seed, mode=mode, provenance=provenance, dataset_hash=dataset_hash(dataset_uri),
        real_stats_uri=real.cache_uri, real_stats_cached=real.cached, fid_by_epoch_specialty=spec_by_epoch,
        halving=halving, seconds_by_epoch=seconds, fid_diff_ci_by_epoch=diff_ci,
    )
    if rank != 0:
        return result
    return _publish(cfg, result, scorer, small_scores, small_n)


def _publish(cfg: RunConfig, result: ScoreResult, scorer: _EpochScorer, small: dict[int, float],
             small_n: int) -> ScoreResult:
    import dataclasses

    curve = _fid_curve_figure(result.fid_by_epoch, small or None, result.num_samples, small_n if small else None)
    buf = io.BytesIO()
    curve.savefig(buf, format="png", dpi=100)
    storage.write_bytes(storage.join(result.out_uri, "fid_curve.png"), buf.getvalue())
    grids = {}
    by_spec: dict[str, list[Image.Image]] = {}
    for spec, img in scorer.grid_samples(result.best_checkpoint_uri):
        by_spec.setdefault(spec, []).append(img)
    for spec, imgs in sorted(by_spec.items()):
        grids[spec] = _grid_figure(spec, imgs, result.best_epoch)
        gbuf = io.BytesIO()
        grids[spec].savefig(gbuf, format="png", dpi=100)
        storage.write_bytes(storage.join(result.out_uri, "grids", f"{_slug(spec)}.png"), gbuf.getvalue())
    with tracking.stage_run(cfg, "score", tags={"medisyn.fid.mode": result.mode}) as run:
        if run is not None:
            import mlflow

            mlflow.log_params({"fid.n": result.num_samples, "fid.seed": result.seed, "fid.mode": result.mode,
                               "fid.implementation": result.provenance["implementation"][:250],
                               "fid.weights_sha256": result.provenance["weights_sha256"],
                               "fid.resize_filter": result.provenance["resize_filter"][:250]})
            for epoch, value in sorted(result.fid_by_epoch.items()):
                mlflow.log_metric("fid", value, step=epoch)
                for spec, v in result.fid_by_epoch_specialty.get(epoch, {}).items():
                    mlflow.log_metric(f"fid.{_slug(spec)}", v, step=epoch)
            for epoch, value in sorted(small.items()):
                mlflow.log_metric("fid_small_n", value, step=epoch)
            mlflow.log_metrics({"best_epoch": result.best_epoch, "best_fid": result.best_fid})
            if result.fid_ci:
                mlflow.log_metrics({"best_fid_ci_low": result.fid_ci[0], "best_fid_ci_high": result.fid_ci[1]})
            for epoch, (lo, hi) in result.fid_diff_ci_by_epoch.items():  # FID(epoch) - FID(best), paired
                mlflow.log_metrics({"fid_minus_best_ci_low": lo, "fid_minus_best_ci_high": hi}, step=epoch)
            if result.learning_detected is not None:
                mlflow.set_tag("medisyn.fid.learning_detected", str(result.learning_detected).lower())
            result = dataclasses.replace(result, run_id=run.info.run_id)
        tracking.log_figure(curve, "fid/fid_curve.png")
        for spec, fig in grids.items():
            tracking.log_figure(fig, f"fid/grids/{_slug(spec)}.png")
    result.save(result.out_uri)  # result.json inside the prefix, before _COMPLETE (the runner logs it to MLflow)
    storage.write_json(storage.join(result.out_uri, storage.COMPLETE_MARKER), {"best_epoch": result.best_epoch})
    return result


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-") or "unknown"
