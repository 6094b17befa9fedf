"""Kubeflow Trainer v2: the TrainJob ``medisyn.launch.render_trainjob`` renders is valid against the
operator's CRD for 1 node x 1 GPU, 4 x 8 and CPU-only, and runs our command on the chart's
TrainingRuntime, which is itself valid against its CRD and carries the pod policy of ``medisyn.k8s``."""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from helpers import helm_binary
from medisyn import k8s, launch
from medisyn.config import RunConfig, load_config
from medisyn.launch.settings import DEFAULT_DEADLINE_S, TRAINING_RUNTIME

REPO = Path(__file__).resolve().parents[1]
CONFIG_URI = "s3://b/run-7/config.yaml"
GPU_TOLERATION = {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}

# (num_nodes, gpus_per_node, processes per node): one GPU, 4 nodes x 8 GPUs, CPU-only (one process per node)
TOPOLOGIES = [(1, 1, 1), (4, 8, 8), (2, 0, 1)]


@pytest.fixture(scope="module")
def cfg() -> RunConfig:
    return load_config(REPO / "configs" / "demo.yaml", ["storage.s3_endpoint_url=http://minio:9000"])


def _render(cfg: RunConfig, **kw: Any) -> dict[str, Any]:
    settings = launch.ClusterSettings(**{"namespace": "ml", "image": "registry.example/medisyn@sha256:" + "a" * 64,
                                         **kw})
    return launch.render_trainjob(cfg, CONFIG_URI, "s3://b/cache", "s3://b/ckpt", settings)


@pytest.mark.parametrize("nodes,gpus,procs", TOPOLOGIES, ids=["1x1", "4x8", "cpu-only"])
def test_trainjob_is_valid_against_the_crd(cfg, nodes, gpus, procs):
    job = _render(cfg, num_nodes=nodes, gpus_per_node=gpus)
    launch.validate_against_crd(job)  # the packaged copy of the operator's CRD (test_launch: equal to ../shared)
    assert (job["apiVersion"], job["kind"]) == ("trainer.kubeflow.org/v1alpha1", "TrainJob")
    trainer = job["spec"]["trainer"]
    assert trainer["numNodes"] == nodes and trainer["numProcPerNode"] == procs
    res = trainer["resourcesPerNode"]
    assert res["requests"] == res["limits"]  # Guaranteed QoS
    if gpus:
        assert res["limits"]["nvidia.com/gpu"] == gpus
    else:
        assert "nvidia.com/gpu" not in res["limits"]
    assert job["spec"]["runtimeRef"] == {"apiGroup": "trainer.kubeflow.org", "kind": "TrainingRuntime",
                                         "name": TRAINING_RUNTIME}
    assert job["spec"]["activeDeadlineSeconds"] == DEFAULT_DEADLINE_S


def test_trainjob_runs_the_stage_runner_on_the_stored_config(cfg):
    from medisyn import cli

    job = _render(cfg, num_nodes=4, gpus_per_node=8, nccl_socket_ifname="eth0")
    trainer = job["spec"]["trainer"]
    argv = trainer["command"]
    assert argv == ["medisyn", "train", "--config", CONFIG_URI, "--cache", "s3://b/cache", "--checkpoints",
                    "s3://b/ckpt", "--nproc", "auto"]
    args = cli.build_parser().parse_args(argv[1:])
    assert (args.command, args.config, args.nproc) == ("train", CONFIG_URI, "auto")
    env = {e["name"]: e["value"] for e in trainer["env"]}
    assert env["MEDISYN_S3_ENDPOINT_URL"] == "http://minio:9000" and env["NCCL_SOCKET_IFNAME"] == "eth0"
    assert env["TORCH_NCCL_ASYNC_ERROR_HANDLING"] == "1"
    assert trainer["image"] == "registry.example/medisyn@sha256:" + "a" * 64


def test_node_selector_tolerations_and_service_account_go_in_a_runtime_patch(cfg):
    job = _render(cfg, node_selector={"nvidia.com/gpu.present": "true"}, tolerations=[GPU_TOLERATION],
                  service_account="medisyn-jobs")
    launch.validate_against_crd(job)
    (patch,) = job["spec"]["runtimePatches"]
    assert patch["manager"] == "medisyn.io/launcher"
    (node,) = patch["trainingRuntimeSpec"]["template"]["spec"]["replicatedJobs"]
    pod = node["template"]["spec"]["template"]["spec"]
    assert node["name"] == "node"
    assert pod == {"nodeSelector": {"nvidia.com/gpu.present": "true"}, "tolerations": [GPU_TOLERATION],
                   "serviceAccountName": "medisyn-jobs"}
    assert "runtimePatches" not in _render(cfg)["spec"]


def test_bad_topology_and_bad_manifests_are_refused(cfg):
    with pytest.raises(ValueError, match="num_nodes"):
        _render(cfg, num_nodes=0)
    job = _render(cfg)
    job["spec"]["trainer"]["numNodes"] = "four"
    with pytest.raises(ValueError, match=r"spec\.trainer\.numNodes"):
        launch.validate_against_crd(job)
    job = _render(cfg)
    del job["spec"]["runtimeRef"]
    with pytest.raises(ValueError, match="runtimeRef"):
        launch.validate_against_crd(job)


# ----------------------------------------------------------------------------------------------
# The chart's TrainingRuntime (charts/medisyn/templates/trainingruntime.yaml)
# ----------------------------------------------------------------------------------------------
def _runtime(*sets: str) -> dict[str, Any] | None:
    args = [helm_binary(), "template", "medisyn", str(REPO / "charts" / "medisyn"), "--namespace", "ml"]
    for s in sets:
        args += ["--set", s]
    out = subprocess.run(args, capture_output=True, text=True, timeout=120, check=True).stdout
    found = [d for d in yaml.safe_load_all(out) if d and d["kind"] == "TrainingRuntime"]
    return found[0] if found else None


def test_the_charts_training_runtime_is_valid_and_hardened_like_every_pod():
    runtime = _runtime("image.digest=sha256:" + "c" * 64)
    assert runtime is not None
    launch.validate_against_crd(runtime)
    assert runtime["metadata"]["name"] == TRAINING_RUNTIME == launch.ClusterSettings().training_runtime
    assert runtime["spec"]["mlPolicy"]["torch"] == {}  # torchrun's PET_* variables, read by medisyn.train.torchrun
    (node,) = runtime["spec"]["template"]["spec"]["replicatedJobs"]
    assert node["name"] == "node"  # the replicated job the TrainJob's trainer and our runtime patch address
    pod = node["template"]["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    assert container["name"] == "node" and container["image"].endswith("@sha256:" + "c" * 64)
    # the same policy as every pod medisyn.k8s renders (one copy of the concern, checked here)
    assert pod["securityContext"] == k8s.pod_security_context()
    assert k8s.container_security_context().items() <= container["securityContext"].items()
    volumes, mounts = k8s.writable_volumes("100Gi", "16Gi")
    assert pod["volumes"] == volumes and container["volumeMounts"] == mounts
    env = {e["name"]: e["value"] for e in container["env"]}
    assert env == k8s.WRITABLE_ENV
    assert [e["secretRef"]["name"] for e in container["envFrom"]] == ["medisyn-s3", "medisyn-mlflow-client"]
    assert _runtime("trainingRuntime.create=false") is None
