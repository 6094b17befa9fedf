"""The preprocessing RayJob (``medisyn.launch.render_rayjob``, the only RayJob renderer): its layout
validates against KubeRay's own CRD schema (package data) for every cluster shape we size."""

from __future__ import annotations

import json
import shlex
from typing import Any

import pytest

from medisyn import launch
from medisyn.config import RunConfig, load_config
from medisyn.launch.settings import DEFAULT_DEADLINE_S

CONFIG_URI = "s3://data/runs/r7/config.yaml"


def _render(cfg: RunConfig | None = None, **settings: Any) -> dict[str, Any]:
    return launch.render_rayjob(cfg or RunConfig(), CONFIG_URI, "s3://raw/landing", "s3://data/datasets/v7",
                                launch.ClusterSettings(namespace="ml", image="registry/medisyn:1.0", **settings))


CASES = [
    # (settings, expected workers, expected Ray CPUs per worker)
    ({}, 2, 8),
    ({"ray_workers": 8, "ray_worker_cpu": "16", "ray_worker_memory": "64Gi", "service_account": "medisyn-ray"}, 8, 16),
    ({"ray_workers": 0, "active_deadline_s": 7200}, 0, None),
    ({"active_deadline_s": None}, 2, 8),
]


@pytest.mark.parametrize("settings,workers,cpus", CASES)
def test_rayjob_validates_against_the_crd(settings, workers, cpus):
    cfg = RunConfig.model_validate({"storage": {"s3_endpoint_url": "http://minio:9000"}})
    job = _render(cfg, **settings)
    launch.validate_against_crd(job)
    assert job["apiVersion"] == "ray.io/v1" and job["kind"] == "RayJob"
    spec = job["spec"]
    assert spec["shutdownAfterJobFinishes"] is True and spec["submissionMode"] == "K8sJobMode"
    assert spec["ttlSecondsAfterFinished"] == 3600  # KubeRay deletes the finished job's cluster
    # a deadline always: the settings' (three days by default), never an unbounded job
    assert spec.get("activeDeadlineSeconds") == settings.get("active_deadline_s", DEFAULT_DEADLINE_S)
    cluster = spec["rayClusterSpec"]
    assert cluster["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0"  # the head runs the driver only
    groups = cluster.get("workerGroupSpecs", [])
    assert sum(g["replicas"] for g in groups) == workers
    for g in groups:
        assert g["rayStartParams"]["num-cpus"] == str(cpus)
        (c,) = g["template"]["spec"]["containers"]
        assert c["resources"]["limits"]["cpu"] == str(cpus)
    pods = [cluster["headGroupSpec"]["template"]] + [g["template"] for g in groups] + [spec["submitterPodTemplate"]]
    for pod in pods:
        assert pod["spec"].get("serviceAccountName") == settings.get("service_account", None)
        for c in pod["spec"]["containers"]:
            assert c["image"] == "registry/medisyn:1.0"
    head_env = {e["name"]: e["value"] for e in cluster["headGroupSpec"]["template"]["spec"]["containers"][0]["env"]}
    assert head_env["MEDISYN_S3_ENDPOINT_URL"] == "http://minio:9000" and head_env["RAY_AUTH_MODE"] == "disabled"


def test_the_entrypoint_reads_the_config_uri_only():
    cfg = RunConfig()
    job = _render(cfg)
    argv = shlex.split(job["spec"]["entrypoint"])
    assert argv == ["medisyn", "preprocess", "--config", CONFIG_URI, "--raw", "s3://raw/landing",
                    "--out", "s3://data/datasets/v7"]
    text = json.dumps(job)
    assert "--config-json" not in text and cfg.to_yaml() not in text  # no inline copy of the config


def test_names_are_dns_safe():
    cfg = load_config(None, ["name=My_Run.2026"])
    job = _render(cfg)
    assert job["metadata"]["name"] == "my-run-2026-preprocess" and job["metadata"]["namespace"] == "ml"
    assert job["metadata"]["labels"]["medisyn/stage"] == "preprocess"


@pytest.mark.parametrize("settings", [{"ray_workers": -1}, {"ray_worker_cpu": "0"}, {"ray_worker_cpu": "1.5"},
                                      {"ray_head_cpu": "0.5"}])
def test_bad_sizes_rejected(settings):
    with pytest.raises(ValueError):
        _render(**settings)


def test_schema_catches_a_broken_manifest():
    job = _render()
    job["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]["replicas"] = "two"
    with pytest.raises(ValueError, match=r"workerGroupSpecs\.0\.replicas"):
        launch.validate_against_crd(job)
