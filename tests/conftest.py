"""Shared fixtures: the demo config pointed at a per-session temp dir, tiny models built once, and the
moto S3 server (``s3_endpoint``). Builders live in tests/helpers.py; test modules import them from there."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")

from helpers import REPO, S3_BUCKET, chromium, demo_config, postgres_url, ray_local, s3_endpoint  # noqa: E402
from medisyn.config import RunConfig  # noqa: E402

# s3_endpoint, chromium, postgres_url: imported here, the fixtures are registered for every test module.
# REPO, S3_BUCKET and demo_config stay importable from conftest for older callers; new code imports them from helpers.
__all__ = ["REPO", "S3_BUCKET", "chromium", "demo_config", "postgres_url", "ray_local", "s3_endpoint"]


@pytest.fixture(scope="session", autouse=True)
def signing_keys(tmp_path_factory) -> tuple[Path, Path]:
    """A gate key, a promoter key and their trust policy for the whole session, where the chart mounts them
    (issue #21: promote accepts only signed gate verdicts). Subprocesses inherit them. Tests that attack
    the signatures make keys of their own."""
    from medisyn import signing

    keys, trust = signing.provision(tmp_path_factory.mktemp("signing"))
    os.environ[signing.KEYS_DIR_ENV], os.environ[signing.TRUST_DIR_ENV] = str(keys), str(trust)
    return keys, trust


@pytest.fixture(scope="session")
def tiny_root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("medisyn")


@pytest.fixture(scope="session")
def tiny_cfg(tiny_root) -> RunConfig:
    """The demo config with every tiny model built once per test session (random init, real formats)."""
    from medisyn.demo.tiny_models import build_tiny_models

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
