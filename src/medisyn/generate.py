"""Generation engine: batched SDXL sampling with classifier-free guidance and explicit per-image seeds.

Paper section 4.3: CFG scale 7, the default Euler scheduler, 50 inference steps (``SamplingConfig``).
Every image has its own seed: its initial latent comes from ``torch.Generator().manual_seed(seed)``,
so an image depends on (model, prompt, seed, sampling config) and not on which batch or which rank
produced it. Euler discrete (no churn) adds no noise after the initial latent, so that seed is the
only randomness. The pipeline runs in ``runtime.dtype`` (bf16 by default) wherever the hardware has
it, GPU or CPU (``medisyn.models.sdxl.resolve_dtype``; a ConfigError elsewhere), with the fp16-fix VAE
(section 4.2) and PyTorch SDPA attention. Speed: docs/performance.md.

Images are PNG (lossless; JPEG artefacts would bias FID and the privacy patch distance).
"""

from __future__ import annotations

import io
import json
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from medisyn import storage
from medisyn.config import RunConfig, SamplingConfig
from medisyn.progress import Progress
from medisyn.registry.names import MODEL_INFO_FILE
from medisyn.results import StageResult

log = logging.getLogger("medisyn.generate")


@dataclass(frozen=True)
class GenerateResult(StageResult):
    out_uri: str  # prefix holding 00000.png ... and images.jsonl (prompt, seed, file per image)
    model: str  # the model reference as given
    n_images: int
    seconds: float
    images_per_s: float
    files: list[str] = field(default_factory=list)


# ----------------------------------------------------------------------------------------------
# Loading
# ----------------------------------------------------------------------------------------------
def _is_pipeline_dir(path: Path) -> bool:
    return (path / "model_index.json").exists()


def _is_unet_dir(path: Path) -> bool:
    cfg = path / "config.json"
    if not cfg.exists():
        return False
    try:
        return json.loads(cfg.read_text()).get("_class_name") == "UNet2DConditionModel"
    except (OSError, json.JSONDecodeError):
        return False


def _prepare(pipe, cfg: RunConfig):
    """Euler sampler (section 4.3), SDPA attention, no progress bar, on the configured device/dtype."""
    from diffusers import EulerDiscreteScheduler
    from diffusers.models.attention_processor import AttnProcessor2_0

    from medisyn.models.sdxl import resolve_device, resolve_dtype

    device = resolve_device(cfg.runtime)
    dtype = resolve_dtype(cfg.runtime, device)
    if not isinstance(pipe.scheduler, EulerDiscreteScheduler):
        pipe.scheduler = EulerDiscreteScheduler.from_config(pipe.scheduler.config)
    pipe.unet.set_attn_processor(AttnProcessor2_0())
    pipe.set_progress_bar_config(disable=True)
    del dtype  # components were loaded in the right dtype; a later .to(dtype) would upcast-skip VAE modules
    return pipe.to(device)


def load_pipeline_dir(cfg: RunConfig, path: str | os.PathLike):
    """A complete diffusers SDXL pipeline directory (e.g. from ``medisyn pull``)."""
    from diffusers import StableDiffusionXLPipeline

    from medisyn.models.sdxl import resolve_device, resolve_dtype

    dtype = resolve_dtype(cfg.runtime, resolve_device(cfg.runtime))
    pipe = StableDiffusionXLPipeline.from_pretrained(str(path), dtype=dtype, add_watermarker=False)
    return _prepare(pipe, cfg)


def load_model(cfg: RunConfig, model: str, approved_only: bool = False):
    """A ready SDXL pipeline from any model reference.

    ``model`` is ``models:/<name>@<alias>`` or ``models:/<name>/<version>`` (pulled from the MLflow
    registry once into the local cache, keyed by the resolved version), a local pipeline directory
    (``model_index.json``; also an MLflow model directory holding ``artifacts/pipeline``), a
    checkpoint's ``unet`` directory or the checkpoint directory holding it (file:// or s3://); a bare
    U-Net is combined with the frozen base components named in ``cfg.models``. ``approved_only`` (the
    consumer commands): a registry reference must be an approved version whose promoter signature covers
    every file (issue #21); the gates and the reader study load candidates and leave it off.
    """
    from medisyn.models.sdxl import load_pipeline, local_model_dir

    model = str(model)
    if model.startswith("models:/"):
        from medisyn import registry, tracking

        tracking.configure(cfg)  # idempotent: a no-op under the stage runner
        return load_pipeline_dir(cfg, registry.pull_cached(model, approved_only=approved_only))
    if storage.is_remote(model) and storage.exists(storage.join(model, "unet", "config.json")):
        model = storage.join(model, "unet")  # a remote checkpoint: fetch the U-Net, not training_state/
    path = local_model_dir(model) if storage.is_remote(model) else storage.local_path(model)
    if not path.exists():
        raise FileNotFoundError(f"model {model!r} is neither a models:/ URI nor an existing directory")
    for candidate in (path, path / "artifacts" / "pipeline", path / "pipeline"):
        if _is_pipeline_dir(candidate):
            return load_pipeline_dir(cfg, candidate)
    for candidate in (path, path / "unet"):
        if _is_unet_dir(candidate):
            return _prepare(load_pipeline(cfg.models, cfg.runtime, unet_dir=candidate), cfg)
    raise ValueError(
        f"{model!r} holds neither a diffusers pipeline (model_index.json) nor a U-Net (unet/config.json)"
    )


