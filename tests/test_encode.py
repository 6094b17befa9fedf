"""medisyn.train.encode: the latent cache (VAE latents + text embeddings computed once, section 4.2)."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from helpers import CAPTIONS, demo_config, write_tiny_dataset
from medisyn import storage
from medisyn.models import sdxl
from medisyn.train.encode import (
    EMPTY_PROMPT,
    LatentCache,
    encode,
    encode_prompts,
    image_to_tensor,
    read_manifest,
)


@pytest.fixture(scope="module")
def sdxl_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("encode")
    cfg = demo_config(root)
    sdxl.build_tiny_sdxl(cfg.models.tiny, storage.local_path(cfg.models.sdxl_base), storage.local_path(cfg.models.vae))
    return root


@pytest.fixture(scope="module")
def encoded(sdxl_root):
    cfg = demo_config(sdxl_root, ["train.cache_shard_rows=16", "train.encode_batch_size=8",
                                  "train.cache_dtype=float32"])
    dataset = write_tiny_dataset(sdxl_root / "dataset", n=40)
    result = encode(cfg, dataset, str(sdxl_root / "cache"))
    return cfg, dataset, result


def test_encode_writes_complete_cache_with_documented_layout(encoded):
    cfg, _, result = encoded
    assert not result.reused
    assert result.num_samples == 40
    assert result.num_captions == len(CAPTIONS) + 1  # distinct captions + the empty prompt
    assert storage.is_complete(result.cache_uri)
    root = storage.local_path(result.cache_uri)
    manifest = read_manifest(result.cache_uri)
    assert manifest["cache_key"] == result.cache_key
    assert manifest["dataset_hash"] == "tiny-40-64-0"
    assert manifest["model_identity"] == sdxl.model_identity(cfg.models)
    # 40 rows in shards of 16: bounded memory, 3 shards.
    assert [s["rows"] for s in manifest["shards"]] == [16, 16, 8]
    for s in manifest["shards"]:
        for part in ("latents", "caption_ids", "time_ids"):
            assert (root / "shards" / f"{s['name']}.{part}.npy").exists()
    assert json.loads((root / "text" / "captions.json").read_text())[0] == EMPTY_PROMPT


def test_latent_shape_is_derived_from_the_vae(encoded):
    cfg, _, result = encoded
    vae = sdxl.load_vae(cfg.models)
    factor = 2 ** (len(vae.config.block_out_channels) - 1)
    assert result.latent_shape == (vae.config.latent_channels, 64 // factor, 64 // factor)


def test_cached_values_equal_the_frozen_models_outputs(encoded):
    """Latents = VAE posterior mean x scaling factor; text = both encoders' penultimate states + pooled."""
    import pyarrow.parquet as pq

    cfg, dataset, result = encoded
    cache = LatentCache(storage.local_path(result.cache_uri))
    first = pq.read_table(Path(dataset) / "train" / "part-00000.parquet").slice(0, 1).to_pylist()[0]
    vae = sdxl.load_vae(cfg.models)
    pixels, time_ids = image_to_tensor(first["image"], 64)
    with torch.no_grad():
        expected = vae.encode(pixels[None]).latent_dist.mean[0] * vae.config.scaling_factor
    latents, row, cached_time_ids = cache.sample(0)
    np.testing.assert_allclose(latents, expected.numpy(), rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(cached_time_ids, [64, 64, 0, 0, 64, 64])

    captions = json.loads((storage.local_path(result.cache_uri) / "text" / "captions.json").read_text())
    assert captions[row] == first["caption"]
    emb, pooled = encode_prompts([first["caption"], EMPTY_PROMPT], sdxl.load_tokenizers(cfg.models),
                                 sdxl.load_text_encoders(cfg.models), "cpu")
    got_emb, got_pooled = cache.text(np.array([row, 0]))
    hidden = cfg.models.tiny.text_hidden_size
    assert got_emb.shape == (2, 77, 2 * hidden)  # both encoders concatenated on channels
    np.testing.assert_allclose(got_emb, emb.numpy(), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(got_pooled, pooled.numpy(), rtol=1e-5, atol=1e-5)


def test_second_encode_reuses_the_complete_cache(encoded):
    cfg, dataset, result = encoded
    manifest = storage.local_path(result.cache_uri) / "manifest.json"
    before = manifest.stat().st_mtime_ns
    again = encode(cfg, dataset, result.cache_uri)
    assert again.reused and again.cache_key == result.cache_key
    assert manifest.stat().st_mtime_ns == before


def test_changed_dataset_hash_rebuilds_the_cache(sdxl_root, encoded):
    cfg, _, first = encoded
    other = write_tiny_dataset(sdxl_root / "dataset-b", n=12, seed=1, shards=1)
    cache_uri = str(sdxl_root / "cache-b")
    a = encode(cfg, other, cache_uri)
    (Path(other) / "manifest.json").write_text(json.dumps({"dataset_hash": "changed"}))
    b = encode(cfg, other, cache_uri)
    assert not b.reused and b.cache_key != a.cache_key != first.cache_key
    assert read_manifest(cache_uri)["dataset_hash"] == "changed"


def test_incomplete_dataset_is_refused(sdxl_root):
    cfg = demo_config(sdxl_root)
    ds = Path(write_tiny_dataset(sdxl_root / "dataset-partial", n=4, shards=1))
    (ds / storage.COMPLETE_MARKER).unlink()
    with pytest.raises(FileNotFoundError):
        encode(cfg, str(ds), str(sdxl_root / "cache-partial"))
    assert not storage.exists(str(sdxl_root / "cache-partial"))


@pytest.mark.parametrize(
    "size, expected_time_ids",
    [
        ((64, 64), [64, 64, 0, 0, 64, 64]),  # already at resolution: no crop
        ((96, 64), [64, 96, 0, 16, 64, 64]),  # wide: (h, w) original, left crop 16
        ((64, 128), [128, 64, 32, 0, 64, 64]),  # tall: top crop 32
    ],
)
def test_time_ids_describe_the_pixels_actually_encoded(size, expected_time_ids):
    from PIL import Image

    buf = io.BytesIO()
    Image.new("L", size, 128).save(buf, format="PNG")
    pixels, time_ids = image_to_tensor(buf.getvalue(), 64)
    assert tuple(pixels.shape) == (3, 64, 64)
    assert float(pixels.min()) >= -1.0 and float(pixels.max()) <= 1.0
    np.testing.assert_array_equal(time_ids, expected_time_ids)
