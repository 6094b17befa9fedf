"""Rendering the jobs MediSyn hands to operators: a Kubeflow Trainer v2 TrainJob or a Training Operator
PyTorchJob for training, a KubeRay RayJob for preprocessing (docs/deploy.md, Launched jobs).

Every pod runs the same ``medisyn <stage> --config <config_uri> ...`` a user types; the pod policy
comes from :mod:`medisyn.k8s` (or, for a TrainJob, from the chart's TrainingRuntime).
"""

from __future__ import annotations

import shlex
from importlib.metadata import version
from typing import Any

from medisyn import k8s
from medisyn.config import RunConfig
from medisyn.launch.settings import ClusterSettings, job_name

_LABELS = {"app.kubernetes.io/part-of": "medisyn"}


# ----------------------------------------------------------------------------------------------
# In-pod commands: the same `medisyn <stage> --config <config_uri>` a user types
# ----------------------------------------------------------------------------------------------
def trainer_command(config_uri: str, cache_uri: str, checkpoints_uri: str) -> list[str]:
    """The command of every training pod (TrainJob node, PyTorchJob replica).

    ``--nproc auto`` takes ``PET_NPROC_PER_NODE`` and the node topology from the operator's ``PET_*``
    variables (:mod:`medisyn.train.torchrun`), so every node runs the same command; the stage
    runner on node rank 0 writes ``<checkpoints_uri>/result.json``.
    """
    return ["medisyn", "train", "--config", config_uri, "--cache", cache_uri,
            "--checkpoints", checkpoints_uri, "--nproc", "auto"]


def preprocess_command(config_uri: str, raw_uri: str, dataset_uri: str) -> list[str]:
    """The RayJob's entrypoint (as argv; the manifest carries it shell-quoted)."""
    return ["medisyn", "preprocess", "--config", config_uri, "--raw", raw_uri, "--out", dataset_uri]


def _env(cfg: RunConfig) -> list[dict[str, Any]]:
    env: list[dict[str, Any]] = [{"name": "HF_HUB_OFFLINE", "value": "1"}]
    if cfg.storage.s3_endpoint_url:  # needed before the config is read (the config lives on S3)
        env.append({"name": "MEDISYN_S3_ENDPOINT_URL", "value": cfg.storage.s3_endpoint_url})
    if cfg.tracking.tracking_uri:
        env.append({"name": "MLFLOW_TRACKING_URI", "value": cfg.tracking.tracking_uri})
    return env


def _trainer_env(cfg: RunConfig, s: ClusterSettings) -> list[dict[str, Any]]:
    env = _env(cfg) + [
        {"name": "OMP_NUM_THREADS", "value": "1"},
        {"name": "NCCL_DEBUG", "value": "WARN"},
        # surface a hung collective as an error instead of a silent stall (train.nccl_timeout_s)
        {"name": "TORCH_NCCL_ASYNC_ERROR_HANDLING", "value": "1"},
        {"name": "MEDISYN_NCCL_TIMEOUT_S", "value": str(cfg.train.nccl_timeout_s)},
    ]
    if s.nccl_socket_ifname:
        env.append({"name": "NCCL_SOCKET_IFNAME", "value": s.nccl_socket_ifname})
    return env


def _env_from(settings: ClusterSettings) -> list[dict[str, Any]]:
    # optional: a cluster using IRSA / workload identity has no S3 key Secret
    return [{"secretRef": {"name": s, "optional": True}} for s in settings.env_secrets]


def _metadata(cfg: RunConfig, name: str, namespace: str, stage: str) -> dict[str, Any]:
    return {"name": name, "namespace": namespace,
            "labels": {**_LABELS, "medisyn/stage": stage, "medisyn/run": job_name(cfg.name, "")}}


def _check_topology(s: ClusterSettings) -> None:
    if s.num_nodes < 1 or s.gpus_per_node < 0:
        raise ValueError(f"num_nodes must be >= 1 and gpus_per_node >= 0 (got {s.num_nodes}, {s.gpus_per_node})")


