"""One validated configuration schema for a whole MediSyn run.

Every default is the paper's number (``medisyn-paper.txt``, section 4); the section is cited next to
the field. ``configs/paper.yaml`` states the full-scale run explicitly, ``configs/demo.yaml`` the
tiny local one. Unknown keys and bad values are errors that name the field, raised before any work
starts (``load_config``).
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any, Literal, get_args

import yaml
from pydantic import BaseModel, Field, ValidationError, model_validator

# The evaluation sections live in config_eval and the section base in config_section; both are
# re-exported here, so `from medisyn.config import PrivacyConfig` keeps working.
from medisyn.config_eval import (
    FIDConfig,
    HumanGateConfig,
    PrivacyConfig,
    StudyConfig,
    StudyTask,
    UtilityConfig,
    UtilityTask,
)
from medisyn.config_section import _INVALID, _Section, _validated, annotation_name

__all__ = [
    "ConfigError", "DataConfig", "DemoConfig", "FIDConfig", "HumanGateConfig", "ModelsConfig", "PrivacyConfig",
    "RunConfig", "RuntimeConfig", "SamplingConfig", "StorageConfig", "StudyConfig", "StudyTask",
    "TinyModelsConfig", "TinyPretrainConfig", "TrackingConfig", "TrainConfig", "UtilityConfig", "UtilityTask",
    "annotation_name", "config_from_json", "deep_merge", "load_config", "parse_overrides", "resolve_override",
    "validate_config",
]


class ConfigError(ValueError):
    """A configuration file or value is invalid. The message names the offending field(s)."""


# ----------------------------------------------------------------------------------------------
# Storage and tracking
# ----------------------------------------------------------------------------------------------
class StorageConfig(_Section):
    root: str = Field("file://./medisyn-runs", description="Base URI (file:// or s3://) for run outputs")
    s3_endpoint_url: str | None = Field(
        None, description="S3 API endpoint (MinIO, moto); falls back to $MEDISYN_S3_ENDPOINT_URL / $AWS_ENDPOINT_URL"
    )
    upload_timeout_s: float = Field(300.0, gt=0, description="per-request timeout for large uploads, seconds")
    multipart_chunk_mb: int = Field(64, ge=5, description="multipart upload part size, MiB (S3 minimum is 5)")
    # Retry policy of object storage (issue #12; docs/operations.md): every s3:// operation is bounded
    # by these, so an endpoint that is down, or accepts connections and never answers, ends in an error
    # naming the URI after about attempts x (timeouts + backoff), never a silent hang.
    connect_timeout_s: float = Field(10.0, gt=0, description="S3 TCP connect timeout per request, seconds")
    read_timeout_s: float = Field(60.0, gt=0, description="S3 wait for an answer per request, seconds")
    retry_attempts: int = Field(5, ge=1, description="tries of one S3 operation (1 = no retry) before it fails")
    retry_backoff_s: float = Field(0.5, ge=0, description="first wait between tries, seconds; doubles each try")
    retry_max_backoff_s: float = Field(20.0, ge=0, description="cap on one wait between tries, seconds")


class TrackingConfig(_Section):
    tracking_uri: str | None = Field(None, description="MLflow tracking URI; None = $MLFLOW_TRACKING_URI")
    experiment: str = Field("medisyn", description="MLflow experiment name")
    model_name: str = Field("medisyn-sdxl", description="registered model name in the MLflow registry")
    candidate_alias: str = Field("candidate", description="registry alias of the best-FID version awaiting gates")
    approved_alias: str = Field("approved", description="registry alias set by promote only when every gate passed")
    candidate_model_name: str | None = Field(
        None, description="registered model of the candidates, which the pipeline identity edits; None ="
        " '<model_name>-candidates'. model_name holds approved versions only (mlflow/REGISTRY.md, #10)",
    )
    gate_identities: list[str] = Field(
        ["pipeline"], min_length=1,
        description="MLflow users whose gate runs promote accepts as verdicts (the pipeline's identity, #10)",
    )
    package_dtype: Literal["bfloat16", "float16", "float32"] = Field(
        "bfloat16", description="dtype of the fine-tuned U-Net weights in the registered model (section 4.2: bf16)"
    )
    proxy_multipart_upload: bool = Field(
        True, description="multipart artifact uploads through the MLflow server (parts of storage.multipart_chunk_mb)"
    )
    # Run identity, set by `medisyn plan` on the run's stored config (not part of config_hash):
    pipeline_run_id: str | None = Field(
        None, description="the orchestrator's run id (KFP run id); tagged on every stage run and registered version"
    )
    parent_run_id: str | None = Field(None, description="the MLflow run every stage run of this pipeline nests under")
    # Bounded MLflow calls (issue #12): a server restart (~10 s) is ridden out by the retries, an unreachable
    # one fails the pre-flight check within preflight_timeout_s, before any heavy work.
    request_timeout_s: float = Field(30.0, gt=0, description="MLflow REST request timeout, seconds")
    request_retries: int = Field(5, ge=0, description="MLflow REST retries (waits 1, 2, 4, ... x request_backoff_s)")
    request_backoff_s: int = Field(1, ge=0, description="MLflow REST retry backoff factor, whole seconds")
    preflight_timeout_s: float = Field(10.0, gt=0, description="pre-flight reachability probe of the server, seconds")


# ----------------------------------------------------------------------------------------------
# Models: every pretrained model comes from a path or URI; nothing downloads at run time.
# ----------------------------------------------------------------------------------------------
class TinyPretrainConfig(_Section):
    """Pretraining of the tiny VAE and FID feature extractor on phantoms (``medisyn.demo.pretrain``):
    what makes the demo's samples images rather than coloured noise, and its FID meaningful."""

    images_per_class: int = Field(48, ge=1, description="phantoms per class (8 classes), drawn with `seed`")
    seed: int = Field(1000, description="phantom and training seed; the demo's landing zone uses another")
    batch_size: int = Field(32, ge=1)
    vae_steps: int = Field(1000, ge=1, description="autoencoder optimizer steps")
    vae_crop: int = Field(32, ge=8, description="side of the random crops the (convolutional) VAE trains on")
    vae_learning_rate: float = Field(2e-3, gt=0)
    vae_kl_weight: float = Field(1e-6, ge=0, description="KL term weight (Stable Diffusion's VAE: 1e-6)")
    feature_steps: int = Field(300, ge=1, description="FID feature extractor (phantom classifier) steps")
    feature_learning_rate: float = Field(2e-3, gt=0)


