"""FID feature extractors: the tiny stand-in and the standard Inception loaded from a local weights file."""

from __future__ import annotations

import pytest
import torch

from medisyn.config import FIDConfig, TinyModelsConfig
from medisyn.models import inception


@pytest.fixture(scope="module")
def tiny_weights(tmp_path_factory):
    path = tmp_path_factory.mktemp("fidw") / "fid-features-tiny.pth"
    inception.build_tiny_feature_extractor(TinyModelsConfig(fid_feature_dim=24), path)
    return str(path)


@pytest.mark.parametrize("side", [16, 64, 97])
def test_tiny_extractor_maps_uint8_images_to_features(tiny_weights, side):
    model = inception.load_feature_extractor(FIDConfig(feature_extractor="tiny"), tiny_weights, "cpu")
    x = torch.randint(0, 256, (3, 3, side, side), dtype=torch.uint8)
    f = model(x)
    assert f.shape == (3, 24) and f.dtype == torch.float32
    assert torch.equal(f, model(x))  # eval mode, deterministic
    assert not any(p.requires_grad for p in model.parameters())


def test_tiny_extractor_rejects_float_input(tiny_weights):
    model = inception.load_feature_extractor(FIDConfig(feature_extractor="tiny"), tiny_weights, "cpu")
    with pytest.raises(ValueError, match="uint8"):
        model(torch.rand(1, 3, 32, 32))


def test_build_is_reproducible_and_identity_pins_weights(tiny_weights, tmp_path):
    other = tmp_path / "again.pth"
    inception.build_tiny_feature_extractor(TinyModelsConfig(fid_feature_dim=24), other)
    a = inception.load_feature_extractor(FIDConfig(feature_extractor="tiny"), tiny_weights, "cpu")
    b = inception.load_feature_extractor(FIDConfig(feature_extractor="tiny"), str(other), "cpu")
    x = torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8)
    assert torch.equal(a(x), b(x))
    ident = inception.extractor_identity(FIDConfig(feature_extractor="tiny"), tiny_weights)
    assert set(ident) == {"implementation", "weights_sha256", "resize_filter"}
    assert len(ident["weights_sha256"]) == 64
    different = tmp_path / "seed1.pth"
    inception.build_tiny_feature_extractor(TinyModelsConfig(fid_feature_dim=24, seed=1), different)
    assert inception.weights_sha256(str(different)) != ident["weights_sha256"]


def test_missing_weights_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="fid_inception_weights"):
        inception.load_feature_extractor(FIDConfig(feature_extractor="inception"), str(tmp_path / "nope.pth"), "cpu")


def test_inception_mode_refuses_a_tiny_file_and_tiny_refuses_other_files(tiny_weights, tmp_path):
    # torch_fidelity's InceptionV3 load_state_dict rejects the tiny file's keys
    with pytest.raises(RuntimeError, match="state_dict"):
        inception.load_feature_extractor(FIDConfig(feature_extractor="inception"), tiny_weights, "cpu")
    junk = tmp_path / "junk.pth"
    torch.save({"a": torch.zeros(1)}, junk)
    with pytest.raises(ValueError, match="not a tiny FID extractor"):
        inception.load_feature_extractor(FIDConfig(feature_extractor="tiny"), str(junk), "cpu")


@pytest.mark.slow
def test_standard_inception_loads_from_a_local_weights_file(tmp_path, monkeypatch):
    """The real code path with random weights in the pt_inception-2015-12-05 layout (nothing downloaded)."""
    from torch_fidelity import feature_extractor_inceptionv3 as tfi

    # Build a state dict of the exact architecture without its (downloaded) weights.
    monkeypatch.setattr(tfi, "load_state_dict_from_url", lambda *a, **k: {})
    monkeypatch.setattr(tfi.FeatureExtractorInceptionV3, "load_state_dict", lambda self, sd, *a, **k: None)
    state = tfi.FeatureExtractorInceptionV3("x", ["2048"]).state_dict()
    monkeypatch.undo()
    path = tmp_path / "pt_inception-2015-12-05-random.pth"
    torch.save(state, path)

    model = inception.load_feature_extractor(FIDConfig(feature_extractor="inception"), str(path), "cpu")
    x = torch.randint(0, 256, (2, 3, 64, 64), dtype=torch.uint8)  # resized to 299 inside (TF1 bilinear)
    f = model(x)
    assert f.shape == (2, 2048) and f.dtype == torch.float32 and torch.isfinite(f).all()
    ident = inception.extractor_identity(FIDConfig(feature_extractor="inception"), str(path))
    assert "tf1x-bilinear-299" in ident["resize_filter"] and "pt_inception-2015-12-05" in ident["implementation"]