# ----------------------------------------------------------------------------------------------
# Sampling
# ----------------------------------------------------------------------------------------------
def _rank_and_world() -> tuple[int, int]:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


@torch.inference_mode()
def sample(
    pipe, prompts: list[str], seeds: list[int], sampling: SamplingConfig, resolution: int, desc: str = "sample"
) -> list[Image.Image]:
    """One image per (prompt, seed), in order, ``sampling.batch_size`` at a time with CFG.

    Each image's initial latent is drawn from its own generator seeded with its seed (on the CPU,
    so the same seed gives the same latent on any device), which makes the output independent of
    batching. Logs progress with images/s.

    The conditional and unconditional halves of CFG run as one batch (diffusers concatenates
    them). With ``sampling.torch_compile`` the U-Net and the VAE decoder are compiled once per
    pipeline (``compile_for_sampling``) and the last, short batch is padded to the full size so it
    reuses the compiled graphs instead of compiling new ones (docs/performance.md).
    """
    if len(prompts) != len(seeds):
        raise ValueError(f"{len(prompts)} prompts but {len(seeds)} seeds: give one seed per image")
    if sampling.scheduler != "euler":  # the only one the config allows today (section 4.3)
        raise ValueError(f"unsupported sampling.scheduler {sampling.scheduler!r}")
    if not prompts:
        return []
    if sampling.torch_compile:
        compile_for_sampling(pipe)
    images: list[Image.Image] = []
    progress = Progress(len(prompts), desc, unit="img")
    bs = sampling.batch_size
    for start in range(0, len(prompts), bs):
        batch_prompts = list(prompts[start:start + bs])
        batch_seeds = [int(s) for s in seeds[start:start + bs]]
        n = len(batch_prompts)
        if sampling.torch_compile and n < bs and len(prompts) > bs:
            # pad with copies of the first item (its image is dropped): same shapes, no recompilation
            batch_prompts += batch_prompts[:1] * (bs - n)
            batch_seeds += batch_seeds[:1] * (bs - n)
        gens = [torch.Generator("cpu").manual_seed(s) for s in batch_seeds]
        out = pipe(
            prompt=batch_prompts,
            generator=gens,
            guidance_scale=sampling.guidance_scale,
            guidance_rescale=sampling.guidance_rescale,
            num_inference_steps=sampling.num_inference_steps,
            height=resolution,
            width=resolution,
            output_type="pil",
        )
        images.extend(img.convert("RGB") for img in out.images[:n])
        progress.update(n)
    progress.close()
    return images


def compile_for_sampling(pipe) -> None:
    """``torch.compile`` the U-Net and the VAE decoder in place, once per pipeline (regional: the
    modules the denoising loop and the decode call, not the pipeline's Python). On CPU, inductor
    "freezing" folds the (inference-only) weights into the graph and pre-packs them for oneDNN."""
    if getattr(pipe, "_medisyn_compiled", False):
        return
    import torch._inductor.config as inductor_config

    if pipe.device.type == "cpu":
        inductor_config.freezing = True
    pipe.unet.compile(fullgraph=False, dynamic=False)
    pipe.vae.decoder.compile(fullgraph=False, dynamic=False)
    pipe._medisyn_compiled = True


def sample_distributed(
    pipe, prompts: list[str], seeds: list[int], sampling: SamplingConfig, resolution: int, desc: str = "sample"
) -> tuple[list[int], list[Image.Image]]:
    """Data-parallel sampling: rank r takes items r, r+W, r+2W, ... (its own captions and seeds).

    Returns (indices, images) of this rank's share; callers gather what they need (e.g. features,
    which are far smaller than images). Single-process runs get everything.
    """
    rank, world = _rank_and_world()
    idx = list(range(rank, len(prompts), world))
    return idx, sample(pipe, [prompts[i] for i in idx], [seeds[i] for i in idx], sampling, resolution, desc)


