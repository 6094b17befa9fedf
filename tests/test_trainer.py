"""medisyn.train.trainer: the U-Net fine-tune on the latent cache (section 4.2), in one process."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from helpers import NUM_SAMPLES, build_sdxl_and_cache, train_config
from medisyn import storage
from medisyn.config import ConfigError
from medisyn.models import sdxl
from medisyn.train import checkpoint_name, latest_checkpoint, list_checkpoints
from medisyn.train.encode import LatentCache
from medisyn.train.trainer import dropout_mask, epoch_order, micro_batches, train, weights_sha256


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("trainer")


@pytest.fixture(scope="module")
def cache_uri(root) -> str:
    return build_sdxl_and_cache(root)


@pytest.fixture(scope="module")
def finished(root, cache_uri):
    """One plain 2-epoch run with a mid-epoch checkpoint every 3 steps, rotated to the last 2."""
    cfg = train_config(root, ["train.checkpoint_every_steps=3", "train.checkpoints_total_limit=2"])
    ckpts = str(root / "ckpt-main")
    return cfg, ckpts, train(cfg, cache_uri, ckpts)


def test_train_writes_one_complete_checkpoint_per_epoch(finished):
    cfg, ckpts, result = finished
    assert result.epochs == 2 and result.steps_per_epoch == NUM_SAMPLES // 8 and result.global_step == 10
    assert [u.rsplit("/", 1)[-1] for u in result.checkpoints] == ["epoch-0001", "epoch-0002"]
    assert result.checkpoints == list_checkpoints(ckpts, kind="epoch")
    root = storage.local_path(ckpts)
    for name in ("epoch-0001", "epoch-0002"):
        d = root / name
        assert (d / "unet" / "diffusion_pytorch_model.safetensors").exists()
        assert (d / "unet" / "config.json").exists()
        for f in ("optimizer.json", "optimizer.safetensors", "scheduler.json", "scheduler.safetensors",
                  "rng.json", "rng.safetensors", "data_position.json"):
            assert (d / "training_state" / f).exists(), f
        assert not list(d.rglob("*.pt")) and not list(d.rglob("*.pkl"))  # no pickle is written
        assert (d / storage.COMPLETE_MARKER).exists()
    info = json.loads((root / "epoch-0002" / "checkpoint.json").read_text())
    assert info["epoch"] == 2 and info["global_step"] == 10 and info["kind"] == "epoch"
    pos = json.loads((root / "epoch-0001" / "training_state" / "data_position.json").read_text())
    assert (pos["epoch"], pos["step_in_epoch"], pos["global_step"]) == (1, 0, 5)
    assert result.final_loss is not None and np.isfinite(result.final_loss)
    assert result.mixed_precision == "no"


def test_step_checkpoints_are_rotated_but_epochs_are_kept(finished):
    _, ckpts, result = finished
    # step checkpoints at global steps 3, 6, 9 (5 and 10 are epoch ends); limit 2 keeps 6 and 9.
    assert [u.rsplit("/", 1)[-1] for u in result.step_checkpoints] == ["step-00000006", "step-00000009"]
    assert not storage.exists(storage.join(ckpts, "step-00000003"))
    assert latest_checkpoint(ckpts).endswith("epoch-0002")


def test_checkpoint_unet_loads_with_the_scorers_loader_and_differs_from_base(finished):
    cfg, _, result = finished
    trained = sdxl.load_unet(cfg.models, storage.local_path(result.checkpoints[-1]) / "unet")
    base = sdxl.load_unet(cfg.models)
    assert weights_sha256(trained) == result.unet_sha256_per_rank[0]
    assert weights_sha256(trained) != weights_sha256(base)


def test_incomplete_checkpoint_is_never_listed(finished, tmp_path):
    _, ckpts, _ = finished
    fake = storage.local_path(ckpts) / checkpoint_name("epoch", 99)
    (fake / "unet").mkdir(parents=True)
    (fake / "checkpoint.json").write_text(json.dumps({"epoch": 99, "global_step": 999, "kind": "epoch"}))
    try:
        assert all("epoch-0099" not in u for u in list_checkpoints(ckpts, kind="epoch"))
        assert latest_checkpoint(ckpts).endswith("epoch-0002")
    finally:
        storage.remove(str(fake))
    assert list_checkpoints(str(tmp_path / "nothing-here")) == []


def test_rerun_with_resume_latest_after_the_end_trains_no_more(finished, cache_uri):
    cfg, ckpts, first = finished
    again = train(cfg, cache_uri, ckpts)
    assert again.resumed_from.endswith("epoch-0002")
    assert again.global_step == first.global_step and again.final_loss is None
    assert again.unet_sha256_per_rank == first.unet_sha256_per_rank


def test_resume_refuses_a_checkpoint_from_another_dataset(root, finished, cache_uri):
    cfg, ckpts, _ = finished
    other_cache = storage.local_path(cache_uri).parent / "cache-other"
    import shutil

    shutil.copytree(storage.local_path(cache_uri), other_cache, dirs_exist_ok=True)
    manifest = json.loads((other_cache / "manifest.json").read_text())
    manifest["dataset_hash"] = "another-dataset"
    (other_cache / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ValueError, match="another-dataset"):
        train(cfg, str(other_cache), ckpts)


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["train.effective_batch_size=8", "train.per_device_batch_size=3", "train.gradient_accumulation_steps=null"],
         "not divisible"),
        (["train.effective_batch_size=8", "train.per_device_batch_size=4", "train.gradient_accumulation_steps=4"],
         "effective_batch_size=8"),
        (["train.effective_batch_size=64", "train.per_device_batch_size=8", "train.gradient_accumulation_steps=null"],
         "exceeds the 40 cached"),
    ],
)
def test_batch_combinations_that_do_not_fit_are_refused(root, cache_uri, overrides, message, tmp_path):
    cfg = train_config(root, overrides)
    with pytest.raises(ConfigError, match=message):
        train(cfg, cache_uri, str(tmp_path / "ckpt"))
    assert list_checkpoints(str(tmp_path / "ckpt")) == []


def test_micro_batches_split_each_global_batch_across_ranks_and_accumulation():
    order = torch.arange(100, 116)  # a fake epoch order of 16 samples
    # E = 2 per device x 2 accumulation x 2 ranks = 8 -> 2 optimizer steps
    rank0 = list(micro_batches(order, 0, 2, rank=0, world=2, per_device=2, accumulation=2))
    rank1 = list(micro_batches(order, 0, 2, rank=1, world=2, per_device=2, accumulation=2))
    assert [[p for p, _ in mb] for mb in rank0] == [[0, 1], [4, 5], [8, 9], [12, 13]]
    assert [[p for p, _ in mb] for mb in rank1] == [[2, 3], [6, 7], [10, 11], [14, 15]]
    assert [i for mb in rank0 for _, i in mb][:2] == [100, 101]
    # resuming at step 1 yields exactly the tail, without replaying step 0
    assert list(micro_batches(order, 1, 2, 0, 2, 2, 2)) == rank0[2:]


def test_epoch_order_depends_only_on_seed_and_epoch():
    assert torch.equal(epoch_order(50, 0, 3), epoch_order(50, 0, 3))
    assert not torch.equal(epoch_order(50, 0, 3), epoch_order(50, 0, 4))
    assert sorted(epoch_order(50, 0, 3).tolist()) == list(range(50))


def test_empty_prompt_dropout_is_ten_percent_and_redrawn_every_epoch():
    """Section 4.2: prompts replaced with the empty text 10% of the time, drawn per sample per step."""
    positions = np.arange(20_000)
    e0 = dropout_mask(0, 0, positions, 0.10)
    e1 = dropout_mask(0, 1, positions, 0.10)
    assert abs(e0.mean() - 0.10) < 0.01 and abs(e1.mean() - 0.10) < 0.01
    # Re-drawn: a different set of samples is emptied in each epoch (independent draws overlap ~1%).
    assert (e0 & e1).mean() < 0.02
    assert not np.array_equal(e0, e1)


def test_trainer_applies_the_dropout_draws_per_step(root, cache_uri, tmp_path, monkeypatch):
    """Record the caption rows the trainer feeds the U-Net: ~10% are the empty prompt (row 0), and they
    are exactly the per-(epoch, position) draws, so the emptied samples change every epoch."""
    fed: list[np.ndarray] = []
    real_text = LatentCache.text

    def spy(self, rows):
        fed.append(np.asarray(rows).copy())
        return real_text(self, rows)

    monkeypatch.setattr(LatentCache, "text", spy)
    cfg = train_config(root, ["train.epochs=5", "train.resume=null"])
    train(cfg, cache_uri, str(tmp_path / "ckpt"))
    steps_per_epoch = NUM_SAMPLES // 8
    assert len(fed) == 5 * steps_per_epoch
    cache = LatentCache(storage.local_path(cache_uri))
    emptied_per_epoch = []
    for epoch in range(5):
        order = epoch_order(NUM_SAMPLES, cfg.train.seed, epoch)
        rows = np.concatenate(fed[epoch * steps_per_epoch:(epoch + 1) * steps_per_epoch])
        positions = np.arange(steps_per_epoch * 8)
        expected = dropout_mask(cfg.train.seed, epoch, positions, 0.10)
        original = np.array([cache.sample(int(order[p]))[1] for p in positions])
        np.testing.assert_array_equal(rows == 0, expected)
        np.testing.assert_array_equal(rows[~expected], original[~expected])
        emptied_per_epoch.append({int(order[p]) for p in positions[expected]})
    rate = np.mean([len(s) for s in emptied_per_epoch]) / (steps_per_epoch * 8)
    assert 0.02 <= rate <= 0.25  # 200 Bernoulli(0.1) draws
    assert len({frozenset(s) for s in emptied_per_epoch}) > 1


def _base_predicting(root: Path, tmp_path: Path, prediction_type: str) -> Path:
    """A copy of the tiny base model whose scheduler predicts ``prediction_type``."""
    base = tmp_path / f"base-{prediction_type}"
    shutil.copytree(train_config(root).models.sdxl_base, base)
    path = base / "scheduler" / "scheduler_config.json"
    path.write_text(json.dumps(json.loads(path.read_text()) | {"prediction_type": prediction_type}))
    return base


def test_a_prediction_type_the_base_scheduler_does_not_sample_is_refused(root, cache_uri, tmp_path):
    """The samplers read the base model's scheduler: a U-Net trained for velocity on an epsilon base
    would be decoded wrongly, so training refuses to start (and writes nothing)."""
    cfg = train_config(root, ["train.epochs=1", "train.resume=null", "train.prediction_type=v_prediction"])
    with pytest.raises(ConfigError, match="predicts 'epsilon'"):
        train(cfg, cache_uri, str(tmp_path / "ckpt"))
    assert not (tmp_path / "ckpt").exists()


@pytest.mark.parametrize(
    "overrides",
    [
        ["train.snr_gamma=5.0"],
        ["train.prediction_type=v_prediction"],
        ["train.noise_offset=0.05", "train.max_grad_norm=null"],
        ["train.gradient_checkpointing=true", "train.attention=default", "train.channels_last=true"],
        ["train.per_device_batch_size=2", "train.gradient_accumulation_steps=null", "train.lr_scheduler=cosine",
         "train.lr_warmup_steps=2"],
    ],
    ids=["snr-gamma", "v-prediction", "noise-offset", "checkpointing-default-attn-channels-last",
         "accumulation-cosine"],
)
def test_training_options_run_and_learn(root, cache_uri, tmp_path, overrides):
    if "train.prediction_type=v_prediction" in overrides:  # needs a base model that predicts velocity
        overrides = overrides + [f"models.sdxl_base={_base_predicting(root, tmp_path, 'v_prediction')}"]
    cfg = train_config(root, ["train.epochs=1", "train.resume=null"] + overrides)
    result = train(cfg, cache_uri, str(tmp_path / "ckpt"))
    assert result.global_step == 5 and np.isfinite(result.final_loss)
    if "train.per_device_batch_size=2" in overrides:
        assert (result.per_device_batch_size, result.gradient_accumulation_steps) == (2, 4)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_min_snr_weighting_is_the_papers_formula(prediction_type):
    """Min-SNR-gamma (Hang et al. 2023) as the loss applies it, against a hand computation: each sample's
    MSE weighted by min(SNR, gamma) / SNR (epsilon) or min(SNR, gamma) / (SNR + 1) (velocity), so timesteps
    with SNR above gamma are down-weighted and plain MSE is what snr_gamma=None gives."""
    from diffusers import EulerDiscreteScheduler
    from diffusers.training_utils import compute_snr

    from medisyn.train.trainer import _loss

    sched = EulerDiscreteScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    timesteps = torch.tensor([10, 500, 990])  # SNR >> 5, about 1, << 1
    alphas = sched.alphas_cumprod[timesteps].double()
    snr = alphas / (1 - alphas)
    assert snr[0] > 5 > snr[1] > snr[2]
    g = torch.Generator().manual_seed(0)
    pred, target = torch.randn(3, 4, 2, 2, generator=g), torch.randn(3, 4, 2, 2, generator=g)
    mse = ((pred - target) ** 2).mean(dim=(1, 2, 3)).double()
    clipped = torch.minimum(snr, torch.full_like(snr, 5.0))
    weights = clipped / snr if prediction_type == "epsilon" else clipped / (snr + 1)
    loss = _loss(pred, target, timesteps, 5.0, prediction_type, sched, compute_snr)
    assert float(loss) == pytest.approx(float((mse * weights).mean()), rel=1e-5)
    assert float(_loss(pred, target, timesteps, None, prediction_type, sched, compute_snr)) == pytest.approx(
        float(mse.mean()), rel=1e-5)
    if prediction_type == "epsilon":  # the high-SNR (nearly clean) sample counts 5/SNR of its MSE, the others fully
        assert float(weights[0]) < 0.1 and float(weights[1]) == pytest.approx(1.0) == float(weights[2])


def test_offset_noise_adds_one_constant_per_channel_of_the_configured_scale():
    """Offset noise (Guttenberg 2023): the training noise of a sample is its plain noise plus one draw per
    latent channel, constant over the image, of standard deviation ``noise_offset``; the other draws of the
    sample (dropout, timestep, noise) stay what they were without it."""
    from medisyn.train.trainer import sample_draws

    offsets = []
    for position in range(400):
        u0, t0, plain = sample_draws(7, 1, position, (4, 8, 8), 1000, 0.0)
        u1, t1, shifted = sample_draws(7, 1, position, (4, 8, 8), 1000, 0.1)
        assert (u0, t0) == (u1, t1)
        delta = shifted - plain
        per_channel = delta.mean(dim=(1, 2))
        torch.testing.assert_close(delta, per_channel[:, None, None].expand_as(delta), rtol=0, atol=1e-6)
        offsets.append(per_channel)
    sd = float(torch.stack(offsets).std())
    assert 0.09 < sd < 0.11  # 1,600 draws of N(0, 0.1^2)


def test_ema_checkpoint_holds_ema_weights_and_raw_weights_for_resume(root, cache_uri, tmp_path):
    cfg = train_config(root, ["train.epochs=1", "train.use_ema=true", "train.ema_decay=0.5", "train.resume=null"])
    result = train(cfg, cache_uri, str(tmp_path / "ckpt"))
    d = storage.local_path(result.checkpoints[0])
    ema = load_file(str(d / "unet" / "diffusion_pytorch_model.safetensors"))
    raw = load_file(str(d / "training_state" / "unet_raw" / "diffusion_pytorch_model.safetensors"))
    assert (d / "training_state" / "ema.json").exists() and (d / "training_state" / "ema.safetensors").exists()
    assert any(not torch.equal(ema[k], raw[k]) for k in raw)
    raw_unet = sdxl.load_unet(cfg.models, d / "training_state" / "unet_raw")
    assert weights_sha256(raw_unet) == result.unet_sha256_per_rank[0]


def test_bf16_on_cpu_runs_in_bf16_where_the_cpu_has_it_and_is_refused_elsewhere(root, cache_uri, tmp_path):
    """No silent float32 fallback (#14): the precision asked for runs, or a ConfigError says why not."""
    cfg = train_config(root, ["train.epochs=1", "train.mixed_precision=bf16", "train.resume=null"])
    if sdxl.cpu_bf16_support() is None:
        with pytest.raises(ConfigError, match="no native bf16"):
            train(cfg, cache_uri, str(tmp_path / "ckpt"))
    else:
        assert train(cfg, cache_uri, str(tmp_path / "ckpt")).mixed_precision == "bf16"


def test_flops_and_mfu_are_reported(finished):
    cfg, _, result = finished
    assert result.flops_per_sample > 1e8  # tiny U-Net forward+backward at 32x32 latents: ~2 GFLOP
    assert result.images_per_s > 0
    expected = result.flops_per_sample * result.images_per_s / cfg.train.peak_flops_per_device
    assert result.mfu == pytest.approx(expected)


@pytest.mark.mlflow
def test_metrics_config_and_dataset_hash_go_to_mlflow(root, cache_uri, tmp_path):
    import mlflow

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    cfg = train_config(root, ["train.epochs=1", "train.resume=null", f"tracking.tracking_uri={uri}"])
    train(cfg, cache_uri, str(tmp_path / "ckpt"))
    client = mlflow.tracking.MlflowClient(uri)
    exp = client.get_experiment_by_name(cfg.tracking.experiment)
    (run,) = client.search_runs([exp.experiment_id])
    for metric in ("loss", "lr", "images_per_s", "images_per_s_per_device", "mfu"):
        assert metric in run.data.metrics, metric
    assert run.data.params["dataset_hash"] == LatentCache(storage.local_path(cache_uri)).manifest["dataset_hash"]
    assert run.data.tags["medisyn.stage"] == "train"
    history = client.get_metric_history(run.info.run_id, "loss")
    assert [m.step for m in history] == [2, 4, 5]


# ----------------------------------------------------------------------------------------------
# Training state without pickle (issue 10): safetensors + JSON, old *.pt files never opened
# ----------------------------------------------------------------------------------------------
class _WritesMarker:
    """Unpickling this creates ``path``: stands in for any code an attacker's pickle would run."""

    def __init__(self, path: Path):
        self.path = path

    def __reduce__(self):
        return open, (str(self.path), "w")


def _plant_pickles(state: Path, marker: Path) -> None:
    import pickle

    payload = pickle.dumps(_WritesMarker(marker))
    for f in ("optimizer.pt", "scheduler.pt", "ema.pt", "rng.pt"):
        (state / f).write_bytes(payload)


def _payload_is_live(tmp_path: Path) -> None:
    """The planted payload really runs code when unpickled (so 'no marker' below means something)."""
    import pickle

    probe = tmp_path / "probe-marker"
    pickle.loads(pickle.dumps(_WritesMarker(probe))).close()
    assert probe.exists()


def test_training_state_round_trips_exactly_through_safetensors_and_json(tmp_path):
    from diffusers.optimization import get_scheduler

    from medisyn.train.trainer import _read_state, _write_state

    torch.manual_seed(0)
    model = torch.nn.Linear(4, 3)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, betas=(0.9, 0.99))
    sched = get_scheduler("cosine", optimizer=opt, num_warmup_steps=2, num_training_steps=10)
    for _ in range(3):
        model(torch.randn(2, 4)).pow(2).sum().backward()
        opt.step()
        sched.step()
        opt.zero_grad()
    odd = {"ints": {0: 1, 7: (2, 3.5)}, "nan": float("nan"), "inf": float("-inf"), "none": None, "flag": True,
           "s": "x", "t": torch.arange(6, dtype=torch.int64).reshape(2, 3), "empty": []}
    for name, obj in (("optimizer", opt.state_dict()), ("scheduler", sched.state_dict()), ("odd", odd)):
        _write_state(tmp_path, name, obj)
        back = _read_state(tmp_path, name, "test")
        _assert_same(back, obj, name)
    assert json.loads((tmp_path / "optimizer.json").read_text())["format"] == "medisyn.training_state/1"

    # The loaded optimizer + scheduler continue exactly like the originals.
    model2 = torch.nn.Linear(4, 3)
    model2.load_state_dict(model.state_dict())
    opt2 = torch.optim.AdamW(model2.parameters(), lr=1e-3, betas=(0.9, 0.99))
    sched2 = get_scheduler("cosine", optimizer=opt2, num_warmup_steps=2, num_training_steps=10)
    opt2.load_state_dict(_read_state(tmp_path, "optimizer", "test"))
    sched2.load_state_dict(_read_state(tmp_path, "scheduler", "test"))
    x = torch.randn(2, 4)
    for m, o, s in ((model, opt, sched), (model2, opt2, sched2)):
        m(x).pow(2).sum().backward()
        o.step()
        s.step()
    for a, b in zip(model.parameters(), model2.parameters(), strict=True):
        assert torch.equal(a, b)
    assert sched.get_last_lr() == sched2.get_last_lr()


