"""Classifiers for the utility gate: the tiny ResNet file has the torchvision ImageNet state_dict
format, loads strictly, and gets a fresh head; wrong files are errors, not random backbones."""

from __future__ import annotations

import pytest
import torch

from medisyn.config import TinyModelsConfig, UtilityConfig
from medisyn.models.resnet import build_tiny_resnet, load_classifier


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    return build_tiny_resnet(TinyModelsConfig(), tmp_path_factory.mktemp("rn") / "sub" / "resnet-tiny.pth")


def test_build_writes_an_imagenet_format_state_dict(weights):
    state = torch.load(weights, weights_only=True)
    assert state["fc.weight"].shape == (1000, 512)  # BasicBlock ResNet: 512 features, 1000 ImageNet classes
    assert state["conv1.weight"].shape == (64, 3, 7, 7)
    assert "layer4.0.conv2.weight" in state and "layer4.1.conv1.weight" not in state  # one block per stage
    assert not list(weights.parent.glob(".*tmp*"))  # atomic write leaves no temp file


def test_build_is_deterministic(tmp_path, weights):
    other = build_tiny_resnet(TinyModelsConfig(), tmp_path / "again.pth")
    a, b = torch.load(weights, weights_only=True), torch.load(other, weights_only=True)
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("num_outputs", [1, 2, 4])
def test_load_classifier_keeps_backbone_and_replaces_head(weights, num_outputs):
    model = load_classifier(UtilityConfig(classifier="tiny_resnet"), weights, num_outputs)
    state = torch.load(weights, weights_only=True)
    assert torch.equal(model.conv1.weight, state["conv1.weight"])
    assert model.fc.out_features == num_outputs and model.fc.in_features == 512
    model.eval()
    with torch.no_grad():
        assert model(torch.zeros(2, 3, 32, 32)).shape == (2, num_outputs)


def test_resnet50_refuses_a_tiny_weights_file(weights):
    with pytest.raises(ValueError, match="not a torchvision resnet50 state_dict"):
        load_classifier(UtilityConfig(classifier="resnet50"), weights, 4)


@pytest.mark.slow
def test_resnet50_loads_an_imagenet_format_file(tmp_path):
    from torchvision.models import resnet50

    path = tmp_path / "resnet50.pth"
    torch.save(resnet50(weights=None).state_dict(), path)
    model = load_classifier(UtilityConfig(), path, 4)
    assert model.fc.in_features == 2048 and model.fc.out_features == 4


@pytest.mark.parametrize("bad,match", [("missing.pth", "not found")])
def test_load_classifier_errors(tmp_path, bad, match):
    with pytest.raises(FileNotFoundError, match=match):
        load_classifier(UtilityConfig(classifier="tiny_resnet"), tmp_path / bad, 2)


def test_load_classifier_rejects_zero_outputs(weights):
    with pytest.raises(ValueError, match="num_outputs"):
        load_classifier(UtilityConfig(classifier="tiny_resnet"), weights, 0)
