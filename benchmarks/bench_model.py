"""The benchmarks' model: SDXL's architecture with its widths scaled down to a ~135 M-parameter U-Net.

Same classes and block layout as stable-diffusion-xl-base-1.0 (DownBlock2D + 2 x CrossAttnDownBlock2D,
2 ResNets per block, linear-projection transformers deepening towards the bottom (1, 2, 5 layers;
SDXL: 1, 2, 10), 64-wide attention heads, ``text_time`` added conditioning from 6 size ids and the
pooled text embedding), widths 96/192/384 (SDXL: 320/640/1280), two 256-wide CLIP text encoders
(cross-attention 512; SDXL: 768 + 1280 = 2048) and an 8x-downsampling VAE, so 128 px images are
16 x 16 x 4 latents. Random init: the benchmarks time compute, not quality.
"""

from __future__ import annotations

import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch  # noqa: E402

RESOLUTION = 128  # pixels; latents 16 x 16 x 4
TEXT_HIDDEN = 256  # each CLIP text encoder; cross-attention dim = 2 x this
TIME_EMBED = 64  # addition_time_embed_dim (SDXL: 256)
UNET_WIDTHS = (96, 192, 384)
UNET_TRANSFORMER_LAYERS = (1, 2, 5)
VAE_WIDTHS = (32, 64, 128, 128)  # 4 levels = 8x downsampling, as SDXL's VAE (128, 256, 512, 512)


def unet_config() -> dict:
    return dict(
        sample_size=RESOLUTION // 8, in_channels=4, out_channels=4, layers_per_block=2,
        block_out_channels=UNET_WIDTHS,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=tuple(c // 64 for c in UNET_WIDTHS),  # diffusers' name for the number of heads
        transformer_layers_per_block=UNET_TRANSFORMER_LAYERS, use_linear_projection=True,
        addition_embed_type="text_time", addition_time_embed_dim=TIME_EMBED,
        projection_class_embeddings_input_dim=6 * TIME_EMBED + TEXT_HIDDEN,
        cross_attention_dim=2 * TEXT_HIDDEN,
    )


def build(base_dir: str | os.PathLike, seed: int = 0) -> Path:
    """Save the pipeline (diffusers layout of stable-diffusion-xl-base-1.0) under ``base_dir``."""
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from medisyn.models.sdxl import SDXL_SCHEDULER, build_clip_tokenizer

    base_dir = Path(base_dir)
    if (base_dir / "model_index.json").exists():
        return base_dir
    torch.manual_seed(seed)
    h = TEXT_HIDDEN
    text_cfg = dict(hidden_size=h, intermediate_size=4 * h, num_hidden_layers=4, num_attention_heads=4,
                    projection_dim=h, vocab_size=49408, max_position_embeddings=77, bos_token_id=49406,
                    eos_token_id=49407, pad_token_id=49407, hidden_act="gelu")
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, layers_per_block=2, block_out_channels=VAE_WIDTHS,
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
        norm_num_groups=32, sample_size=RESOLUTION, scaling_factor=0.13025, force_upcast=False,
    )
    pipe = StableDiffusionXLPipeline(
        vae=vae, text_encoder=CLIPTextModel(CLIPTextConfig(**text_cfg)),
        text_encoder_2=CLIPTextModelWithProjection(CLIPTextConfig(**text_cfg)),
        tokenizer=build_clip_tokenizer(), tokenizer_2=build_clip_tokenizer(pad_token="!"),
        unet=UNet2DConditionModel(**unet_config()), scheduler=EulerDiscreteScheduler(**SDXL_SCHEDULER),
        add_watermarker=False,
    )
    pipe.save_pretrained(base_dir, safe_serialization=True)
    return base_dir


def unet_params_m(base_dir: str | os.PathLike) -> float:
    from diffusers import UNet2DConditionModel

    unet = UNet2DConditionModel.from_pretrained(Path(base_dir) / "unet")
    return sum(p.numel() for p in unet.parameters()) / 1e6


def pin_threads(threads: int | None) -> int:
    """Pin torch's intra-op threads (and OpenMP's, for libraries read later) for a steady A/B."""
    if threads:
        os.environ["OMP_NUM_THREADS"] = str(threads)
        torch.set_num_threads(threads)
    return torch.get_num_threads()


def measured_matmul_peak(dtype: torch.dtype, n: int = 4096, repeats: int = 5) -> float:
    """Best matmul FLOP/s of this machine in ``dtype``: large square matrices, warm, best of ``repeats``
    (the CPU stand-in for a GPU's datasheet peak)."""
    import time

    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    a @ b
    best = 0.0
    for _ in range(repeats):
        t = time.perf_counter()
        a @ b
        best = max(best, 2 * n**3 / (time.perf_counter() - t))
    return best
