"""BiomedCLIP stand-in: built offline in the open_clip local-dir layout, loaded back through
``create_model_from_pretrained("local-dir:...")``, deterministic L2-normalised image embeddings."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from PIL import Image

from medisyn.config import TinyModelsConfig
from medisyn.models.biomedclip import build_tiny_biomedclip, image_embeddings, load_biomedclip


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory):
    return build_tiny_biomedclip(TinyModelsConfig(clip_embed_dim=24), tmp_path_factory.mktemp("clip") / "biomedclip")


def _images(n, size=64, mode="RGB"):
    rng = np.random.default_rng(0)
    shape = (size, size, 3) if mode == "RGB" else (size, size)
    return [Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8)) for _ in range(n)]


def test_layout_is_biomedclip_like(clip_dir):
    cfg = json.loads((clip_dir / "open_clip_config.json").read_text())
    vision, text = cfg["model_cfg"]["vision_cfg"], cfg["model_cfg"]["text_cfg"]
    # the structure of microsoft/BiomedCLIP-PubMedBERT_256-vit_base_patch16_224's open_clip_config.json
    assert vision["timm_model_name"] == "test_vit" and vision["timm_pool"] == "" and vision["timm_proj"] == "linear"
    assert text["hf_proj_type"] == "mlp" and text["hf_pooler_type"] == "cls_last_hidden_state_pooler"
    assert cfg["model_cfg"]["embed_dim"] == 24
    assert (clip_dir / "open_clip_model.safetensors").is_file()
    assert (clip_dir / "text" / "config.json").is_file()  # the BERT config travels with the model


def test_embeddings_are_unit_vectors_and_batch_independent(clip_dir):
    model, preprocess = load_biomedclip(clip_dir)
    assert not model.training
    ims = _images(5) + _images(2, size=100, mode="L")  # any size and mode: preprocess resizes, RGB-converts
    e1 = image_embeddings(model, preprocess, ims, batch_size=2)
    e2 = image_embeddings(model, preprocess, ims, batch_size=7)
    assert e1.shape == (7, 24) and e1.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(e1, axis=1), 1.0, atol=1e-5)
    np.testing.assert_allclose(e1, e2, atol=1e-5)
    assert image_embeddings(model, preprocess, [], 4).shape == (0, 24)


def test_weights_round_trip_and_directory_is_relocatable(clip_dir, tmp_path):
    moved = tmp_path / "elsewhere"
    shutil.copytree(clip_dir, moved)
    m1, p1 = load_biomedclip(clip_dir)
    m2, p2 = load_biomedclip(str(moved))
    ims = _images(3)
    np.testing.assert_allclose(image_embeddings(m1, p1, ims), image_embeddings(m2, p2, ims), atol=1e-6)
    # identical images -> cosine similarity 1 (eq. 2 as a dot product of unit vectors)
    e = image_embeddings(m1, p1, [ims[0], ims[0].copy()])
    assert float(e[0] @ e[1]) == pytest.approx(1.0, abs=1e-5)


def test_tokenizer_loads_offline(clip_dir):
    import open_clip

    tok = open_clip.get_tokenizer(f"local-dir:{clip_dir}")
    assert tok(["Dermoscopy image showing melanoma."]).shape == (1, 64)


@pytest.mark.parametrize("make,exc", [
    (lambda d: None, FileNotFoundError),                          # directory does not exist
    (lambda d: d.mkdir(), FileNotFoundError),                     # no open_clip_config.json
])
def test_load_errors(tmp_path, make, exc):
    d = tmp_path / "nope"
    make(d)
    with pytest.raises(exc):
        load_biomedclip(d)