# ----------------------------------------------------------------------------------------------
# TrainJob (Kubeflow Trainer v2)
# ----------------------------------------------------------------------------------------------
def render_trainjob(cfg: RunConfig, config_uri: str, cache_uri: str, checkpoints_uri: str,
                    settings: ClusterSettings | None = None, name: str | None = None) -> dict[str, Any]:
    """The TrainJob that trains ``cfg`` (read by every node from ``config_uri``) from ``cache_uri``
    into ``checkpoints_uri`` on ``num_nodes`` x ``gpus_per_node`` GPUs (0 GPUs: CPU-only, one process).

    The pod itself (security context, writable emptyDirs, Secrets as env) comes from the chart's
    TrainingRuntime ``settings.training_runtime``; the job sets what varies per run. Node selector,
    tolerations and service account go in a ``runtimePatches`` entry owned by ``medisyn.io/launcher``.
    """
    s = settings or ClusterSettings()
    _check_topology(s)
    name = name or job_name(cfg.name, "train")
    trainer: dict[str, Any] = {
        "image": s.image,
        "command": trainer_command(config_uri, cache_uri, checkpoints_uri),
        "env": _trainer_env(cfg, s),
        "numNodes": s.num_nodes,
        "numProcPerNode": max(1, s.gpus_per_node),
        "resourcesPerNode": k8s.resources(s.cpu, s.memory, s.gpus_per_node),
    }
    spec: dict[str, Any] = {
        "runtimeRef": {"apiGroup": "trainer.kubeflow.org", "kind": "TrainingRuntime", "name": s.training_runtime},
        "trainer": trainer,
    }
    pod_patch: dict[str, Any] = {}
    if s.node_selector:
        pod_patch["nodeSelector"] = dict(s.node_selector)
    if s.tolerations:
        pod_patch["tolerations"] = [dict(t) for t in s.tolerations]
    if s.service_account:
        pod_patch["serviceAccountName"] = s.service_account
    if pod_patch:
        spec["runtimePatches"] = [{
            "manager": "medisyn.io/launcher",
            "trainingRuntimeSpec": {"template": {"spec": {"replicatedJobs": [
                {"name": "node", "template": {"spec": {"template": {"spec": pod_patch}}}},
            ]}}},
        }]
    if s.active_deadline_s:
        spec["activeDeadlineSeconds"] = s.active_deadline_s
    return {
        "apiVersion": "trainer.kubeflow.org/v1alpha1",
        "kind": "TrainJob",
        "metadata": _metadata(cfg, name, s.resolved_namespace(), "train"),
        "spec": spec,
    }


# ----------------------------------------------------------------------------------------------
# PyTorchJob
# ----------------------------------------------------------------------------------------------
def render_pytorchjob(cfg: RunConfig, config_uri: str, cache_uri: str, checkpoints_uri: str,
                      settings: ClusterSettings | None = None, name: str | None = None) -> dict[str, Any]:
    """The PyTorchJob that trains ``cfg`` (read by every pod from ``config_uri``) from ``cache_uri``
    into ``checkpoints_uri``."""
    s = settings or ClusterSettings()
    _check_topology(s)
    name = name or job_name(cfg.name, "train")
    env = _trainer_env(cfg, s)
    container = {
        "name": "pytorch",  # the operator requires this container name
        "image": s.image,
        "imagePullPolicy": "IfNotPresent",
        "command": trainer_command(config_uri, cache_uri, checkpoints_uri),
        "env": env,
        "envFrom": _env_from(s),
        "resources": k8s.resources(s.cpu, s.memory, s.gpus_per_node),
    }
    pod = k8s.pod_spec([container], scratch_size=s.scratch_size, shm_size=s.shm_size,
                       service_account=s.service_account, node_selector=s.node_selector, tolerations=s.tolerations)
    template = {"metadata": {"labels": {**_LABELS, "medisyn/stage": "train"}}, "spec": pod}
    replica_specs: dict[str, Any] = {
        "Master": {"replicas": 1, "restartPolicy": "OnFailure", "template": template},
    }
    if s.num_nodes > 1:
        replica_specs["Worker"] = {"replicas": s.num_nodes - 1, "restartPolicy": "OnFailure", "template": template}
    run_policy: dict[str, Any] = {
        "cleanPodPolicy": "None",  # keep pods for their logs; ttlSecondsAfterFinished collects them
        "backoffLimit": s.backoff_limit,
        "ttlSecondsAfterFinished": s.ttl_after_finished_s,
    }
    if s.active_deadline_s:
        run_policy["activeDeadlineSeconds"] = s.active_deadline_s
    return {
        "apiVersion": "kubeflow.org/v1",
        "kind": "PyTorchJob",
        "metadata": _metadata(cfg, name, s.resolved_namespace(), "train"),
        "spec": {
            "nprocPerNode": str(max(1, s.gpus_per_node)),
            "runPolicy": run_policy,
            "pytorchReplicaSpecs": replica_specs,
        },
    }


# ----------------------------------------------------------------------------------------------
# RayJob
# ----------------------------------------------------------------------------------------------
def _whole_cpus(value: str, what: str) -> int:
    cpus = float(value)
    if cpus < 1 or cpus != int(cpus):
        raise ValueError(f"{what} must be a whole number of CPUs >= 1 (Ray's num-cpus), got {value!r}")
    return int(cpus)


