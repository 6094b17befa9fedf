"""Cluster launch: PyTorchJob / RayJob rendering, validated against the operators' own CRDs (package
data, medisyn/crds); one pod security policy for every pod; job states and failure reasons; the
node-level torchrun launcher. The job lifecycle over HTTP is in test_launch_cluster.py, TrainJob
rendering in test_trainjob.py."""

from __future__ import annotations

import copy
import json
import shlex
import subprocess
from dataclasses import replace
from pathlib import Path, PurePosixPath
from typing import Any

import pytest

import medisyn
from medisyn import k8s, launch
from medisyn.config import RunConfig, load_config
from medisyn.launch.crd import CRD_FILES, crd_resource
from medisyn.launch.operators import failure_reason, job_state, pod_problems
from medisyn.train import torchrun

REPO = Path(__file__).resolve().parents[1]
GPU_TOLERATION = {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}
CONFIG_URI = "s3://b/run-7/config.yaml"

# (num_nodes, gpus_per_node): single GPU, one 8-GPU node, 4 x 8 GPUs, CPU-only
TOPOLOGIES = [(1, 1), (1, 8), (4, 8), (2, 0)]


@pytest.fixture(scope="module")
def cfg() -> RunConfig:
    return load_config(REPO / "configs" / "demo.yaml", ["storage.s3_endpoint_url=http://minio:9000"])


def _settings(**kw: Any) -> launch.ClusterSettings:
    base: dict[str, Any] = dict(namespace="ml", image="registry.example/medisyn:1.2.3", service_account="medisyn-jobs",
                                node_selector={"nvidia.com/gpu.present": "true"}, tolerations=[GPU_TOLERATION])
    base.update(kw)
    return launch.ClusterSettings(**base)


def _pytorchjob(cfg: RunConfig, **kw: Any) -> dict[str, Any]:
    return launch.render_pytorchjob(cfg, CONFIG_URI, "s3://b/cache", "s3://b/ckpt", _settings(**kw))


def _rayjob(cfg: RunConfig, **kw: Any) -> dict[str, Any]:
    return launch.render_rayjob(cfg, CONFIG_URI, "s3://b/raw", "s3://b/dataset", _settings(**kw))


def _pod_specs(job: dict[str, Any]) -> list[dict[str, Any]]:
    """Every pod spec a job creates (PyTorchJob replicas; Ray head, workers and the submitter)."""
    spec = job["spec"]
    if job["kind"] == "PyTorchJob":
        return [r["template"]["spec"] for r in spec["pytorchReplicaSpecs"].values()]
    cluster = spec["rayClusterSpec"]
    return ([cluster["headGroupSpec"]["template"]["spec"]]
            + [g["template"]["spec"] for g in cluster.get("workerGroupSpecs", [])]
            + [spec["submitterPodTemplate"]["spec"]])


# ----------------------------------------------------------------------------------------------
# CRDs as package data
# ----------------------------------------------------------------------------------------------
def test_packaged_crds_match_the_shared_originals():
    shared = REPO.parent / "shared" / "crds"
    if not shared.exists():
        pytest.skip("../shared/crds not beside this checkout")
    for kind, name in CRD_FILES.items():
        assert crd_resource(kind).read_bytes() == (shared / name).read_bytes(), name


def test_crds_are_read_from_the_installed_package_not_tests():
    package_dir = Path(medisyn.__file__).resolve().parent
    for kind in CRD_FILES:
        path = Path(str(crd_resource(kind))).resolve()
        assert path.parent == package_dir / "crds" and path.is_file()
        assert "tests" not in path.relative_to(package_dir).parts
    assert not hasattr(launch, "CRD_DIR")  # the old path into tests/ is gone


def test_a_missing_or_unknown_crd_is_an_error_never_a_skip(cfg, monkeypatch):
    with pytest.raises(ValueError, match="no packaged CRD for kind 'Deployment'"):
        crd_resource("Deployment")
    monkeypatch.setitem(CRD_FILES, "PyTorchJob", "kubeflow.org_pytorchjobs-missing.yaml")
    # raised before any client exists: nothing unvalidated reaches a cluster
    with pytest.raises(FileNotFoundError, match="reinstall medisyn"):
        launch.run_job(_pytorchjob(cfg), api_client=object())  # type: ignore[arg-type]