class TinyModelsConfig(_Section):
    """Sizes of the stand-ins built by ``medisyn build-tiny-models`` for tests and the demo: random-init,
    or, with ``pretrain``, a VAE and FID extractor trained on phantoms (cached per machine)."""

    text_hidden_size: int = Field(32, ge=8, description="hidden width of each tiny CLIP text encoder")
    unet_block_out_channels: tuple[int, ...] = Field((32, 64), description="tiny U-Net widths, one per level")
    unet_cross_attention_dim: int = Field(64, description="= 2 x text_hidden_size (two encoders concatenated)")
    vae_block_out_channels: tuple[int, ...] = Field((32, 64), description="tiny VAE widths")
    clip_embed_dim: int = Field(32, description="tiny BiomedCLIP-style embedding size")
    fid_feature_dim: int = Field(64, description="tiny FID feature extractor output size")
    resolution: int = Field(64, ge=16, description="image side the tiny VAE and extractor are pretrained at")
    pretrain: TinyPretrainConfig | None = Field(None, description="None = random init (fast; tests)")
    seed: int = 0


class ModelsConfig(_Section):
    sdxl_base: str = Field(
        "/models/stable-diffusion-xl-base-1.0",
        description="diffusers SDXL directory or URI (stabilityai/stable-diffusion-xl-base-1.0), section 4.2",
    )
    vae: str | None = Field(
        "/models/sdxl-vae-fp16-fix",
        description="VAE directory (madebyollin/sdxl-vae-fp16-fix, section 4.2); None = the base's VAE",
    )
    biomedclip: str = Field(
        "/models/biomedclip", description="open_clip local-dir with open_clip_config.json + weights (section 4.3.4)"
    )
    fid_inception_weights: str = Field(
        "/models/pt_inception-2015-12-05-6726825d.pth", description="standard FID Inception weights file"
    )
    resnet50_weights: str = Field(
        "/models/resnet50-imagenet.pth", description="torchvision ResNet-50 ImageNet state_dict (section 4.3.5)"
    )
    tiny: TinyModelsConfig | None = Field(
        None, description="when set, the paths above are where tiny random models are built (tests, demo)"
    )


