"""The privacy gate's evidence for the evaluation report (docs/report.md), written beside report.json:
sample thumbnails per prompt, thumbnails of the closest and flagged pairs, and the two figures."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from medisyn.evaluate.privacy_prompts import PrivacyPrompt

SAMPLES_PER_PROMPT = 4  # synthetic images kept per prompt (samples/): the sample grids per specialty and class
CLOSEST_PER_SPECIALTY = 4  # closest pairs kept as thumbnails per specialty (pairs/)
MAX_FLAGGED_THUMBNAILS = 32  # flagged pairs (d <= threshold) kept as thumbnails per specialty (pairs.jsonl lists all):
# 6 specialties x (4 closest + 32 flagged) x 2 images of <= 256 px keep the page at tens of MB at worst
THUMBNAIL_SIZE = 256  # px, longest side of a kept image (images are never upscaled)


def _thumbnail(im):
    """A copy no larger than THUMBNAIL_SIZE on its longest side (never upscaled), RGB."""
    from PIL import Image

    im = im.convert("RGB")
    if max(im.size) > THUMBNAIL_SIZE:
        im.thumbnail((THUMBNAIL_SIZE, THUMBNAIL_SIZE), Image.Resampling.LANCZOS)
    return im


def _write_samples(d: Path, scratch: Path, jobs: list, prompts: list[PrivacyPrompt], seeds: list[int]) -> None:
    """``samples/`` + ``samples.json``: the first SAMPLES_PER_PROMPT synthetic images of every prompt
    (one prompt per specialty and class), for the report's sample grids."""
    from PIL import Image

    (d / "samples").mkdir()
    index: list[dict] = []
    taken: dict[int, int] = {}
    for idx, (i, _, _) in enumerate(jobs):
        taken[i] = taken.get(i, 0) + 1
        if taken[i] > SAMPLES_PER_PROMPT:
            continue
        name = f"samples/synthetic-{idx:07d}.png"
        _thumbnail(Image.open(scratch / f"synth-{idx:07d}.png")).save(d / name)
        index.append({"file": name, "synthetic": idx, "prompt": prompts[i].prompt, "seed": seeds[idx],
                      "specialty": prompts[i].specialty, "image_type": prompts[i].image_type})
    (d / "samples.json").write_text(json.dumps(index, indent=1) + "\n")


class _PairThumbnails:
    """The pairs the report shows as images: the CLOSEST_PER_SPECIALTY closest of each specialty and
    every flagged pair (d <= threshold) up to MAX_FLAGGED_THUMBNAILS per specialty. The real side is
    saved (as a thumbnail) to scratch while the matched training image is in hand, so no extra pass
    over the training split is needed."""

    def __init__(self, scratch: Path, threshold: float):
        self.scratch, self.threshold = scratch, threshold
        self.closest: dict[str, list[tuple[float, int]]] = {}
        self.flagged: dict[str, list[int]] = {}

    def offer(self, spec: str, idx: int, distance: float, real_im) -> None:
        near = self.closest.setdefault(spec, [])
        flag = distance <= self.threshold and len(self.flagged.setdefault(spec, [])) < MAX_FLAGGED_THUMBNAILS
        enters = len(near) < CLOSEST_PER_SPECIALTY or (distance, idx) < max(near)
        if not (flag or enters):
            return
        _thumbnail(real_im).save(self.scratch / f"real-{idx:07d}.png")
        if flag:
            self.flagged[spec].append(idx)
        if enters:
            near.append((distance, idx))
            near.sort()
            del near[CLOSEST_PER_SPECIALTY:]

    def write(self, d: Path, pairs: list[dict]) -> None:
        """``pairs/`` (synthetic | nearest training image thumbnails) + ``pair_images.json``."""
        from PIL import Image

        (d / "pairs").mkdir()
        index = []
        for spec in sorted(set(self.closest) | set(self.flagged)):
            rank = {idx: r for r, (_, idx) in enumerate(self.closest.get(spec, []))}
            for idx in sorted(set(rank) | set(self.flagged.get(spec, [])), key=lambda i: (pairs[i]["distance"], i)):
                synth, real = f"pairs/{idx:07d}-synthetic.png", f"pairs/{idx:07d}-real.png"
                _thumbnail(Image.open(self.scratch / f"synth-{idx:07d}.png")).save(d / synth)
                Image.open(self.scratch / f"real-{idx:07d}.png").save(d / real)
                index.append(pairs[idx] | {"closest_rank": rank.get(idx), "flagged": idx in self.flagged.get(spec, []),
                                           "synthetic_file": synth, "real_file": real})
        (d / "pair_images.json").write_text(json.dumps(index, indent=1) + "\n")


def _histogram(distances: np.ndarray, threshold: float, reference: np.ndarray | None = None):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    bins = np.histogram_bin_edges(np.concatenate([distances, reference if reference is not None else []]),
                                  bins=min(50, max(5, len(distances) // 4))).tolist()
    ax.hist(distances, bins=bins, color="tab:blue", alpha=0.8, label="synthetic to nearest train")
    if reference is not None and len(reference):
        ax.hist(reference, bins=bins, histtype="step", color="black", linewidth=1.5,
                label="reference: real test to nearest train")
    ax.axvline(threshold, color="tab:red", linestyle="--", label=f"threshold {threshold}")
    ax.set_xlabel("max normalized patch distance to nearest training image (eq. 3)")
    ax.set_ylabel("image pairs")
    ax.set_title("Privacy gate: nearest-neighbour distances")
    ax.legend()
    return fig


def _pair_grid(scratch: Path, closest: list[tuple[float, int, np.ndarray]], sims: np.ndarray):
    """The closest real/synthetic pairs: real on top, synthetic below, distance and similarity above."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from PIL import Image

    cols = max(1, len(closest))
    fig, axes = plt.subplots(2, cols, figsize=(2 * cols, 4.4), squeeze=False)
    for c, (dist, idx, real_arr) in enumerate(closest):
        axes[0, c].imshow(real_arr)
        axes[1, c].imshow(Image.open(scratch / f"synth-{idx:07d}.png"))
        axes[0, c].set_title(f"d={dist:.3f}\ncos={sims[idx]:.3f}", fontsize=8)
    for ax in axes.ravel():
        ax.axis("off")
    axes[0, 0].text(-0.1, 0.5, "real", transform=axes[0, 0].transAxes, rotation=90, va="center", ha="right")
    axes[1, 0].text(-0.1, 0.5, "synthetic", transform=axes[1, 0].transAxes, rotation=90, va="center", ha="right")
    fig.suptitle("Closest synthetic/real pairs")
    return fig
