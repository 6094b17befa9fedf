"""Privacy gate: does the model reproduce its training images? (paper sections 4.3.4 and 4.4)

1. Generate ``privacy.images_per_prompt`` images for each privacy prompt (section 4.3.4: 500 per
   prompt, prompts from the training data of 6 specialties).
2. Embed synthetic and real training images with the BiomedCLIP vision encoder and find, for each
   synthetic image, its nearest real training image by cosine similarity (eq. 2), searching only
   training images of the same specialty AND image type.
3. Measure each pair with the normalized patch-based Euclidean distance of Carlini et al. (eq. 3),
   :func:`patch_distance`: the maximum over 16 non-overlapping 128x128 patches.
4. One-sided Wilcoxon signed-rank test that the distances lie above 0.15 (section 4.4), and the
   fraction of pairs at or below 0.15 (potential reproductions).

The gate passes only if p < ``privacy.alpha`` AND the fraction at/below the threshold is at most
``privacy.max_fraction_below`` (default 0: a single potential reproduction fails the gate and sends
the model to the visual inspection the paper did by hand). See docs/gates.md.

Memory: the training split's embeddings are computed once per dataset version and stored as shards
inside the dataset prefix (:mod:`medisyn.evaluate.embeddings`, keyed by dataset hash and model
identity, verified on every read), then searched shard by shard with an exact chunked cosine search
in torch on the configured device (:mod:`medisyn.evaluate.search`: only the queries, one shard and a
few candidates per query are held); synthetic images are spilled to a scratch directory as PNG, and
a second pass fetches only the matched real images; a 1M-image split is never held as images in RAM.
"""

from __future__ import annotations

import heapq
import json
import logging
import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from medisyn import storage, tracking
from medisyn.config import RunConfig
from medisyn.data import decode_png, iter_rows
from medisyn.evaluate.gates import GateResult, Sampler, generation_sampler, log_metrics, sample_in_batches, save_figure
from medisyn.evaluate.privacy_evidence import (
    SAMPLES_PER_PROMPT,
    _histogram,
    _pair_grid,
    _PairThumbnails,
    _write_samples,
)
from medisyn.evaluate.privacy_prompts import PrivacyPrompt, resolve_prompts
from medisyn.progress import Progress

log = logging.getLogger("medisyn.privacy")

__all__ = [  # the gate, eq. (3) and its statistics; prompts and evidence re-exported from their modules
    "CLOSEST_PAIRS", "GATE", "SAMPLES_PER_PROMPT", "PrivacyPrompt", "distance_summary", "patch_distance",
    "privacy_gate", "resolve_prompts", "wilcoxon_above_threshold",
]
GATE = "privacy"
CLOSEST_PAIRS = 8  # pairs shown in the closest-pairs figure
MAX_PIXEL_VALUE = 255.0