def render_rayjob(cfg: RunConfig, config_uri: str, raw_uri: str, dataset_uri: str,
                  settings: ClusterSettings | None = None, name: str | None = None) -> dict[str, Any]:
    """The RayJob that preprocesses ``raw_uri`` into ``dataset_uri`` on an ephemeral KubeRay cluster.

    One head (``num-cpus 0``: it runs the driver, no image work) and ``ray_workers`` workers of
    ``ray_worker_cpu`` Ray CPUs each; ``data.ray_num_cpus`` is ignored on the cluster, its size
    decides. The head runs ``medisyn preprocess --config <config_uri> ...`` (K8sJobMode: a submitter
    pod calls ``ray job submit``). Node selector and tolerations are the GPU nodes' and not applied.
    """
    s = settings or ClusterSettings()
    if s.ray_workers < 0:
        raise ValueError(f"ray_workers must be >= 0, got {s.ray_workers}")
    worker_cpus = _whole_cpus(s.ray_worker_cpu, "ray_worker_cpu")
    _whole_cpus(s.ray_head_cpu, "ray_head_cpu")
    name = name or job_name(cfg.name, "preprocess")
    env = _env(cfg) + [{"name": "RAY_AUTH_MODE", "value": "disabled"}]

    def pod(container_name: str, cpu: str, memory: str, ports: list[dict[str, Any]] | None = None) -> dict[str, Any]:
        container: dict[str, Any] = {
            "name": container_name,
            "image": s.image,
            "imagePullPolicy": "IfNotPresent",
            "env": env,
            "envFrom": _env_from(s),
            "resources": k8s.resources(cpu, memory),
        }
        if ports:
            container["ports"] = ports
        spec = k8s.pod_spec([container], scratch_size=s.scratch_size, shm_size=s.shm_size,
                            service_account=s.service_account)
        return {"metadata": {"labels": {**_LABELS, "medisyn/stage": "preprocess"}}, "spec": spec}

    cluster: dict[str, Any] = {
        "rayVersion": version("ray"),  # the image's Ray must match the cluster's
        "headGroupSpec": {
            # the head schedules no image work: num-cpus 0 keeps it responsive for the driver
            "rayStartParams": {"num-cpus": "0", "dashboard-host": "0.0.0.0"},
            "template": pod("ray-head", s.ray_head_cpu, s.ray_head_memory,
                            [{"containerPort": 6379, "name": "gcs"}, {"containerPort": 8265, "name": "dashboard"},
                             {"containerPort": 10001, "name": "client"}]),
        },
    }
    if s.ray_workers:
        cluster["workerGroupSpecs"] = [{
            "groupName": "preprocess",
            "replicas": s.ray_workers,
            "minReplicas": s.ray_workers,
            "maxReplicas": s.ray_workers,
            "rayStartParams": {"num-cpus": str(worker_cpus)},
            "template": pod("ray-worker", s.ray_worker_cpu, s.ray_worker_memory),
        }]
    submitter = {
        "name": "ray-job-submitter",
        "image": s.image,
        "imagePullPolicy": "IfNotPresent",
        "resources": k8s.resources(1, "1Gi"),
    }
    spec: dict[str, Any] = {
        "entrypoint": shlex.join(preprocess_command(config_uri, raw_uri, dataset_uri)),
        "shutdownAfterJobFinishes": True,
        "ttlSecondsAfterFinished": s.ttl_after_finished_s,
        "submissionMode": "K8sJobMode",
        "backoffLimit": 0,  # preprocess is idempotent; a failed run is rerun by the pipeline, not here
        "rayClusterSpec": cluster,
        "submitterPodTemplate": {
            "spec": k8s.pod_spec([submitter], scratch_size="1Gi", service_account=s.service_account,
                                 restart_policy="Never"),
        },
    }
    if s.active_deadline_s:
        spec["activeDeadlineSeconds"] = s.active_deadline_s
    return {
        "apiVersion": "ray.io/v1",
        "kind": "RayJob",
        "metadata": _metadata(cfg, name, s.resolved_namespace(), "preprocess"),
        "spec": spec,
    }


# ----------------------------------------------------------------------------------------------
# A run's training step: the kind chosen (medisyn.launch.discover_train_launcher), the name per run
# ----------------------------------------------------------------------------------------------
def render_training_job(launcher: str, cfg: RunConfig, config_uri: str, cache_uri: str, checkpoints_uri: str,
                        settings: ClusterSettings, run_tag: str) -> dict[str, Any]:
    """The TrainJob (``trainjob``) or PyTorchJob (``pytorchjob``) of one run's training step."""
    render = {"trainjob": render_trainjob, "pytorchjob": render_pytorchjob}[launcher]
    return render(cfg, config_uri, cache_uri, checkpoints_uri, settings,
                  name=job_name(cfg.name, "train-" + run_tag[-20:]))
