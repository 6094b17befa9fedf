"""SIGKILL of a stage mid-way, then a rerun: it completes, its output equals an uninterrupted run's,
and no partial output was ever visible downstream (issue #12). The stage runs as `medisyn <stage>` in
its own session and the kill takes the whole process group, Ray included, as a pod kill would.
(Training's kill-and-resume is tests/test_trainer_resume.py: bitwise-equal weights.)"""

from __future__ import annotations

import hashlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from helpers import demo_config
from medisyn import storage
from medisyn.data import read_manifest

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]


def _cli(stage: str, config: Path, tmp: Path, **uris: str) -> list[str]:
    args = [sys.executable, "-m", "medisyn.cli", stage, "--config", str(config)]
    for key, value in uris.items():
        args += [f"--{key}", value]
    return args


def _env(tmp: Path) -> dict[str, str]:
    return dict(os.environ, TMPDIR=str(tmp), MEDISYN_ID_SALT="fault-suite-salt", OMP_NUM_THREADS="1",
                HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", RAY_AUTH_MODE="disabled")


def _run(cmd: list[str], tmp: Path) -> None:
    subprocess.run(cmd, env=_env(tmp), check=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, timeout=300)


def _kill_when(cmd: list[str], tmp: Path, ready: Callable[[], bool]) -> None:
    """Start the stage, SIGKILL its whole process group once ``ready()`` holds (mid-way)."""
    proc = subprocess.Popen(cmd, env=_env(tmp), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    try:
        deadline = time.monotonic() + 300
        while not ready():
            assert proc.poll() is None, "the stage finished before it could be killed"
            assert time.monotonic() < deadline
            time.sleep(0.005)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def _files(root: Path) -> dict[str, str]:
    """sha256 of every file under a prefix but the runner's result.json (it carries timings)."""
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file() and p.name != "result.json"}


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    from medisyn.data.demo import write_landing_zone
    from medisyn.models import sdxl

    root = tmp_path_factory.mktemp("kill-rerun")
    cfg = demo_config(root, ["data.ray_num_cpus=2", "data.ray_batch_size=2", "train.encode_batch_size=4",
                             "train.cache_shard_rows=8", "tracking.tracking_uri=null"])
    sdxl.build_tiny_sdxl(cfg.models.tiny, storage.local_path(cfg.models.sdxl_base), storage.local_path(cfg.models.vae))
    (root / "run.yaml").write_text(cfg.to_yaml())
    write_landing_zone(str(root / "raw"), n_per_class=6, seed=0)
    # the stages' TMPDIR: short, since Ray puts its session's unix sockets there (107-byte limit)
    tmp = Path(tempfile.mkdtemp(prefix="mks-"))
    (root / "tmp").symlink_to(tmp)
    yield root
    shutil.rmtree(tmp, ignore_errors=True)


def test_preprocess_killed_mid_decode_then_rerun_gives_the_same_dataset(workspace):
    root, tmp = workspace, (workspace / "tmp").resolve()
    config = workspace / "run.yaml"
    _run(_cli("preprocess", config, tmp, raw=str(root / "raw"), out=str(root / "reference")), tmp)

    out = root / "dataset"

    def decoding() -> bool:  # decoded images already staged in the scratch directory
        return any(tmp.glob("medisyn-preprocess-*/0*/*.parquet"))

    _kill_when(_cli("preprocess", config, tmp, raw=str(root / "raw"), out=str(out)), tmp, decoding)
    assert not out.exists() and not storage.is_complete(str(out))  # nothing partial is visible
    with pytest.raises(FileNotFoundError, match="incomplete"):
        read_manifest(str(out))  # what a downstream stage would do
    assert any(tmp.glob("medisyn-preprocess-*"))  # the killed run's scratch, with image bytes

    _run(_cli("preprocess", config, tmp, raw=str(root / "raw"), out=str(out)), tmp)
    assert read_manifest(str(out))["dataset_hash"] == read_manifest(str(root / "reference"))["dataset_hash"]
    assert _files(out) == _files(root / "reference")  # every shard byte-identical
    assert not any(tmp.glob("medisyn-preprocess-*"))  # the rerun removed the dead run's scratch
    assert sorted(p.name for p in root.iterdir() if p.name.startswith(".")) == []


def test_encode_killed_mid_way_then_rerun_gives_the_same_cache(workspace):
    root, tmp = workspace, (workspace / "tmp").resolve()
    config = workspace / "run.yaml"
    dataset = str(root / "reference")
    if not storage.is_complete(dataset):
        _run(_cli("preprocess", config, tmp, raw=str(root / "raw"), out=dataset), tmp)
    _run(_cli("encode", config, tmp, dataset=dataset, cache=str(root / "cache-reference")), tmp)

    cache = root / "latent-cache"

    def encoding() -> bool:  # shards being written in the hidden staging directory beside the output
        return any(p.is_file() for p in root.glob(".latent-cache.staging-*/**/*"))

    _kill_when(_cli("encode", config, tmp, dataset=dataset, cache=str(cache)), tmp, encoding)
    assert not storage.is_complete(str(cache)) and not cache.exists()
    assert any(root.glob(".latent-cache.staging-*"))  # the killed run's staging, hidden beside the output

    _run(_cli("encode", config, tmp, dataset=dataset, cache=str(cache)), tmp)
    assert _files(cache) == _files(root / "cache-reference")
    assert not any(root.glob(".latent-cache.staging-*"))


def test_privacy_gate_killed_mid_way_then_rerun_gives_the_same_verdict(tmp_path):
    """No verdict and no report from the killed gate (the version stays unapproved); the rerun's
    verdict equals an uninterrupted run's, metric for metric."""
    import json

    from mlflow import MlflowClient

    from helpers import register_tiny_version, write_gate_dataset
    from medisyn.evaluate.gates import GateResult
    from medisyn.models.biomedclip import build_tiny_biomedclip

    cfg, model_uri = register_tiny_version(tmp_path, [
        "privacy.prompts=[Dermoscopy image showing melanoma.]", "privacy.images_per_prompt=3",
        "privacy.patch_size=16", "privacy.batch_size=8", "runtime.device=cpu"])
    build_tiny_biomedclip(cfg.models.tiny, storage.local_path(cfg.models.biomedclip))
    dataset = write_gate_dataset(str(tmp_path / "dataset"), n_train=3, n_eval=2)
    config = tmp_path / "run.yaml"
    config.write_text(cfg.to_yaml())
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    name, version = model_uri.removeprefix("models:/").split("/")
    client = MlflowClient(tracking_uri=cfg.tracking.tracking_uri, registry_uri=cfg.tracking.tracking_uri)

    def gate(out: Path) -> list[str]:
        return _cli("privacy-gate", config, tmp, model=model_uri, dataset=dataset, out=str(out))

    def verdict() -> dict:
        return dict(client.get_model_version(name, version).tags)

    subprocess.run(gate(tmp_path / "reference"), env=_env(tmp), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                   timeout=300)  # exit 3 when the verdict is a failure: either way a verdict is recorded
    reference = GateResult.load(str(tmp_path / "reference"))
    assert verdict()["gate.privacy"] == ("passed" if reference.passed else "failed")
    client.delete_model_version_tag(name, version, "gate.privacy")

    out = tmp_path / "privacy"
    _kill_when(gate(out), tmp, lambda: any(tmp.glob("medisyn-privacy-*/*.png")))  # samples being generated
    assert "gate.privacy" not in verdict()  # the killed gate recorded nothing: not approved
    assert not storage.is_complete(str(out)) and not out.exists()

    subprocess.run(gate(out), env=_env(tmp), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, timeout=300)
    rerun = GateResult.load(str(out))
    assert (rerun.passed, rerun.reasons) == (reference.passed, reference.reasons)
    assert json.dumps(rerun.metrics, sort_keys=True) == json.dumps(reference.metrics, sort_keys=True)
    assert not any(tmp.glob("medisyn-privacy-*"))  # the killed run's generated images were removed
