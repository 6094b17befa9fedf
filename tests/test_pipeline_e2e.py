"""End to end: the KFP pipeline under kfp.local, as `make demo` runs it, with no network at all.

The whole demo runs inside a fresh network namespace (``unshare -n``) whose only interface is
loopback: the MLflow server it starts still works, but any attempt to download a model or a
package fails. Then the registry is read back from the demo's SQLite store.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


def _offline_prefix() -> list[str]:
    if shutil.which("unshare") is None or shutil.which("ip") is None:
        pytest.skip("unshare/ip not available: cannot build a network-less namespace here")
    flags = "-n" if os.geteuid() == 0 else "-rn"
    probe = subprocess.run(["unshare", flags, "true"], capture_output=True)
    if probe.returncode != 0:
        pytest.skip(f"unshare {flags} refused: {probe.stderr.decode().strip()}")
    return ["unshare", flags, "sh", "-c", 'ip link set lo up && exec "$0" "$@"']


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("demo")
    cmd = _offline_prefix() + [sys.executable, "-m", "pipelines.demo", "--workdir", str(workdir)]
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1")
    env.pop("MLFLOW_TRACKING_URI", None)
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=1800)
    log = proc.stdout + proc.stderr
    (workdir / "demo.log").write_text(log)
    assert proc.returncode == 0, log[-6000:]
    return workdir, proc.stdout


def _client(workdir: Path):
    from mlflow import MlflowClient

    uri = f"sqlite:///{workdir / 'mlflow' / 'mlflow.db'}"
    return MlflowClient(tracking_uri=uri, registry_uri=uri)


def test_demo_registers_a_candidate_with_gate_verdicts(demo_run):
    workdir, stdout = demo_run
    client = _client(workdir)
    model = client.get_registered_model("medisyn-demo")
    assert "candidate" in model.aliases
    version = client.get_model_version("medisyn-demo", model.aliases["candidate"])
    tags = version.tags
    for gate in ("privacy", "utility"):
        assert tags.get(f"gate.{gate}") in ("passed", "failed"), tags
    both_passed = all(tags[f"gate.{g}"] == "passed" for g in ("privacy", "utility"))
    # approved exactly when both gates passed (and it points at the candidate)
    assert ("approved" in model.aliases) == both_passed
    if both_passed:
        assert model.aliases["approved"] == model.aliases["candidate"]
    for key in ("epoch", "dataset_hash", "config_hash"):
        assert key in tags, key


def test_demo_prints_where_to_look(demo_run):
    workdir, stdout = demo_run
    assert "models:/medisyn-demo/" in stdout
    assert "mlflow server --backend-store-uri sqlite:///" in stdout
    assert "privacy gate" in stdout and "utility gate" in stdout


def test_demo_writes_figures(demo_run):
    workdir, _ = demo_run
    from pipelines.demo import find_figures

    names = {p.name for p in find_figures(workdir / "runs")}
    for expected in ("fid_curve.png", "privacy_distance_histogram.png", "privacy_closest_pairs.png"):
        assert expected in names, names
    assert any(n.startswith("utility_roc_") for n in names), names
    _, stdout = demo_run
    assert "fid_curve.png" in stdout


def test_demo_left_no_server_running(demo_run):
    workdir, _ = demo_run
    ps = subprocess.run(["ps", "-eo", "args"], capture_output=True, text=True).stdout
    assert str(workdir / "mlflow") not in ps