class RuntimeConfig(_Section):
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="auto = cuda when available")
    dtype: Literal["float32", "bfloat16", "float16"] = Field(
        "bfloat16", description="inference dtype (encode, sampling); bfloat16 needs a GPU with bf16 or a CPU with "
        "avx512_bf16/amx_bf16, float16 a GPU; else a ConfigError (docs/performance.md)"
    )
    seed: int = 0


# ----------------------------------------------------------------------------------------------
# Stages
# ----------------------------------------------------------------------------------------------
class DataConfig(_Section):
    catalog: str = Field(
        "builtin",
        description="catalog YAML path/URI; 'builtin' = <raw_uri>/catalog.yaml when the landing zone ships one,"
        " else the paper's built-in sources (docs/preprocessing.md)",
    )
    resolution: int = Field(512, ge=16, description="output side, pixels: shorter side resized then center crop (4.1)")
    split_fractions: tuple[float, float, float] = Field(
        (0.8, 0.1, 0.1), description="train/val/test, patient-level (section 4.1)"
    )
    id_salt_env: str = Field("MEDISYN_ID_SALT", description="env var holding the salt for patient/image id hashes")
    default_id_salt: str | None = Field(
        None, description="salt used when the env var is unset: demo runs on phantom data only (configs/demo.yaml);"
        " None = the env var is required and preprocessing refuses to start without it (#10)",
    )
    hu_window_level: float = Field(100.0, description="CT window level, HU (section 4.1)")
    hu_window_width: float = Field(700.0, gt=0, description="CT window width, HU (section 4.1)")
    percentile_low: float = Field(0.5, ge=0, lt=50, description="MRI/mammography clip, percent (4.1)")
    percentile_high: float = Field(99.5, gt=50, le=100, description="MRI/mammography clip, percent (4.1)")
    tile_max_overlap: float = Field(0.10, ge=0, lt=1, description="whole-slide tile overlap cap (4.1)")
    multiframe_policy: Literal["middle", "all"] = Field(
        "middle", description="multi-frame DICOM: middle frame or every frame"
    )
    quarantine_burned_in: bool = Field(True, description="reject DICOM with BurnedInAnnotation=YES")
    dedup_hamming: int = Field(4, ge=0, le=64, description="near-duplicate: perceptual-hash Hamming distance <= this")
    max_error_rate: float = Field(0.2, ge=0, le=1, description="fail the run when rejected/total exceeds this")
    max_pixels: int = Field(20_000 * 20_000, gt=0, description="decompression-bomb guard: declared rows*cols*frames")
    max_decoded_mb: int | None = Field(
        None, ge=1, description="largest decoded PNG/JPEG/TIFF image, MiB (width x height x bytes a decoded pixel), "
        "refused before decoding (issue #21); None = a fifth of a worker's memory share: its machine's or "
        "container's memory / its CPUs (docs/preprocessing.md)",
    )
    ray_num_cpus: int | None = Field(None, description="local Ray CPUs; None = all")
    ray_batch_size: int = Field(16, ge=1, description="images per Ray Data map_batches call")
    rows_per_shard: int = Field(2048, ge=1, description="max rows per Parquet shard")
    png_compress_level: int = Field(3, ge=0, le=9, description="zlib level of the PNG bytes in shards (size vs speed)")
    worker_max_tries: int = Field(
        2, ge=1, description="tries of a file whose worker was killed (OOM) before it is quarantined (worker_killed)"
    )
    worker_heap_mb: int = Field(
        256, ge=0,
        description="glibc malloc: buffers below this many MiB come from a heap that keeps freed memory, "
        "in each preprocess worker (saves page faults on every decoded frame); 0 = malloc defaults",
    )

    @model_validator(mode="after")
    def _fractions_sum_to_one(self) -> DataConfig:
        if any(f < 0 for f in self.split_fractions) or abs(sum(self.split_fractions) - 1.0) > 1e-6:
            raise ValueError(f"data.split_fractions must be >= 0 and sum to 1, got {self.split_fractions}")
        return self


