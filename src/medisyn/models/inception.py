"""FID feature extractors: uint8 images (N, 3, H, W) -> features (N, D), float32.

* ``"inception"``: the standard FID network, InceptionV3 with the ``pt_inception-2015-12-05`` weights
  (the TF graph of Heusel et al. converted to PyTorch), via torch-fidelity, 2048-d pool features.
  Resize: torch-fidelity's bit-exact re-implementation of TensorFlow 1.x bilinear resize to 299x299
  (no antialias), then ``(x - 128) / 128``: the same numbers as the reference TF FID code, which is
  what makes FIDs comparable with published ones (paper section 4.2, [54]). Loaded from a local file
  (``models.fid_inception_weights``), never downloaded.
* ``"tiny"``: a small random-init conv net for tests and the demo, saved as a ``.pth`` file in the
  same place by :func:`build_tiny_feature_extractor`. Resize: bilinear with antialias to 64x64, same
  ``(x - 128) / 128`` scaling.

:func:`extractor_identity` names the extractor for provenance and for the real-statistics cache key
(implementation, weights sha256, resize filter).
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from medisyn import storage
from medisyn.config import FIDConfig, TinyModelsConfig

TINY_FORMAT = "medisyn-tiny-fid-v1"
TINY_INPUT_SIZE = 64
INCEPTION_FEATURE_DIM = 2048
RESIZE_FILTERS = {
    "inception": "tf1x-bilinear-299 (torch-fidelity interpolate_bilinear_2d_like_tensorflow1x, no antialias)",
    "tiny": f"bilinear-antialias-{TINY_INPUT_SIZE} (torch.nn.functional.interpolate)",
}
IMPLEMENTATIONS = {
    "inception": "torch-fidelity FeatureExtractorInceptionV3 pt_inception-2015-12-05, pool3 2048-d",
    "tiny": "medisyn TinyFeatureExtractor (random init, or trained on phantoms; demo/test only)",
}


class TinyFeatureExtractor(nn.Module):
    """Four strided conv layers + global average pool: a cheap stand-in with Inception's interface."""

    def __init__(self, feature_dim: int = 64, width: int = 16):
        super().__init__()
        self.feature_dim = feature_dim
        self.net = nn.Sequential(
            nn.Conv2d(3, width, 3, stride=2, padding=1), nn.ReLU(),
            nn.Conv2d(width, 2 * width, 3, stride=2, padding=1), nn.ReLU(),
            nn.Conv2d(2 * width, 4 * width, 3, stride=2, padding=1), nn.ReLU(),
            nn.Conv2d(4 * width, feature_dim, 3, stride=2, padding=1), nn.ReLU(),
            nn.AdaptiveAvgPool2d(1),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype != torch.uint8 or x.dim() != 4 or x.shape[1] != 3:
            raise ValueError(f"expected uint8 images of shape (N, 3, H, W), got {x.dtype} {tuple(x.shape)}")
        x = x.float()
        x = F.interpolate(x, size=(TINY_INPUT_SIZE, TINY_INPUT_SIZE), mode="bilinear", align_corners=False,
                          antialias=True)
        x = (x - 128.0) / 128.0
        return self.net(x).flatten(1)


class InceptionFeatures(nn.Module):
    """torch-fidelity's InceptionV3 returning the 2048-d pool features as one float32 tensor."""

    def __init__(self, weights_path: str):
        super().__init__()
        from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

        self.inner = FeatureExtractorInceptionV3(
            "inception-v3-compat", ["2048"], feature_extractor_weights_path=weights_path
        )
        self.feature_dim = INCEPTION_FEATURE_DIM

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype != torch.uint8 or x.dim() != 4 or x.shape[1] != 3:
            raise ValueError(f"expected uint8 images of shape (N, 3, H, W), got {x.dtype} {tuple(x.shape)}")
        (feats,) = self.inner(x)
        return feats.float()


def build_tiny_feature_extractor(tiny: TinyModelsConfig, path: str | os.PathLike,
                                 model: TinyFeatureExtractor | None = None) -> None:
    """Save ``model``, by default a random-init :class:`TinyFeatureExtractor` (``tiny.fid_feature_dim``
    features), at ``path`` (``medisyn.demo.tiny_models`` passes a trained one)."""
    if model is None:
        torch.manual_seed(tiny.seed)
        model = TinyFeatureExtractor(feature_dim=tiny.fid_feature_dim)
    p = storage.local_path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = p.with_name(f".{p.name}.tmp")
    torch.save({"format": TINY_FORMAT, "feature_dim": tiny.fid_feature_dim, "state_dict": model.state_dict()}, tmp)
    os.replace(tmp, p)


def _local_weights(weights_path: str) -> Path:
    """A local file for ``weights_path`` (s3:// files are cached once, like the other models)."""
    if not storage.is_remote(weights_path):
        p = storage.local_path(weights_path)
        if not p.exists():
            raise FileNotFoundError(
                f"FID feature extractor weights {p} not found: put pt_inception-2015-12-05-6726825d.pth there "
                "(models.fid_inception_weights) or run `medisyn build-tiny-models` for the tiny stand-in"
            )
        return p
    from medisyn.models.sdxl import cache_dir

    key = hashlib.sha256(weights_path.encode()).hexdigest()[:16]
    dest = cache_dir() / "fid" / key / weights_path.rsplit("/", 1)[-1]
    if not dest.exists():
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = dest.with_name(dest.name + ".partial")
        tmp.write_bytes(storage.read_bytes(weights_path))
        os.replace(tmp, dest)
    return dest


def load_feature_extractor(fid: FIDConfig, weights_path: str, device) -> nn.Module:
    """The configured extractor, in eval mode on ``device``: uint8 (N, 3, H, W) -> float32 (N, D)."""
    path = _local_weights(weights_path)
    if fid.feature_extractor == "inception":
        model: nn.Module = InceptionFeatures(str(path))
    else:
        blob = torch.load(path, map_location="cpu", weights_only=True)
        if not isinstance(blob, dict) or blob.get("format") != TINY_FORMAT:
            raise ValueError(
                f"{path} is not a tiny FID extractor ({TINY_FORMAT}); fid.feature_extractor=tiny is for tests/demo only"
            )
        model = TinyFeatureExtractor(feature_dim=int(blob["feature_dim"]))
        model.load_state_dict(blob["state_dict"])
    return model.to(device).eval().requires_grad_(False)


_SHA_CACHE: dict[tuple[str, int, int], str] = {}


def weights_sha256(weights_path: str) -> str:
    """sha256 of the weights file (memoized per path, size and mtime: the real file is ~100 MB)."""
    path = _local_weights(weights_path)
    st = path.stat()
    key = (str(path), st.st_size, st.st_mtime_ns)
    if key not in _SHA_CACHE:
        _SHA_CACHE[key] = storage.sha256(path)
    return _SHA_CACHE[key]


def extractor_identity(fid: FIDConfig, weights_path: str) -> dict[str, str]:
    """Provenance of the features: implementation, weights sha256, resize filter."""
    return {
        "implementation": IMPLEMENTATIONS[fid.feature_extractor],
        "weights_sha256": weights_sha256(weights_path),
        "resize_filter": RESIZE_FILTERS[fid.feature_extractor],
    }
