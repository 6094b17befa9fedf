"""SDXL components: load from a diffusers directory or URI, or build a tiny random-init stand-in.

Production loads ``stabilityai/stable-diffusion-xl-base-1.0`` (text encoders, tokenizers, U-Net,
scheduler) and the ``madebyollin/sdxl-vae-fp16-fix`` VAE from paths given in the config (section
4.2). Tests and the demo build a tiny SDXL with the same classes and save it with
``save_pretrained``, so both go through exactly the same loading code below.

The tokenizers are the real CLIP BPE tokenizer, built offline from the vocabulary that ships inside
open_clip (``bpe_simple_vocab_16e6.txt.gz``).
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import torch

from medisyn import storage
from medisyn.config import ModelsConfig, RuntimeConfig, TinyModelsConfig

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("DIFFUSERS_OFFLINE", "1")

# SDXL's own noise schedule (scheduler_config.json of stable-diffusion-xl-base-1.0).
SDXL_SCHEDULER = dict(
    beta_start=0.00085,
    beta_end=0.012,
    beta_schedule="scaled_linear",
    num_train_timesteps=1000,
    prediction_type="epsilon",
    timestep_spacing="leading",
    steps_offset=1,
    interpolation_type="linear",
    use_karras_sigmas=False,
)


# ----------------------------------------------------------------------------------------------
# Device and dtype
# ----------------------------------------------------------------------------------------------
def resolve_device(runtime: RuntimeConfig) -> torch.device:
    if runtime.device == "cuda" or (runtime.device == "auto" and torch.cuda.is_available()):
        return torch.device("cuda")
    return torch.device("cpu")


def cpu_bf16_support() -> str | None:
    """The instruction set that gives this CPU native bf16 arithmetic ("amx_bf16" or "avx512_bf16"),
    or None. oneDNN also *emulates* bf16 on plain AVX-512 (``torch.ops.mkldnn._is_mkldnn_bf16_supported()``
    is true there), but emulated bf16 is slower than float32, so only native support counts (#14)."""
    flags: set[str] = set()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
                    break
    except OSError:
        pass
    if "amx_bf16" in flags:
        return "amx_bf16"
    # torch's own cpuinfo query covers hosts without /proc/cpuinfo
    if "avx512_bf16" in flags or getattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)():
        return "avx512_bf16"
    return None


def require_precision(precision: str, device: torch.device, setting: str) -> None:
    """Raise a ConfigError naming ``setting`` unless this hardware has ``precision`` ("bf16" or "fp16")
    natively: bf16 on a GPU with native bf16 or a CPU with AVX512-BF16/AMX-BF16 (cpu_bf16_support),
    fp16 on a GPU. Decided by capability, not device type; never a silent fallback (#14). The one
    check behind both training autocast (train.mixed_precision) and inference weights (runtime.dtype)."""
    from medisyn.config import ConfigError

    if device.type == "cuda":
        if precision == "bf16" and not torch.cuda.is_bf16_supported(including_emulation=False):
            raise ConfigError(f"{setting} but {torch.cuda.get_device_name(device)} has no native bf16: use fp16 "
                              "(float16) or full precision")
        return
    if precision == "fp16":
        raise ConfigError(f"{setting} needs a GPU, not {device.type}: use bf16 (bfloat16) or full precision")
    if cpu_bf16_support() is None:
        raise ConfigError(f"{setting} but this CPU has no native bf16 instructions (avx512_bf16 or amx_bf16 in "
                          "/proc/cpuinfo); emulated bf16 is slower than float32: use full precision")


def resolve_dtype(runtime: RuntimeConfig, device: torch.device) -> torch.dtype:
    """``runtime.dtype`` for inference (encode, sampling), if this hardware has it (require_precision)."""
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[runtime.dtype]
    if dtype != torch.float32:
        require_precision("bf16" if dtype == torch.bfloat16 else "fp16", device, f"runtime.dtype={runtime.dtype}")
    return dtype


# ----------------------------------------------------------------------------------------------
# Paths: local directories are used in place; s3:// prefixes are cached locally once.
# ----------------------------------------------------------------------------------------------
def cache_dir() -> Path:
    return Path(os.environ.get("MEDISYN_CACHE_DIR", Path.home() / ".cache" / "medisyn"))