class TrainConfig(_Section):
    """U-Net fine-tuning (section 4.2) and the latent cache it reads (``medisyn.train``; docs/training.md)."""

    epochs: int = Field(15, ge=1, description="passes over the train split, section 4.2")
    learning_rate: float = Field(1e-5, gt=0, description="AdamW learning rate, constant (section 4.2)")
    lr_scheduler: Literal["constant", "constant_with_warmup", "cosine", "linear"] = Field(
        "constant", description="diffusers.optimization.get_scheduler name; the paper uses constant (4.2)"
    )
    lr_warmup_steps: int = Field(0, ge=0, description="warm-up, optimizer steps (not micro-batches)")
    effective_batch_size: int = Field(128, ge=1, description="= per_device x accumulation x world size (4.2)")
    per_device_batch_size: int | None = Field(None, ge=1, description="state two of the three; the third is derived")
    gradient_accumulation_steps: int | None = Field(1, ge=1, description="micro-batches per optimizer step")
    mixed_precision: Literal["no", "bf16", "fp16"] = Field(
        "bf16", description="autocast precision, section 4.2; bf16 needs a GPU with bf16 or a CPU with "
        "avx512_bf16/amx_bf16, fp16 a GPU (loss scaling); else a ConfigError (docs/performance.md)"
    )
    empty_prompt_prob: float = Field(
        0.10, ge=0, le=1, description="CFG prompt dropout, redrawn per sample per step (4.2)"
    )
    prediction_type: Literal["epsilon", "v_prediction"] = Field(
        "epsilon", description="MSE on noise, eq. (1); must match the base model's scheduler (samplers use it)"
    )
    adam_beta1: float = Field(0.9, ge=0, lt=1, description="AdamW beta1 (diffusers default)")
    adam_beta2: float = Field(0.999, ge=0, lt=1, description="AdamW beta2 (diffusers default)")
    adam_weight_decay: float = Field(1e-2, ge=0, description="AdamW decoupled weight decay (diffusers default)")
    adam_epsilon: float = Field(1e-8, gt=0, description="AdamW epsilon (diffusers default)")
    max_grad_norm: float | None = Field(1.0, description="gradient clipping; None disables")
    gradient_checkpointing: bool = Field(
        False, description="recompute U-Net activations in backward: less memory, ~30% slower"
    )
    use_ema: bool = Field(False, description="keep an EMA of the U-Net; checkpoints' unet/ then holds the EMA weights")
    ema_decay: float = Field(0.9999, gt=0, lt=1, description="EMA decay per optimizer step")
    snr_gamma: float | None = Field(None, description="Min-SNR weighting gamma (5.0 typical); None = plain MSE")
    noise_offset: float = Field(0.0, ge=0, description="per-channel offset noise scale; 0 = off (paper)")
    attention: Literal["sdpa", "default"] = Field(
        "sdpa", description="sdpa = torch scaled_dot_product_attention (flash/mem-efficient kernels on GPU)"
    )
    channels_last: bool = Field(
        False, description="U-Net in channels_last memory format: NHWC convs on GPU tensor cores; measured 1.0x on "
        "CPU (docs/performance.md)"
    )
    torch_compile: bool = Field(
        False, description="torch.compile each U-Net block (regional), for GPUs; on CPU measured 1.0x after a "
        "16-minute compile (docs/performance.md)"
    )
    checkpoint_every_steps: int | None = Field(None, ge=1, description="extra mid-epoch checkpoints; epochs always")
    checkpoints_total_limit: int | None = Field(None, ge=1, description="rotate step checkpoints past this many")
    resume: str | None = Field(
        "latest",
        description="'latest' (newest complete checkpoint, else start fresh), a checkpoint name, or None = start fresh",
    )
    log_every_steps: int = Field(10, ge=1, description="optimizer steps between metric logs (MLflow + log line)")
    peak_flops_per_device: float = Field(312e12, gt=0, description="A100 bf16 dense peak, FLOP/s, for MFU")
    dataloader_num_workers: int = Field(0, ge=0, description="DataLoader worker processes reading the latent cache")
    nccl_timeout_s: int = Field(1800, ge=1, description="process-group timeout for multi-node runs, seconds")
    seed: int = Field(0, description="seeds the data order, noise, timesteps and prompt dropout (resume is exact)")
    # The latent cache (medisyn.train.encode): the frozen VAE and text encoders run once, not every step.
    encode_batch_size: int = Field(32, ge=1, description="images per VAE forward pass when building the latent cache")
    cache_shard_rows: int = Field(4096, ge=1, description="samples per latent-cache shard (bounds encode memory)")
    cache_dtype: Literal["float16", "float32"] = Field(
        "float16", description="storage dtype of cached latents and text embeddings (float16 halves the cache)"
    )

    @model_validator(mode="after")
    def _batch_divides(self) -> TrainConfig:
        if self.per_device_batch_size is None and self.gradient_accumulation_steps is None:
            raise ValueError("state per_device_batch_size or gradient_accumulation_steps (with effective_batch_size)")
        return self

    def batch_geometry(self, world_size: int) -> tuple[int, int]:
        """(per_device_batch_size, gradient_accumulation_steps) for ``world_size`` processes.

        The config states the effective batch and one of the two; the other is derived and a
        combination that does not divide is refused (issue: training at production grade).
        """
        eff = self.effective_batch_size
        if self.per_device_batch_size is not None and self.gradient_accumulation_steps is not None:
            if self.per_device_batch_size * self.gradient_accumulation_steps * world_size != eff:
                raise ConfigError(
                    f"train.effective_batch_size={eff} != per_device_batch_size={self.per_device_batch_size}"
                    f" x gradient_accumulation_steps={self.gradient_accumulation_steps} x world_size={world_size}"
                )
            return self.per_device_batch_size, self.gradient_accumulation_steps
        if self.per_device_batch_size is not None:
            denom = self.per_device_batch_size * world_size
            if eff % denom:
                raise ConfigError(
                    f"train.effective_batch_size={eff} is not divisible by per_device_batch_size="
                    f"{self.per_device_batch_size} x world_size={world_size}"
                )
            return self.per_device_batch_size, eff // denom
        accumulation = self.gradient_accumulation_steps
        assert accumulation is not None  # _batch_divides: one of the two is set
        denom = accumulation * world_size
        if eff % denom:
            raise ConfigError(
                f"train.effective_batch_size={eff} is not divisible by gradient_accumulation_steps="
                f"{self.gradient_accumulation_steps} x world_size={world_size}"
            )
        return eff // denom, accumulation