def png_bytes(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


#: The sampling settings a gate judges and a consumer must reproduce to get what was gated (issue #25).
GATED_SAMPLING_FIELDS = ("guidance_scale", "guidance_rescale", "scheduler", "num_inference_steps")


def gated_sampling(pipe) -> dict[str, Any] | None:
    """The sampling settings recorded with the model the pipeline was loaded from (``medisyn_model.json``
    ``["sampling"]``, written at registration from the config its gates ran with), or None for a model
    that records none (a bare checkpoint, a plain diffusers directory)."""
    source = getattr(pipe, "name_or_path", None) or pipe.config.get("_name_or_path")
    info = Path(str(source)) / MODEL_INFO_FILE if source else None
    if info is None or not info.is_file():
        return None
    recorded = json.loads(info.read_text()).get("sampling") or {}
    return {k: recorded[k] for k in GATED_SAMPLING_FIELDS if k in recorded} or None


def served_sampling(cfg: RunConfig, pipe, overrides: dict[str, Any] | None = None) -> tuple[SamplingConfig, bool]:
    """(settings to sample with, whether they are the gated ones). A model that records its gated settings
    is sampled with them, whatever ``cfg.sampling`` says; ``overrides`` (a caller's explicit choice) win
    with a warning, and the result says they are not gated. Models without a record use ``cfg.sampling``
    (gated = False: nothing says what was judged)."""
    gated = gated_sampling(pipe)
    settings = cfg.sampling.model_copy(update=gated or {})
    changed = {k: v for k, v in (overrides or {}).items() if v is not None and getattr(settings, k) != v}
    if changed:
        log.warning("sampling with %s instead of the gated settings %s: these images were not judged by any gate",
                    changed, {k: getattr(settings, k) for k in changed})
        settings = settings.model_copy(update=changed)
    return settings, gated is not None and not changed


def generate(cfg: RunConfig, model: str, prompts: list[str], n: int, out_uri: str, seed: int = 0,
             guidance_scale: float | None = None, num_inference_steps: int | None = None) -> GenerateResult:
    """``n`` images per prompt as PNGs under ``out_uri`` (published atomically) + ``images.jsonl``.

    Image ``i`` (prompt-major order) has seed ``seed + i``, so rerunning with the same arguments
    reproduces every file. The sampling settings are the ones the model's gates judged
    (:func:`served_sampling`); ``guidance_scale`` / ``num_inference_steps`` override them with a warning,
    and ``generation.json`` then records ``"gated": false``.
    """
    if not prompts:
        raise ValueError("give at least one prompt")
    if n < 1:
        raise ValueError(f"n must be >= 1 (images per prompt), got {n}")
    pipe = load_model(cfg, model, approved_only=True)  # a consumer: approved, signed versions only (issue #21)
    settings, is_gated = served_sampling(cfg, pipe, {"guidance_scale": guidance_scale,
                                                     "num_inference_steps": num_inference_steps})
    all_prompts = [p for p in prompts for _ in range(n)]
    seeds = [seed + i for i in range(len(all_prompts))]
    t0 = time.perf_counter()
    images = sample(pipe, all_prompts, seeds, settings, cfg.sampling_resolution(), desc="generate")
    seconds = time.perf_counter() - t0
    files = []
    with storage.staged_dir(out_uri, metadata={"model": model, "n_images": len(images)}) as d:
        lines = []
        for i, (img, p, s) in enumerate(zip(images, all_prompts, seeds, strict=True)):
            name = f"{i:05d}.png"
            (d / name).write_bytes(png_bytes(img))
            files.append(name)
            lines.append(json.dumps({"file": name, "prompt": p, "seed": s}))
        (d / "images.jsonl").write_text("\n".join(lines) + "\n")
        sampling = settings.model_dump(mode="json") | {"resolution": cfg.sampling_resolution()}
        (d / "generation.json").write_text(json.dumps({"model": model, "sampling": sampling, "gated": is_gated,
                                                       "seed": seed}, indent=2))
    out = storage.normalize(out_uri)
    result = GenerateResult(
        out_uri=out, model=model, n_images=len(images), seconds=seconds,
        images_per_s=len(images) / seconds if seconds > 0 else 0.0, files=files,
    )
    log.info("generated %d images in %.1fs (%.2f img/s) -> %s", len(images), seconds, result.images_per_s, out)
    return result
