"""The installed package validates jobs against the CRDs it ships, with no checkout around it.

The project image installs a wheel built from ``pyproject.toml``, ``README.md`` and ``src/`` only
(docker/Dockerfile.trainer), so ``tests/`` is absent there. This builds the wheel the same way, installs
it into a bare directory and, from a working directory outside the repository and with neither
``src/`` nor ``tests/`` importable, renders a PyTorchJob and a RayJob, validates both against the
packaged CRDs and checks that an invalid manifest is rejected before any submission; then compiles the
KFP pipeline with ``medisyn pipeline compile`` from there.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
import textwrap
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.slow

CHECK = textwrap.dedent(
    """
    import copy, json, sys
    from pathlib import Path

    site, repo = Path(sys.argv[1]).resolve(), Path(sys.argv[2]).resolve()
    # the venv may live inside the checkout; what must not be importable is the checkout's code
    code = [repo, repo / "src", repo / "tests"]
    leaks = [p for p in sys.path if Path(p or ".").resolve() == repo
             or any(Path(p or ".").resolve().is_relative_to(c) for c in code[1:])]
    assert not leaks, f"the checkout is importable: {leaks}"

    import medisyn
    from medisyn import launch
    from medisyn.config import RunConfig
    from medisyn.launch.crd import CRD_FILES, crd_resource

    assert Path(medisyn.__file__).resolve().is_relative_to(site), medisyn.__file__
    crds = {kind: Path(str(crd_resource(kind))).resolve() for kind in CRD_FILES}
    assert all(p.is_relative_to(site) and p.is_file() for p in crds.values()), crds

    cfg = RunConfig.model_validate({"name": "wheel-check", "storage": {"s3_endpoint_url": "http://minio:9000"}})
    settings = launch.ClusterSettings(namespace="ml", num_nodes=2, gpus_per_node=8, ray_workers=3)
    jobs = [
        launch.render_pytorchjob(cfg, "s3://b/run/config.yaml", "s3://b/run/cache", "s3://b/run/ckpt", settings),
        launch.render_rayjob(cfg, "s3://b/run/config.yaml", "s3://b/raw", "s3://b/run/dataset", settings),
        launch.render_trainjob(cfg, "s3://b/run/config.yaml", "s3://b/run/cache", "s3://b/run/ckpt", settings),
    ]
    for job in jobs:
        launch.validate_against_crd(job)

    bad = copy.deepcopy(jobs[0])
    bad["spec"]["pytorchReplicaSpecs"]["Worker"]["replicas"] = "two"
    try:
        launch.validate_against_crd(bad)
    except ValueError as exc:
        rejected = str(exc)
    else:
        raise AssertionError("an invalid PyTorchJob passed validation")

    class NoCluster:
        def create_namespaced_custom_object(self, *args):
            raise AssertionError("an invalid job was submitted")

        def get_namespaced_custom_object(self, *args):
            raise AssertionError("an invalid job was watched")

    try:
        launch.run_job(bad, api_client=NoCluster())
    except ValueError:
        pass
    else:
        raise AssertionError("run_job accepted an invalid PyTorchJob")

    print(json.dumps({"kinds": [j["kind"] for j in jobs], "crds": {k: str(p) for k, p in crds.items()},
                      "rejected": rejected}))
    """
)


def _copy_like_the_image(dest: Path) -> Path:
    """What docker/Dockerfile.trainer copies before `pip install .`: no tests/, no caches."""
    dest.mkdir()
    shutil.copy2(REPO / "pyproject.toml", dest)
    if (REPO / "README.md").exists():
        shutil.copy2(REPO / "README.md", dest)
    shutil.copytree(REPO / "src", dest / "src", ignore=shutil.ignore_patterns("__pycache__", "*.egg-info", "*.pyc"))
    return dest


def test_the_installed_wheel_validates_jobs_against_its_own_crds(tmp_path):
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q"]
    project = _copy_like_the_image(tmp_path / "project")
    dist = tmp_path / "dist"
    # offline and with this venv's setuptools: no build isolation, no index
    subprocess.run([*pip, "wheel", "--no-deps", "--no-build-isolation", "--no-index", "-w", str(dist), str(project)],
                   check=True, cwd=tmp_path)
    (wheel,) = dist.glob("medisyn-*.whl")
    site = tmp_path / "site"
    subprocess.run([*pip, "install", "--no-deps", "--no-index", "--target", str(site), str(wheel)],
                   check=True, cwd=tmp_path)
    assert not (site / "tests").exists()
    assert sorted(p.name for p in (site / "medisyn" / "crds").glob("*.yaml")) == sorted(
        p.name for p in (REPO / "src" / "medisyn" / "crds").glob("*.yaml"))

    work = tmp_path / "elsewhere"
    work.mkdir()
    (work / "check.py").write_text(CHECK)
    # -S: no site processing, so this venv's editable-install .pth (-> the checkout's src/) is not
    # read; the dependencies come from the venv's site-packages, listed after the installed wheel.
    paths = dict.fromkeys([str(site), sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]])
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON")}
    env["PYTHONPATH"] = os.pathsep.join(paths)
    out = subprocess.run([sys.executable, "-S", "check.py", str(site), str(REPO)], cwd=work, env=env,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-4000:]
    report = json.loads(out.stdout.strip().splitlines()[-1])
    assert report["kinds"] == ["PyTorchJob", "RayJob", "TrainJob"]
    assert set(report["crds"]) >= {"PyTorchJob", "RayJob", "TrainJob", "TrainingRuntime"}
    assert "pytorchReplicaSpecs.Worker.replicas" in report["rejected"]
    # `medisyn pipeline compile` from the installed wheel, outside the checkout (issue #25): the same IR
    # as the committed one (pipelines/medisyn_pipeline.yaml, which test_pipeline_compile keeps current)
    out = subprocess.run([sys.executable, "-S", "-m", "medisyn.cli", "pipeline", "compile", "--out", "ir.yaml"],
                         cwd=work, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-4000:]
    assert (work / "ir.yaml").read_text() == (REPO / "pipelines" / "medisyn_pipeline.yaml").read_text()