class SamplingConfig(_Section):
    guidance_scale: float = Field(7.0, ge=1.0, description="CFG scale, section 4.3")
    guidance_rescale: float = Field(
        0.0, ge=0.0, le=1.0, description="CFG rescale (Lin et al. 2024, section 3.4): pulls the guided prediction's"
        " spread back to the conditional one's, against the over-saturation of high guidance; 0 = off (paper)",
    )
    scheduler: Literal["euler"] = Field("euler", description="Euler discrete, section 4.3")
    num_inference_steps: int = Field(50, ge=1, description="section 4.3")
    batch_size: int = Field(8, ge=1, description="images per forward pass, per device")
    resolution: int | None = Field(None, description="output side in pixels; None = data.resolution")
    torch_compile: bool = Field(
        False, description="torch.compile the U-Net and VAE decoder for sampling: pays off over many batches, "
        "costs a one-off compile (docs/performance.md)"
    )


class DemoConfig(_Section):
    """The demo's phantom landing zone (``medisyn demo-data``; ``medisyn.demo.phantoms``)."""

    images_per_class: int = Field(24, ge=1, description="phantom images per class per source (8 classes)")


class RunConfig(_Section):
    name: str = Field("medisyn", description="run name, used in storage paths and MLflow")
    storage: StorageConfig = StorageConfig()
    tracking: TrackingConfig = TrackingConfig()
    models: ModelsConfig = ModelsConfig()
    runtime: RuntimeConfig = RuntimeConfig()
    data: DataConfig = DataConfig()
    train: TrainConfig = TrainConfig()
    sampling: SamplingConfig = SamplingConfig()
    fid: FIDConfig = FIDConfig()
    privacy: PrivacyConfig = PrivacyConfig()
    utility: UtilityConfig = UtilityConfig()
    study: StudyConfig = StudyConfig()  # reader study and its optional human gate (#15)
    demo: DemoConfig = DemoConfig()

    def config_hash(self) -> str:
        """sha256 of the canonical JSON form, run identity left out: a lineage tag for registered models."""
        data = self.model_dump(mode="json", exclude={"tracking": {"pipeline_run_id", "parent_run_id"}})
        blob = json.dumps(data, sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()

    def sampling_resolution(self) -> int:
        """Pixels per side of generated images: ``sampling.resolution``, else ``data.resolution``."""
        return self.sampling.resolution or self.data.resolution

    def fid_sampling(self) -> SamplingConfig:
        """``sampling`` as the per-epoch FID images use it (``fid.num_inference_steps`` when set)."""
        if self.fid.num_inference_steps is None:
            return self.sampling
        return self.sampling.model_copy(update={"num_inference_steps": self.fid.num_inference_steps})

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False)