# ----------------------------------------------------------------------------------------------
# PyTorchJob
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("nodes,gpus", TOPOLOGIES)
def test_pytorchjob_is_valid_against_the_crd(cfg, nodes, gpus):
    job = _pytorchjob(cfg, num_nodes=nodes, gpus_per_node=gpus)
    launch.validate_against_crd(job)
    specs = job["spec"]["pytorchReplicaSpecs"]
    assert specs["Master"]["replicas"] == 1
    assert specs.get("Worker", {}).get("replicas", 0) == nodes - 1
    assert job["spec"]["nprocPerNode"] == str(max(gpus, 1))
    pod = specs["Master"]["template"]["spec"]
    (container,) = pod["containers"]
    assert container["name"] == "pytorch"
    limits = container["resources"]["limits"]
    if gpus:
        assert limits["nvidia.com/gpu"] == gpus == container["resources"]["requests"]["nvidia.com/gpu"]
    else:
        assert "nvidia.com/gpu" not in limits
    assert pod["nodeSelector"] == {"nvidia.com/gpu.present": "true"} and pod["tolerations"] == [GPU_TOLERATION]
    assert pod["serviceAccountName"] == "medisyn-jobs"


def test_pytorchjob_reads_the_config_uri_and_carries_no_inline_config(cfg):
    job = _pytorchjob(cfg, num_nodes=2, gpus_per_node=8, nccl_socket_ifname="eth0")
    for pod in _pod_specs(job):
        container = pod["containers"][0]
        # one transport: the pod reads the run's stored config; no shell, no YAML in the environment
        assert container["command"] == ["medisyn", "train", "--config", CONFIG_URI, "--cache", "s3://b/cache",
                                        "--checkpoints", "s3://b/ckpt", "--nproc", "auto"]
        env = {e["name"]: e["value"] for e in container["env"]}
        assert not any(cfg.name in v and "train:" in v for v in env.values())
        assert "MEDISYN_CONFIG_YAML" not in env
        assert env["NCCL_SOCKET_IFNAME"] == "eth0" and env["TORCH_NCCL_ASYNC_ERROR_HANDLING"] == "1"
        # the endpoint must be in the env: the pod needs it to read the config from S3
        assert env["MEDISYN_S3_ENDPOINT_URL"] == "http://minio:9000"
        assert [e["secretRef"]["name"] for e in container["envFrom"]] == ["medisyn-s3", "medisyn-mlflow"]
        shm = next(v for v in pod["volumes"] if v["name"] == "dshm")
        assert shm["emptyDir"] == {"medium": "Memory", "sizeLimit": "16Gi"}
    assert not hasattr(launch, "CONFIG_ENV") and not hasattr(launch, "preprocess_entrypoint")


def test_pytorchjob_command_parses_with_the_cli_and_takes_the_topology_from_pet_env(cfg):
    from medisyn import cli

    job = _pytorchjob(cfg, num_nodes=4, gpus_per_node=8)
    argv = job["spec"]["pytorchReplicaSpecs"]["Worker"]["template"]["spec"]["containers"][0]["command"]
    assert argv[0] == "medisyn"  # the console script of the image (docker/Dockerfile.trainer)
    args = cli.build_parser().parse_args(argv[1:])
    assert (args.command, args.config, args.cache, args.checkpoints) == ("train", CONFIG_URI, "s3://b/cache", "s3://b/ckpt")
    # what the operator sets on the third replica of this job (nprocPerNode -> PET_NPROC_PER_NODE)
    pet = {"PET_NNODES": "4", "PET_NODE_RANK": "2", "PET_NPROC_PER_NODE": job["spec"]["nprocPerNode"],
           "PET_MASTER_ADDR": "train-master-0", "PET_MASTER_PORT": "23456"}
    topo = torchrun.Topology.from_env(args.nproc, pet)
    assert topo == torchrun.Topology(8, 4, 2, "train-master-0", 23456) and topo.world_size == 32


