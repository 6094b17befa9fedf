"""Shared fixtures: the demo config pointed at a per-session temp dir, and tiny models built once."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")

from medisyn.config import RunConfig, load_config  # noqa: E402
from s3_server import S3_BUCKET, s3_endpoint  # noqa: E402,F401  (moto S3 on loopback, for every test module)

REPO = Path(__file__).resolve().parents[1]


def demo_config(root: Path, overrides: list[str] | None = None) -> RunConfig:
    """configs/demo.yaml with every path moved under ``root``."""
    m = root / "models"
    base = [
        f"storage.root={root / 'runs'}",
        f"models.sdxl_base={m / 'sdxl-tiny'}",
        f"models.vae={m / 'sdxl-vae-fp16-fix-tiny'}",
        f"models.biomedclip={m / 'biomedclip-tiny'}",
        f"models.fid_inception_weights={m / 'fid-features-tiny.pth'}",
        f"models.resnet50_weights={m / 'resnet-tiny.pth'}",
    ]
    return load_config(REPO / "configs" / "demo.yaml", base + list(overrides or []))


@pytest.fixture(scope="session")
def tiny_root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("medisyn")


@pytest.fixture(scope="session")
def tiny_cfg(tiny_root) -> RunConfig:
    """The demo config with every tiny model built once per test session (random init, real formats)."""
    from medisyn.models import build_tiny_models

    cfg = demo_config(tiny_root)
    build_tiny_models(cfg)
    return cfg


@pytest.fixture(scope="session")
def tiny_sdxl_cfg(tmp_path_factory) -> RunConfig:
    """The demo config with only the tiny SDXL (and its fp16-fix VAE) built: enough for SDXL tests."""
    from medisyn import storage
    from medisyn.models import sdxl

    cfg = demo_config(tmp_path_factory.mktemp("sdxl"))
    sdxl.build_tiny_sdxl(cfg.models.tiny, storage.local_path(cfg.models.sdxl_base), storage.local_path(cfg.models.vae))
    return cfg


@pytest.fixture(scope="module")
def one_torch_thread_module():
    """Tiny models on a shared 2-core CI box: one intra-op thread avoids oversubscription stalls
    (measured 10x slower with 2 threads under load); restored after the module."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
