"""The SDXL factory: the tiny model is saved in diffusers' layout and loaded by the real loaders."""

from __future__ import annotations

import json

import pytest
import torch

from medisyn import storage
from medisyn.config import RuntimeConfig
from medisyn.models import sdxl


def test_clip_tokenizer_is_the_real_bpe():
    tok = sdxl.build_clip_tokenizer()
    assert len(tok) == 49408
    ids = tok("Chest CT pulmonary angiography image").input_ids
    # CLIP's BOS/EOS and the real BPE ids of these words (same ids as openai/clip-vit-large-patch14)
    assert ids == [49406, 10563, 1122, 39132, 514, 16329, 4897, 2867, 49407]
    assert tok("a photo", padding="max_length", max_length=77).input_ids[-1] == 49407


def test_tiny_sdxl_layout_matches_sdxl_base(tiny_sdxl_cfg):
    base = storage.local_path(tiny_sdxl_cfg.models.sdxl_base)
    index = json.loads((base / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusionXLPipeline"
    for sub in ("unet", "vae", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2", "scheduler"):
        assert (base / sub).is_dir(), sub
    assert list((base / "unet").glob("*.safetensors"))
    assert (storage.local_path(tiny_sdxl_cfg.models.vae) / "config.json").exists()


def test_loaders_give_sdxl_shapes(tiny_sdxl_cfg):
    m = tiny_sdxl_cfg.models
    te1, te2 = sdxl.load_text_encoders(m)
    tok1, tok2 = sdxl.load_tokenizers(m)
    unet = sdxl.load_unet(m)
    vae = sdxl.load_vae(m)
    assert not any(p.requires_grad for p in vae.parameters())
    assert unet.config.cross_attention_dim == te1.config.hidden_size + te2.config.hidden_size
    assert unet.config.addition_embed_type == "text_time"
    # 6 micro-conditioning ids (original size, crop top-left, target size) x time embed + pooled text
    assert unet.config.projection_class_embeddings_input_dim == (
        6 * unet.config.addition_time_embed_dim + te2.config.projection_dim)
    assert tok2.pad_token == "!" and tok1.pad_token == "<|endoftext|>"
    assert sdxl.load_noise_scheduler(m).config.num_train_timesteps == 1000


def test_pipeline_generates_with_euler_and_is_seeded(tiny_sdxl_cfg):
    pipe = sdxl.load_pipeline(tiny_sdxl_cfg.models, RuntimeConfig(device="cpu"))
    assert type(pipe.scheduler).__name__ == "EulerDiscreteScheduler"

    def run(seed):
        return pipe("Dermoscopy image showing melanoma.", num_inference_steps=2, guidance_scale=7.0,
                    height=64, width=64, output_type="np", generator=torch.Generator().manual_seed(seed)).images

    a, b, c = run(0), run(0), run(1)
    assert a.shape == (1, 64, 64, 3)
    assert (a == b).all() and not (a == c).all()


def test_model_identity_changes_with_the_model(tiny_sdxl_cfg, tmp_path):
    ident = sdxl.model_identity(tiny_sdxl_cfg.models)
    assert ident == sdxl.model_identity(tiny_sdxl_cfg.models)
    other = tiny_sdxl_cfg.models.model_copy(update={"sdxl_base": str(tmp_path / "elsewhere")})
    assert sdxl.model_identity(other) != ident


def test_missing_model_path_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="build-tiny-models"):
        sdxl.local_model_dir(str(tmp_path / "nope"))