def test_settings_reject_unknown_keys_and_bad_topology(cfg):
    with pytest.raises(ValueError, match="gpus_per_nod"):
        launch.ClusterSettings.from_dict({"gpus_per_nod": 8})
    assert launch.ClusterSettings.from_dict({"env_secrets": ["a"]}).env_secrets == ("a",)
    assert launch.ClusterSettings.from_pipeline('{"num_nodes": 3}', "img:2").image == "img:2"
    with pytest.raises(ValueError, match="num_nodes"):
        _pytorchjob(cfg, num_nodes=0)


def test_job_names_are_dns_labels():
    name = launch.job_name("MediSyn_Run.2026", "train-" + "x" * 80)
    assert len(name) <= 63 and name == name.lower() and name[0].isalnum() and name[-1].isalnum()
    assert set(name) <= set("abcdefghijklmnopqrstuvwxyz0123456789-")


# ----------------------------------------------------------------------------------------------
# RayJob (one renderer: medisyn.launch.render_rayjob; layout details in test_rayjob.py)
# ----------------------------------------------------------------------------------------------
def test_rayjob_is_valid_against_the_crd_and_runs_the_cli_on_the_config_uri(cfg):
    from medisyn import cli

    job = _rayjob(cfg, ray_workers=3)
    launch.validate_against_crd(job)
    spec = job["spec"]
    assert spec["shutdownAfterJobFinishes"] is True and job["metadata"]["namespace"] == "ml"
    argv = shlex.split(spec["entrypoint"])
    assert argv == ["medisyn", "preprocess", "--config", CONFIG_URI, "--raw", "s3://b/raw", "--out", "s3://b/dataset"]
    args = cli.build_parser().parse_args(argv[1:])
    assert (args.command, args.config, args.raw, args.out) == ("preprocess", CONFIG_URI, "s3://b/raw", "s3://b/dataset")
    head = spec["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]
    assert head["serviceAccountName"] == "medisyn-jobs"
    assert head["containers"][0]["image"] == "registry.example/medisyn:1.2.3"
    assert spec["rayClusterSpec"]["workerGroupSpecs"][0]["replicas"] == 3
    assert not hasattr(launch, "preprocess_entrypoint")


def test_validation_names_the_bad_field(cfg):
    job = _pytorchjob(cfg, num_nodes=2)
    bad = copy.deepcopy(job)
    bad["spec"]["pytorchReplicaSpecs"]["Worker"]["replicas"] = "two"
    with pytest.raises(ValueError, match=r"pytorchReplicaSpecs\.Worker\.replicas"):
        launch.validate_against_crd(bad)
    bad = copy.deepcopy(job)
    bad["spec"]["runPolicy"]["backoffLimit"] = "twice"
    with pytest.raises(ValueError, match=r"runPolicy\.backoffLimit"):
        launch.validate_against_crd(bad)
    bad = copy.deepcopy(job)
    bad["apiVersion"] = "kubeflow.org/v2"
    with pytest.raises(ValueError, match="not served"):
        launch.validate_against_crd(bad)
    with pytest.raises(ValueError, match="does not match"):
        launch.validate_against_crd(_rayjob(cfg), crd_resource("PyTorchJob"))


# ----------------------------------------------------------------------------------------------
# One pod security policy (medisyn.k8s) for every pod we render
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("render", [_pytorchjob, _rayjob], ids=["pytorchjob", "rayjob"])
def test_every_pod_is_hardened_and_writes_only_to_emptydirs(cfg, render):
    job = render(cfg)
    pods = _pod_specs(job)
    assert len(pods) >= (1 if job["kind"] == "PyTorchJob" else 3)
    for pod in pods:
        assert pod["securityContext"] == k8s.pod_security_context()
        writable = {v["name"] for v in pod["volumes"] if "emptyDir" in v}
        for c in pod["containers"]:
            sc = c["securityContext"]
            assert sc == k8s.container_security_context()
            assert sc["readOnlyRootFilesystem"] is True and sc["runAsNonRoot"] is True
            assert sc["allowPrivilegeEscalation"] is False and sc["capabilities"] == {"drop": ["ALL"]}
            assert sc["seccompProfile"] == {"type": "RuntimeDefault"}
            assert c["resources"]["requests"] and c["resources"]["limits"]
            mounts = {m["mountPath"]: m for m in c["volumeMounts"] if m["name"] in writable and not m.get("readOnly")}
            assert {"/tmp", "/scratch"} <= set(mounts)
            env = {e["name"]: e["value"] for e in c["env"]}
            assert len(env) == len(c["env"]), "duplicate env names"
            for var in ("TMPDIR", "HOME", "HF_HOME", "MEDISYN_CACHE_DIR"):
                # a writer that follows the variable lands on a writable emptyDir
                path = PurePosixPath(env[var])
                assert any(path == PurePosixPath(m) or PurePosixPath(m) in path.parents for m in mounts), (var, path)


def test_pod_spec_refuses_a_container_that_brings_its_own_policy():
    with pytest.raises(ValueError, match="securityContext"):
        k8s.pod_spec([{"name": "x", "image": "i", "securityContext": {"privileged": True}}])
    spec = k8s.pod_spec([{"name": "x", "image": "i", "env": [{"name": "HOME", "value": "/scratch/home"}]}])
    homes = [e["value"] for e in spec["containers"][0]["env"] if e["name"] == "HOME"]
    assert homes == ["/scratch/home"]  # an explicit value replaces ours instead of duplicating the name


# ----------------------------------------------------------------------------------------------
# Job states, as each operator reports them (the lifecycle over HTTP: test_launch_cluster.py)
# ----------------------------------------------------------------------------------------------
def _cond(kind: str, reason: str = "") -> dict[str, Any]:
    return {"conditions": [{"type": "Created", "status": "True"}, {"type": kind, "status": "True", "reason": reason}]}


def test_job_states():
    assert job_state("RayJob", {"status": {"jobStatus": "SUCCEEDED"}})[0] == "succeeded"
    assert job_state("RayJob", {"status": {"jobDeploymentStatus": "Initializing"}})[0] == "running"
    assert job_state("RayJob", {"status": {"jobDeploymentStatus": "ValidationFailed"}})[0] == "failed"
    assert job_state("PyTorchJob", {})[0] == "running"
    assert job_state("PyTorchJob", {"status": _cond("Failed", "OOMKilled")}) == ("failed", "Failed: OOMKilled")
    assert job_state("TrainJob", {"status": _cond("Complete")})[0] == "succeeded"
    assert job_state("TrainJob", {"status": _cond("Suspended")})[0] == "running"


def test_pod_problems_name_the_container_state():
    pods = [{"metadata": {"name": "p0"}, "status": {"containerStatuses": [
        {"name": "node", "state": {"running": {}},
         "lastState": {"terminated": {"exitCode": 137, "reason": "OOMKilled"}}}]}},
        {"metadata": {"name": "p1"}, "status": {"containerStatuses": [
            {"name": "node", "state": {"waiting": {"reason": "ErrImagePull", "message": "not found"}}}]}},
        {"metadata": {"name": "p2"}, "status": {"containerStatuses": [
            {"name": "node", "state": {"terminated": {"exitCode": 0, "reason": "Completed"}}}]}}]
    assert pod_problems(pods) == ["p0/node: OOMKilled (exit 137)", "p1/node: ErrImagePull not found"]
    assert failure_reason("", [], ["x", "NCCL WARN Timeout waiting for peer"]).startswith("NCCL timeout")
    assert failure_reason("", [], []) == "no reason reported"


def _train_result(checkpoints_uri: str):
    from medisyn.train.trainer import TrainResult

    return TrainResult(checkpoints=[f"{checkpoints_uri}/epoch-0001"], epochs=1, global_step=4, final_loss=0.25,
                       world_size=16, per_device_batch_size=8, gradient_accumulation_steps=1,
                       effective_batch_size=128, steps_per_epoch=4, resumed_from=None, mixed_precision="bf16",
                       flops_per_sample=1.0e12, images_per_s=100.0, mfu=0.2, dataset_hash="cd" * 32, cache_key="k")


# ----------------------------------------------------------------------------------------------
# medisyn.train.torchrun: the node-level launcher the PyTorchJob command ends in
# ----------------------------------------------------------------------------------------------
def test_topology_from_env():
    assert torchrun.Topology.from_env(3, {}) == torchrun.Topology(3)  # no operator env: one node, standalone
    assert torchrun.Topology.from_env("auto", {"PET_NPROC_PER_NODE": "4"}).nproc_per_node == 4
    assert torchrun.resolve_nproc("2", {"PET_NPROC_PER_NODE": "8"}) == 2  # explicit beats the env
    with pytest.raises(ValueError, match="PET_MASTER_ADDR"):
        torchrun.Topology.from_env(1, {"PET_NNODES": "2", "PET_NODE_RANK": "1"})
    with pytest.raises(ValueError, match="outside"):
        torchrun.Topology.from_env(1, {"PET_NNODES": "2", "PET_NODE_RANK": "2", "PET_MASTER_ADDR": "m",
                                       "PET_MASTER_PORT": "1"})
    with pytest.raises(ValueError, match="PET_NNODES"):
        torchrun.Topology.from_env(1, {"PET_NNODES": "1:4"})
    with pytest.raises(ValueError, match="nproc"):
        torchrun.resolve_nproc("many", {})


def _multinode_env(node_rank: int) -> dict[str, str]:
    return {"PET_NNODES": "2", "PET_NODE_RANK": str(node_rank), "PET_NPROC_PER_NODE": "2",
            "PET_MASTER_ADDR": "job-master-0", "PET_MASTER_PORT": "23456", "PATH": "/usr/bin"}


@pytest.fixture
def torchrun_cfg() -> RunConfig:
    geometry = ["train.effective_batch_size=8", "train.per_device_batch_size=2"]
    return load_config(REPO / "configs" / "demo.yaml", geometry)


@pytest.mark.parametrize("node_rank", [0, 1])
def test_launch_runs_torchrun_in_a_child_and_returns_the_result_on_node_rank_0(torchrun_cfg, monkeypatch, tmp_path,
                                                                               node_rank):
    expected = replace(_train_result(str(tmp_path)), world_size=4)
    seen: dict[str, Any] = {}

    def fake_torchrun(cmd: list[str], env: dict[str, str], check: bool) -> subprocess.CompletedProcess[str]:
        seen["cmd"], seen["env"] = cmd, env
        # the config the workers read is the launcher's resolved config
        assert load_config(cmd[cmd.index("--config") + 1]).config_hash() == torchrun_cfg.config_hash()
        if node_rank == 0:  # the global main worker (rank 0) runs on node rank 0 and writes the result
            Path(cmd[cmd.index("--result-json") + 1]).write_text(json.dumps(expected.to_dict()))
        return subprocess.CompletedProcess(cmd, 0)

    monkeypatch.setattr(torchrun.subprocess, "run", fake_torchrun)
    got = torchrun.launch(torchrun_cfg, "s3://b/cache", "s3://b/ckpt", "auto", env=_multinode_env(node_rank))
    assert got == (expected if node_rank == 0 else None)
    for flag in ("--nproc_per_node=2", "--nnodes=2", f"--node_rank={node_rank}", "--master_addr=job-master-0",
                 "--master_port=23456"):
        assert flag in seen["cmd"]
    assert seen["env"]["TORCH_NCCL_ASYNC_ERROR_HANDLING"] == "1" and seen["env"]["PATH"] == "/usr/bin"


def test_launch_propagates_the_torchrun_exit_code(torchrun_cfg, monkeypatch):
    monkeypatch.setattr(torchrun.subprocess, "run",
                        lambda cmd, env, check: subprocess.CompletedProcess(cmd, 3))
    with pytest.raises(subprocess.CalledProcessError) as err:
        torchrun.launch(torchrun_cfg, "s3://b/cache", "s3://b/ckpt", 2, env={})
    assert err.value.returncode == 3


def test_launch_checks_the_batch_against_the_whole_job_before_starting(monkeypatch):
    from medisyn.config import ConfigError

    cfg = load_config(REPO / "configs" / "demo.yaml", ["train.effective_batch_size=8", "train.per_device_batch_size=4"])
    monkeypatch.setattr(torchrun.subprocess, "run", lambda *a, **k: pytest.fail("torchrun started"))
    with pytest.raises(ConfigError):  # 2 nodes x 2 processes x 4 per device > 8
        torchrun.launch(cfg, "s3://b/cache", "s3://b/ckpt", "auto", env=_multinode_env(0))
