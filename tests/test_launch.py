"""PyTorchJob / RayJob rendering, validated against the operators' own CRDs (vendored in
tests/data/crds); submission and watching against a fake CustomObjectsApi (no API server here)."""

from __future__ import annotations

import copy
import json
import shlex
from pathlib import Path

import pytest

from medisyn import launch
from medisyn.config import load_config

REPO = Path(__file__).resolve().parents[1]
CRDS = REPO / "tests" / "data" / "crds"
GPU_TOLERATION = {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}

# (num_nodes, gpus_per_node): single GPU, one 8-GPU node, 4 x 8 GPUs, CPU-only
TOPOLOGIES = [(1, 1), (1, 8), (4, 8), (2, 0)]


@pytest.fixture(scope="module")
def cfg():
    return load_config(REPO / "configs" / "demo.yaml", ["storage.s3_endpoint_url=http://minio:9000"])


def _settings(**kw) -> launch.ClusterSettings:
    base = dict(namespace="ml", image="registry.example/medisyn:1.2.3", service_account="medisyn-jobs",
                node_selector={"nvidia.com/gpu.present": "true"}, tolerations=[GPU_TOLERATION])
    base.update(kw)
    return launch.ClusterSettings(**base)


def test_vendored_crds_match_the_shared_originals():
    shared = REPO.parent / "shared" / "crds"
    if not shared.exists():
        pytest.skip("../shared/crds not beside this checkout")
    for name in (launch.PYTORCHJOB_CRD, launch.RAYJOB_CRD):
        assert (CRDS / name).read_bytes() == (shared / name).read_bytes(), name


@pytest.mark.parametrize("nodes,gpus", TOPOLOGIES)
def test_pytorchjob_is_valid_against_the_crd(cfg, nodes, gpus):
    job = launch.render_pytorchjob(cfg, "s3://b/cache", "s3://b/ckpt", _settings(num_nodes=nodes, gpus_per_node=gpus),
                                   result_json_uri="s3://b/run/train-result.json")
    launch.validate_against_crd(job, CRDS / launch.PYTORCHJOB_CRD)
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


def test_pytorchjob_command_env_and_volumes(cfg):
    job = launch.render_pytorchjob(cfg, "s3://b/cache", "s3://b/ckpt", _settings(num_nodes=2, gpus_per_node=8,
                                   nccl_socket_ifname="eth0"), result_json_uri="s3://b/r.json")
    pod = job["spec"]["pytorchReplicaSpecs"]["Worker"]["template"]["spec"]
    container = pod["containers"][0]
    shell, flag, script = container["command"]
    assert (shell, flag) == ("/bin/sh", "-c")
    launch_part = script.split("exec ", 1)[1]
    assert shlex.split(launch_part) == [
        "python", "-m", "medisyn.train.launch", "--config", launch.CONFIG_PATH_IN_POD,
        "--cache", "s3://b/cache", "--checkpoints", "s3://b/ckpt", "--result-json", "s3://b/r.json"]
    env = {e["name"]: e["value"] for e in container["env"]}
    # the config travels whole and round-trips to the same run
    assert load_config_from_yaml(env[launch.CONFIG_ENV]).config_hash() == cfg.config_hash()
    assert env["NCCL_SOCKET_IFNAME"] == "eth0" and env["TORCH_NCCL_ASYNC_ERROR_HANDLING"] == "1"
    assert env["MEDISYN_S3_ENDPOINT_URL"] == "http://minio:9000"
    assert [e["secretRef"]["name"] for e in container["envFrom"]] == ["medisyn-s3", "medisyn-mlflow"]
    mounts = {m["mountPath"] for m in container["volumeMounts"]}
    assert {"/dev/shm", "/scratch"} <= mounts
    shm = next(v for v in pod["volumes"] if v["name"] == "dshm")
    assert shm["emptyDir"]["medium"] == "Memory"
    sc = container["securityContext"]
    assert sc["allowPrivilegeEscalation"] is False and sc["capabilities"]["drop"] == ["ALL"]
    assert pod["securityContext"]["runAsNonRoot"] is True