def local_model_dir(uri: str) -> Path:
    """A local directory with the model at ``uri``: itself if local, else a cached download."""
    if not storage.is_remote(uri):
        path = storage.local_path(uri)
        if not path.exists():
            raise FileNotFoundError(
                f"model path {path} does not exist: put the weights there or run `medisyn build-tiny-models`"
            )
        return path
    key = hashlib.sha256(uri.encode()).hexdigest()[:16]
    return storage.download_dir_once(uri, cache_dir() / "models" / key)


def model_identity(models: ModelsConfig) -> str:
    """A short, stable identity of the frozen base components (keys the latent cache and tags models)."""
    parts = {"sdxl_base": storage.normalize(models.sdxl_base), "vae": models.vae and storage.normalize(models.vae)}
    for key in ("sdxl_base", "vae"):
        uri = getattr(models, key)
        if uri and not storage.is_remote(uri):
            idx = storage.local_path(uri) / "model_index.json"
            cfg = storage.local_path(uri) / "config.json"
            for f in (idx, cfg):
                if f.exists():
                    parts[key + ":" + f.name] = hashlib.sha256(f.read_bytes()).hexdigest()
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:16]


# ----------------------------------------------------------------------------------------------
# Loading
# ----------------------------------------------------------------------------------------------
def load_tokenizers(models: ModelsConfig):
    from transformers import CLIPTokenizer

    base = local_model_dir(models.sdxl_base)
    return CLIPTokenizer.from_pretrained(base / "tokenizer"), CLIPTokenizer.from_pretrained(base / "tokenizer_2")


def load_text_encoders(models: ModelsConfig, device="cpu", dtype=torch.float32):
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    base = local_model_dir(models.sdxl_base)
    te1 = CLIPTextModel.from_pretrained(base / "text_encoder", dtype=dtype).to(device)
    te2 = CLIPTextModelWithProjection.from_pretrained(base / "text_encoder_2", dtype=dtype).to(device)
    te1.requires_grad_(False).eval()
    te2.requires_grad_(False).eval()
    return te1, te2


def load_vae(models: ModelsConfig, device="cpu", dtype=torch.float32):
    """The fp16-fix VAE when configured (section 4.2), else the base model's."""
    from diffusers import AutoencoderKL

    if models.vae:
        vae = AutoencoderKL.from_pretrained(local_model_dir(models.vae), dtype=dtype)
    else:
        vae = AutoencoderKL.from_pretrained(local_model_dir(models.sdxl_base), subfolder="vae", dtype=dtype)
    return vae.to(device).requires_grad_(False).eval()


def load_unet(models: ModelsConfig, unet_dir: str | os.PathLike | None = None, device="cpu", dtype=torch.float32):
    """The base U-Net, or a fine-tuned one from a checkpoint's ``unet/`` directory."""
    from diffusers import UNet2DConditionModel

    if unet_dir is not None:
        return UNet2DConditionModel.from_pretrained(local_model_dir(str(unet_dir)), dtype=dtype).to(device)
    return UNet2DConditionModel.from_pretrained(
        local_model_dir(models.sdxl_base), subfolder="unet", dtype=dtype
    ).to(device)


def load_noise_scheduler(models: ModelsConfig):
    from diffusers import DDPMScheduler

    return DDPMScheduler.from_pretrained(local_model_dir(models.sdxl_base), subfolder="scheduler")


def load_pipeline(models: ModelsConfig, runtime: RuntimeConfig, unet_dir: str | os.PathLike | None = None):
    """StableDiffusionXLPipeline with the configured VAE, optionally a fine-tuned U-Net, Euler sampler."""
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline

    device = resolve_device(runtime)
    dtype = resolve_dtype(runtime, device)
    kwargs = {"vae": load_vae(models, dtype=dtype)}
    if unet_dir is not None:
        kwargs["unet"] = load_unet(models, unet_dir, dtype=dtype)
    pipe = StableDiffusionXLPipeline.from_pretrained(
        local_model_dir(models.sdxl_base), dtype=dtype, add_watermarker=False, **kwargs
    )
    pipe.scheduler = EulerDiscreteScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device)


