"""Exact binomial bounds for accuracies measured on a few dozen images (issue #29).

The demo's recognisability check counts, per class, how many of ~30 synthetic images a real-trained
classifier calls by their class. A point estimate against a margin ("above chance + 0.15") decides on
noise at that size; a one-sided Clopper-Pearson bound decides with a stated confidence.
"""

from __future__ import annotations

RECOGNISABILITY_CONFIDENCE = 0.95  # one-sided level of the per-class accuracy lower bound


def accuracy_lower_bound(hits: int, n: int, confidence: float = RECOGNISABILITY_CONFIDENCE) -> float | None:
    """One-sided Clopper-Pearson (exact binomial) lower confidence bound of an accuracy of ``hits`` out of
    ``n``: the true accuracy is at least this with probability ``confidence``. None when ``n`` is 0.
    A class is recognised above chance when this bound, not the point estimate, exceeds chance: with 30
    images a point estimate of 0.65 is consistent with a coin (its bound is 0.49)."""
    from scipy.stats import beta

    if n <= 0:
        return None
    if hits <= 0:
        return 0.0
    return float(beta.ppf(1.0 - confidence, hits, n - hits + 1))