def load_config_from_yaml(text: str):
    import yaml

    from medisyn.config import validate_config

    return validate_config(yaml.safe_load(text))


def test_rayjob_is_valid_against_the_crd(cfg):
    job = launch.render_rayjob(cfg, "s3://b/raw", "s3://b/dataset", _settings(ray_workers=3))
    launch.validate_against_crd(job, CRDS / launch.RAYJOB_CRD)
    spec = job["spec"]
    assert spec["shutdownAfterJobFinishes"] is True
    args = shlex.split(spec["entrypoint"])
    assert args[:4] == ["python", "-m", "medisyn.cli", "preprocess"]
    assert "s3://b/raw" in args and "s3://b/dataset" in args
    assert json.loads(args[args.index("--config-json") + 1])["name"] == cfg.name
    assert job["metadata"]["namespace"] == "ml"
    head = spec["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]
    assert head["serviceAccountName"] == "medisyn-jobs"
    assert head["containers"][0]["image"] == "registry.example/medisyn:1.2.3"
    assert head["containers"][0]["envFrom"] == [{"secretRef": {"name": "medisyn-s3"}}]
    workers = spec["rayClusterSpec"]["workerGroupSpecs"]
    assert workers[0]["replicas"] == 3
    for group in [spec["rayClusterSpec"]["headGroupSpec"], *workers]:
        for c in group["template"]["spec"]["containers"]:
            assert c["resources"]["requests"] and c["resources"]["limits"]


def test_validation_names_the_bad_field(cfg):
    job = launch.render_pytorchjob(cfg, "s3://b/c", "s3://b/k", _settings(num_nodes=2))
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
    ray = launch.render_rayjob(cfg, "s3://b/raw", "s3://b/ds", _settings())
    with pytest.raises(ValueError, match="does not match"):
        launch.validate_against_crd(ray, CRDS / launch.PYTORCHJOB_CRD)


def test_settings_reject_unknown_keys_and_bad_topology(cfg):
    with pytest.raises(ValueError, match="gpus_per_nod"):
        launch.ClusterSettings.from_dict({"gpus_per_nod": 8})
    assert launch.ClusterSettings.from_dict({"env_secrets": ["a"]}).env_secrets == ("a",)
    with pytest.raises(ValueError, match="num_nodes"):
        launch.render_pytorchjob(cfg, "s3://b/c", "s3://b/k", _settings(num_nodes=0))


def test_job_names_are_dns_labels():
    name = launch.job_name("MediSyn_Run.2026", "train-" + "x" * 80)
    assert len(name) <= 63 and name == name.lower() and name[0].isalnum() and name[-1].isalnum()
    assert set(name) <= set("abcdefghijklmnopqrstuvwxyz0123456789-")


class FakeCustomObjects:
    """The two CustomObjectsApi calls launch uses; statuses are replayed in order."""

    def __init__(self, statuses):
        self.statuses = list(statuses)
        self.created = []

    def create_namespaced_custom_object(self, group, version, namespace, plural, body):
        self.created.append((group, version, namespace, plural, body))
        return body

    def get_namespaced_custom_object(self, group, version, namespace, plural, name):
        status = self.statuses.pop(0) if len(self.statuses) > 1 else self.statuses[0]
        return {"metadata": {"name": name}, "status": status}


def _cond(kind, reason=""):
    return {"conditions": [{"type": "Created", "status": "True"}, {"type": kind, "status": "True", "reason": reason}]}


def test_run_job_submits_and_waits_for_success(cfg):
    api = FakeCustomObjects([{}, _cond("Running"), _cond("Succeeded")])
    job = launch.render_pytorchjob(cfg, "s3://b/c", "s3://b/k", _settings(num_nodes=2))
    naps = []
    out = launch.run_job(job, api=api, poll_s=5, sleep=naps.append)
    assert out["status"]["conditions"][-1]["type"] == "Succeeded"
    group, version, ns, plural, body = api.created[0]
    assert (group, version, ns, plural) == ("kubeflow.org", "v1", "ml", "pytorchjobs") and body is job
    assert naps and all(n == 5 for n in naps)


def test_wait_raises_on_failure_with_the_reason():
    api = FakeCustomObjects([_cond("Running"), _cond("Failed", "OOMKilled")])
    with pytest.raises(launch.JobFailed, match="OOMKilled"):
        launch.wait_for_job("PyTorchJob", "j", "ml", api=api, poll_s=0, sleep=lambda s: None)
    api = FakeCustomObjects([{"jobDeploymentStatus": "Running", "jobStatus": "RUNNING"},
                             {"jobDeploymentStatus": "Complete", "jobStatus": "FAILED", "message": "exit 2"}])
    with pytest.raises(launch.JobFailed, match="exit 2"):
        launch.wait_for_job("RayJob", "r", "ml", api=api, poll_s=0, sleep=lambda s: None)


def test_wait_times_out():
    api = FakeCustomObjects([_cond("Running")])
    with pytest.raises(TimeoutError):
        launch.wait_for_job("PyTorchJob", "j", "ml", api=api, timeout_s=0, poll_s=0, sleep=lambda s: None)


def test_rayjob_success_state():
    assert launch.job_state("RayJob", {"status": {"jobStatus": "SUCCEEDED"}})[0] == "succeeded"
    assert launch.job_state("RayJob", {"status": {"jobDeploymentStatus": "Initializing"}})[0] == "running"
    assert launch.job_state("PyTorchJob", {})[0] == "running"


def test_submit_falls_back_to_kubectl(monkeypatch, cfg):
    calls = {}

    class Done:
        stdout = json.dumps({"metadata": {"name": "x"}})

    def fake_run(cmd, input, capture_output, text, check):
        calls["cmd"], calls["input"] = cmd, json.loads(input)
        return Done()

    monkeypatch.setattr(launch, "_have_kubernetes_client", lambda: False)
    monkeypatch.setattr(launch.shutil, "which", lambda name: "/usr/bin/kubectl")
    monkeypatch.setattr(launch.subprocess, "run", fake_run)
    job = launch.render_rayjob(cfg, "s3://b/raw", "s3://b/ds", _settings())
    assert launch.submit(job) == {"metadata": {"name": "x"}}
    assert calls["cmd"][:4] == ["/usr/bin/kubectl", "create", "-n", "ml"] and calls["input"]["kind"] == "RayJob"


def test_pytorchjob_command_parses_with_the_training_launcher(cfg):
    from medisyn.train import launch as train_launch

    job = launch.render_pytorchjob(cfg, "s3://b/cache", "s3://b/ckpt", _settings(num_nodes=2),
                                   result_json_uri="s3://b/r.json")
    script = job["spec"]["pytorchReplicaSpecs"]["Master"]["template"]["spec"]["containers"][0]["command"][2]
    argv = shlex.split(script.split("exec ", 1)[1])
    assert argv[:3] == ["python", "-m", "medisyn.train.launch"]
    args = train_launch.parse_args(argv[3:])
    assert (args.config, args.cache, args.checkpoints, args.result_json) == (
        launch.CONFIG_PATH_IN_POD, "s3://b/cache", "s3://b/ckpt", "s3://b/r.json")


def test_rayjob_entrypoint_parses_with_the_cli(cfg):
    from medisyn import cli

    job = launch.render_rayjob(cfg, "s3://b/raw", "s3://b/ds", _settings())
    argv = shlex.split(job["spec"]["entrypoint"])
    assert argv[:3] == ["python", "-m", "medisyn.cli"]
    args = cli.build_parser().parse_args(argv[3:])
    assert (args.raw, args.out) == ("s3://b/raw", "s3://b/ds")