def _format_errors(err: ValidationError, source: str) -> str:
    lines = [f"invalid configuration in {source}:"]
    for e in err.errors():
        field = ".".join(str(p) for p in e["loc"]) or "<root>"
        msg = e["msg"]
        if e["type"] == "extra_forbidden":
            msg = "unknown key (check the spelling; see configs/paper.yaml for every field)"
        if e["type"] != "extra_forbidden":
            lines.append(f"  {field}: {msg} (got {e.get('input')!r})")
        else:
            lines.append(f"  {field}: {msg}")
    return "\n".join(lines)


def deep_merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in override.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = deep_merge(out[k], v)
        else:
            out[k] = v
    return out


def _field_annotation(schema: type[BaseModel], parts: list[str]) -> Any | None:
    """The type annotation of the field at ``parts`` (``["train", "mixed_precision"]``) in ``schema``,
    descending through sections (``X | None`` included); None when the path names no field (an
    unknown key: validation reports it, naming the field) or crosses a non-section value."""
    model: type[BaseModel] | None = schema
    annotation: Any = None
    for part in parts:
        if model is None:
            return None
        field = model.model_fields.get(part)
        if field is None:
            return None
        annotation = field.annotation
        sections = [a for a in (get_args(annotation) or (annotation,))
                    if isinstance(a, type) and issubclass(a, BaseModel)]
        model = sections[0] if len(sections) == 1 else None
    return annotation


def resolve_override(annotation: Any | None, raw: str, value: Any) -> Any:
    """The value of ``--set key=raw`` for a field of type ``annotation``, given YAML's reading ``value``.

    YAML 1.1 guesses types from the text alone: ``no``/``off``/``n``/``false`` read as False,
    ``yes``/``on``/``y``/``true`` as True, ``2024-01-01`` as a date, ``123`` as an int. The schema
    decides instead. YAML's reading is kept when the field takes it as it is (a bool for a bool
    field, an int for an int field, null for an optional field) or when it means the same as the
    text; otherwise the text as written is used when the field accepts it (``no`` for
    ``train.mixed_precision``, an enum of strings; ``123`` for a name). So
    ``--set train.mixed_precision=no`` gives the string ``"no"`` and ``--set train.use_ema=no`` False.
    A YAML bool that fits neither way stays its text, so the error names the field with what the
    user wrote (``train.epochs=yes`` is an error, never the integer 1).
    """
    if annotation is None or value is None:
        return value
    if _validated(annotation, value, strict=True) is not _INVALID:
        return value
    text = yaml.load(raw, Loader=yaml.BaseLoader)  # the same structure, every scalar as written
    as_text = _validated(annotation, text)
    if as_text is _INVALID:
        return text if isinstance(value, bool) else value
    as_yaml = _validated(annotation, value)
    return value if as_yaml is not _INVALID and as_yaml == as_text else text


