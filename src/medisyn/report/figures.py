"""The report's figures, drawn from the persisted evidence with matplotlib (Agg) as PNG bytes."""

from __future__ import annotations

import io
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

ARM_LABELS = {
    "real_full": "(i) real",
    "real_half": "(ii) real subset",
    "real_plus_synthetic": "(iii) subset + synthetic",
}


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def png(fig) -> bytes:
    """The figure as PNG bytes; closes it."""
    plt = _plt()
    buf = io.BytesIO()
    try:
        fig.savefig(buf, format="png", dpi=100, bbox_inches="tight")
    finally:
        plt.close(fig)
    return buf.getvalue()


def fid_curve(fid_by_epoch: Mapping[int, float], n: int, best_epoch: int | None,
              small: Mapping[int, float] | None = None, small_n: int | None = None) -> bytes:
    """FID per epoch at N real vs N synthetic (and the successive-halving small-N curve)."""
    from matplotlib.ticker import MaxNLocator

    fig, ax = _plt().subplots(figsize=(6, 3.6))
    if small:
        e = sorted(small)
        ax.plot(e, [small[k] for k in e], "o--", color="0.6", label=f"N={small_n} real vs {small_n} synthetic")
    e = sorted(fid_by_epoch)
    ax.plot(e, [fid_by_epoch[k] for k in e], "o-", color="tab:blue", label=f"N={n} real vs {n} synthetic")
    if best_epoch is not None and best_epoch in fid_by_epoch:
        ax.plot([best_epoch], [fid_by_epoch[best_epoch]], "*", color="tab:red", markersize=14,
                label=f"selected: epoch {best_epoch}")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("epoch")
    ax.set_ylabel("FID (lower is better)")
    ax.set_title("FID per epoch (section 4.2)")
    ax.legend(fontsize=8)
    return png(fig)


def distance_histograms(synthetic: Mapping[str, Sequence[float]], reference: Mapping[str, Sequence[float]],
                        threshold: float) -> bytes:
    """One panel per specialty: synthetic-to-nearest-train distances (bars) next to the calibrated
    reference, held-out real test images to their nearest training image (outline), as densities."""
    specs = sorted(synthetic)
    cols = min(3, max(1, len(specs)))
    rows = -(-max(1, len(specs)) // cols)
    fig, axes = _plt().subplots(rows, cols, figsize=(4.2 * cols, 3.2 * rows), squeeze=False)
    for ax, spec in zip(axes.ravel(), specs, strict=False):
        syn = np.asarray(synthetic[spec], dtype=float)
        ref = np.asarray(reference.get(spec, []), dtype=float)
        both = np.concatenate([syn, ref, [threshold]])
        bins = np.linspace(max(0.0, both.min() - 0.02), min(1.0, both.max() + 0.02), 25).tolist()
        ax.hist(syn, bins=bins, density=True, color="tab:blue", alpha=0.7, label=f"synthetic (n={len(syn)})")
        if len(ref):
            ax.hist(ref, bins=bins, density=True, histtype="step", color="black", linewidth=1.6,
                    label=f"reference: test->train (n={len(ref)})")
        ax.axvline(threshold, color="tab:red", linestyle="--", label=f"threshold {threshold}")
        ax.set_title(spec, fontsize=10)
        ax.set_xlabel("normalized patch distance (eq. 3)")
        ax.set_ylabel("density")
        ax.legend(fontsize=7)
    for ax in axes.ravel()[len(specs):]:
        ax.axis("off")
    fig.tight_layout()
    return png(fig)


def roc_curves(task: str, arrays: Mapping[str, np.ndarray], aurocs: Mapping[str, Mapping[str, Any]]) -> bytes:
    """Figure 5 for one task: one panel per training set, a ROC curve per class plus the macro average."""
    from sklearn.metrics import roc_curve

    y = np.asarray(arrays["y_true"]).astype(bool)
    classes = [str(c) for c in arrays["classes"]]
    arms = [a for a in ARM_LABELS if a in arrays]
    fig, axes = _plt().subplots(1, len(arms), figsize=(4.2 * len(arms), 4.2), squeeze=False)
    grid = np.linspace(0, 1, 201)
    for ax, arm in zip(axes[0], arms, strict=True):
        s = np.asarray(arrays[arm], dtype=float)
        tprs = []
        for k, c in enumerate(classes):
            if 0 < y[:, k].sum() < len(y):
                fpr, tpr, _ = roc_curve(y[:, k], s[:, k])
                tprs.append(np.interp(grid, fpr, tpr))
                a = aurocs.get(arm, {}).get(c)
                ax.plot(fpr, tpr, linewidth=1.2, label=f"{c}: {a:.3f}" if a is not None else c)
        if tprs:
            ax.plot(grid, np.mean(tprs, axis=0), color="black", linewidth=2.2, label="macro average")
        ax.plot([0, 1], [0, 1], color="grey", linestyle=":")
        ax.set_title(f"{task}: {ARM_LABELS[arm]}", fontsize=10)
        ax.set_xlabel("FPR")
        ax.set_ylabel("TPR")
        ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    return png(fig)


def recognisability_bars(task: str, rows: Sequence[Mapping[str, Any]], chance: float) -> bytes:
    """Per class: accuracy of the real-trained classifier on real test vs synthetic images, with chance."""
    classes = [r["class"] for r in rows]
    x = np.arange(len(classes))
    real = [r["real_accuracy"] if r["real_accuracy"] is not None else np.nan for r in rows]
    syn = [r["synthetic_accuracy"] if r["synthetic_accuracy"] is not None else np.nan for r in rows]
    fig, ax = _plt().subplots(figsize=(max(4.5, 1.4 * len(classes) + 2), 3.4))
    ax.bar(x - 0.2, real, 0.4, color="tab:gray", label="real test images")
    ax.bar(x + 0.2, syn, 0.4, color="tab:orange", label="synthetic images")
    ax.axhline(chance, color="tab:red", linestyle="--", label=f"chance {chance:.2f}")
    ax.set_xticks(x, classes, rotation=15, fontsize=8)
    ax.set_ylim(0, 1.05)
    ax.set_ylabel("accuracy")
    ax.set_title(f"{task}: recognised by the real-trained classifier", fontsize=10)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.tight_layout()
    return png(fig)