# ----------------------------------------------------------------------------------------------
# Tiny random-init stand-ins (tests, demo)
# ----------------------------------------------------------------------------------------------
def build_clip_tokenizer(pad_token: str = "<|endoftext|>"):
    """The real CLIP BPE tokenizer (49,408 tokens), built offline from open_clip's vocabulary file."""
    from open_clip.tokenizer import SimpleTokenizer
    from transformers import CLIPTokenizer

    simple = SimpleTokenizer()
    # open_clip names the two special tokens differently from Hugging Face's CLIP vocabulary.
    rename = {"<start_of_text>": "<|startoftext|>", "<end_of_text>": "<|endoftext|>"}
    vocab = {rename.get(k, k): v for k, v in simple.encoder.items()}
    merges = [(a, b) for (a, b), _ in sorted(simple.bpe_ranks.items(), key=lambda kv: kv[1])]
    tok = CLIPTokenizer(vocab=vocab, merges=merges, pad_token=pad_token, model_max_length=77)
    if len(tok) != 49408:
        raise RuntimeError(f"CLIP tokenizer built with {len(tok)} tokens, expected 49408")
    return tok


def _norm_groups(widths: tuple[int, ...]) -> int:
    """GroupNorm groups for a tiny model: at least 4 channels per group, as in SDXL's VAE (128 channels,
    32 groups). One channel per group is instance normalisation, which erases each image's mean colour:
    a VAE decoder built that way cannot tell a grey X-ray from skin (measured: reconstruction error
    12.1 grey levels with 1 channel per group, 5.8 with 4, after the same pretraining)."""
    return max(1, min(32, min(widths) // 4))


def build_tiny_sdxl(tiny: TinyModelsConfig, base_dir: str | os.PathLike, vae_dir: str | os.PathLike | None) -> None:
    """Save a tiny, random-init SDXL in the diffusers layout of stable-diffusion-xl-base-1.0 (the
    VAE is trained on phantoms afterwards when ``tiny.pretrain`` is set: ``medisyn.models``)."""
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    torch.manual_seed(tiny.seed)
    h = tiny.text_hidden_size
    text_cfg = dict(
        hidden_size=h, intermediate_size=2 * h, num_hidden_layers=2, num_attention_heads=4,
        projection_dim=h, vocab_size=49408, max_position_embeddings=77, bos_token_id=49406,
        eos_token_id=49407, pad_token_id=49407, hidden_act="gelu",
    )
    te1 = CLIPTextModel(CLIPTextConfig(**text_cfg))
    te2 = CLIPTextModelWithProjection(CLIPTextConfig(**text_cfg))
    n_levels = len(tiny.unet_block_out_channels)
    time_dim = 8
    latent_side = tiny.resolution // 2 ** (len(tiny.vae_block_out_channels) - 1)
    unet = UNet2DConditionModel(
        sample_size=latent_side,
        in_channels=4,
        out_channels=4,
        block_out_channels=tiny.unet_block_out_channels,
        layers_per_block=1,
        down_block_types=("DownBlock2D",) + ("CrossAttnDownBlock2D",) * (n_levels - 1),
        up_block_types=("CrossAttnUpBlock2D",) * (n_levels - 1) + ("UpBlock2D",),
        attention_head_dim=tuple(max(1, c // 16) for c in tiny.unet_block_out_channels),
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=time_dim,
        transformer_layers_per_block=1,
        projection_class_embeddings_input_dim=6 * time_dim + h,  # 6 time ids + pooled text (encoder 2)
        cross_attention_dim=2 * h,  # both encoders' hidden states concatenated
        norm_num_groups=_norm_groups(tiny.unet_block_out_channels),
    )
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        block_out_channels=tiny.vae_block_out_channels,
        down_block_types=("DownEncoderBlock2D",) * len(tiny.vae_block_out_channels),
        up_block_types=("UpDecoderBlock2D",) * len(tiny.vae_block_out_channels),
        latent_channels=4,
        layers_per_block=1,
        norm_num_groups=_norm_groups(tiny.vae_block_out_channels),
        sample_size=tiny.resolution,
        scaling_factor=0.13025,  # SDXL's VAE scaling factor
        force_upcast=False,  # the fp16-fix VAE runs in half precision
    )
    tok = build_clip_tokenizer()
    pipe = StableDiffusionXLPipeline(
        vae=vae, text_encoder=te1, text_encoder_2=te2,
        tokenizer=tok, tokenizer_2=build_clip_tokenizer(pad_token="!"),  # as in SDXL base
        unet=unet, scheduler=EulerDiscreteScheduler(**SDXL_SCHEDULER), add_watermarker=False,
    )
    pipe.save_pretrained(base_dir, safe_serialization=True)
    if vae_dir is not None:
        vae.save_pretrained(vae_dir, safe_serialization=True)