def parse_overrides(pairs: list[str] | None, schema: type[BaseModel] | None = None) -> dict[str, Any]:
    """``["train.epochs=2", "train.mixed_precision=no"]`` -> nested dict. Values are read as YAML and
    resolved against the field's type in ``schema`` (default :class:`RunConfig`) by
    :func:`resolve_override`: ``{"train": {"epochs": 2, "mixed_precision": "no"}}``."""
    schema = schema or RunConfig
    out: dict[str, Any] = {}
    for pair in pairs or []:
        if "=" not in pair:
            raise ConfigError(f"override {pair!r} must look like section.field=value")
        key, raw = pair.split("=", 1)
        parts = key.strip().split(".")
        if not all(parts):
            raise ConfigError(f"override {pair!r} must look like section.field=value")
        try:
            value = yaml.safe_load(raw)
        except yaml.YAMLError as exc:
            raise ConfigError(f"override {key.strip()}: value {raw!r} is not valid YAML: {exc}") from None
        node = out
        for p in parts[:-1]:
            child = node.setdefault(p, {})
            if not isinstance(child, dict):
                raise ConfigError(f"override {key.strip()}: {p} was set to a value above, it is not a section")
            node = child
        node[parts[-1]] = resolve_override(_field_annotation(schema, parts), raw, value)
    return out


def validate_config(data: dict[str, Any], source: str = "<dict>") -> RunConfig:
    if not isinstance(data, dict):
        raise ConfigError(f"config {source} must be a mapping of sections at the top level, "
                          f"got {type(data).__name__} ({str(data)[:80]!r})")
    try:
        return RunConfig.model_validate(data)
    except ValidationError as err:
        raise ConfigError(_format_errors(err, source)) from None


def _read_text(path: str | os.PathLike) -> str:
    """A local path, ``file://`` or ``s3://`` URI (a pipeline run keeps its config at ``<run>/config.yaml``)."""
    if "://" in str(path):
        from medisyn import storage

        return storage.read_text(str(path))
    return Path(path).read_text()


def load_config(path: str | os.PathLike | None, overrides: list[str] | None = None) -> RunConfig:
    """Load and validate a run config from YAML at a path or URI (None = the paper's defaults)."""
    data: dict[str, Any] = {}
    source = "<defaults>"
    if path is not None:
        source = str(path)
        try:
            text = _read_text(path)
        except OSError as exc:
            raise ConfigError(f"cannot read config {source}: {exc}") from None
        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            raise ConfigError(f"config {source} is not valid YAML: {exc}") from None
        if data is None or data == {}:
            # never silently the paper's full-scale run (issue #12): that is configs/paper.yaml, or no --config
            raise ConfigError(f"config {source} is empty: state the run (configs/paper.yaml holds the paper's "
                              "full-scale run; configs/demo.yaml the tiny one)")
        if not isinstance(data, dict):
            raise ConfigError(f"config {source} must be a mapping at the top level, got {type(data).__name__}")
    if overrides:
        data = deep_merge(data, parse_overrides(overrides))
    return validate_config(data, source)


def config_from_json(text: str) -> RunConfig:
    """Used by KFP components, which pass the resolved config as a JSON string: a non-empty object
    (``null``, ``[]``, ``{}`` or text that is not JSON are errors, never the paper's defaults)."""
    try:
        data = json.loads(text)
    except (json.JSONDecodeError, TypeError) as exc:
        raise ConfigError(f"config JSON is not valid JSON: {exc}") from None
    if data is None or data == {}:
        raise ConfigError(f"config JSON {text[:40]!r} is empty: pass the run's resolved config")
    return validate_config(data, "<json>")
