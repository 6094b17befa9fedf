"""Fine-tune the SDXL U-Net on the latent cache (section 4.2), 1..N processes, resumable exactly.

One function in named phases, in the diffusers order (train_text_to_image_sdxl.py): load, freeze,
cast, optimizer, prepare, resume, loop. The same function runs in-process (1 process) and under
torchrun (N processes, gloo on CPU, NCCL on GPU); ``medisyn.train.torchrun`` starts either.
Checkpoints are written and read by :mod:`medisyn.train.checkpoints`.

Determinism is by construction, not by replaying state (:mod:`medisyn.train.draws`):

* the data order of epoch ``e`` is ``randperm(N)`` seeded by ``(seed, e)``;
* every sample's noise, timestep, offset noise and prompt-dropout draw come from a generator seeded
  by ``(seed, epoch, position in the epoch order)``.

So a run resumed from a checkpoint that stored ``(epoch, step)`` continues with exactly the samples
and random draws the uninterrupted run would have used (no data-loader replay), and the numbers a
sample sees do not depend on which rank or micro-batch it lands on: 2 processes x accumulation 1
and 1 process x accumulation 2 train on the same global batches with the same draws.

An epoch is ``N // effective_batch_size`` optimizer steps; the remainder (fewer than one global batch,
different samples each epoch) is skipped, as ``drop_last`` does (paper: 1,022,191 / 128 -> 111).
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import time
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

import torch
import torch.nn.functional as F

from medisyn import storage, tracking
from medisyn.config import ConfigError, RunConfig
from medisyn.progress import Progress
from medisyn.results import StageResult
from medisyn.train import list_checkpoints
from medisyn.train.checkpoints import (  # the state helpers stay importable from here (tests/test_trainer.py)
    CheckpointFormatError,
    _load_checkpoint,
    _read_state,
    _remove_incomplete,
    _resolve_resume,
    _rng_state,
    _save_checkpoint,
    _set_rng_state,
    _write_state,
)
from medisyn.train.draws import _EpochBatches, dropout_mask, epoch_order, micro_batches, sample_draws
from medisyn.train.encode import LatentCache, local_cache_dir

log = logging.getLogger("medisyn.train")

__all__ = [  # the stage and its pieces; the draws and state helpers are re-exported (tests/test_trainer.py)
    "CheckpointFormatError", "TrainResult", "_read_state", "_rng_state", "_set_rng_state", "_write_state",
    "dropout_mask", "epoch_order", "micro_batches", "resolve_mixed_precision", "sample_draws", "train",
    "unet_flops_per_sample", "weights_sha256",
]


@dataclass(frozen=True)
class TrainResult(StageResult):
    checkpoints: list[str]  # URIs of the complete epoch checkpoints, in order
    epochs: int  # epochs completed (= train.epochs when the run finished)
    global_step: int  # optimizer steps taken in total (across resumes)
    final_loss: float | None  # mean loss of the last global batch (all ranks); None if no step ran
    world_size: int  # processes
    per_device_batch_size: int  # derived by TrainConfig.batch_geometry
    gradient_accumulation_steps: int  # derived by TrainConfig.batch_geometry
    effective_batch_size: int  # per_device x accumulation x world_size (section 4.2: 128)
    steps_per_epoch: int  # num_samples // effective_batch_size
    resumed_from: str | None  # checkpoint URI this call resumed from
    mixed_precision: str  # what ran: as configured, or a ConfigError before any step (resolve_mixed_precision)
    flops_per_sample: float  # U-Net forward+backward FLOPs per sample (torch.utils.flop_counter)
    images_per_s: float  # samples/s over this call's steps, all devices
    mfu: float | None  # model FLOPs utilisation over this call, vs train.peak_flops_per_device
    dataset_hash: str  # from the latent cache manifest
    cache_key: str  # latent cache key
    step_checkpoints: list[str] = field(default_factory=list)  # complete step checkpoints left after rotation
    unet_sha256_per_rank: list[str] = field(default_factory=list)  # final weights of every rank: replicas in sync
    step_seconds: list[float] = field(default_factory=list)  # wall time of each optimizer step of this call (rank 0)


# ----------------------------------------------------------------------------------------------
# Small pieces
# ----------------------------------------------------------------------------------------------
def resolve_mixed_precision(requested: str, device: torch.device) -> str:
    """The precision that will run: what was asked for, if this hardware has it (decided by capability,
    not by device type), else a ConfigError; never a silent fallback (#14).

    bf16 (section 4.2) needs a GPU with bf16 (Ampere or newer) or a CPU with native bf16 instructions
    (AVX512-BF16 or AMX-BF16; medisyn.models.sdxl.require_precision). fp16 needs a GPU; accelerate then
    scales the loss with a GradScaler.
    """
    if requested != "no":
        from medisyn.models.sdxl import require_precision

        require_precision(requested, device, f"train.mixed_precision={requested}")
    return requested


def unet_flops_per_sample(unet_config, latent_shape, text_shape, pooled_dim: int) -> float:
    """Forward + backward FLOPs of one sample through this U-Net, counted once with
    ``torch.utils.flop_counter`` on a meta-device copy (no memory, no compute)."""
    from diffusers import UNet2DConditionModel
    from torch.utils.flop_counter import FlopCounterMode

    with torch.device("meta"):
        model = UNet2DConditionModel.from_config(unet_config)
        x = torch.zeros((1, *latent_shape))
        t = torch.tensor([500])
        ehs = torch.zeros((1, *text_shape))
        cond = {"text_embeds": torch.zeros((1, pooled_dim)), "time_ids": torch.zeros((1, 6))}
        with FlopCounterMode(display=False) as counter:
            out = model(x, t, encoder_hidden_states=ehs, added_cond_kwargs=cond).sample
            out.float().pow(2).mean().backward()
    return float(counter.get_total_flops())


# ----------------------------------------------------------------------------------------------
# The stage, in named phases: data, load/freeze/cast, optimizer, prepare, resume, loop, result
# ----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class _Geometry:
    """How the global batch is laid out over processes and micro-batches (TrainConfig.batch_geometry)."""

    world: int  # processes
    rank: int  # this process
    per_device: int  # samples per micro-batch on each process
    accumulation: int  # micro-batches per optimizer step
    num_samples: int  # cached training samples

    @property
    def eff(self) -> int:
        """The effective batch size: per_device x accumulation x world (section 4.2: 128)."""
        return self.per_device * self.accumulation * self.world

    @property
    def steps_per_epoch(self) -> int:
        """Optimizer steps per epoch: the remainder of fewer than one global batch is skipped."""
        return self.num_samples // self.eff


@dataclass(frozen=True)
class _Model:
    """What the loop trains, as prepared by accelerate."""

    noise_scheduler: Any  # the base model's DDPM scheduler: add_noise, get_velocity, SNR
    unet: Any  # as prepared (DDP-wrapped under N processes): forward, backward, clipping
    raw_unet: Any  # unwrapped: saved, restored and hashed
    optimizer: Any
    lr_scheduler: Any  # stepped once per optimizer step
    ema: Any  # diffusers EMAModel with train.use_ema, else None
    flops_per_sample: float  # U-Net forward+backward FLOPs per sample


@dataclass
class _Tally:
    """What the loop counts: steps, the logging window's losses, timings."""

    global_step: int  # optimizer steps taken in total (across resumes)
    final_loss: float | None = None  # mean loss of the last global batch (all ranks)
    steps_run: int = 0  # optimizer steps of this call
    t_run: float = 0.0  # seconds spent in this call's optimizer steps
    step_seconds: list[float] = field(default_factory=list)  # wall time of each optimizer step (this rank)
    window_t: float = field(default_factory=time.perf_counter)  # start of the logging window
    window_steps: int = 0  # optimizer steps in the logging window
    window_loss: list[torch.Tensor] = field(default_factory=list)  # per-step mean losses of the window


def train(cfg: RunConfig, cache_uri: str, checkpoints_uri: str) -> TrainResult:
    """Fine-tune the U-Net on the latent cache; one checkpoint per epoch (+ every N steps)."""
    from accelerate import Accelerator
    from accelerate.utils import InitProcessGroupKwargs

    tc = cfg.train
    checkpoints_uri = storage.normalize(checkpoints_uri)
    cache_uri = storage.normalize(cache_uri)
    use_cuda = torch.cuda.is_available() and cfg.runtime.device != "cpu"
    mixed_precision = resolve_mixed_precision(tc.mixed_precision, torch.device("cuda" if use_cuda else "cpu"))
    accelerator = Accelerator(
        cpu=not use_cuda,
        mixed_precision=mixed_precision,
        # Accumulation is explicit below (no_sync + loss / A), so accelerate's counter stays at 1.
        gradient_accumulation_steps=1,
        kwargs_handlers=[InitProcessGroupKwargs(timeout=timedelta(seconds=tc.nccl_timeout_s))],
    )
    try:
        return _train(cfg, cache_uri, checkpoints_uri, accelerator, mixed_precision)
    finally:
        if accelerator.num_processes == 1:
            # accelerate keeps process-wide singletons; reset them so a later in-process run (tests,
            # the benchmark) can choose another precision or accumulation.
            from accelerate.state import AcceleratorState, GradientState

            AcceleratorState._reset_state(True)
            GradientState._reset_state()


def _train(cfg: RunConfig, cache_uri: str, checkpoints_uri: str, accelerator, mixed_precision: str) -> TrainResult:
    """The phases in the diffusers order: data, load/freeze/cast, optimizer, prepare, resume, loop."""
    tc = cfg.train
    world = accelerator.num_processes
    per_device, accumulation = tc.batch_geometry(world)  # refuses combinations that don't divide
    if accelerator.is_main_process:
        logging.basicConfig(level=logging.INFO)

    cache, geo = _load_cache(cache_uri, accelerator, per_device, accumulation)
    noise_scheduler, unet, ema, flops_per_sample = _load_unet(cfg, cache, cache_uri, accelerator.device)
    optimizer, lr_scheduler = _optimizer(cfg, unet, geo.steps_per_epoch * tc.epochs, accelerator.device)

    # -- prepare ----------------------------------------------------------------------------------
    unet, optimizer = accelerator.prepare(unet, optimizer)
    model = _Model(noise_scheduler, unet, accelerator.unwrap_model(unet), optimizer, lr_scheduler, ema,
                   flops_per_sample)

    resumed_from, start_epoch, start_step, global_step = _resume(cfg, checkpoints_uri, accelerator, model,
                                                                 cache.manifest, geo.steps_per_epoch)
    torch.manual_seed(tc.seed + geo.rank)  # only for anything outside our per-sample generators

    # -- tracking, then the loop ------------------------------------------------------------------
    manifest = cache.manifest
    run_ctx = (
        tracking.stage_run(cfg, "train", tags={"medisyn.dataset_hash": manifest["dataset_hash"],
                                               "medisyn.cache_key": manifest["cache_key"]})
        if accelerator.is_main_process else contextlib.nullcontext(None)
    )
    with run_ctx as run:
        _log_start(cfg, run, geo, model, manifest, mixed_precision, resumed_from)
        tally = _train_epochs(cfg, accelerator, cache, geo, model, checkpoints_uri, (start_epoch, start_step),
                              global_step, run)

    accelerator.wait_for_everyone()
    return _result(cfg, accelerator, geo, model, tally, checkpoints_uri, resumed_from, mixed_precision, manifest)


def _load_cache(cache_uri: str, accelerator, per_device: int, accumulation: int) -> tuple[LatentCache, _Geometry]:
    """The latent cache, downloaded once per node for s3:// (local main process first), and the batch
    geometry over it; a global batch larger than the cache is a ConfigError."""
    with accelerator.local_main_process_first():
        cache = LatentCache(local_cache_dir(cache_uri))
    geo = _Geometry(accelerator.num_processes, accelerator.process_index, per_device, accumulation, len(cache))
    if geo.steps_per_epoch == 0:
        raise ConfigError(
            f"train.effective_batch_size={geo.eff} exceeds the {geo.num_samples} cached training samples: "
            "no step fits in an epoch"
        )
    return cache, geo


def _load_unet(cfg: RunConfig, cache: LatentCache, cache_uri: str, device: torch.device):
    """Load, freeze, cast: only the U-Net is trained (VAE and text encoders were used by encode).
    Returns (noise scheduler, U-Net on ``device``, EMA or None, FLOPs per sample)."""
    from diffusers import UNet2DConditionModel
    from diffusers.models.attention_processor import AttnProcessor, AttnProcessor2_0
    from diffusers.training_utils import EMAModel

    from medisyn.models import sdxl

    tc = cfg.train
    manifest = cache.manifest
    noise_scheduler = sdxl.load_noise_scheduler(cfg.models)
    if noise_scheduler.config.prediction_type != tc.prediction_type:
        # Every sampler (FID, gates, registry, consumers) takes its scheduler from the base model, so a
        # U-Net trained for another target would be decoded wrongly, silently. Fail before training.
        raise ConfigError(
            f"train.prediction_type={tc.prediction_type!r}, but the base model's scheduler "
            f"({cfg.models.sdxl_base}/scheduler) predicts {noise_scheduler.config.prediction_type!r}, and "
            "checkpoints are sampled with the base model's scheduler: train what the base model predicts "
            "(SDXL base: epsilon), or start from a base model whose scheduler predicts "
            f"{tc.prediction_type!r}"
        )
    unet = sdxl.load_unet(cfg.models)
    if (unet.config.cross_attention_dim != manifest["prompt_embeds_shape"][-1]
            or unet.config.in_channels != cache.latent_shape[0]):
        raise ValueError(
            f"latent cache {cache_uri} (text dim {manifest['prompt_embeds_shape'][-1]}, latent channels "
            f"{cache.latent_shape[0]}) does not match the U-Net of {cfg.models.sdxl_base}: re-run encode"
        )
    if manifest["model_identity"] != sdxl.model_identity(cfg.models):
        log.warning("latent cache was encoded with base model %s, config names %s", manifest["model_identity"],
                    sdxl.model_identity(cfg.models))
    unet.train()
    unet.requires_grad_(True)
    unet.set_attn_processor(AttnProcessor2_0() if tc.attention == "sdpa" else AttnProcessor())
    if tc.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
    if tc.channels_last:
        unet.to(memory_format=torch.channels_last)
    unet.to(device)  # master weights stay float32; autocast (accelerate) runs bf16 compute (GPU or bf16 CPU)
    if tc.torch_compile:
        # Regional compilation: each down/mid/up block is compiled on its own, in place (state-dict
        # keys unchanged), instead of tracing the whole U-Net and its backward as one graph, which
        # takes far longer to start. Static shapes: every micro-batch has the same size (drop_last).
        for block in (*unet.down_blocks, unet.mid_block, *unet.up_blocks):
            block.compile(dynamic=False)
    ema = None
    if tc.use_ema:
        ema = EMAModel(unet.parameters(), decay=tc.ema_decay, model_cls=UNet2DConditionModel, model_config=unet.config)
        ema.to(device)
    flops_per_sample = unet_flops_per_sample(
        unet.config, cache.latent_shape, manifest["prompt_embeds_shape"], manifest["pooled_dim"]
    )
    return noise_scheduler, unet, ema, flops_per_sample


def _optimizer(cfg: RunConfig, unet, total_steps: int, device: torch.device):
    """(AdamW, LR schedule stepped by us once per optimizer step)."""
    from diffusers.optimization import get_scheduler

    tc = cfg.train
    # fused AdamW: one kernel over all parameters instead of a chain of foreach ops; on CPU and GPU
    # alike (measured 2.1-2.5x faster optimizer step on CPU, docs/performance.md). Deterministic, so
    # exact resume holds.
    optimizer = torch.optim.AdamW(
        unet.parameters(), lr=tc.learning_rate, betas=(tc.adam_beta1, tc.adam_beta2),
        weight_decay=tc.adam_weight_decay, eps=tc.adam_epsilon, fused=device.type in ("cpu", "cuda"),
    )
    lr_scheduler = get_scheduler(
        tc.lr_scheduler, optimizer=optimizer, num_warmup_steps=tc.lr_warmup_steps, num_training_steps=total_steps
    )
    return optimizer, lr_scheduler


def _resume(cfg: RunConfig, checkpoints_uri: str, accelerator, model: _Model, manifest: dict,
            steps_per_epoch: int) -> tuple[str | None, int, int, int]:
    """Clear a killed run's leftovers and restore ``train.resume``'s checkpoint, if any; returns
    (checkpoint resumed from, epoch, step in that epoch, global step) to start at."""
    tc = cfg.train
    if accelerator.is_main_process:  # only the main process ever writes or deletes under the checkpoints prefix
        _remove_incomplete(checkpoints_uri)
    accelerator.wait_for_everyone()
    start_epoch, start_step, global_step = 0, 0, 0
    resumed_from = _resolve_resume(tc.resume, checkpoints_uri)
    if tc.resume == "latest" and resumed_from is None:
        log.info("no complete checkpoint under %s: starting a new run", checkpoints_uri)
    if resumed_from is not None:
        start_epoch, start_step, global_step = _load_checkpoint(
            resumed_from, model.raw_unet, model.optimizer, model.lr_scheduler, model.ema, manifest
        )
        log.info("resumed from %s: epoch %d, step %d of %d, global step %d", resumed_from, start_epoch + 1,
                 start_step, steps_per_epoch, global_step)
    return resumed_from, start_epoch, start_step, global_step


def _log_start(cfg: RunConfig, run, geo: _Geometry, model: _Model, manifest: dict, mixed_precision: str,
               resumed_from: str | None) -> None:
    """The run's parameters and resolved config (main process, with tracking) and the plan, in the log."""
    tc = cfg.train
    if run is not None:
        import mlflow

        mlflow.log_params({f"train.{k}": v for k, v in tc.model_dump(mode="json").items()})
        mlflow.log_params({"world_size": geo.world, "derived.per_device_batch_size": geo.per_device,
                           "derived.gradient_accumulation_steps": geo.accumulation,
                           "dataset_hash": manifest["dataset_hash"], "cache_key": manifest["cache_key"],
                           "flops_per_sample": model.flops_per_sample, "mixed_precision.effective": mixed_precision,
                           "resumed_from": resumed_from or ""})
        tracking.log_text(cfg.to_yaml(), "config/resolved.yaml")
    log.info(
        "train: %d samples, %d epochs x %d steps, batch %d = %d/device x %d accumulation x %d processes, "
        "%s precision, %.3g FLOP/sample", geo.num_samples, tc.epochs, geo.steps_per_epoch, geo.eff, geo.per_device,
        geo.accumulation, geo.world, mixed_precision, model.flops_per_sample,
    )


def _train_epochs(cfg: RunConfig, accelerator, cache: LatentCache, geo: _Geometry, model: _Model,
                  checkpoints_uri: str, start: tuple[int, int], global_step: int, run) -> _Tally:
    """The loop, from ``start`` = (epoch, step in epoch): optimizer steps, then logging every
    ``train.log_every_steps`` and checkpoints at each epoch's end (+ every N steps)."""
    from diffusers.training_utils import compute_snr

    tc = cfg.train
    total_steps = geo.steps_per_epoch * tc.epochs
    progress = Progress(total_steps, "train", unit="step", every_s=30.0)
    progress.count = global_step
    num_timesteps = model.noise_scheduler.config.num_train_timesteps
    tally = _Tally(global_step)
    start_epoch, start_step = start

    for epoch in range(start_epoch, tc.epochs):
        first = start_step if epoch == start_epoch else 0
        loader = _epoch_loader(cfg, cache, geo, num_timesteps, epoch, first, accelerator.device)
        batches = iter(loader)
        for step in range(first, geo.steps_per_epoch):
            t_step = time.perf_counter()
            loss_sum = _optimizer_step(cfg, accelerator, model, batches, geo.accumulation, compute_snr)
            tally.global_step += 1
            tally.steps_run += 1
            tally.step_seconds.append(time.perf_counter() - t_step)
            tally.t_run += tally.step_seconds[-1]
            tally.window_steps += 1
            tally.window_loss.append(loss_sum / geo.accumulation)
            progress.update(1)
            last_of_epoch = step == geo.steps_per_epoch - 1
            if tally.global_step % tc.log_every_steps == 0 or last_of_epoch:
                _log_window(accelerator, geo, model, tally, epoch, total_steps, tc.peak_flops_per_device, run)
            if last_of_epoch:
                _save_checkpoint(accelerator, checkpoints_uri, "epoch", epoch + 1, model.raw_unet, model.optimizer,
                                 model.lr_scheduler, model.ema, epoch + 1, 0, tally.global_step, cache.manifest, cfg)
            elif tc.checkpoint_every_steps and tally.global_step % tc.checkpoint_every_steps == 0:
                _save_checkpoint(accelerator, checkpoints_uri, "step", tally.global_step, model.raw_unet,
                                 model.optimizer, model.lr_scheduler, model.ema, epoch, step + 1, tally.global_step,
                                 cache.manifest, cfg)
        del batches, loader
    progress.close()
    return tally


def _epoch_loader(cfg: RunConfig, cache: LatentCache, geo: _Geometry, num_timesteps: int, epoch: int, first: int,
                  device: torch.device) -> torch.utils.data.DataLoader:
    """This rank's micro-batches of ``epoch`` from optimizer step ``first`` on, with their draws."""
    tc = cfg.train
    order = epoch_order(geo.num_samples, tc.seed, epoch)
    dataset = _EpochBatches(cache, tc.seed, epoch, num_timesteps, tc.noise_offset, tc.empty_prompt_prob)
    return torch.utils.data.DataLoader(
        dataset,
        batch_sampler=list(micro_batches(order, first, geo.steps_per_epoch, geo.rank, geo.world, geo.per_device,
                                         geo.accumulation)),
        collate_fn=dataset.collate, num_workers=tc.dataloader_num_workers,
        pin_memory=device.type == "cuda",
        prefetch_factor=2 if tc.dataloader_num_workers else None,
        persistent_workers=False,
    )


def _optimizer_step(cfg: RunConfig, accelerator, model: _Model, batches, accumulation: int,
                    compute_snr) -> torch.Tensor:
    """One optimizer step over ``accumulation`` micro-batches (gradients synchronised on the last
    one only); returns the micro-batches' summed loss, on the device (no host sync)."""
    tc = cfg.train
    device = accelerator.device
    non_blocking = device.type == "cuda"
    noise_scheduler, unet = model.noise_scheduler, model.unet
    loss_sum = torch.zeros((), device=device)
    for micro in range(accumulation):
        batch = {k: v.to(device, non_blocking=non_blocking) for k, v in next(batches).items()}
        latents, noise, timesteps = batch["latents"], batch["noise"], batch["timesteps"]
        noisy = noise_scheduler.add_noise(latents, noise, timesteps)
        if tc.channels_last:
            noisy = noisy.contiguous(memory_format=torch.channels_last)
        target = (noise if tc.prediction_type == "epsilon"
                  else noise_scheduler.get_velocity(latents, noise, timesteps))
        sync = contextlib.nullcontext() if micro == accumulation - 1 else accelerator.no_sync(unet)
        with sync:
            pred = unet(
                noisy, timesteps, encoder_hidden_states=batch["prompt_embeds"],
                added_cond_kwargs={"text_embeds": batch["text_embeds"], "time_ids": batch["time_ids"]},
            ).sample
            loss = _loss(pred, target, timesteps, tc.snr_gamma, tc.prediction_type, noise_scheduler, compute_snr)
            accelerator.backward(loss / accumulation)
        loss_sum += loss.detach()
    if tc.max_grad_norm is not None:
        accelerator.clip_grad_norm_(unet.parameters(), tc.max_grad_norm)
    model.optimizer.step()
    model.lr_scheduler.step()
    model.optimizer.zero_grad(set_to_none=True)
    if model.ema is not None:
        model.ema.step(unet.parameters())
    return loss_sum


def _log_window(accelerator, geo: _Geometry, model: _Model, tally: _Tally, epoch: int, total_steps: int,
                peak_flops_per_device: float, run) -> None:
    """Loss, LR, throughput and MFU of the steps since the last log; then a new window.
    Collective: every rank reaches this at the same steps."""
    mean_loss = accelerator.reduce(torch.stack(tally.window_loss).mean(), reduction="mean")
    tally.final_loss = float(accelerator.reduce(tally.window_loss[-1], reduction="mean"))
    elapsed = time.perf_counter() - tally.window_t
    ips = tally.window_steps * geo.eff / elapsed if elapsed > 0 else 0.0
    metrics = {
        "loss": float(mean_loss), "lr": float(model.lr_scheduler.get_last_lr()[0]),
        "images_per_s": ips, "images_per_s_per_device": ips / geo.world,
        "mfu": model.flops_per_sample * ips / geo.world / peak_flops_per_device, "epoch": epoch + 1,
    }
    if accelerator.is_main_process:
        log.info("step %d/%d epoch %d loss %.5f lr %.2e %.1f img/s (%.2f/device) MFU %.2f%%",
                 tally.global_step, total_steps, epoch + 1, metrics["loss"], metrics["lr"], ips,
                 ips / geo.world, 100 * metrics["mfu"])
        if run is not None:
            import mlflow

            mlflow.log_metrics(metrics, step=tally.global_step)
    tally.window_t, tally.window_steps, tally.window_loss = time.perf_counter(), 0, []


def _result(cfg: RunConfig, accelerator, geo: _Geometry, model: _Model, tally: _Tally, checkpoints_uri: str,
            resumed_from: str | None, mixed_precision: str, manifest: dict) -> TrainResult:
    """The stage's result; every rank hashes its own final weights (equal hashes: replicas in sync)."""
    hashes = _gather_strings(accelerator, weights_sha256(model.raw_unet))
    images_per_s = tally.steps_run * geo.eff / tally.t_run if tally.t_run > 0 else 0.0
    epochs_done = min(cfg.train.epochs, tally.global_step // geo.steps_per_epoch)
    peak = cfg.train.peak_flops_per_device
    return TrainResult(
        checkpoints=list_checkpoints(checkpoints_uri, kind="epoch"),
        epochs=epochs_done, global_step=tally.global_step, final_loss=tally.final_loss, world_size=geo.world,
        per_device_batch_size=geo.per_device, gradient_accumulation_steps=geo.accumulation,
        effective_batch_size=geo.eff, steps_per_epoch=geo.steps_per_epoch, resumed_from=resumed_from,
        mixed_precision=mixed_precision, flops_per_sample=model.flops_per_sample, images_per_s=images_per_s,
        mfu=(model.flops_per_sample * images_per_s / geo.world / peak) if tally.steps_run else None,
        dataset_hash=manifest["dataset_hash"], cache_key=manifest["cache_key"],
        step_checkpoints=list_checkpoints(checkpoints_uri, kind="step"),
        unet_sha256_per_rank=hashes, step_seconds=tally.step_seconds,
    )


def weights_sha256(module: torch.nn.Module) -> str:
    """sha256 over the module's state dict (names, dtypes, bytes), in a fixed order."""
    h = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        t = tensor.detach().to("cpu").contiguous(memory_format=torch.contiguous_format)
        h.update(name.encode())
        h.update(str(t.dtype).encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def _gather_strings(accelerator, value: str) -> list[str]:
    if accelerator.num_processes == 1:
        return [value]
    from accelerate.utils import gather_object

    return list(gather_object([value]))


def _loss(pred, target, timesteps, snr_gamma, prediction_type, noise_scheduler, compute_snr):
    """Eq. (1): MSE between predicted and true noise (or velocity); Min-SNR-gamma weighting optional."""
    if snr_gamma is None:
        return F.mse_loss(pred.float(), target.float(), reduction="mean")
    snr = compute_snr(noise_scheduler, timesteps)
    weights = torch.minimum(snr, torch.full_like(snr, snr_gamma))
    weights = weights / snr if prediction_type == "epsilon" else weights / (snr + 1)
    per_sample = F.mse_loss(pred.float(), target.float(), reduction="none").mean(dim=(1, 2, 3))
    return (per_sample * weights).mean()


