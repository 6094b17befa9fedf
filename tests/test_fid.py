"""FID: the distance against closed forms and scipy's reference, and per-epoch checkpoint scoring."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.linalg

from helpers import model_env, write_checkpoints, write_dataset
from medisyn import storage
from medisyn.evaluate import fid as fidmod
from medisyn.evaluate.fid import ScoreResult, bootstrap_fid_interval, feature_statistics, frechet_distance


def scipy_reference(mu1, s1, mu2, s2) -> float:
    """The reference computation (pytorch-fid / TTUR): scipy.linalg.sqrtm of the product."""
    covmean = scipy.linalg.sqrtm(s1 @ s2)
    if not np.isfinite(covmean).all():
        off = np.eye(len(s1)) * 1e-6
        covmean = scipy.linalg.sqrtm((s1 + off) @ (s2 + off))
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(s1) + np.trace(s2) - 2 * np.trace(np.real(covmean)))


def random_rotation(d: int, rng) -> np.ndarray:
    q, _ = np.linalg.qr(rng.normal(size=(d, d)))
    return q


# Gaussians whose covariances share an eigenbasis U: tr sqrt(S1 S2) = sum sqrt(l1 * l2) exactly.
CLOSED_FORM_CASES = [
    # (name, d, eigenvalues 1, eigenvalues 2)
    ("full-rank", 8, np.linspace(0.5, 4.0, 8), np.linspace(3.0, 0.1, 8)),
    ("rank-deficient-one", 8, np.r_[np.linspace(1, 2, 5), 0, 0, 0], np.linspace(0.2, 5, 8)),
    ("rank-deficient-both", 16, np.r_[np.ones(6) * 2, np.zeros(10)], np.r_[np.zeros(4), np.ones(12) * 0.5]),
    ("tiny-and-huge", 6, np.array([1e-9, 1e-6, 1, 10, 1e3, 1e4]), np.array([1e4, 1e3, 10, 1, 1e-6, 0.0])),
]


@pytest.mark.parametrize("name,d,l1,l2", CLOSED_FORM_CASES, ids=[c[0] for c in CLOSED_FORM_CASES])
def test_frechet_matches_closed_form(name, d, l1, l2):
    rng = np.random.default_rng(d)
    u = random_rotation(d, rng)
    s1, s2 = u @ np.diag(l1) @ u.T, u @ np.diag(l2) @ u.T
    mu1, mu2 = rng.normal(size=d), rng.normal(size=d)
    expected = float(np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(l1) - np.sqrt(l2)) ** 2))
    assert frechet_distance(mu1, s1, mu2, s2) == pytest.approx(expected, rel=1e-6)


def test_frechet_one_dimensional_closed_form():
    # N(1, 4) vs N(-2, 9): (1 + 2)^2 + (2 - 3)^2 = 10
    assert frechet_distance([1.0], [[4.0]], [-2.0], [[9.0]]) == pytest.approx(10.0, rel=1e-12)


# Sample covariances (the way FID sees them), including N < D, i.e. rank-deficient.
SCIPY_CASES = [(16, 200), (64, 1000), (64, 20), (256, 50)]


@pytest.mark.parametrize("d,n", SCIPY_CASES, ids=[f"d{d}-n{n}" for d, n in SCIPY_CASES])
def test_frechet_matches_scipy_reference(d, n):
    rng = np.random.default_rng(n)
    x = rng.normal(size=(n, d))
    y = rng.normal(size=(n, d)) @ rng.normal(size=(d, d)) * 0.3 + 0.2
    mu1, s1 = feature_statistics(x)
    mu2, s2 = feature_statistics(y)
    if n < d:
        assert np.linalg.matrix_rank(s1) < d  # the rank-deficient case really is
    ours = frechet_distance(mu1, s1, mu2, s2)
    assert ours == pytest.approx(scipy_reference(mu1, s1, mu2, s2), rel=1e-6)


def test_frechet_identical_is_zero_and_symmetric():
    rng = np.random.default_rng(1)
    x = rng.normal(size=(30, 40))  # rank-deficient
    mu, s = feature_statistics(x)
    assert frechet_distance(mu, s, mu, s) == pytest.approx(0.0, abs=1e-9)
    y = rng.normal(size=(30, 40)) + 1
    mu2, s2 = feature_statistics(y)
    assert frechet_distance(mu, s, mu2, s2) == pytest.approx(frechet_distance(mu2, s2, mu, s), rel=1e-9)


@pytest.mark.parametrize(
    "args,match",
    [
        (([0, 0], np.eye(2), [0, 0, 0], np.eye(3)), "shape"),
        (([0, 0], np.eye(3), [0, 0], np.eye(3)), "shape"),
        (([np.nan, 0], np.eye(2), [0, 0], np.eye(2)), "non-finite"),
    ],
)
def test_frechet_rejects_bad_input(args, match):
    with pytest.raises(ValueError, match=match):
        frechet_distance(*args)


def test_feature_statistics_needs_two_samples():
    with pytest.raises(ValueError):
        feature_statistics(np.zeros((1, 4)))


def test_bootstrap_interval_brackets_the_estimate():
    rng = np.random.default_rng(0)
    real, fake = rng.normal(size=(200, 8)), rng.normal(size=(200, 8)) + 0.5
    low, high = bootstrap_fid_interval(real, fake, resamples=100, seed=0)
    point = fidmod.fid_from_features(real, fake)
    assert low < high
    assert low <= point * 1.5 and high >= point * 0.5  # a sane interval around the estimate
    assert (low, high) == bootstrap_fid_interval(real, fake, resamples=100, seed=0)  # reproducible


# ----------------------------------------------------------------------------------------------
# score_checkpoints
# ----------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def scored(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("fid")
    cfg, root = model_env(tmp_path_factory.mktemp("models"), [f"storage.root={tmp / 'runs'}"])
    ds = write_dataset(str(tmp / "dataset"), n_per_specialty=10)
    ck = str(tmp / "checkpoints")
    write_checkpoints(cfg, ck, epochs=3, incomplete_epoch=3)
    result = fidmod.score_checkpoints(cfg, ds, ck, str(tmp / "score"))
    return cfg, tmp, ds, ck, result


@pytest.mark.slow
def test_score_checkpoints_scores_complete_epochs_only(scored):
    cfg, tmp, ds, ck, r = scored
    assert sorted(r.fid_by_epoch) == [1, 2]  # epoch-0003 has no _COMPLETE: never scored
    assert r.best_epoch == min(r.fid_by_epoch, key=r.fid_by_epoch.get)
    assert r.best_checkpoint_uri.endswith(f"epoch-{r.best_epoch:04d}")
    assert r.best_fid == r.fid_by_epoch[r.best_epoch]
    # the stored number is the distance of the stored features, by the scipy reference computation
    real = fidmod._load_npz(r.real_stats_uri)["features"].astype(np.float64)
    (feats,) = storage.local_path(r.out_uri).glob(f"epochs/epoch-{r.best_epoch:04d}/features-*.npz")
    fake = fidmod._load_npz(str(feats))["features"].astype(np.float64)
    assert len(real) == len(fake) == 16
    expected = scipy_reference(*feature_statistics(real), *feature_statistics(fake))
    assert r.best_fid == pytest.approx(expected, rel=1e-4) and r.best_fid > 0
    assert r.num_samples == 16 and r.mode == "full"
    assert set(r.fid_by_specialty) == {"dermatology", "ophthalmology"}
    assert r.fid_ci is not None and r.fid_ci[0] <= r.fid_ci[1]
    other = 3 - r.best_epoch  # the paired interval of the other epoch against the selected one, and the check
    assert set(r.fid_diff_ci_by_epoch) == {1, 2} and r.fid_diff_ci_by_epoch[r.best_epoch] == (0.0, 0.0)
    lo, hi = r.fid_diff_ci_by_epoch[other]
    assert lo <= hi and (other in r.epochs_indistinguishable_from_best) == (lo <= 0 <= hi)
    assert r.learning_detected is (None if r.best_epoch == 1 else lo > 0)
    prov = r.provenance
    assert prov["n"] == 16 and prov["seed"] == 0 and len(prov["weights_sha256"]) == 64
    assert "bilinear" in prov["resize_filter"] and prov["implementation"]
    assert not r.real_stats_cached
    out = r.out_uri
    assert storage.is_complete(out)
    for name in ("result.json", "fid_curve.png", "grids/dermatology.png", "grids/ophthalmology.png"):
        assert storage.exists(storage.join(out, name)), name
    assert ScoreResult.load(out) == r


@pytest.mark.slow
def test_real_statistics_are_cached_and_reused(scored, monkeypatch):
    cfg, tmp, ds, ck, first = scored
    calls = []
    real_extract = fidmod.extract_features

    def counting(extractor, images, batch_size, device):
        calls.append(len(images))
        return real_extract(extractor, images, batch_size, device)

    monkeypatch.setattr(fidmod, "extract_features", counting)
    again = fidmod.score_checkpoints(cfg, ds, ck, str(tmp / "score-again"))
    assert again.real_stats_cached and again.real_stats_uri == first.real_stats_uri
    # Only synthetic images were featurised (16 per epoch), never the 16 real ones again.
    assert calls == [16, 16]
    # Same seeds, same captions, same checkpoints: the same FIDs.
    for e in first.fid_by_epoch:
        assert again.fid_by_epoch[e] == pytest.approx(first.fid_by_epoch[e], rel=1e-5)


@pytest.mark.slow
def test_rescoring_same_output_reuses_epoch_features(scored, monkeypatch):
    cfg, tmp, ds, ck, first = scored
    import medisyn.generate as gen

    def no_sampling(*a, **k):
        raise AssertionError("epoch features were cached: nothing should be generated")

    monkeypatch.setattr(gen, "sample_distributed", no_sampling)
    monkeypatch.setattr(fidmod._EpochScorer, "grid_samples", lambda self, uri: [])
    again = fidmod.score_checkpoints(cfg, ds, ck, first.out_uri)
    assert again.fid_by_epoch == pytest.approx(first.fid_by_epoch)


@pytest.mark.slow
def test_successive_halving(scored, tmp_path):
    cfg, tmp, ds, ck, full = scored
    hcfg = cfg.model_copy(update={"fid": cfg.fid.model_copy(update={
        "successive_halving": True, "halving_small_n": 8, "halving_keep": 1})})
    r = fidmod.score_checkpoints(hcfg, ds, ck, str(tmp_path / "halving"))
    assert r.mode == "successive_halving"
    assert r.halving["small_n"] == 8 and sorted(r.halving["fid_small_by_epoch"]) == [1, 2]
    small = r.halving["fid_small_by_epoch"]
    assert r.halving["rescored_epochs"] == [min(small, key=small.get)]
    assert list(r.fid_by_epoch) == r.halving["rescored_epochs"]  # only the finalist at full N
    assert r.num_samples == 16


@pytest.mark.slow
def test_fid_steps_override_the_sampler_for_fid_only(scored, tmp_path, monkeypatch):
    """fid.num_inference_steps changes the per-epoch FID images (and says so in the provenance and
    the feature-cache key), never the sampling section the gates and consumers use."""
    cfg, tmp, ds, ck, full = scored
    import medisyn.generate as gen

    steps: list[int] = []
    real_sample = gen.sample_distributed

    def recording(pipe, prompts, seeds, sampling, resolution, **kw):
        steps.append(sampling.num_inference_steps)
        return real_sample(pipe, prompts, seeds, sampling, resolution, **kw)

    monkeypatch.setattr(gen, "sample_distributed", recording)
    fcfg = cfg.model_copy(update={"fid": cfg.fid.model_copy(update={"num_inference_steps": 1})})
    assert fcfg.fid_sampling().num_inference_steps == 1 and fcfg.sampling == cfg.sampling
    assert cfg.fid_sampling() is cfg.sampling  # unset: FID samples exactly as the gates do
    r = fidmod.score_checkpoints(fcfg, ds, ck, full.out_uri)  # same output dir: must not reuse the features
    assert steps == [1, 1]
    assert r.provenance["sampling"]["num_inference_steps"] == 1
    assert full.provenance["sampling"]["num_inference_steps"] == cfg.sampling.num_inference_steps != 1


@pytest.mark.slow
def test_no_checkpoints_is_an_error(scored, tmp_path):
    cfg, tmp, ds, _, _ = scored
    with pytest.raises(FileNotFoundError, match="no complete epoch checkpoints"):
        fidmod.score_checkpoints(cfg, ds, str(tmp_path / "empty"), str(tmp_path / "out"))


def test_cached_real_statistics_give_the_same_distance():
    rng = np.random.default_rng(3)
    real, fake = rng.normal(size=(50, 64)), rng.normal(size=(40, 64)) * 1.1 + 0.1  # both rank-deficient
    sample = fidmod.RealSample(["c"] * 50, ["s"] * 50, real, "mem://", False)
    assert sample.fid(fake) == pytest.approx(fidmod.fid_from_features(real, fake), rel=1e-9)


def test_paired_bootstrap_resolves_an_epoch_difference_that_unpaired_intervals_cannot():
    """Issue #29: epoch FIDs at small N have intervals wider than the learning curve, but epochs share their
    captions and seeds, so the paired interval of the difference is narrow. Two 'epochs' built from the same
    per-image noise: a good one, and one shifted by 0.25 per feature (true FID difference 0.0625 * D = 1)."""
    rng = np.random.default_rng(0)
    n, d = 64, 16
    real = rng.normal(size=(n, d))
    shared = rng.normal(size=(n, d))  # image i of every epoch: the same caption and seed
    fakes = {1: shared + 0.25, 2: shared + 0.01 * rng.normal(size=(n, d)), 3: shared}
    diff = fidmod.paired_bootstrap_fid_differences(real, fakes, reference=3, resamples=200, seed=0)
    assert diff[3] == (0.0, 0.0)
    lo, hi = diff[1]
    assert 0 < lo < 0.0625 * d < hi  # epoch 1 is worse, and the interval holds the true difference
    assert diff[2][0] <= 0 <= diff[2][1]  # epoch 2 is the same model up to noise: not distinguishable
    # each epoch's own (unpaired) interval overlaps the other's: alone they could not tell the epochs apart
    own = {e: bootstrap_fid_interval(real, fakes[e], 200, 0) for e in (1, 3)}
    assert own[1][0] < own[3][1] and hi - lo < own[1][1] - own[1][0]
    with pytest.raises(ValueError, match="paired"):
        fidmod.paired_bootstrap_fid_differences(real, {1: shared[:10], 3: shared}, 3, 10, 0)