def _assert_same(a, b, where):
    assert type(a) is type(b), (where, type(a), type(b))
    if isinstance(b, torch.Tensor):
        assert a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b.cpu()), where
    elif isinstance(b, dict):
        assert list(a) == list(b), where
        for k in b:
            _assert_same(a[k], b[k], f"{where}.{k}")
    elif isinstance(b, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            _assert_same(x, y, f"{where}[{i}]")
    elif isinstance(b, float) and b != b:
        assert a != a, where
    else:
        assert a == b, where


def test_rng_state_round_trips_exactly_as_json(tmp_path):
    import random

    from medisyn.train.trainer import _read_state, _rng_state, _set_rng_state, _write_state

    random.gauss(0, 1)  # python caches a second gaussian (gauss_next)
    np.random.seed(3)
    np.random.standard_normal(3)  # numpy legacy caches one too (has_gauss)
    assert np.random.get_state()[3] == 1
    _write_state(tmp_path, "rng", _rng_state())
    rng_json = json.loads((tmp_path / "rng.json").read_text())
    assert "numpy" in json.dumps(rng_json) and "python" in json.dumps(rng_json)

    def draws():
        return (random.random(), random.gauss(0, 1), np.random.standard_normal(2).tolist(), np.random.rand(),
                torch.rand(3).tolist())

    expected = draws()
    draws()  # move every generator on
    _set_rng_state(_read_state(tmp_path, "rng", "test"))
    assert draws() == expected


@pytest.mark.parametrize(
    "doc, message",
    [
        ({"format": "medisyn.training_state/1", "tensors": [], "state": {"object": "os.system"}}, "unexpected value"),
        ({"format": "medisyn.training_state/1", "tensors": [], "state": {"tensor": "0"}}, "unexpected value"),
        ({"format": "pickle", "tensors": [], "state": None}, "format is not"),
        ({"format": "medisyn.training_state/1", "tensors": ["9"], "state": None}, "do not match"),
    ],
)
def test_malformed_training_state_is_refused(tmp_path, doc, message):
    from safetensors.torch import save_file

    from medisyn.train.trainer import CheckpointFormatError, _read_state

    save_file({}, str(tmp_path / "optimizer.safetensors"))
    (tmp_path / "optimizer.json").write_text(json.dumps(doc))
    with pytest.raises(CheckpointFormatError, match=message):
        _read_state(tmp_path, "optimizer", "ckpt")
    (tmp_path / "optimizer.json").write_text(json.dumps({"format": "medisyn.training_state/1", "tensors": [],
                                                         "state": None}))
    (tmp_path / "optimizer.safetensors").write_bytes(b"not safetensors")
    with pytest.raises(CheckpointFormatError, match="unreadable"):
        _read_state(tmp_path, "optimizer", "ckpt")


def _copy_checkpoint(ckpts: str, name: str, dest: Path) -> Path:
    import shutil

    shutil.copytree(storage.local_path(ckpts) / name, dest / name)
    return dest / name


def test_resume_refuses_a_checkpoint_in_the_old_pickle_format_without_unpickling_it(finished, cache_uri, tmp_path):
    from medisyn.train.trainer import CheckpointFormatError

    cfg, ckpts, _ = finished
    _payload_is_live(tmp_path)
    d = _copy_checkpoint(ckpts, "epoch-0001", tmp_path / "old")
    state = d / "training_state"
    for f in list(state.glob("*.json")) + list(state.glob("*.safetensors")):
        if f.name != "data_position.json":
            f.unlink()
    marker = tmp_path / "pwned"
    _plant_pickles(state, marker)  # exactly where the old format kept optimizer/scheduler/EMA/RNG state
    with pytest.raises(CheckpointFormatError, match="old pickle format") as err:
        train(cfg, cache_uri, str(tmp_path / "old"))
    assert "restart from its U-Net weights" in str(err.value) and "train.resume=null" in str(err.value)
    assert not marker.exists()


def test_stray_pickles_beside_the_state_are_never_opened_and_resume_is_exact(finished, cache_uri, tmp_path, caplog):
    cfg, ckpts, result = finished
    _payload_is_live(tmp_path)
    d = _copy_checkpoint(ckpts, "epoch-0001", tmp_path / "planted")
    marker = tmp_path / "pwned"
    _plant_pickles(d / "training_state", marker)
    with caplog.at_level(logging.WARNING, logger="medisyn.train"):
        resumed = train(cfg, cache_uri, str(tmp_path / "planted"))
    assert not marker.exists()
    assert "pickle files are never loaded" in caplog.text
    assert resumed.resumed_from is not None and resumed.resumed_from.endswith("epoch-0001")
    assert resumed.global_step == result.global_step == 10
    assert resumed.unet_sha256_per_rank == result.unet_sha256_per_rank  # the state round-tripped exactly
