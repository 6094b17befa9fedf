"""The utility gate's metrics (paper section 4.4): macro AUROC and its paired bootstrap difference,
per-class AUROC and accuracy, and the recognisability and synthetic-signal checks (issue #11).

Pure numpy on labels and scores; ``medisyn.evaluate.utility`` trains the classifiers, calls these on
their test-set scores and re-exports the names.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from medisyn.evaluate.binomial import RECOGNISABILITY_CONFIDENCE, accuracy_lower_bound


def _binary_auroc(y: np.ndarray, s: np.ndarray) -> float:
    """AUROC = Mann-Whitney U / (n_pos * n_neg), ties counted one half (average ranks); equals
    sklearn's roc_auc_score, but cheap enough for 2,000 bootstrap resamples."""
    from scipy.stats import rankdata

    pos = y.astype(bool)
    n_pos = int(pos.sum())
    n_neg = len(y) - n_pos
    ranks = rankdata(s)
    return float((ranks[pos].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def _indicator(y_true: np.ndarray, n_classes: int, multilabel: bool) -> np.ndarray:
    y = np.asarray(y_true)
    if multilabel:
        if y.ndim != 2 or y.shape[1] != n_classes:
            raise ValueError(f"multi-label y_true must be (n, {n_classes}) indicators, got shape {y.shape}")
        return y.astype(bool)
    if y.ndim == 2:  # one-hot
        if y.shape[1] != n_classes or not np.all(y.sum(axis=1) == 1):
            raise ValueError("multi-class y_true given as a matrix must be one-hot with one column per class")
        return y.astype(bool)
    if y.ndim != 1:
        raise ValueError(f"multi-class y_true must be class indices (n,), got shape {y.shape}")
    if y.size and (y.min() < 0 or y.max() >= n_classes):
        raise ValueError(f"class indices must lie in 0..{n_classes - 1}")
    return np.eye(n_classes, dtype=bool)[y.astype(int)]


def macro_auroc(y_true: np.ndarray, scores: np.ndarray, multilabel: bool) -> float:
    """Macro-averaged AUROC (section 4.3.5): the unweighted mean over classes of the one-vs-rest
    (multi-class) or per-label (multi-label) AUROC.

    ``y_true``: class indices (n,) or one-hot (n, K) for multi-class; indicators (n, K) for
    multi-label. ``scores``: (n, K). A class without both positives and negatives in ``y_true`` has
    no AUROC and is left out of the mean (it can happen in a bootstrap resample); if no class
    qualifies the AUROC is undefined and a ValueError is raised.
    """
    s = np.asarray(scores, dtype=np.float64)
    if s.ndim != 2:
        raise ValueError(f"scores must be (n, K), got shape {s.shape}")
    y = _indicator(y_true, s.shape[1], multilabel)
    if y.shape[0] != s.shape[0]:
        raise ValueError(f"{y.shape[0]} labels but {s.shape[0]} score rows")
    per_class = [_binary_auroc(y[:, k], s[:, k]) for k in range(s.shape[1]) if 0 < y[:, k].sum() < len(y)]
    if not per_class:
        raise ValueError("macro AUROC undefined: no class has both positive and negative examples")
    return float(np.mean(per_class))


def bootstrap_auroc_difference(
    y_true: np.ndarray,
    scores_a: np.ndarray,
    scores_b: np.ndarray,
    n_resamples: int = 2000,
    ci_level: float = 0.95,
    seed: int = 0,
    multilabel: bool | None = None,
) -> tuple[float, float, float]:
    """(diff, lo, hi): macro AUROC(a) - AUROC(b) on the test set and its percentile bootstrap CI.

    Section 4.4: the test set is resampled with replacement at its original size ``n_resamples``
    times (2,000); both classifiers are scored on the SAME resample (a paired bootstrap) and the
    ``ci_level`` interval is read off the percentiles of the resampled differences. ``multilabel``
    defaults to "y_true is a 2-D indicator matrix". ``n_resamples=0`` gives lo = hi = diff.
    """
    y = np.asarray(y_true)
    a, b = np.asarray(scores_a, dtype=np.float64), np.asarray(scores_b, dtype=np.float64)
    if a.shape != b.shape:
        raise ValueError(f"scores differ in shape: {a.shape} vs {b.shape}")
    if not 0 < ci_level < 1:
        raise ValueError(f"ci_level must lie in (0, 1), got {ci_level}")
    if n_resamples < 0:
        raise ValueError(f"n_resamples must be >= 0, got {n_resamples}")
    if multilabel is None:
        multilabel = y.ndim == 2
    diff = macro_auroc(y, a, multilabel) - macro_auroc(y, b, multilabel)
    if n_resamples == 0:
        return diff, diff, diff
    rng = np.random.default_rng(seed)
    n = len(y)
    diffs = []
    for _ in range(n_resamples):
        idx = rng.integers(0, n, n)
        try:
            diffs.append(macro_auroc(y[idx], a[idx], multilabel) - macro_auroc(y[idx], b[idx], multilabel))
        except ValueError:  # a degenerate resample (one class only): no AUROC to compare
            continue
    if len(diffs) < n_resamples / 2:
        raise ValueError(f"only {len(diffs)}/{n_resamples} bootstrap resamples had a defined AUROC: test set too small")
    tail = (1 - ci_level) / 2 * 100
    lo, hi = np.percentile(diffs, [tail, 100 - tail])
    return float(diff), float(lo), float(hi)


def per_class_auroc(y_true: np.ndarray, scores: np.ndarray, classes: Sequence[str],
                    multilabel: bool) -> dict[str, float | None]:
    """One-vs-rest (multi-label: per-label) AUROC of each class; None for a class lacking positives or
    negatives. Their unweighted mean over the defined ones is :func:`macro_auroc` (Figure 5's legends)."""
    s = np.asarray(scores, dtype=np.float64)
    y = _indicator(y_true, len(classes), multilabel)
    return {c: (_binary_auroc(y[:, k], s[:, k]) if 0 < y[:, k].sum() < len(y) else None)
            for k, c in enumerate(classes)}


def per_class_accuracy(y_true: np.ndarray, scores: np.ndarray, n_classes: int,
                       multilabel: bool) -> tuple[np.ndarray, np.ndarray]:
    """(accuracy, n) per class: of the ``n`` images that carry class k, the share the classifier
    assigns to k. Multi-class: the arg-max class is k; multi-label: label k's probability is at least
    0.5 (per-label sensitivity). NaN where ``n`` is 0."""
    s = np.asarray(scores, dtype=np.float64)
    y = _indicator(y_true, n_classes, multilabel)
    if s.shape != y.shape:
        raise ValueError(f"scores {s.shape} do not match {y.shape[0]} labels of {n_classes} classes")
    if multilabel:
        pred = s >= 0.5
    else:
        pred = np.zeros_like(y)
        pred[np.arange(len(s)), s.argmax(axis=1) if len(s) else np.zeros(0, dtype=int)] = True
    n = y.sum(axis=0).astype(int)
    hits = (pred & y).sum(axis=0)
    with np.errstate(invalid="ignore", divide="ignore"):
        acc = np.where(n > 0, hits / np.maximum(n, 1), np.nan)
    return acc, n


def recognisability(y_real: np.ndarray, scores_real: np.ndarray, y_synthetic: np.ndarray,
                    scores_synthetic: np.ndarray, classes: Sequence[str], multilabel: bool) -> dict:
    """Can a classifier trained on real images recognise the class of each synthetic image? (issue #11;
    the automatic stand-in for the reader study of Figure 3, section 2.1). The classifier trained on
    the real images of arm (i) scores the held-out real test images and the synthetic images of every
    class; per class: accuracy on each (:func:`per_class_accuracy`), their counts, and the chance
    level (1/K for K classes; 0.5 per label for multi-label)."""
    k = len(classes)
    acc_r, n_r = per_class_accuracy(y_real, scores_real, k, multilabel)
    acc_s, n_s = per_class_accuracy(y_synthetic, scores_synthetic, k, multilabel)

    def num(x: float) -> float | None:
        return float(x) if np.isfinite(x) else None

    chance = 0.5 if multilabel else 1.0 / k
    rows = []
    for i, c in enumerate(classes):
        hits = int(round(acc_s[i] * n_s[i])) if n_s[i] else 0
        lower = accuracy_lower_bound(hits, int(n_s[i]), RECOGNISABILITY_CONFIDENCE)
        rows.append({"class": c, "n_real": int(n_r[i]), "real_accuracy": num(acc_r[i]),
                     "n_synthetic": int(n_s[i]), "synthetic_accuracy": num(acc_s[i]),
                     "synthetic_accuracy_lower": lower,
                     "synthetic_above_chance": lower is not None and lower > chance})
    return {
        "classifier": "real_full",  # arm (i): trained on real images only
        "rule": "per-label probability >= 0.5" if multilabel else "arg-max class",
        "chance": chance, "per_class": rows, "confidence": RECOGNISABILITY_CONFIDENCE,
        "macro_real_accuracy": num(float(np.nanmean(acc_r))) if np.isfinite(acc_r).any() else None,
        "macro_synthetic_accuracy": num(float(np.nanmean(acc_s))) if np.isfinite(acc_s).any() else None,
        # above chance by the one-sided Clopper-Pearson bound, not by the point estimate (issue #29)
        "all_synthetic_above_chance": all(r["synthetic_above_chance"] for r in rows),
    }


def _auroc_or_nan(y_true: np.ndarray, scores: np.ndarray, multilabel: bool) -> float:
    """Macro AUROC, or NaN when no class has both positives and negatives (a handful of synthetic
    images may all carry one label): the synthetic-signal condition then fails as undefined."""
    try:
        return macro_auroc(y_true, scores, multilabel)
    except ValueError:
        return float("nan")


def synthetic_signal(real_auroc: float, synthetic_auroc: float) -> dict:
    """How much of the class signal of real images the synthetic images carry, as judged by the
    real-trained classifier (arm i): its macro AUROC on the synthetic images (against the labels they
    were generated for) and on the real test images, and ``fraction = (AUROC_syn - 0.5) /
    (AUROC_real - 0.5)`` (0: no more than chance; 1: as recognisable as real images). Undefined (None)
    when the classifier itself is at chance on real images."""
    above = real_auroc - 0.5
    defined = np.isfinite(real_auroc) and np.isfinite(synthetic_auroc) and above > 1e-9
    fraction = (synthetic_auroc - 0.5) / above if defined else None
    return {"real_auroc": float(real_auroc), "synthetic_auroc": float(synthetic_auroc),
            "fraction": None if fraction is None or not np.isfinite(fraction) else float(fraction)}
