"""The Fréchet distance and its statistics: the number behind FID (Heusel et al., 2017; section 4.2).

Pure numpy on feature arrays: the distance itself, per-set statistics, and the percentile bootstrap
intervals reported for the selected epoch (issue #29). ``medisyn.evaluate.fid`` extracts the
features, caches the real side and re-exports these names.
"""

from __future__ import annotations

import numpy as np


def _psd_sqrt_eigen(matrix: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Eigen-decomposition of a symmetric PSD matrix with round-off eigenvalues set to exactly 0."""
    w, v = np.linalg.eigh(matrix)
    tol = max(float(np.abs(w).max(initial=0.0)), 0.0) * matrix.shape[0] * np.finfo(np.float64).eps
    w = np.where(w > tol, w, 0.0)
    return w, v


def psd_sqrt(sigma: np.ndarray) -> np.ndarray:
    """Symmetric PSD square root of a covariance (float64), round-off eigenvalues set to 0."""
    s = np.asarray(sigma, dtype=np.float64)
    w, v = _psd_sqrt_eigen((s + s.T) / 2)
    return (v * np.sqrt(w)) @ v.T


def _frechet_from_sqrt(mu1: np.ndarray, sqrt1: np.ndarray, trace1: float, mu2: np.ndarray, s2: np.ndarray) -> float:
    """The distance given S1^{1/2}: one eigen-decomposition instead of two (the real side is cached)."""
    m = sqrt1 @ s2 @ sqrt1
    w_m, _ = _psd_sqrt_eigen((m + m.T) / 2)
    tr_covmean = float(np.sqrt(w_m).sum())
    diff = mu1 - mu2
    return max(float(diff @ diff + trace1 + np.trace(s2) - 2.0 * tr_covmean), 0.0)


def frechet_distance(mu1, sigma1, mu2, sigma2) -> float:
    """Fréchet distance between N(mu1, sigma1) and N(mu2, sigma2) (Heusel et al., 2017):

        d^2 = ||mu1 - mu2||^2 + tr(sigma1) + tr(sigma2) - 2 tr((sigma1 sigma2)^{1/2})

    Numerically stable for nearly singular covariances (N < feature dimension, duplicated images):
    instead of ``scipy.linalg.sqrtm(sigma1 @ sigma2)`` of a non-symmetric product (which can return
    complex values or NaNs there), it uses tr((S1 S2)^{1/2}) = tr((A S2 A)^{1/2}) with A = S1^{1/2},
    both symmetric PSD eigen-problems in float64; eigenvalues below round-off are treated as 0.
    (S1 S2 = A (A S2) and A S2 A = (A S2) A share their eigenvalues, so the traces are equal.)

    Args: means as (D,) arrays, covariances as (D, D) arrays (symmetrised internally).
    Returns: the squared distance (the number reported as "FID"), >= 0.
    """
    mu1 = np.atleast_1d(np.asarray(mu1, dtype=np.float64))
    mu2 = np.atleast_1d(np.asarray(mu2, dtype=np.float64))
    s1 = np.atleast_2d(np.asarray(sigma1, dtype=np.float64))
    s2 = np.atleast_2d(np.asarray(sigma2, dtype=np.float64))
    if mu1.shape != mu2.shape or s1.shape != s2.shape or s1.shape != (mu1.shape[0], mu1.shape[0]):
        raise ValueError(f"shape mismatch: mu {mu1.shape} vs {mu2.shape}, sigma {s1.shape} vs {s2.shape}")
    if not (np.isfinite(mu1).all() and np.isfinite(mu2).all() and np.isfinite(s1).all() and np.isfinite(s2).all()):
        raise ValueError("non-finite mean or covariance (NaN/inf features?)")
    s1 = (s1 + s1.T) / 2
    s2 = (s2 + s2.T) / 2
    return _frechet_from_sqrt(mu1, psd_sqrt(s1), float(np.trace(s1)), mu2, s2)


def feature_statistics(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(mean, covariance) of (N, D) features in float64; the unbiased covariance, as in the reference."""
    f = np.asarray(features, dtype=np.float64)
    if f.ndim != 2 or f.shape[0] < 2:
        raise ValueError(f"need at least 2 feature vectors of shape (N, D), got {f.shape}")
    return f.mean(axis=0), np.cov(f, rowvar=False)


def fid_from_features(real: np.ndarray, fake: np.ndarray) -> float:
    mu1, s1 = feature_statistics(real)
    mu2, s2 = feature_statistics(fake)
    return frechet_distance(mu1, s1, mu2, s2)


def fid_against_sqrt(mu: np.ndarray, sigma_sqrt: np.ndarray, sigma_trace: float, fake: np.ndarray) -> float:
    """Pooled FID of ``fake`` features against real statistics given as (mean, S^{1/2}, tr S)."""
    mu2, s2 = feature_statistics(fake)
    return _frechet_from_sqrt(mu, sigma_sqrt, sigma_trace, mu2, (s2 + s2.T) / 2)


def bootstrap_fid_interval(
    real: np.ndarray, fake: np.ndarray, resamples: int, seed: int, level: float = 0.95
) -> tuple[float, float]:
    """Percentile bootstrap interval of the pooled FID (both sets resampled independently with replacement).

    Each resample costs two covariances and two D x D eigen-decompositions (~seconds at D=2048), so
    it is computed for the selected epoch only.
    """
    rng = np.random.default_rng(seed)
    values = []
    for _ in range(resamples):
        r = real[rng.integers(0, len(real), len(real))]
        f = fake[rng.integers(0, len(fake), len(fake))]
        values.append(fid_from_features(r, f))
    alpha = (1 - level) / 2
    return float(np.quantile(values, alpha)), float(np.quantile(values, 1 - alpha))


def paired_bootstrap_fid_differences(
    real: np.ndarray, fake_by_epoch: dict[int, np.ndarray], reference: int, resamples: int, seed: int,
    level: float = 0.95,
) -> dict[int, tuple[float, float]]:
    """Percentile bootstrap interval of ``FID(epoch) - FID(reference)`` for every epoch (issue #29).

    An epoch's FID alone has a wide interval at small N (the demo's N = 64 gives an interval wider
    than the whole learning curve), but epochs are compared on *paired* samples: synthetic image ``i``
    of every epoch comes from real caption ``i`` with the same seed. Resampling the index set once per
    replicate, for the real features and every epoch's features together, keeps that pairing, so the
    shared noise cancels in the difference and its interval is far narrower than either FID's. An
    interval that contains 0 means the two epochs are not distinguishable at this N.

    Args: real (N, D) features; ``fake_by_epoch`` epoch -> (N, D) features, row i paired with real row i;
    ``reference`` the epoch the others are compared with (the selected one). Returns epoch -> (lo, hi);
    the reference itself is (0, 0).
    """
    n = len(real)
    if any(len(f) != n for f in fake_by_epoch.values()):
        raise ValueError("paired bootstrap needs every epoch's features at the real sample's N")
    rng = np.random.default_rng(seed)
    diffs: dict[int, list[float]] = {e: [] for e in fake_by_epoch if e != reference}
    for _ in range(resamples):
        idx = rng.integers(0, n, n)
        real_mu, real_sigma = feature_statistics(real[idx])  # the real side's statistics once per resample
        real_sqrt, real_trace = psd_sqrt(real_sigma), float(np.trace(real_sigma))
        ref = fid_against_sqrt(real_mu, real_sqrt, real_trace, fake_by_epoch[reference][idx])
        for e in diffs:
            diffs[e].append(fid_against_sqrt(real_mu, real_sqrt, real_trace, fake_by_epoch[e][idx]) - ref)
    alpha = (1 - level) / 2
    out = {e: (float(np.quantile(v, alpha)), float(np.quantile(v, 1 - alpha))) for e, v in diffs.items()}
    out[reference] = (0.0, 0.0)
    return dict(sorted(out.items()))


# ----------------------------------------------------------------------------------------------
