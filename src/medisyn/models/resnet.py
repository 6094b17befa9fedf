"""Classifiers for the utility gate (paper section 4.3.5): an ImageNet pre-trained ResNet-50 whose
head is replaced for the task, or a tiny ResNet stand-in for tests and the demo.

Both come from a torchvision ``state_dict`` file (the format of torchvision's
``resnet50-11ad3fa6.pth`` ImageNet weights: plain tensors keyed ``conv1.weight`` ... ``fc.bias``,
with a 1000-way ``fc``), so production and the demo go through the same loading code. Nothing
downloads: ``weights=None`` everywhere, the file is loaded with ``weights_only=True``.
"""

from __future__ import annotations

import io
import os
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import nn

from medisyn.config import TinyModelsConfig, UtilityConfig

if TYPE_CHECKING:
    from torchvision.models.resnet import ResNet

IMAGENET_CLASSES = 1000
# The tiny stand-in: torchvision's ResNet with one BasicBlock per stage (a "ResNet-10"): the same
# stem, stages, pooling and ``fc`` head as ResNet-50, about 5 M parameters.
TINY_LAYERS = (1, 1, 1, 1)


def _architecture(kind: str, num_classes: int = IMAGENET_CLASSES) -> ResNet:
    from torchvision.models import resnet50
    from torchvision.models.resnet import BasicBlock, ResNet

    if kind == "resnet50":
        return resnet50(weights=None, num_classes=num_classes)
    if kind == "tiny_resnet":
        return ResNet(BasicBlock, list(TINY_LAYERS), num_classes=num_classes)
    raise ValueError(f"unknown classifier {kind!r} (utility.classifier: resnet50 | tiny_resnet)")


def build_tiny_resnet(tiny: TinyModelsConfig, path: str | os.PathLike) -> Path:
    """Save a random-init tiny ResNet ``state_dict`` (1000-way head, like the ImageNet file) at ``path``."""
    torch.manual_seed(tiny.seed)
    model = _architecture("tiny_resnet")
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp")
    torch.save(model.state_dict(), tmp)
    os.replace(tmp, out)  # atomic: a crashed build never leaves a truncated weights file
    return out


def load_classifier(utility: UtilityConfig, weights_path: str | os.PathLike, num_outputs: int) -> nn.Module:
    """``utility.classifier`` initialised from the ImageNet ``state_dict`` at ``weights_path``, with
    a fresh ``num_outputs``-way linear head (section 4.3.5: ImageNet pre-trained ResNet-50).

    The backbone must load strictly: a weights file for the wrong architecture is an error, never a
    silently random backbone.
    """
    if num_outputs < 1:
        raise ValueError(f"num_outputs must be >= 1, got {num_outputs}")
    from medisyn import storage

    source: io.BytesIO | Path
    if storage.is_remote(str(weights_path)):
        source = io.BytesIO(storage.read_bytes(str(weights_path)))
    else:
        source = storage.local_path(weights_path)
        if not source.is_file():
            raise FileNotFoundError(f"classifier weights {weights_path} not found")
    state = torch.load(source, map_location="cpu", weights_only=True)
    fc_rows = state.get("fc.weight", torch.empty(0, 0)).shape[0]
    model = _architecture(utility.classifier, num_classes=fc_rows or IMAGENET_CLASSES)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise ValueError(
            f"{weights_path} is not a torchvision {utility.classifier} state_dict "
            f"(utility.classifier={utility.classifier!r}): {str(exc)[:300]}"
        ) from None
    model.fc = nn.Linear(model.fc.in_features, num_outputs)
    return model
