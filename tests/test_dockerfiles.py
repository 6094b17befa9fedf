"""Static checks of the container images (there is no Docker engine on CI machines): pinned bases,
non-root users, no remote ADD, the lock file installed, and what the chart/pipeline expect inside."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
DOCKER = REPO / "docker"
DOCKERFILES = ["Dockerfile.trainer", "Dockerfile.mlflow"]


def instructions(name: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with line continuations joined and comments dropped."""
    text = (DOCKER / name).read_text()
    text = re.sub(r"\\\n", " ", text)
    out = []
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        op, _, rest = line.partition(" ")
        out.append((op.upper(), rest.strip()))
    return out


def final_stage(name: str) -> list[tuple[str, str]]:
    ins = instructions(name)
    last_from = max(i for i, (op, _) in enumerate(ins) if op == "FROM")
    return ins[last_from:]


@pytest.mark.parametrize("name", DOCKERFILES)
def test_base_images_are_pinned(name):
    stages = set()
    for op, args in instructions(name):
        if op != "FROM":
            continue
        image = args.split()[0]
        if image in stages:  # FROM <earlier stage>
            continue
        if " AS " in args.upper():
            stages.add(args.split()[-1])
        assert "$" not in image, f"{name}: base image from a build arg is not statically pinned: {image}"
        assert "@sha256:" in image or re.search(r":[\w.-]+$", image), f"{name}: unpinned base {image}"
        assert not image.endswith(":latest"), f"{name}: {image}"


@pytest.mark.parametrize("name", DOCKERFILES)
def test_runs_as_non_root(name):
    users = [args for op, args in final_stage(name) if op == "USER"]
    assert users, f"{name}: the final stage sets no USER"
    user = users[-1].split(":")[0]
    assert user not in ("root", "0"), f"{name}: USER {users[-1]}"
    if user.isdigit():
        assert int(user) >= 1000


@pytest.mark.parametrize("name", DOCKERFILES)
def test_no_add_and_no_remote_fetches(name):
    for op, args in instructions(name):
        assert op != "ADD", f"{name}: use COPY (ADD {args})"
        if op == "RUN":
            assert not re.search(r"(curl|wget)\s", args), f"{name}: downloads outside the package managers: {args}"


def test_trainer_installs_the_lock_file_and_the_package_without_resolving():
    ins = instructions("Dockerfile.trainer")
    runs = " ; ".join(args for op, args in ins if op == "RUN")
    copies = [args for op, args in ins if op == "COPY"]
    assert any(c.split()[0] == "requirements.lock" for c in copies)
    assert "pip install -r requirements.lock" in runs
    assert "pip install --no-deps ." in runs and "pip check" in runs
    assert "HEALTHCHECK" not in {op for op, _ in ins}  # a batch image
    base = next(args for op, args in ins if op == "FROM")
    assert base.startswith("nvidia/cuda:") and "cudnn" in base


def test_mlflow_image_is_constrained_by_the_lock_file():
    runs = " ; ".join(args for op, args in instructions("Dockerfile.mlflow") if op == "RUN")
    assert "-c /tmp/requirements.lock" in runs and "mlflow" in runs and "psycopg2" in runs
    locked = dict(line.split("==") for line in (REPO / "requirements.lock").read_text().splitlines() if "==" in line)
    assert "mlflow" in locked


@pytest.mark.parametrize("name", DOCKERFILES)
def test_copied_sources_exist(name):
    for op, args in instructions(name):
        if op != "COPY" or "--from=" in args:
            continue
        parts = [p for p in args.split() if not p.startswith("--")]
        for src in parts[:-1]:
            if src.endswith("*"):
                continue
            assert (REPO / src.rstrip("/")).exists(), f"{name}: COPY source {src} missing"


def test_dockerignore_keeps_secrets_and_state_out():
    text = (DOCKER / ".dockerignore").read_text()
    entries = {ln.strip() for ln in text.splitlines() if ln.strip() and not ln.startswith("#")}
    assert {".git", ".venv", ".env", "demo-output", "mlruns"} <= entries
    # BuildKit reads <Dockerfile>.dockerignore beside each Dockerfile: keep them identical
    for name in DOCKERFILES:
        assert (DOCKER / f"{name}.dockerignore").read_text() == text
    # ...and nothing the images COPY is ignored
    for needed in ("src", "configs", "mlflow", "requirements.lock"):
        assert needed not in entries


def test_chart_and_components_use_these_images():
    values = yaml.safe_load((REPO / "charts" / "medisyn" / "values.yaml").read_text())
    from medisyn.pipeline.components.image import DEFAULT_IMAGE

    assert DEFAULT_IMAGE == f"{values['image']['repository']}:{values['image']['tag']}"
    assert values["mlflow"]["image"]["repository"].endswith("medisyn-mlflow")
    # the chart runs the auth renderer from where Dockerfile.mlflow copies mlflow/
    chart_mlflow = (REPO / "charts" / "medisyn" / "templates" / "mlflow.yaml").read_text()
    assert "/opt/mlflow-config/render_auth_config.py" in chart_mlflow
    assert any(op == "COPY" and args.split()[-2:] == ["mlflow/", "/opt/mlflow-config/"]
               for op, args in instructions("Dockerfile.mlflow"))
    # the registration Job's `medisyn pipeline` is in the installed package (medisyn.pipeline): no source tree
    # on PYTHONPATH (issue #22)
    assert (REPO / "src" / "medisyn" / "pipeline" / "cli.py").is_file()
    assert "PYTHONPATH" not in " ".join(args for op, args in final_stage("Dockerfile.trainer") if op == "ENV")


def test_mlflow_dir_is_not_a_python_package():
    assert not (REPO / "mlflow" / "__init__.py").exists()


def test_auth_config_renders_from_the_environment(tmp_path):
    out = tmp_path / "auth.ini"
    env = {"MLFLOW_AUTH_DATABASE_URI": "postgresql://u:p@db/mlflow", "MLFLOW_AUTH_ADMIN_USERNAME": "admin",
           "MLFLOW_AUTH_ADMIN_PASSWORD": "s3cret", "MLFLOW_AUTH_CACHE_TTL_SECONDS": "60",
           "PATH": "/usr/bin:/bin"}
    script = REPO / "mlflow" / "render_auth_config.py"
    proc = subprocess.run([sys.executable, str(script), str(out)], env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    import configparser

    ini = configparser.ConfigParser()
    ini.read(out)
    assert ini["mlflow"]["admin_password"] == "s3cret" and ini["mlflow"]["default_permission"] == "READ"
    assert ini["mlflow"].getint("auth_cache_ttl_seconds") == 60  # the chart's mlflow.auth.cacheTtlSeconds
    assert "${" not in out.read_text() and (out.stat().st_mode & 0o077) == 0
    env.pop("MLFLOW_AUTH_ADMIN_PASSWORD")
    proc = subprocess.run([sys.executable, str(script), str(tmp_path / "x.ini")], env=env, capture_output=True,
                          text=True)
    assert proc.returncode != 0 and "MLFLOW_AUTH_ADMIN_PASSWORD" in proc.stderr
