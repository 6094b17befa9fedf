"""medisyn.data.rayjob: the RayJob manifest validates against KubeRay's own CRD schema."""

from __future__ import annotations

import functools
import json
import shlex
from pathlib import Path

import jsonschema
import pytest
import yaml

from medisyn.config import RunConfig, config_from_json, load_config
from medisyn.data.rayjob import render_config_map, render_rayjob, rayjob_yaml

CRD = Path(__file__).resolve().parent / "data" / "crds" / "ray.io_rayjobs.yaml"  # vendored copy of the KubeRay CRD
REPO = Path(__file__).resolve().parents[1]


@functools.lru_cache(maxsize=1)
def _validator():
    crd = yaml.safe_load(CRD.read_text())
    schema = next(v for v in crd["spec"]["versions"] if v["name"] == "v1")["schema"]["openAPIV3Schema"]
    return jsonschema.Draft7Validator(schema)  # built once: meta-checking the large CRD schema is slow


def validate_rayjob(job: dict) -> None:
    if not CRD.exists():
        pytest.skip("KubeRay CRD not available on this machine")
    _validator().validate(job)


CASES = [
    # (kwargs, expected workers)
    ({}, 2),
    ({"config_map": "medisyn-config", "s3_secret": "s3-creds", "num_workers": 8, "worker_cpus": 16}, 8),
    ({"num_workers": 0, "service_account": "medisyn-ray"}, 0),
]


@pytest.mark.parametrize("kwargs,workers", CASES)
def test_rayjob_validates_against_crd(kwargs, workers):
    cfg = load_config(REPO / "configs" / "demo.yaml", ["storage.s3_endpoint_url=http://minio:9000"])
    job = render_rayjob(cfg, "s3://raw/landing", "s3://data/datasets/v7", image="registry/medisyn:1.0", **kwargs)
    validate_rayjob(job)
    assert job["apiVersion"] == "ray.io/v1" and job["kind"] == "RayJob"
    spec = job["spec"]
    assert spec["shutdownAfterJobFinishes"] is True
    groups = spec["rayClusterSpec"].get("workerGroupSpecs", [])
    assert sum(g["replicas"] for g in groups) == workers
    pods = [spec["rayClusterSpec"]["headGroupSpec"]["template"]] + [g["template"] for g in groups] + [spec["submitterPodTemplate"]]
    for pod in pods:
        for c in pod["spec"]["containers"]:
            sc = c["securityContext"]
            assert sc["runAsNonRoot"] and sc["readOnlyRootFilesystem"] and sc["capabilities"]["drop"] == ["ALL"]
            assert sc["seccompProfile"]["type"] == "RuntimeDefault"
            assert c["resources"]["requests"] and c["resources"]["limits"]
    env = {e["name"]: e.get("value") for e in pods[0]["spec"]["containers"][0]["env"]}
    assert env["MEDISYN_S3_ENDPOINT_URL"] == "http://minio:9000"


def test_entrypoint_inline_config_roundtrips():
    cfg = RunConfig()
    job = render_rayjob(cfg, "s3://raw/x", "s3://out/y", image="img")
    argv = shlex.split(job["spec"]["entrypoint"])
    assert argv[:4] == ["python", "-m", "medisyn.cli", "preprocess"]
    assert argv[argv.index("--raw") + 1] == "s3://raw/x" and argv[argv.index("--out") + 1] == "s3://out/y"
    assert config_from_json(argv[argv.index("--config-json") + 1]) == cfg


def test_entrypoint_with_config_map_mounts_it():
    cfg = RunConfig()
    job = render_rayjob(cfg, "s3://raw/x", "s3://out/y", image="img", config_map="cm")
    argv = shlex.split(job["spec"]["entrypoint"])
    assert argv[argv.index("--config") + 1] == "/etc/medisyn/config.yaml"
    head = job["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]
    assert {"name": "medisyn-config", "configMap": {"name": "cm"}} in head["volumes"]
    cm = render_config_map(cfg, "cm")
    assert RunConfig.model_validate(yaml.safe_load(cm["data"]["config.yaml"])) == cfg


def test_names_are_dns_safe_and_yaml_renders():
    cfg = load_config(None, ["name=My_Run.2026"])
    text = rayjob_yaml(cfg, "file:///a", "file:///b", image="img", namespace="ml")
    job = yaml.safe_load(text)
    assert job["metadata"]["name"] == "my-run-2026-preprocess" and job["metadata"]["namespace"] == "ml"
    json.dumps(job)


@pytest.mark.parametrize("kwargs", [{"num_workers": -1}, {"worker_cpus": 0}, {"head_cpus": 0}])
def test_bad_sizes_rejected(kwargs):
    with pytest.raises(ValueError):
        render_rayjob(RunConfig(), "a", "b", image="img", **kwargs)


def test_schema_catches_a_broken_manifest():
    job = render_rayjob(RunConfig(), "a", "b", image="img")
    job["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]["replicas"] = "two"
    with pytest.raises(jsonschema.ValidationError):
        validate_rayjob(job)