# ----------------------------------------------------------------------------------------------
# Eq. (3)
# ----------------------------------------------------------------------------------------------
def patch_distance(real: np.ndarray, synth: np.ndarray, patch_size: int) -> float:
    """Carlini et al.'s normalized patch-based Euclidean distance (paper eq. 3, section 4.3.4).

    Both images are split into non-overlapping ``patch_size`` x ``patch_size`` patches; for each pair
    of corresponding patches P1 (real) and P2 (synthetic)

        d = sqrt(sum_i (P1_i - P2_i)^2) / sqrt(255^2 * N)

    with N the number of values in a patch (pixels x channels for colour images), so d is the root
    mean squared difference in units of the full 0..255 range: 0 for identical patches, 1 for black
    against white. The result is the MAXIMUM over all patches, so two images count as close only if
    every region is close (a shared background alone does not make a pair similar).

    ``real`` and ``synth`` are uint8-range arrays of identical shape (H, W) or (H, W, C); H and W
    must be multiples of ``patch_size`` (512 / 128 -> 16 patches in the paper).
    """
    a = np.asarray(real, dtype=np.float64)
    b = np.asarray(synth, dtype=np.float64)
    if a.shape != b.shape:
        raise ValueError(f"images differ in shape: real {a.shape} vs synthetic {b.shape}")
    if a.ndim == 2:
        a, b = a[..., None], b[..., None]
    if a.ndim != 3:
        raise ValueError(f"expected (H, W) or (H, W, C) arrays, got shape {a.shape}")
    h, w, c = a.shape
    if patch_size < 1 or h % patch_size or w % patch_size:
        raise ValueError(f"image {h}x{w} is not divisible into {patch_size}x{patch_size} patches")
    if min(a.min(), b.min()) < 0 or max(a.max(), b.max()) > MAX_PIXEL_VALUE:
        raise ValueError("pixel values must lie in 0..255")
    sq = (a - b) ** 2
    # (rows, p, cols, p, C) -> sum of squares per patch
    per_patch = sq.reshape(h // patch_size, patch_size, w // patch_size, patch_size, c).sum(axis=(1, 3, 4))
    n = patch_size * patch_size * c
    return float(np.sqrt(per_patch.max()) / np.sqrt(MAX_PIXEL_VALUE**2 * n))


def wilcoxon_above_threshold(distances: Sequence[float] | np.ndarray, threshold: float) -> float:
    """p-value of the one-sided Wilcoxon signed-rank test that distances lie above ``threshold``
    (section 4.4): ``scipy.stats.wilcoxon(d - threshold, alternative="greater")``.

    Returns 1.0 (no evidence, the gate fails) when the test is undefined: no pairs, or every
    distance exactly at the threshold.
    """
    from scipy.stats import wilcoxon

    d = np.asarray(distances, dtype=np.float64) - threshold
    if d.size == 0 or np.all(d == 0):
        return 1.0
    return float(wilcoxon(d, alternative="greater").pvalue)


def distance_summary(distances: Sequence[float] | np.ndarray, threshold: float) -> dict[str, float | int | None]:
    """One row of the paper's Table 1 for a set of pair distances: number of pairs, mean and sample
    standard deviation (ddof 1; 0 for a single pair), count and fraction at or below ``threshold``,
    and the one-sided Wilcoxon p-value (:func:`wilcoxon_above_threshold`). Empty: n 0, the rest None."""
    d = np.asarray(distances, dtype=np.float64)
    if d.size == 0:
        return {"n": 0, "mean": None, "sd": None, "min": None, "median": None, "n_below": 0,
                "fraction_below": None, "wilcoxon_p": None}
    return {
        "n": int(d.size), "mean": float(d.mean()), "sd": float(d.std(ddof=1)) if d.size > 1 else 0.0,
        "min": float(d.min()), "median": float(np.median(d)), "n_below": int((d <= threshold).sum()),
        "fraction_below": float((d <= threshold).mean()), "wilcoxon_p": wilcoxon_above_threshold(d, threshold),
    }




# ----------------------------------------------------------------------------------------------
# The gate, in phases: generate, match, measure, decide, report, publish
# ----------------------------------------------------------------------------------------------
def _to_rgb_array(im, size: tuple[int, int] | None = None) -> np.ndarray:
    """uint8 (H, W, 3); grayscale is replicated to RGB so real and synthetic compare like for like."""
    from PIL import Image

    im = im.convert("RGB")
    if size is not None and im.size != tuple(size):
        im = im.resize(tuple(size), Image.Resampling.BICUBIC)
    return np.asarray(im, dtype=np.uint8)


def privacy_gate(cfg: RunConfig, model_uri: str, dataset_uri: str, out_uri: str,
                 sampler: Sampler | None = None) -> GateResult:
    """Run the privacy (memorization) gate of section 4.3.4 for the model at ``model_uri``.

    Writes ``report.json``, ``pairs.jsonl`` and the figures to ``out_uri`` (atomically) and logs
    them to MLflow. ``sampler`` replaces generation (tests); default: :func:`generation_sampler`.
    """
    with tracking.stage_run(cfg, "privacy-gate", tags={"medisyn.model_uri": str(model_uri)}):
        return _privacy_gate(cfg, model_uri, dataset_uri, out_uri, sampler)


def _privacy_gate(cfg, model_uri, dataset_uri, out_uri, sampler):
    """The phases in order; the scratch directory (synthetic and reference PNGs) goes whatever happens."""
    from medisyn.models.biomedclip import load_biomedclip
    from medisyn.models.sdxl import resolve_device

    prompts, prompt_source = resolve_prompts(cfg, dataset_uri)
    if sampler is None:
        sampler = generation_sampler(cfg, model_uri)
    device = resolve_device(cfg.runtime)
    clip, preprocess = load_biomedclip(cfg.models.biomedclip, device)

    scratch = storage.scratch_dir("privacy")  # named with its owner: a later run removes it if this one is killed
    try:
        synth = _generate(cfg, sampler, prompts, clip, preprocess, scratch)
        matches = _match(cfg, dataset_uri, prompts, synth, clip, preprocess, device, scratch)
        measured = _measure(cfg, dataset_uri, matches, scratch)
        passed, reasons, metrics = _decide(cfg, measured.distances, matches.best_sim, len(prompts))
        evidence = _report(cfg, model_uri, dataset_uri, prompt_source, prompts, synth, matches, measured,
                           {"gate": GATE, "passed": passed, "reasons": reasons, "metrics": metrics})
        return _publish(cfg, out_uri, scratch, prompts, synth, matches, measured, evidence)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


@dataclass(frozen=True)
class _Synthetic:
    """The generated images (spilled to scratch as ``synth-<index>.png``) and their embeddings."""

    jobs: list[tuple[int, PrivacyPrompt, int]]  # per image: (prompt index, prompt, image number)
    seeds: list[int]  # per image: its generation seed
    embeddings: np.ndarray  # per image: BiomedCLIP unit vector


def _generate(cfg: RunConfig, sampler, prompts: list[PrivacyPrompt], clip, preprocess, scratch: Path) -> _Synthetic:
    """1. Generate ``privacy.images_per_prompt`` images per prompt, spill them to disk, embed them."""
    from medisyn.models.biomedclip import image_embeddings

    pc = cfg.privacy
    jobs = [
        (i, p, pc.images_per_prompt * i + k) for i, p in enumerate(prompts) for k in range(pc.images_per_prompt)
    ]
    seeds = [cfg.runtime.seed * 1_000_003 + j for _, _, j in jobs]  # one distinct seed per image
    synth_emb = np.zeros((len(jobs), 0), dtype=np.float32)
    chunks = []
    prog = Progress(len(jobs), "privacy: generate", unit="img")
    done = 0
    batch = max(1, cfg.sampling.batch_size)
    for images in sample_in_batches(sampler, [prompts[i].prompt for i, _, _ in jobs], seeds, batch):
        for k, im in enumerate(images):
            im.convert("RGB").save(scratch / f"synth-{done + k:07d}.png")
        chunks.append(image_embeddings(clip, preprocess, images, pc.batch_size))
        done += len(images)
        prog.update(len(images))
    prog.close()
    return _Synthetic(jobs, seeds, np.concatenate(chunks) if chunks else synth_emb)


@dataclass(frozen=True)
class _Matches:
    """The nearest training image of every synthetic image and of the calibrated reference's test images."""

    group_of: np.ndarray  # per synthetic image: "<specialty>\x00<image type>"
    best_row: np.ndarray  # per synthetic image: row of its nearest training image
    best_sim: np.ndarray  # per synthetic image: its cosine similarity (eq. 2)
    ref_group: list[str]  # per reference image: its group key
    ref_test_row: list[int]  # per reference image: its test-split row (scratch: ref-<row>.png)
    ref_best_sim: list[float]
    ref_best_row: list[int]
    n_searched: dict[str, int]  # training images searched per "<specialty>/<image type>"
    embeddings_info: dict[str, Any]  # the training embeddings' store and the search (report.json)


def _match(cfg: RunConfig, dataset_uri: str, prompts: list[PrivacyPrompt], synth: _Synthetic, clip, preprocess,
           device, scratch: Path) -> _Matches:
    """2. The nearest real training neighbour of every synthetic image, group by group.

    The training split's embeddings come from the store inside the dataset prefix when a verified
    copy is there (medisyn.evaluate.embeddings: keyed by dataset hash and model identity), else one
    pass over the train split embeds every prompted group and stores them. The search is exact and
    chunked, in torch on the configured device (medisyn.evaluate.search).
    """
    from medisyn.data import dataset_hash
    from medisyn.evaluate.embeddings import TrainEmbeddings, train_group_rows
    from medisyn.evaluate.embeddings import model_identity as embedding_identity
    from medisyn.evaluate.search import nearest_neighbours
    from medisyn.models.biomedclip import image_embeddings

    pc = cfg.privacy
    n = len(synth.jobs)
    best_sim = np.full(n, -np.inf, dtype=np.float32)
    best_row = np.full(n, -1, dtype=np.int64)
    group_of = np.array([f"{prompts[i].specialty}\x00{prompts[i].image_type}" for i, _, _ in synth.jobs])
    keys = sorted(set(group_of))
    groups: list[tuple[str, str]] = [(k.split("\x00")[0], k.split("\x00")[1]) for k in keys]
    group_rows = train_group_rows(dataset_uri, groups)
    for spec, itype in groups:
        if len(group_rows[(spec, itype)]) == 0:
            raise ValueError(f"no training images of {spec}/{itype} to search")
    store = TrainEmbeddings(
        dataset_uri, dataset_hash(dataset_uri), embedding_identity(cfg.models.biomedclip, clip, preprocess),
        scratch / "train-embeddings", lambda ims: image_embeddings(clip, preprocess, ims, pc.batch_size),
        pc.batch_size, str(device))
    train_emb = store.prepare(group_rows)
    n_searched: dict[str, int] = {}
    # The calibrated reference (report only, never the decision): held-out real TEST images of the
    # group, as many as it has synthetic images, searched against the same training images with the
    # same embedding and distance: what "a different patient" looks like on this scale.
    ref_group: list[str] = []
    ref_test_row: list[int] = []
    ref_best_sim: list[float] = []
    ref_best_row: list[int] = []
    second_pass = 0
    for key, group in zip(keys, groups, strict=True):
        spec, itype = group
        members = np.flatnonzero(group_of == key)
        r_rows, r_emb = _embed_reference(cfg, dataset_uri, spec, itype, len(members), scratch, clip, preprocess)
        queries = np.concatenate([synth.embeddings[members], r_emb]) if len(r_rows) else synth.embeddings[members]
        # unit vectors: dot product = cosine similarity (eq. 2)
        rows, sims, refined = nearest_neighbours(queries, train_emb[group].chunks, device)
        second_pass += refined
        best_row[members] = rows[:len(members)]
        best_sim[members] = sims[:len(members)].astype(np.float32)
        ref_group += [key] * len(r_rows)
        ref_test_row += list(r_rows)
        ref_best_sim += sims[len(members):].astype(np.float32).tolist()
        ref_best_row += rows[len(members):].tolist()
        n_searched[f"{spec}/{itype}"] = train_emb[group].count
    embeddings_info = {
        "where": store.root_uri, "model_digest": store.identity_digest, "dataset_hash": store.dataset_hash,
        "reused": all(g.status == "reused" for g in train_emb.values()),
        "images_embedded": store.images_embedded,
        "groups": {f"{s}/{t}": g.summary() for (s, t), g in sorted(train_emb.items())},
        "search": {"device": str(device), "queries_needing_second_pass": second_pass},
    }
    log.info("privacy: train embeddings %s (%d images embedded by this run) at %s",
             "reused" if embeddings_info["reused"] else "computed", store.images_embedded, store.root_uri)
    return _Matches(group_of, best_row, best_sim, ref_group, ref_test_row, ref_best_sim, ref_best_row, n_searched,
                    embeddings_info)


@dataclass(frozen=True)
class _Measured:
    """Patch distances (eq. 3) of the matched pairs, and the pairs kept for the report."""

    distances: np.ndarray  # per synthetic image
    real_hash: list[str]  # per synthetic image: image_hash of its nearest training image
    closest: list[tuple[float, int, np.ndarray]]  # the CLOSEST_PAIRS closest: (distance, index, real RGB array)
    ref_distances: np.ndarray  # per reference image (NaN: not measured)
    ref_real_hash: list[str]
    kept: _PairThumbnails  # the closest and flagged pairs' thumbnails


def _measure(cfg: RunConfig, dataset_uri: str, matches: _Matches, scratch: Path) -> _Measured:
    """3. Patch distances: fetch only the matched real rows, group by group."""
    from PIL import Image

    pc = cfg.privacy
    group_of, n = matches.group_of, len(matches.group_of)
    distances = np.full(n, np.nan)
    real_hash = [""] * n
    closest: list[tuple[float, int, np.ndarray]] = []
    ref_distances = np.full(len(matches.ref_test_row), np.nan)
    ref_real_hash = [""] * len(matches.ref_test_row)
    kept = _PairThumbnails(scratch, pc.distance_threshold)  # the report's closest and flagged pairs
    for key in sorted(set(group_of)):
        spec, itype = key.split("\x00")
        wanted: dict[int, list[int]] = {}
        for member in np.flatnonzero(group_of == key):
            wanted.setdefault(int(matches.best_row[member]), []).append(int(member))
        ref_wanted: dict[int, list[int]] = {}
        for k, (g, r) in enumerate(zip(matches.ref_group, matches.ref_best_row, strict=True)):
            if g == key:
                ref_wanted.setdefault(int(r), []).append(k)
        for ids, cols in iter_rows(dataset_uri, "train", ["image", "image_hash"], pc.batch_size,
                                   where={"specialty": spec, "image_type": itype}):
            for row, png, h in zip(ids, cols["image"], cols["image_hash"], strict=True):
                if int(row) not in wanted and int(row) not in ref_wanted:
                    continue
                real_im = decode_png(png)
                real_arr = _to_rgb_array(real_im)
                for idx in wanted.get(int(row), []):
                    # a synthetic image at another resolution is resized to the real one (docs/gates.md)
                    synth_arr = _to_rgb_array(Image.open(scratch / f"synth-{idx:07d}.png"), real_im.size)
                    distances[idx] = patch_distance(real_arr, synth_arr, pc.patch_size)
                    real_hash[idx] = h
                    # keep the real side of the CLOSEST_PAIRS closest pairs only, for the figure
                    closest.append((distances[idx], idx, real_arr))
                    closest = heapq.nsmallest(CLOSEST_PAIRS, closest, key=lambda t: (t[0], t[1]))
                    kept.offer(spec, idx, float(distances[idx]), real_im)
                for k in ref_wanted.get(int(row), []):
                    test_png = scratch / f"ref-{matches.ref_test_row[k]:09d}.png"
                    test_arr = _to_rgb_array(Image.open(test_png), real_im.size)
                    ref_distances[k] = patch_distance(real_arr, test_arr, pc.patch_size)
                    ref_real_hash[k] = h
    if np.isnan(distances).any():
        raise RuntimeError("some nearest neighbours could not be read back from the train split")
    return _Measured(distances, real_hash, closest, ref_distances, ref_real_hash, kept)


def _decide(cfg: RunConfig, distances: np.ndarray, best_sim: np.ndarray,
            n_prompts: int) -> tuple[bool, list[str], dict[str, Any]]:
    """4. Statistics and the decision (section 4.4): (passed, reasons, metrics)."""
    pc = cfg.privacy
    n, thr = len(distances), pc.distance_threshold
    p_value = wilcoxon_above_threshold(distances, thr)
    below = distances <= thr
    fraction_below = float(below.mean())
    reasons: list[str] = []
    if n < pc.min_pairs:  # no evidence, no approval (issue #12: too few samples is a stated failure)
        reasons.append(f"too few samples: {n} synthetic-real pairs < privacy.min_pairs={pc.min_pairs}")
    if not p_value < pc.alpha:
        reasons.append(f"Wilcoxon p={p_value:.3g} >= alpha={pc.alpha}: distances not shown to exceed {thr}")
    if fraction_below > pc.max_fraction_below:
        reasons.append(
            f"{int(below.sum())}/{n} synthetic images ({fraction_below:.2%}) are at or below distance {thr} of a"
            f" training image (allowed {pc.max_fraction_below:.2%}): potential memorization, inspect pairs"
        )
    passed = not reasons
    if passed:
        reasons.append(f"Wilcoxon p={p_value:.3g} < {pc.alpha} and {fraction_below:.2%} of pairs at/below {thr}")
    metrics = {
        "n_pairs": n,
        "n_prompts": n_prompts,
        "wilcoxon_p": p_value,
        "fraction_below": fraction_below,
        "n_below": int(below.sum()),
        "distance_min": float(distances.min()),
        "distance_median": float(np.median(distances)),
        "distance_mean": float(distances.mean()),
        "similarity_mean": float(best_sim.mean()),
    }
    return passed, reasons, metrics


@dataclass(frozen=True)
class _Evidence:
    """What the gate publishes besides the figures and thumbnails."""

    report: dict[str, Any]  # report.json
    pairs: list[dict]  # pairs.jsonl: every synthetic image and its nearest training image
    reference_pairs: list[dict]  # reference.jsonl: the calibrated reference's measured pairs
    reference_distances: np.ndarray  # their distances (the histogram's reference)


def _report(cfg: RunConfig, model_uri: str, dataset_uri: str, prompt_source: str, prompts: list[PrivacyPrompt],
            synth: _Synthetic, matches: _Matches, measured: _Measured, verdict: dict[str, Any]) -> _Evidence:
    """5. report.json (``verdict``: gate, passed, reasons, metrics; then per prompt, per specialty as
    Table 1, the calibrated reference), the pairs and the reference pairs."""
    pc, jobs, seeds = cfg.privacy, synth.jobs, synth.seeds
    distances, best_sim, best_row = measured.distances, matches.best_sim, matches.best_row
    n, thr = len(distances), pc.distance_threshold
    per_prompt = []
    for i, p in enumerate(prompts):
        sel = np.array([j for j, (pi, _, _) in enumerate(jobs) if pi == i])
        d = distances[sel]
        per_prompt.append({
            "prompt": p.prompt, "specialty": p.specialty, "image_type": p.image_type, "n": int(len(d)),
            "distance_min": float(d.min()), "distance_median": float(np.median(d)),
            "fraction_below": float((d <= thr).mean()), "wilcoxon_p": wilcoxon_above_threshold(d, thr),
        })
    pairs = [
        {"synthetic": idx, "prompt": prompts[jobs[idx][0]].prompt, "seed": seeds[idx],
         "real_row": int(best_row[idx]), "real_image_hash": measured.real_hash[idx],
         "cosine_similarity": float(best_sim[idx]), "distance": float(distances[idx]),
         "specialty": prompts[jobs[idx][0]].specialty, "image_type": prompts[jobs[idx][0]].image_type}
        for idx in range(n)
    ]
    # Table 1 of the paper, per specialty, and the same rows for the calibrated reference
    spec_of = np.array([prompts[i].specialty for i, _, _ in jobs])
    ref_group, ref_distances = matches.ref_group, measured.ref_distances
    ref_spec = np.array([g.split("\x00")[0] for g in ref_group], dtype=str)
    reference_pairs = [
        {"test_row": matches.ref_test_row[k], "real_row": int(matches.ref_best_row[k]),
         "real_image_hash": measured.ref_real_hash[k],
         "specialty": ref_group[k].split("\x00")[0], "image_type": ref_group[k].split("\x00")[1],
         "cosine_similarity": float(matches.ref_best_sim[k]), "distance": float(ref_distances[k])}
        for k in range(len(matches.ref_test_row)) if np.isfinite(ref_distances[k])
    ]
    ref_d = np.array([r["distance"] for r in reference_pairs], dtype=np.float64)
    report = {
        **verdict,
        "model_uri": str(model_uri), "dataset_uri": str(dataset_uri), "prompt_source": prompt_source,
        "config": pc.model_dump(mode="json"), "train_images_searched": matches.n_searched, "per_prompt": per_prompt,
        "per_specialty": {sp: distance_summary(distances[spec_of == sp], thr) for sp in sorted(set(spec_of))},
        "reference": {
            "what": "held-out real test images to their nearest training image (same specialty and image type,"
                    " same BiomedCLIP search, same patch distance); reported, never part of the decision",
            "split": "test", "pairs_file": "reference.jsonl", "pooled": distance_summary(ref_d, thr),
            "per_specialty": {sp: distance_summary(ref_d[ref_spec[np.isfinite(ref_distances)] == sp], thr)
                              for sp in sorted(set(spec_of))},
        },
        "evidence": {"samples": "samples.json", "pair_images": "pair_images.json", "pairs": "pairs.jsonl"},
        "train_embeddings": matches.embeddings_info,
    }
    return _Evidence(report, pairs, reference_pairs, ref_d)


def _publish(cfg: RunConfig, out_uri: str, scratch: Path, prompts: list[PrivacyPrompt], synth: _Synthetic,
             matches: _Matches, measured: _Measured, evidence: _Evidence) -> GateResult:
    """6. The report, figures and evidence, published atomically, then logged to MLflow."""
    report, pairs, reference_pairs = evidence.report, evidence.pairs, evidence.reference_pairs
    passed, metrics, thr = report["passed"], report["metrics"], cfg.privacy.distance_threshold
    figures: list[str] = []
    with storage.staged_dir(out_uri, {"gate": GATE, "passed": passed}) as d:
        histogram = _histogram(measured.distances, thr, evidence.reference_distances)
        figures.append(save_figure(histogram, d, "privacy_distance_histogram.png"))
        figures.append(save_figure(_pair_grid(scratch, measured.closest, matches.best_sim), d,
                                   "privacy_closest_pairs.png"))
        (d / "report.json").write_text(json.dumps(report, indent=2, default=str) + "\n")
        (d / "pairs.jsonl").write_text("".join(json.dumps(p) + "\n" for p in pairs))
        (d / "reference.jsonl").write_text("".join(json.dumps(r) + "\n" for r in reference_pairs))
        _write_samples(d, scratch, synth.jobs, prompts, synth.seeds)
        measured.kept.write(d, pairs)
    tracking.log_json(report, "gates/privacy_report.json")
    log_metrics("privacy", metrics)
    pooled_ref = report["reference"]["pooled"]
    log_metrics("privacy.reference", {k: v for k, v in pooled_ref.items() if v is not None})
    return GateResult(
        gate=GATE, passed=passed, metrics=metrics, reasons=tuple(report["reasons"]),
        report_uri=storage.join(storage.normalize(out_uri), "report.json"),
        figures=tuple(storage.join(storage.normalize(out_uri), f) for f in figures),
    )


def _embed_reference(cfg: RunConfig, dataset_uri: str, spec: str, itype: str, n: int, scratch: Path,
                     clip, preprocess) -> tuple[list[int], np.ndarray]:
    """Row ids and BiomedCLIP embeddings of up to ``n`` test-split images of one group, drawn at random
    (``runtime.seed``); the PNGs are spilled to ``scratch`` as ``ref-<row>.png``. None: ([], empty)."""
    from medisyn.models.biomedclip import image_embeddings

    where = {"specialty": spec, "image_type": itype}
    rows = [int(r) for ids, _ in iter_rows(dataset_uri, "test", [], 8192, where=where) for r in ids]
    if not rows or n <= 0:
        return [], np.zeros((0, 0), dtype=np.float32)
    rng = np.random.default_rng(cfg.runtime.seed)
    chosen = set(rng.choice(np.array(rows), size=min(n, len(rows)), replace=False).tolist())
    out_rows: list[int] = []
    chunks = []
    for ids, cols in iter_rows(dataset_uri, "test", ["image"], cfg.privacy.batch_size, where=where):
        keep = [(int(r), b) for r, b in zip(ids, cols["image"], strict=True) if int(r) in chosen]
        if not keep:
            continue
        for r, b in keep:
            (scratch / f"ref-{r:09d}.png").write_bytes(b)  # the column holds PNG bytes already
        chunks.append(image_embeddings(clip, preprocess, [decode_png(b) for _, b in keep], cfg.privacy.batch_size))
        out_rows += [r for r, _ in keep]
    return out_rows, np.concatenate(chunks)


