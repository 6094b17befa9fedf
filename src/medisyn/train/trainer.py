"""Fine-tune the SDXL U-Net on the latent cache (section 4.2), 1..N processes, resumable exactly.

One function, in the diffusers order (train_text_to_image_sdxl.py): load, freeze, cast, optimizer,
prepare, resume, loop. The same function runs in-process (1 process) and under torchrun (N
processes, gloo on CPU, NCCL on GPU); ``medisyn.train.torchrun`` starts either.

Determinism is by construction, not by replaying state:

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
import json
import logging
import math
import random
import shutil
import time
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from medisyn import storage, tracking
from medisyn.config import ConfigError, RunConfig
from medisyn.progress import Progress
from medisyn.results import StageResult
from medisyn.train import checkpoint_name, latest_checkpoint, list_checkpoints, read_checkpoint_info
from medisyn.train.encode import LatentCache, local_cache_dir

log = logging.getLogger("medisyn.train")


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


def _mix(*parts: int | str) -> int:
    """A 63-bit seed from a tuple: independent streams per (seed, epoch, position)."""
    digest = hashlib.blake2b(repr(parts).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


def epoch_order(num_samples: int, seed: int, epoch: int) -> torch.Tensor:
    """The sample order of one epoch: a permutation that depends only on (seed, epoch)."""
    return torch.randperm(num_samples, generator=torch.Generator().manual_seed(_mix(seed, "order", epoch)))


def sample_draws(seed: int, epoch: int, position: int, latent_shape, num_timesteps: int, noise_offset: float):
    """(dropout uniform, timestep, noise, offset noise) of one sample at one step, from its own
    generator: the same numbers whichever rank, micro-batch or resume processes it."""
    g = torch.Generator().manual_seed(_mix(seed, "sample", epoch, position))
    u = float(torch.rand((), generator=g))
    t = int(torch.randint(0, num_timesteps, (), generator=g))
    noise = torch.randn(tuple(latent_shape), generator=g)
    if noise_offset:
        noise = noise + noise_offset * torch.randn((latent_shape[0], 1, 1), generator=g)
    return u, t, noise


def dropout_mask(seed: int, epoch: int, positions, prob: float) -> np.ndarray:
    """Which samples get the empty prompt at (epoch, positions): the same draws the trainer makes."""
    out = []
    for p in positions:
        g = torch.Generator().manual_seed(_mix(seed, "sample", epoch, int(p)))
        out.append(float(torch.rand((), generator=g)) < prob)
    return np.array(out, dtype=bool)


class _EpochBatches(torch.utils.data.Dataset):
    """One epoch of the latent cache with every sample's random draws, ready for the step.

    Items are (position in the epoch order, sample index): the position keys the draws. The
    per-sample generators, prompt dropout and text-table lookup run here, in the data path
    (DataLoader workers when ``train.dataloader_num_workers`` > 0), not in the training step, so
    the step itself only moves finished tensors to the device: no Python per-sample loop and no
    host sync on the hot path (#14).
    """

    def __init__(self, cache: LatentCache, seed: int, epoch: int, num_timesteps: int, noise_offset: float,
                 empty_prompt_prob: float):
        self.cache, self.seed, self.epoch = cache, seed, epoch
        self.num_timesteps, self.noise_offset, self.empty_prompt_prob = num_timesteps, noise_offset, empty_prompt_prob

    def __len__(self) -> int:
        return len(self.cache)

    def __getitem__(self, item):
        position, index = item
        latents, caption_row, time_ids = self.cache.sample(int(index))
        u, t, noise = sample_draws(self.seed, self.epoch, position, self.cache.latent_shape, self.num_timesteps,
                                   self.noise_offset)
        # Prompt dropout for CFG, re-drawn per sample per step (section 4.2): row 0 of the text
        # table is the empty prompt, encoded once by the encode stage.
        row = 0 if u < self.empty_prompt_prob else int(caption_row)
        return torch.from_numpy(latents), row, torch.from_numpy(time_ids), t, noise

    def collate(self, items) -> dict[str, torch.Tensor]:
        latents, rows, time_ids, timesteps, noise = zip(*items, strict=True)
        prompt, pooled = self.cache.text(np.array(rows, dtype=np.int64))
        return {
            "latents": torch.stack(latents), "noise": torch.stack(noise),
            "timesteps": torch.tensor(timesteps, dtype=torch.long), "time_ids": torch.stack(time_ids),
            "prompt_embeds": torch.from_numpy(np.ascontiguousarray(prompt)),
            "text_embeds": torch.from_numpy(np.ascontiguousarray(pooled)),
        }


def micro_batches(order: torch.Tensor, start_step: int, steps: int, rank: int, world: int, per_device: int,
                  accumulation: int):
    """This rank's micro-batches from optimizer step ``start_step`` on, as lists of (position, index).

    Global batch ``s`` is positions ``[s*E, (s+1)*E)`` of the epoch order; its micro-batch ``m`` is
    the next ``world*per_device`` positions, of which rank ``r`` takes slice ``r``.
    """
    eff = per_device * accumulation * world
    for s in range(start_step, steps):
        for m in range(accumulation):
            lo = s * eff + m * world * per_device + rank * per_device
            yield [(p, int(order[p])) for p in range(lo, lo + per_device)]


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


def _rng_state() -> dict:
    """RNG states of python, numpy, torch (and CUDA) as plain JSON values and tensors: no pickle."""
    version, internal, gauss_next = random.getstate()
    np_name, np_keys, np_pos, np_has_gauss, np_cached = np.random.get_state(legacy=True)
    state: dict = {
        "python": {"version": int(version), "internal": [int(x) for x in internal], "gauss_next": gauss_next},
        "numpy": {"name": str(np_name), "keys": [int(k) for k in np_keys], "pos": int(np_pos),
                  "has_gauss": int(np_has_gauss), "cached_gaussian": float(np_cached)},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    """Inverse of ``_rng_state``; every value is type-checked and rebuilt, never trusted as an object."""
    py, npst = state["python"], state["numpy"]
    gauss_next = py["gauss_next"]
    random.setstate((int(py["version"]), tuple(int(x) for x in py["internal"]),
                     None if gauss_next is None else float(gauss_next)))
    np.random.set_state((str(npst["name"]), np.array([int(k) for k in npst["keys"]], dtype=np.uint32),
                         int(npst["pos"]), int(npst["has_gauss"]), float(npst["cached_gaussian"])))
    if not isinstance(state["torch"], torch.Tensor) or state["torch"].dtype != torch.uint8:
        raise TypeError("torch RNG state must be a uint8 tensor")
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        if not all(isinstance(t, torch.Tensor) and t.dtype == torch.uint8 for t in state["cuda"]):
            raise TypeError("CUDA RNG states must be uint8 tensors")
        torch.cuda.set_rng_state_all(state["cuda"])


# ----------------------------------------------------------------------------------------------
# Training state on disk without pickle: <name>.safetensors (tensors) + <name>.json (the rest)
# ----------------------------------------------------------------------------------------------
STATE_FORMAT = "medisyn.training_state/1"
STATE_PARTS = ("optimizer", "scheduler", "rng")  # + "ema" with train.use_ema
LEGACY_PICKLES = ("optimizer.pt", "scheduler.pt", "ema.pt", "rng.pt")  # the old format: never opened


class CheckpointFormatError(ValueError):
    """A checkpoint's training_state/ is in the old pickle format, or malformed."""


def _encode_state(obj, tensors: dict[str, torch.Tensor]):
    """A JSON tree for ``obj``; tensors go to ``tensors`` and are referenced by key. Containers are
    tagged (``{"dict": [[k, v], ...]}``, ``{"list": [...]}``, ``{"tuple": [...]}``, ``{"tensor": key}``,
    ``{"float": "nan"}``) so ints, tuples and non-string dict keys round-trip exactly."""
    if obj is None or isinstance(obj, (bool, int, str)):
        return obj
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else {"float": repr(obj)}
    if isinstance(obj, torch.Tensor):
        key = str(len(tensors))
        tensors[key] = obj.detach().to("cpu").contiguous().clone()
        return {"tensor": key}
    if isinstance(obj, dict):
        for k in obj:
            if isinstance(k, bool) or not isinstance(k, (int, str)):
                raise TypeError(f"training state: dict key {k!r} ({type(k).__name__}) is not str or int")
        return {"dict": [[k, _encode_state(v, tensors)] for k, v in obj.items()]}
    if isinstance(obj, list):
        return {"list": [_encode_state(v, tensors) for v in obj]}
    if isinstance(obj, tuple):
        return {"tuple": [_encode_state(v, tensors) for v in obj]}
    raise TypeError(f"training state: cannot store a {type(obj).__name__} without pickle")


def _decode_state(node, tensors: dict[str, torch.Tensor]):
    """Inverse of ``_encode_state``; anything else is refused."""
    if node is None or isinstance(node, (bool, int, float, str)):
        return node
    if isinstance(node, dict) and len(node) == 1:
        ((tag, value),) = node.items()
        if tag == "tensor" and isinstance(value, str) and value in tensors:
            return tensors[value]
        if tag == "float" and value in ("inf", "-inf", "nan"):
            return float(value)
        if tag in ("list", "tuple") and isinstance(value, list):
            items = [_decode_state(v, tensors) for v in value]
            return items if tag == "list" else tuple(items)
        if tag == "dict" and isinstance(value, list):
            out = {}
            for pair in value:
                if (not isinstance(pair, list) or len(pair) != 2 or isinstance(pair[0], bool)
                        or not isinstance(pair[0], (int, str))):
                    raise CheckpointFormatError(f"malformed dict entry {str(pair)[:80]}")
                out[pair[0]] = _decode_state(pair[1], tensors)
            return out
    raise CheckpointFormatError(f"unexpected value {str(node)[:80]}")


def _write_state(state_dir: Path, name: str, obj) -> None:
    from safetensors.torch import save_file

    tensors: dict[str, torch.Tensor] = {}
    tree = _encode_state(obj, tensors)
    save_file(tensors, str(state_dir / f"{name}.safetensors"), metadata={"format": STATE_FORMAT})
    (state_dir / f"{name}.json").write_text(json.dumps(
        {"format": STATE_FORMAT, "tensors": sorted(tensors), "state": tree}, allow_nan=False))


def _legacy_error(uri: str, found: list[str]) -> CheckpointFormatError:
    return CheckpointFormatError(
        f"checkpoint {uri} stores its training state in the old pickle format ({', '.join(found)}), which is "
        "never loaded: unpickling a file can run code. Its optimizer, scheduler, EMA and RNG state cannot be "
        "resumed; restart from its U-Net weights (unet/ or training_state/unet_raw/, safetensors) in a fresh run "
        "with a new checkpoints prefix or train.resume=null (docs/training.md, 'Checkpoints')"
    )


def _read_state(state_dir: Path, name: str, uri: str):
    """Load ``<name>.json`` + ``<name>.safetensors``; nothing here can unpickle."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = state_dir / f"{name}.json"
    if not path.is_file():
        if (state_dir / f"{name}.pt").exists():
            raise _legacy_error(uri, [f"{name}.pt"])
        raise CheckpointFormatError(f"checkpoint {uri} has no training_state/{name}.json")
    where = f"checkpoint {uri}: training_state/{name}"

    def _no_constants(value: str):
        raise CheckpointFormatError(f"{where}.json: non-standard JSON constant {value}")

    try:
        doc = json.loads(path.read_text(), parse_constant=_no_constants)
        if not isinstance(doc, dict) or doc.get("format") != STATE_FORMAT:
            raise CheckpointFormatError(f"format is not {STATE_FORMAT!r}")
        tensors = load_file(str(state_dir / f"{name}.safetensors"), device="cpu")
        if sorted(tensors) != doc.get("tensors"):
            raise CheckpointFormatError(f"tensors {sorted(tensors)} do not match the JSON's {doc.get('tensors')}")
        return _decode_state(doc["state"], tensors)
    except CheckpointFormatError as e:
        raise CheckpointFormatError(f"{where} is malformed: {e}") from None
    except (OSError, ValueError, KeyError, RecursionError, SafetensorError) as e:
        raise CheckpointFormatError(f"{where} is unreadable: {type(e).__name__}: {e}") from None


def _resolve_resume(resume: str | None, checkpoints_uri: str) -> str | None:
    if resume is None:
        return None
    if resume == "latest":
        return latest_checkpoint(checkpoints_uri)
    uri = storage.join(checkpoints_uri, resume)
    if not storage.is_complete(uri):
        raise FileNotFoundError(f"train.resume={resume!r}: {uri} is missing or incomplete")
    return uri


def _remove_incomplete(checkpoints_uri: str) -> None:
    """Leftovers of a killed run (no _COMPLETE): never listed, removed so a retry starts clean."""
    for uri in storage.listdir(checkpoints_uri):
        name = uri.rsplit("/", 1)[-1]
        if (name.startswith("epoch-") or name.startswith("step-")) and not storage.is_complete(uri):
            log.warning("removing incomplete checkpoint %s (a run stopped while writing it)", uri)
            storage.remove(uri)
    if not storage.is_remote(checkpoints_uri):  # hidden staging dirs of storage.publish_dir
        root = storage.local_path(checkpoints_uri)
        for p in root.glob(".*.staging-*") if root.exists() else []:
            shutil.rmtree(p, ignore_errors=True)


def _rotate(checkpoints_uri: str, limit: int | None) -> None:
    """Keep the newest ``limit`` step checkpoints; epoch checkpoints are never rotated (the scorer
    ranks every epoch, section 4.2). The marker goes first, so a half-deleted one is never listed."""
    if limit is None:
        return
    steps = list_checkpoints(checkpoints_uri, kind="step")
    for uri in steps[: max(0, len(steps) - limit)]:
        storage.remove(storage.join(uri, storage.COMPLETE_MARKER))
        storage.remove(uri)


# ----------------------------------------------------------------------------------------------
# The stage
# ----------------------------------------------------------------------------------------------
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
    from diffusers import UNet2DConditionModel
    from diffusers.models.attention_processor import AttnProcessor, AttnProcessor2_0
    from diffusers.optimization import get_scheduler
    from diffusers.training_utils import EMAModel, compute_snr

    from medisyn.models import sdxl

    tc = cfg.train
    world, rank, device = accelerator.num_processes, accelerator.process_index, accelerator.device
    per_device, accumulation = tc.batch_geometry(world)  # refuses combinations that don't divide
    eff = per_device * accumulation * world
    is_main = accelerator.is_main_process
    if is_main:
        logging.basicConfig(level=logging.INFO)

    # -- data: the latent cache, downloaded once per node for s3:// (local main process first) ------
    with accelerator.local_main_process_first():
        cache = LatentCache(local_cache_dir(cache_uri))
    manifest = cache.manifest
    num_samples = len(cache)
    steps_per_epoch = num_samples // eff
    if steps_per_epoch == 0:
        raise ConfigError(
            f"train.effective_batch_size={eff} exceeds the {num_samples} cached training samples: "
            "no step fits in an epoch"
        )
    total_steps = steps_per_epoch * tc.epochs

    # -- load, freeze, cast: only the U-Net is trained; VAE and text encoders were used by encode ----
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

    # -- optimizer, LR schedule (stepped by us once per optimizer step) -----------------------------
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

    # -- prepare ----------------------------------------------------------------------------------
    unet, optimizer = accelerator.prepare(unet, optimizer)
    raw_unet = accelerator.unwrap_model(unet)

    # -- resume -----------------------------------------------------------------------------------
    if is_main:  # only the main process ever writes or deletes under the checkpoints prefix
        _remove_incomplete(checkpoints_uri)
    accelerator.wait_for_everyone()
    start_epoch, start_step, global_step = 0, 0, 0
    resumed_from = _resolve_resume(tc.resume, checkpoints_uri)
    if tc.resume == "latest" and resumed_from is None:
        log.info("no complete checkpoint under %s: starting a new run", checkpoints_uri)
    if resumed_from is not None:
        start_epoch, start_step, global_step = _load_checkpoint(
            resumed_from, raw_unet, optimizer, lr_scheduler, ema, manifest
        )
        log.info("resumed from %s: epoch %d, step %d of %d, global step %d", resumed_from, start_epoch + 1,
                 start_step, steps_per_epoch, global_step)
    torch.manual_seed(tc.seed + rank)  # only for anything outside our per-sample generators

    # -- tracking ---------------------------------------------------------------------------------
    run_ctx = (
        tracking.stage_run(cfg, "train", tags={"medisyn.dataset_hash": manifest["dataset_hash"],
                                               "medisyn.cache_key": manifest["cache_key"]})
        if is_main else contextlib.nullcontext(None)
    )
    final_loss = None
    steps_run, t_run, step_seconds = 0, 0.0, []
    with run_ctx as run:
        if run is not None:
            import mlflow

            mlflow.log_params({f"train.{k}": v for k, v in tc.model_dump(mode="json").items()})
            mlflow.log_params({"world_size": world, "derived.per_device_batch_size": per_device,
                               "derived.gradient_accumulation_steps": accumulation,
                               "dataset_hash": manifest["dataset_hash"], "cache_key": manifest["cache_key"],
                               "flops_per_sample": flops_per_sample, "mixed_precision.effective": mixed_precision,
                               "resumed_from": resumed_from or ""})
            tracking.log_text(cfg.to_yaml(), "config/resolved.yaml")
        log.info(
            "train: %d samples, %d epochs x %d steps, batch %d = %d/device x %d accumulation x %d processes, "
            "%s precision, %.3g FLOP/sample", num_samples, tc.epochs, steps_per_epoch, eff, per_device,
            accumulation, world, mixed_precision, flops_per_sample,
        )
        progress = Progress(total_steps, "train", unit="step", every_s=30.0)
        progress.count = global_step
        T = noise_scheduler.config.num_train_timesteps
        window_t, window_steps, window_loss = time.perf_counter(), 0, []
        non_blocking = device.type == "cuda"

        for epoch in range(start_epoch, tc.epochs):
            first = start_step if epoch == start_epoch else 0
            order = epoch_order(num_samples, tc.seed, epoch)
            dataset = _EpochBatches(cache, tc.seed, epoch, T, tc.noise_offset, tc.empty_prompt_prob)
            loader = torch.utils.data.DataLoader(
                dataset,
                batch_sampler=list(micro_batches(order, first, steps_per_epoch, rank, world, per_device, accumulation)),
                collate_fn=dataset.collate, num_workers=tc.dataloader_num_workers,
                pin_memory=device.type == "cuda",
                prefetch_factor=2 if tc.dataloader_num_workers else None,
                persistent_workers=False,
            )
            batches = iter(loader)
            for step in range(first, steps_per_epoch):
                t_step = time.perf_counter()
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
                        loss = _loss(pred, target, timesteps, tc.snr_gamma, tc.prediction_type, noise_scheduler,
                                     compute_snr)
                        accelerator.backward(loss / accumulation)
                    loss_sum += loss.detach()
                if tc.max_grad_norm is not None:
                    accelerator.clip_grad_norm_(unet.parameters(), tc.max_grad_norm)
                optimizer.step()
                lr_scheduler.step()
                optimizer.zero_grad(set_to_none=True)
                if ema is not None:
                    ema.step(unet.parameters())
                global_step += 1
                steps_run += 1
                step_seconds.append(time.perf_counter() - t_step)
                t_run += step_seconds[-1]
                window_steps += 1
                window_loss.append(loss_sum / accumulation)
                progress.update(1)
                last_of_epoch = step == steps_per_epoch - 1
                if global_step % tc.log_every_steps == 0 or last_of_epoch:
                    # Collective: every rank reaches this at the same steps.
                    mean_loss = accelerator.reduce(torch.stack(window_loss).mean(), reduction="mean")
                    final_loss = float(accelerator.reduce(window_loss[-1], reduction="mean"))
                    elapsed = time.perf_counter() - window_t
                    ips = window_steps * eff / elapsed if elapsed > 0 else 0.0
                    metrics = {
                        "loss": float(mean_loss), "lr": float(lr_scheduler.get_last_lr()[0]),
                        "images_per_s": ips, "images_per_s_per_device": ips / world,
                        "mfu": flops_per_sample * ips / world / tc.peak_flops_per_device, "epoch": epoch + 1,
                    }
                    if is_main:
                        log.info("step %d/%d epoch %d loss %.5f lr %.2e %.1f img/s (%.2f/device) MFU %.2f%%",
                                 global_step, total_steps, epoch + 1, metrics["loss"], metrics["lr"], ips,
                                 ips / world, 100 * metrics["mfu"])
                        if run is not None:
                            import mlflow

                            mlflow.log_metrics(metrics, step=global_step)
                    window_t, window_steps, window_loss = time.perf_counter(), 0, []
                if last_of_epoch:
                    _save_checkpoint(accelerator, checkpoints_uri, "epoch", epoch + 1, raw_unet, optimizer,
                                     lr_scheduler, ema, epoch + 1, 0, global_step, manifest, cfg)
                elif tc.checkpoint_every_steps and global_step % tc.checkpoint_every_steps == 0:
                    _save_checkpoint(accelerator, checkpoints_uri, "step", global_step, raw_unet, optimizer,
                                     lr_scheduler, ema, epoch, step + 1, global_step, manifest, cfg)
            del batches, loader
        progress.close()

    accelerator.wait_for_everyone()
    # Every rank hashes its own final weights; equal hashes prove the replicas stayed in sync.
    hashes = _gather_strings(accelerator, weights_sha256(raw_unet))
    images_per_s = steps_run * eff / t_run if t_run > 0 else 0.0
    epochs_done = min(tc.epochs, global_step // steps_per_epoch)
    return TrainResult(
        checkpoints=list_checkpoints(checkpoints_uri, kind="epoch"),
        epochs=epochs_done, global_step=global_step, final_loss=final_loss, world_size=world,
        per_device_batch_size=per_device, gradient_accumulation_steps=accumulation, effective_batch_size=eff,
        steps_per_epoch=steps_per_epoch, resumed_from=resumed_from, mixed_precision=mixed_precision,
        flops_per_sample=flops_per_sample, images_per_s=images_per_s,
        mfu=(flops_per_sample * images_per_s / world / tc.peak_flops_per_device) if steps_run else None,
        dataset_hash=manifest["dataset_hash"], cache_key=manifest["cache_key"],
        step_checkpoints=list_checkpoints(checkpoints_uri, kind="step"),
        unet_sha256_per_rank=hashes, step_seconds=step_seconds,
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


# ----------------------------------------------------------------------------------------------
# Checkpoints (docs/stages.md): unet/, training_state/, checkpoint.json, _COMPLETE last
# ----------------------------------------------------------------------------------------------
def _save_checkpoint(accelerator, checkpoints_uri, kind, number, raw_unet, optimizer, lr_scheduler, ema,
                     next_epoch, next_step, global_step, manifest, cfg) -> None:
    """Main process writes a staged directory and publishes it (``_COMPLETE`` last); every rank
    waits, so no rank runs ahead of a checkpoint that may be needed to resume it."""
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        name = checkpoint_name(kind, number)
        uri = storage.join(checkpoints_uri, name)
        info = {"epoch": next_epoch if kind == "epoch" else next_epoch + 1, "global_step": global_step, "kind": kind,
                "name": name, "dataset_hash": manifest["dataset_hash"], "cache_key": manifest["cache_key"],
                "ema": ema is not None, "config_hash": cfg.config_hash()}
        with storage.staged_dir(uri, metadata=info) as d:
            state = d / "training_state"
            state.mkdir()
            if ema is not None:
                # unet/ holds what a scorer should load: the EMA weights; the raw weights go to
                # training_state/ for an exact resume.
                raw_unet.save_pretrained(state / "unet_raw", safe_serialization=True)
                ema.store(raw_unet.parameters())
                ema.copy_to(raw_unet.parameters())
                raw_unet.save_pretrained(d / "unet", safe_serialization=True)
                ema.restore(raw_unet.parameters())
                _write_state(state, "ema", ema.state_dict())
            else:
                raw_unet.save_pretrained(d / "unet", safe_serialization=True)
            # safetensors + JSON, never pickle: resuming must not be able to run code (docs/training.md)
            _write_state(state, "optimizer", optimizer.state_dict())
            _write_state(state, "scheduler", lr_scheduler.state_dict())
            _write_state(state, "rng", _rng_state())
            (state / "data_position.json").write_text(json.dumps(
                {"epoch": next_epoch, "step_in_epoch": next_step, "global_step": global_step,
                 "order": "randperm(seed, epoch)", "seed": cfg.train.seed}, indent=2))
            (d / "checkpoint.json").write_text(json.dumps(info, indent=2, sort_keys=True))
        if kind == "step":
            _rotate(checkpoints_uri, cfg.train.checkpoints_total_limit)
        log.info("checkpoint %s written (global step %d)", uri, global_step)
    accelerator.wait_for_everyone()


def _load_checkpoint(uri, raw_unet, optimizer, lr_scheduler, ema, manifest) -> tuple[int, int, int]:
    """Restore weights, optimizer, scheduler, EMA and RNG; returns (epoch, step_in_epoch, global_step)."""
    from safetensors.torch import load_file

    info = read_checkpoint_info(uri)
    if info.get("dataset_hash") != manifest["dataset_hash"]:
        raise ValueError(
            f"checkpoint {uri} was trained on dataset {info.get('dataset_hash')}, the cache holds "
            f"{manifest['dataset_hash']}: use a fresh checkpoints prefix or train.resume=null"
        )
    with storage.local_copy(uri) as d:
        state = Path(d) / "training_state"
        # No pickle on this path: the old *.pt files are refused (never opened), stray ones ignored.
        legacy = sorted(f for f in LEGACY_PICKLES if (state / f).exists())
        if legacy and not all((state / f"{part}.json").is_file() for part in STATE_PARTS):
            raise _legacy_error(uri, legacy)
        if legacy:
            log.warning("checkpoint %s: ignoring %s (pickle files are never loaded)", uri, ", ".join(legacy))
        parts = {part: _read_state(state, part, uri) for part in STATE_PARTS}
        if ema is not None and not (state / "ema.json").is_file() and not (state / "ema.pt").exists():
            raise ValueError(f"train.use_ema is on but checkpoint {uri} has no EMA state")
        ema_state = _read_state(state, "ema", uri) if ema is not None else None
        weights_dir = state / "unet_raw" if (state / "unet_raw").exists() else Path(d) / "unet"
        raw_unet.load_state_dict(load_file(str(weights_dir / "diffusion_pytorch_model.safetensors")))
        optimizer.load_state_dict(parts["optimizer"])
        lr_scheduler.load_state_dict(parts["scheduler"])
        if ema is not None:
            ema.load_state_dict(ema_state)
        try:
            _set_rng_state(parts["rng"])
        except (KeyError, TypeError, ValueError) as e:
            raise CheckpointFormatError(f"checkpoint {uri}: training_state/rng.json is malformed: {e}") from None
        pos = json.loads((state / "data_position.json").read_text())
    return int(pos["epoch"]), int(pos["step_in_epoch"]), int(pos["global_step"])
