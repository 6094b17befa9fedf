"""Cluster launch: render, validate, submit, follow and always clean up the jobs MediSyn hands to operators.

Launchers (each reached through the stage runner, ``medisyn.stages.run``):

* ``trainjob``: training as a Kubeflow Trainer v2 ``TrainJob`` (``trainer.kubeflow.org/v1alpha1``,
  on JobSet). It names the chart's ``TrainingRuntime`` (charts/medisyn/templates/trainingruntime.yaml:
  torch, our image, the pod policy of :mod:`medisyn.k8s`) in ``spec.runtimeRef`` and sets nodes,
  processes per node, resources per node and the command in ``spec.trainer``. The default wherever
  the cluster serves the Trainer v2 API (:func:`discover_train_launcher`).
* ``pytorchjob``: training as a Training Operator v1 ``PyTorchJob`` (``kubeflow.org/v1``; deprecated
  upstream, kept for clusters that have not moved): one Master and ``num_nodes - 1`` Workers.
* ``rayjob``: preprocessing as a KubeRay ``RayJob`` (``ray.io/v1``): an ephemeral Ray cluster running
  ``medisyn preprocess`` with Ray Data, shut down when the job finishes (``shutdownAfterJobFinishes``,
  ``ttlSecondsAfterFinished``).
* ``local``: the step's own pod (no job; ``medisyn.stages``).

Every training pod runs ``medisyn train --config <config_uri> ... --nproc auto``: both operators set
``PET_NNODES`` / ``PET_NODE_RANK`` / ``PET_MASTER_ADDR`` / ``PET_MASTER_PORT`` / ``PET_NPROC_PER_NODE``,
which :mod:`medisyn.train.torchrun` reads to start torchrun with a static rendezvous. The run config
reaches every pod one way, as ``config_uri`` (``<run_uri>/config.yaml``); the S3 endpoint travels as
``MEDISYN_S3_ENDPOINT_URL`` because the pod needs it to read that config in the first place. Inside
the job the stage runner writes the stage's ``result.json``, which the launcher reads back.

One lifecycle for every kind (:func:`run_job`, issue #13):

1. validate against the operator's CRD (package data ``medisyn/crds``; a missing CRD is an error);
2. create, or adopt: the name is deterministic (run tag + stage), and the manifest carries the hash
   of its spec (annotation :data:`SPEC_HASH_ANNOTATION`). A job of that name with the same hash that
   has not failed is adopted (a retried step whose pod was evicted picks its job up again); a job with
   another hash, or one that failed, is deleted and created anew. Never two GPU jobs for one step;
3. watch it (list + watch from the listed ``resourceVersion``), logging every status change, and
   stream the lead pod's log lines into the step's log (logger ``medisyn.launch``);
4. stop at a deadline: ``activeDeadlineSeconds`` on the job (``ClusterSettings.active_deadline_s``,
   three days by default) and the same bound on the watch;
5. on failure, name the reason: the job's condition, the pods' container states (``OOMKilled``,
   ``ImagePullBackOff``, exit codes) and an NCCL timeout in the lead pod's last log lines; it goes
   into the raised :class:`JobFailed` and onto the active MLflow run (tag ``medisyn.job.failure_reason``);
6. delete the job (pods with it, ``propagationPolicy=Foreground``) on every exit path: success,
   failure, timeout, an error, and SIGTERM (a cancelled pipeline step), which raises
   :class:`JobCancelled` after the deletion.

The kubernetes Python client does the talking (``api_client`` is injectable; by default the
in-cluster config, else ``$KUBECONFIG`` / ``~/.kube/config``). Tests run all of it over HTTP against
a loopback server that speaks the Kubernetes API (tests/kube_api_server.py).
"""

from __future__ import annotations

import collections
import contextlib
import hashlib
import json
import logging
import os
import re
import shlex
import signal
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from importlib import resources
from importlib.metadata import version
from importlib.resources.abc import Traversable
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from medisyn import k8s
from medisyn.config import RunConfig

if TYPE_CHECKING:
    from kubernetes.client import ApiClient

    from medisyn.data.preprocess import PreprocessResult
    from medisyn.results import StageResult
    from medisyn.train.trainer import TrainResult

log = logging.getLogger("medisyn.launch")

#: The operators' CRDs, shipped as package data (medisyn/crds/*.yaml), by the kind they define.
CRD_FILES: dict[str, str] = {
    "PyTorchJob": "kubeflow.org_pytorchjobs.yaml",
    "RayJob": "ray.io_rayjobs.yaml",
    "TrainJob": "trainer.kubeflow.org_trainjobs.yaml",
    "TrainingRuntime": "trainer.kubeflow.org_trainingruntimes.yaml",
}
PYTORCHJOB_CRD = CRD_FILES["PyTorchJob"]
RAYJOB_CRD = CRD_FILES["RayJob"]
TRAINJOB_CRD = CRD_FILES["TrainJob"]

SERVICE_ACCOUNT_NAMESPACE_FILE = "/var/run/secrets/kubernetes.io/serviceaccount/namespace"
DEFAULT_DEADLINE_S = 3 * 24 * 3600  # the paper's 15 epochs on 8 GPUs take about a day; 3x that is a hung job
DEFAULT_TIMEOUT_S = 7 * 24 * 3600  # the step's own bound (pipeline parameter job_timeout_s)
DEADLINE_GRACE_S = 600  # the watch outlasts activeDeadlineSeconds by this much, so the operator's reason is seen
SPEC_HASH_ANNOTATION = "medisyn.io/spec-hash"
TRAINING_RUNTIME = "medisyn-torch"  # the chart's TrainingRuntime (charts/medisyn/templates/trainingruntime.yaml)
TRAIN_LAUNCHERS = ("auto", "trainjob", "pytorchjob")
_DNS1123 = re.compile(r"[^a-z0-9-]+")
_LABELS = {"app.kubernetes.io/part-of": "medisyn"}


class JobFailed(RuntimeError):
    """The operator reported the job as failed; the message carries the reason (:func:`failure_reason`)."""

    def __init__(self, message: str, reason: str = ""):
        super().__init__(message)
        self.reason = reason or message


class JobCancelled(BaseException):
    """The step got SIGTERM (a cancelled pipeline run); its job was deleted first.

    A ``BaseException``, like ``KeyboardInterrupt``: no ``except Exception`` on the way (the
    kubernetes client's, urllib3's) may swallow a cancellation.
    """


@dataclass(frozen=True)
class ClusterSettings:
    """Where and how a job runs on the cluster; the pipeline fills it from its parameters."""

    namespace: str = ""                      # "" = the namespace of the pod we run in, else "default"
    image: str = "ghcr.io/medisyn/medisyn-trainer:0.1.0"  # the project image (docker/Dockerfile.trainer)
    service_account: str | None = None       # pod service account (S3 access via IRSA/workload identity)
    num_nodes: int = 1                       # training nodes (TrainJob numNodes; PyTorchJob 1 Master + N-1 Workers)
    gpus_per_node: int = 1                   # nvidia.com/gpu per node = torchrun processes per node; 0 = CPU-only
    cpu: str = "8"                           # CPU request = limit per node
    memory: str = "64Gi"                     # memory request = limit per node
    shm_size: str = "16Gi"                   # /dev/shm (NCCL, dataloader workers, Ray's object store)
    scratch_size: str = "100Gi"              # emptyDir at /scratch (TMPDIR, HF_HOME, the latent cache copy)
    node_selector: dict[str, str] = field(default_factory=dict)   # training pods only, e.g. the GPU nodes
    tolerations: list[dict[str, Any]] = field(default_factory=list)  # training pods only, e.g. the GPU taint
    env_secrets: tuple[str, ...] = ("medisyn-s3", "medisyn-mlflow")  # Secrets mapped into env (optional)
    nccl_socket_ifname: str | None = None    # NCCL_SOCKET_IFNAME when the pod has several interfaces
    training_runtime: str = TRAINING_RUNTIME  # TrainJob: the TrainingRuntime in the job's namespace (the chart's)
    ray_workers: int = 2                     # RayJob worker replicas (preprocessing)
    ray_worker_cpu: str = "8"                # CPU per Ray worker (whole CPUs: Ray's num-cpus)
    ray_worker_memory: str = "32Gi"          # memory per Ray worker
    ray_head_cpu: str = "2"                  # the Ray head runs the driver only (num-cpus 0)
    ray_head_memory: str = "8Gi"
    active_deadline_s: int | None = DEFAULT_DEADLINE_S  # the operator kills the job after this; None = no limit
    backoff_limit: int = 2                   # operator-level retries of a failed PyTorchJob
    ttl_after_finished_s: int = 3600         # garbage-collect finished jobs after this many seconds
    image_pull_grace_s: int = 600            # a pod stuck in ImagePullBackOff this long fails the step

    @classmethod
    def from_dict(cls, data: dict[str, Any] | None) -> ClusterSettings:
        data = dict(data or {})
        unknown = set(data) - set(cls.__dataclass_fields__)
        if unknown:
            raise ValueError(f"unknown cluster setting(s): {sorted(unknown)}")
        if "env_secrets" in data:
            data["env_secrets"] = tuple(data["env_secrets"])
        return cls(**data)

    @classmethod
    def from_pipeline(cls, cluster_json: str, image: str = "") -> ClusterSettings:
        """From the pipeline's ``cluster_json`` parameter, with ``image`` (when set) as the job image."""
        data = json.loads(cluster_json or "{}")
        if image:
            data["image"] = image
        return cls.from_dict(data)

    def resolved_namespace(self) -> str:
        if self.namespace:
            return self.namespace
        try:
            return Path(SERVICE_ACCOUNT_NAMESPACE_FILE).read_text().strip() or "default"
        except OSError:
            return "default"

    def watch_timeout_s(self, step_timeout_s: float | None) -> float:
        """How long the launcher follows a job: the step's bound, and at most the job's deadline + grace."""
        bounds = [float(step_timeout_s)] if step_timeout_s else []
        if self.active_deadline_s:
            bounds.append(float(self.active_deadline_s + DEADLINE_GRACE_S))
        return min(bounds) if bounds else float(DEFAULT_TIMEOUT_S)


def job_name(prefix: str, suffix: str) -> str:
    """A DNS-1123 name <= 63 chars: ``prefix-suffix`` lower-cased, invalid characters dashed."""
    name = _DNS1123.sub("-", f"{prefix}-{suffix}".lower()).strip("-")
    return name[:63].rstrip("-")


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
# Validation against the operators' CRDs (offline, from package data)
# ----------------------------------------------------------------------------------------------
_CRD_CACHE: dict[str, dict[str, Any]] = {}


def crd_resource(kind: str) -> Traversable:
    """The packaged CRD file of ``kind``; ``FileNotFoundError`` when the installation lacks it."""
    filename = CRD_FILES.get(kind)
    if filename is None:
        raise ValueError(f"no packaged CRD for kind {kind!r}; known: {sorted(CRD_FILES)}")
    res = resources.files("medisyn").joinpath("crds", filename)
    if not res.is_file():
        raise FileNotFoundError(f"the {kind} CRD {filename} is missing from the installed medisyn package "
                                "(package data medisyn/crds): reinstall medisyn")
    return res


def _load_crd(crd: Traversable | str | os.PathLike[str]) -> dict[str, Any]:
    import yaml

    key = str(crd)
    if key not in _CRD_CACHE:
        text = Path(crd).read_text() if isinstance(crd, (str, os.PathLike)) else crd.read_text()
        # the CRDs are MBs of YAML: the C loader reads them ~10x faster when PyYAML has it
        loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
        _CRD_CACHE[key] = yaml.load(text, Loader=loader)
    return _CRD_CACHE[key]


def validate_against_crd(manifest: dict[str, Any], crd: Traversable | str | os.PathLike[str] | None = None) -> None:
    """Raise ``ValueError`` listing every violation of ``manifest`` against its CRD's OpenAPI schema.

    ``crd`` defaults to the packaged CRD of the manifest's kind (:func:`crd_resource`). Checks that
    apiVersion and kind match a served version of the CRD, then validates the whole object with
    jsonschema.
    """
    import jsonschema

    kind = str(manifest.get("kind"))
    source = crd if crd is not None else crd_resource(kind)
    doc = _load_crd(source)
    names, group = doc["spec"]["names"], doc["spec"]["group"]
    if kind != names["kind"]:
        raise ValueError(f"kind {kind!r} does not match the CRD's kind {names['kind']!r}")
    api_version = str(manifest.get("apiVersion", ""))
    grp, _, ver = api_version.rpartition("/")
    versions = {v["name"]: v for v in doc["spec"]["versions"] if v.get("served", True)}
    if grp != group or ver not in versions:
        raise ValueError(f"apiVersion {api_version!r} is not served by this CRD ({group}/{'|'.join(versions)})")
    schema = versions[ver]["schema"]["openAPIV3Schema"]
    meta = manifest.get("metadata") or {}
    if not meta.get("name"):
        raise ValueError("metadata.name is required")
    validator = jsonschema.Draft7Validator(schema)
    errors = sorted(validator.iter_errors(manifest), key=lambda e: [str(p) for p in e.absolute_path])
    if errors:
        lines = [f"{kind} {meta.get('name')} is invalid against {Path(str(source)).name}:"]
        for e in errors[:20]:
            path = ".".join(str(p) for p in e.absolute_path) or "<root>"
            lines.append(f"  {path}: {e.message[:300]}")
        raise ValueError("\n".join(lines))



# ----------------------------------------------------------------------------------------------
# The operators, as the launcher sees them: where the job lives, which pods are its, its state
# ----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class JobKind:
    kind: str
    group: str
    version: str
    plural: str
    pod_selector: str  # label selector of the job's pods, formatted with the job's name
    lead_labels: dict[str, str]  # among those, the labels of the lead pod (whose log is the step's log)
    container: str  # the lead pod's container that runs our command


JOB_KINDS: dict[str, JobKind] = {k.kind: k for k in (
    # JobSet names its child Jobs' pods; the lead is completion index 0 of the "node" replicated job
    JobKind("TrainJob", "trainer.kubeflow.org", "v1alpha1", "trainjobs", "jobset.sigs.k8s.io/jobset-name={name}",
            {"batch.kubernetes.io/job-completion-index": "0"}, "node"),
    JobKind("PyTorchJob", "kubeflow.org", "v1", "pytorchjobs", "training.kubeflow.org/job-name={name}",
            {"training.kubeflow.org/replica-type": "master"}, "pytorch"),
    # K8sJobMode: the submitter is a batch Job of the RayJob's name; its pod carries the driver's log
    JobKind("RayJob", "ray.io", "v1", "rayjobs", "batch.kubernetes.io/job-name={name}", {}, "ray-job-submitter"),
)}
#: (group, version, plural) per kind, for the CustomObjectsApi.
RESOURCES: dict[str, tuple[str, str, str]] = {k: (j.group, j.version, j.plural) for k, j in JOB_KINDS.items()}


def job_state(kind: str, obj: dict[str, Any]) -> tuple[str, str]:
    """('running'|'succeeded'|'failed', reason) from a TrainJob, PyTorchJob or RayJob status."""
    status = obj.get("status") or {}
    if kind == "RayJob":
        job_status = status.get("jobStatus", "")
        deploy = status.get("jobDeploymentStatus", "")
        reason = status.get("message") or status.get("reason") or f"{deploy}/{job_status}"
        if job_status == "SUCCEEDED":
            return "succeeded", reason
        if job_status in ("FAILED", "STOPPED") or deploy in ("Failed", "ValidationFailed"):
            return "failed", f"{status.get('reason') or deploy}: {status.get('message') or job_status}".strip(": ")
        return "running", reason
    # TrainJob: Created/Suspended/Complete/Failed; Training Operator: Created/Running/Restarting/Succeeded/Failed
    done = {"Complete": "succeeded", "Succeeded": "succeeded", "Failed": "failed"}
    last = ""
    for cond in status.get("conditions") or []:
        if cond.get("status") != "True":
            continue
        text = f"{cond.get('type')}: {cond.get('reason', '')} {cond.get('message', '')}".strip()
        if cond.get("type") in done:
            return done[cond["type"]], text
        last = text
    return "running", last


# ----------------------------------------------------------------------------------------------
# Failure reasons: the job's condition, the pods' container states, the lead pod's last log lines
# ----------------------------------------------------------------------------------------------
_FATAL_WAITING = ("ErrImagePull", "ImagePullBackOff", "InvalidImageName", "CreateContainerConfigError")
_NCCL_TIMEOUT = re.compile(r"(NCCL|ProcessGroupNCCL|c10d).*(timeout|timed out|Timeout)|Watchdog caught collective")


def pod_problems(pods: list[dict[str, Any]]) -> list[str]:
    """One line per container that ended badly or cannot start: ``<pod>/<container>: OOMKilled (exit 137)``."""
    problems: list[str] = []
    for pod in pods:
        pname = (pod.get("metadata") or {}).get("name", "?")
        status = pod.get("status") or {}
        for cs in (status.get("initContainerStatuses") or []) + (status.get("containerStatuses") or []):
            for key in ("state", "lastState"):
                state = cs.get(key) or {}
                term, waiting = state.get("terminated"), state.get("waiting")
                if term and (term.get("exitCode") or 0) != 0:
                    what = term.get("reason") or "Error"
                    msg = f" {term['message'].strip()[:200]}" if term.get("message") else ""
                    problems.append(f"{pname}/{cs.get('name')}: {what} (exit {term.get('exitCode')}){msg}")
                    break
                if waiting and waiting.get("reason") in _FATAL_WAITING:
                    msg = f" {waiting['message'][:200]}" if waiting.get("message") else ""
                    problems.append(f"{pname}/{cs.get('name')}: {waiting['reason']}{msg}")
                    break
        if status.get("reason") == "Evicted":
            problems.append(f"{pname}: Evicted {status.get('message', '')}".strip())
    return list(dict.fromkeys(problems))


def failure_reason(condition: str, pods: list[dict[str, Any]], last_lines: list[str]) -> str:
    """The reason a job failed, most specific first: pod problems, an NCCL timeout, the job's condition."""
    parts = pod_problems(pods)
    nccl = [ln for ln in last_lines if _NCCL_TIMEOUT.search(ln)]
    if nccl:
        parts.append(f"NCCL timeout: {nccl[-1].strip()[:300]}")
    if condition:
        parts.append(condition)
    return "; ".join(parts) or "no reason reported"


def _tag_failure(reason: str, kind: str, name: str) -> None:
    """Put the reason on the active MLflow run (the launcher's stage run), when there is one."""
    try:
        import mlflow

        if mlflow.active_run() is not None:
            mlflow.set_tags({"medisyn.job.failure_reason": reason[:5000], "medisyn.job": f"{kind}/{name}"})
    except Exception as exc:  # noqa: BLE001 - bookkeeping must not hide the job's own failure
        log.warning("could not tag the MLflow run with the failure reason: %s", exc)


# ----------------------------------------------------------------------------------------------
# The one job runner (every kind): create or adopt, watch, stream logs, deadline, always delete
# ----------------------------------------------------------------------------------------------
def api_client() -> ApiClient:
    """A client from the in-cluster config, else ``$KUBECONFIG`` / ~/.kube/config (read now, not at import)."""
    from kubernetes import client, config

    configuration = client.Configuration()
    try:
        config.load_incluster_config(client_configuration=configuration)
    except config.ConfigException:
        config.load_kube_config(config_file=os.environ.get("KUBECONFIG") or None, client_configuration=configuration)
    return client.ApiClient(configuration)


def spec_hash(manifest: dict[str, Any]) -> str:
    """sha256 of what defines the job (kind, spec, labels): equal hashes = the same job."""
    meta = manifest.get("metadata") or {}
    blob = json.dumps({"apiVersion": manifest.get("apiVersion"), "kind": manifest.get("kind"),
                       "labels": meta.get("labels") or {}, "spec": manifest.get("spec")}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()


class _LogFollower(threading.Thread):
    """Follows the lead pod's log into the step's log; keeps the last lines for the failure reason."""

    def __init__(self, core: Any, kind: JobKind, name: str, namespace: str):
        super().__init__(name=f"logs-{name}", daemon=True)
        self.core, self.kind, self.job, self.ns = core, kind, name, namespace
        self.last_lines: collections.deque[str] = collections.deque(maxlen=50)
        self.stop = threading.Event()
        self._followed: set[str] = set()

    def _lead_pod(self) -> dict[str, Any] | None:
        pods = _list_pods(self.core, self.kind, self.job, self.ns)
        lead = [p for p in pods if all((p["metadata"].get("labels") or {}).get(k) == v
                                       for k, v in self.kind.lead_labels.items())]
        return lead[0] if lead else None

    def _stream(self, pod: str, follow: bool) -> None:
        resp = self.core.read_namespaced_pod_log(pod, self.ns, container=self.kind.container, follow=follow,
                                                 _preload_content=False)
        buf = b""
        try:
            for chunk in resp.stream(4096):
                buf += chunk
                *lines, buf = buf.split(b"\n")
                for raw in lines:
                    self._emit(pod, raw)
            if buf:
                self._emit(pod, buf)
        finally:
            resp.release_conn()

    def _emit(self, pod: str, raw: bytes) -> None:
        line = raw.decode(errors="replace").rstrip("\r")
        self.last_lines.append(line)
        log.info("[%s] %s", pod, line)

    def run(self) -> None:
        while True:
            stopping = self.stop.is_set()
            try:
                pod = self._lead_pod()
                name = pod["metadata"]["name"] if pod else None
                started = pod is not None and (pod.get("status") or {}).get("phase") not in (None, "Pending")
                if name and name not in self._followed and (started or stopping):
                    self._followed.add(name)
                    self._stream(name, follow=not stopping)
            except Exception as exc:  # noqa: BLE001 - a pod that went away, a dropped stream: logs are best effort
                log.debug("log stream of %s/%s: %s", self.ns, self.job, exc)
            if stopping:
                return
            self.stop.wait(1.0)  # once stopped, one last pass reads what a not yet followed lead pod wrote


def _list_pods(core: Any, kind: JobKind, name: str, namespace: str) -> list[dict[str, Any]]:
    resp = core.list_namespaced_pod(namespace, label_selector=kind.pod_selector.format(name=name),
                                    _preload_content=False)
    return list(json.loads(resp.data).get("items") or [])


@contextlib.contextmanager
def _sigterm_raises() -> Iterator[None]:
    """SIGTERM (Kubernetes stopping a cancelled step's pod) raises :class:`JobCancelled` in the main
    thread, so the ``finally`` that deletes the job runs. Elsewhere (a worker thread) nothing changes."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def cancel(signum: int, frame: Any) -> None:
        raise JobCancelled(f"the step was cancelled (signal {signum})")

    previous = signal.signal(signal.SIGTERM, cancel)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


class JobRunner:
    """One job's lifecycle (see the module docstring); :func:`run_job` is the entry point."""

    def __init__(self, manifest: dict[str, Any], client: ApiClient | None = None, watch_s: float = 60.0,
                 image_pull_grace_s: float = 600.0):
        from kubernetes import client as k8s_client

        self.manifest = manifest
        self.kind = JOB_KINDS[manifest["kind"]]
        self.name = manifest["metadata"]["name"]
        self.ns = manifest["metadata"].get("namespace") or "default"
        self.client = client or api_client()
        self.custom = k8s_client.CustomObjectsApi(self.client)
        self.core = k8s_client.CoreV1Api(self.client)
        self.watch_s = watch_s
        self.image_pull_grace_s = image_pull_grace_s
        self.what = f"{self.kind.kind} {self.ns}/{self.name}"

    # -- API calls ---------------------------------------------------------------------------
    def _get(self) -> dict[str, Any] | None:
        from kubernetes.client.exceptions import ApiException

        k = self.kind
        try:
            obj: dict[str, Any] = self.custom.get_namespaced_custom_object(k.group, k.version, self.ns, k.plural,
                                                                          self.name)
            return obj
        except ApiException as exc:
            if exc.status == 404:
                return None
            raise

    def delete(self, wait_s: float = 120.0) -> bool:
        """Delete the job and its pods (foreground); wait until it is gone. False when it did not exist."""
        from kubernetes.client.exceptions import ApiException

        k = self.kind
        try:
            self.custom.delete_namespaced_custom_object(k.group, k.version, self.ns, k.plural, self.name,
                                                        propagation_policy="Foreground")
        except ApiException as exc:
            if exc.status == 404:
                return False
            raise
        log.info("deleted %s", self.what)
        end = time.monotonic() + wait_s
        while self._get() is not None and time.monotonic() < end:
            time.sleep(0.5)
        return True

    def create_or_adopt(self) -> dict[str, Any]:
        """Create the job; adopt an existing one with the same spec hash that has not failed; replace others."""
        from kubernetes.client.exceptions import ApiException

        k = self.kind
        want = spec_hash(self.manifest)
        body = json.loads(json.dumps(self.manifest))
        body["metadata"].setdefault("annotations", {})[SPEC_HASH_ANNOTATION] = want
        for _attempt in range(3):
            try:
                created: dict[str, Any] = self.custom.create_namespaced_custom_object(
                    k.group, k.version, self.ns, k.plural, body)
                log.info("created %s (spec %s)", self.what, want[:12])
                return created
            except ApiException as exc:
                if exc.status != 409:
                    raise
            existing = self._get()
            if existing is None:
                continue  # deleted in between: create again
            have = ((existing.get("metadata") or {}).get("annotations") or {}).get(SPEC_HASH_ANNOTATION)
            state, reason = job_state(k.kind, existing)
            if have == want and state != "failed":
                log.info("adopting the existing %s (same spec %s, %s)", self.what, want[:12], state)
                return existing
            log.info("replacing the existing %s (%s)", self.what,
                     f"spec {str(have)[:12]} != {want[:12]}" if have != want else f"it failed: {reason}")
            self.delete()
        raise RuntimeError(f"could not create {self.what}: it kept coming back after deletion")

    # -- watching ----------------------------------------------------------------------------
    def _events(self, resource_version: str, timeout_s: float) -> Iterator[tuple[str, dict[str, Any]]]:
        from kubernetes import watch

        k = self.kind
        w = watch.Watch()
        try:
            for event in w.stream(self.custom.list_namespaced_custom_object, k.group, k.version, self.ns, k.plural,
                                  field_selector=f"metadata.name={self.name}", resource_version=resource_version,
                                  timeout_seconds=max(1, int(timeout_s)), allow_watch_bookmarks=False):
                yield event["type"], event["object"]
        finally:
            w.stop()

    def _stuck_pulling(self, first_seen: dict[str, float]) -> str | None:
        """A pod that cannot pull its image for longer than the grace: the job would never start."""
        now = time.monotonic()
        stuck = [p for p in pod_problems(_list_pods(self.core, self.kind, self.name, self.ns))
                 if any(r in p for r in _FATAL_WAITING)]
        for p in stuck:
            first_seen.setdefault(p, now)
        late = [p for p in stuck if now - first_seen[p] >= self.image_pull_grace_s]
        return "; ".join(late) if late else None

    def wait(self, timeout_s: float, logs: _LogFollower) -> dict[str, Any]:
        """Follow the job until it succeeds (returns it) or fails (:class:`JobFailed`); TimeoutError past
        the deadline."""
        from kubernetes.client.exceptions import ApiException

        deadline = time.monotonic() + timeout_s
        last: tuple[str, str] | None = None
        pulling: dict[str, float] = {}
        obj = self._get()
        while True:
            if obj is None:
                raise JobFailed(f"{self.what} was deleted by someone else", "deleted")
            state, reason = job_state(self.kind.kind, obj)
            if (state, reason) != last:
                log.info("%s: %s %s", self.what, state, reason)
                last = (state, reason)
            if state == "succeeded":
                return obj
            if state == "failed":
                logs.stop.set()
                logs.join(timeout=30)
                pods = _list_pods(self.core, self.kind, self.name, self.ns)
                why = failure_reason(reason, pods, list(logs.last_lines))
                raise JobFailed(f"{self.what} failed: {why}", why)
            stuck = self._stuck_pulling(pulling)
            if stuck:
                raise JobFailed(f"{self.what} cannot start: {stuck}", stuck)
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError(f"{self.what} did not finish within {timeout_s:.0f}s")
            rv = (obj.get("metadata") or {}).get("resourceVersion") or ""
            try:
                for etype, eobj in self._events(rv, min(self.watch_s, remaining)):
                    if etype == "DELETED":
                        obj = None
                        break
                    if etype in ("ADDED", "MODIFIED"):
                        obj = eobj
                        if job_state(self.kind.kind, obj) != last:
                            break
                else:
                    obj = self._get()  # the watch window ended: re-read (also covers a 410 Gone resync)
            except ApiException as exc:
                if exc.status != 410:
                    raise
                obj = self._get()

    def run(self, timeout_s: float) -> dict[str, Any]:
        with _sigterm_raises():
            logs = _LogFollower(self.core, self.kind, self.name, self.ns)
            try:
                self.create_or_adopt()
                logs.start()
                done = self.wait(timeout_s, logs)
                logs.stop.set()
                logs.join(timeout=30)  # the lead pod has exited: its stream ends with its last line
                return done
            except JobFailed as exc:
                _tag_failure(exc.reason, self.kind.kind, self.name)
                raise
            except (TimeoutError, JobCancelled) as exc:
                _tag_failure(str(exc), self.kind.kind, self.name)
                raise
            finally:
                logs.stop.set()
                # every exit path: success, failure, deadline, error, SIGTERM (a second one waits for this)
                with _ignore_sigterm():
                    try:
                        self.delete()
                    except Exception as exc:  # noqa: BLE001 - report, but keep the original outcome
                        log.error("could not delete %s: %s (delete it by hand)", self.what, exc)


@contextlib.contextmanager
def _ignore_sigterm() -> Iterator[None]:
    """While the job is being deleted a second SIGTERM must not interrupt the deletion."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, signal.SIG_IGN)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def run_job(manifest: dict[str, Any], timeout_s: float | None = None, *, api_client: ApiClient | None = None,
            watch_s: float = 60.0, image_pull_grace_s: float = 600.0) -> dict[str, Any]:
    """Validate, create or adopt, follow and delete one job (module docstring); returns its final object.

    ``timeout_s`` defaults to the job's ``activeDeadlineSeconds`` + :data:`DEADLINE_GRACE_S`.
    Raises :class:`JobFailed` (with the reason), ``TimeoutError`` or :class:`JobCancelled`; the
    job is deleted in every case.
    """
    if timeout_s is None:
        deadline = (manifest.get("spec") or {}).get("activeDeadlineSeconds")
        timeout_s = float(deadline + DEADLINE_GRACE_S) if deadline else float(DEFAULT_TIMEOUT_S)
    if manifest.get("kind") not in JOB_KINDS:
        raise ValueError(f"cannot run kind {manifest.get('kind')!r}; known: {sorted(JOB_KINDS)}")
    validate_against_crd(manifest)
    runner = JobRunner(manifest, api_client, watch_s=watch_s, image_pull_grace_s=image_pull_grace_s)
    return runner.run(timeout_s)


# ----------------------------------------------------------------------------------------------
# Which training API the cluster serves
# ----------------------------------------------------------------------------------------------
def served_kinds(client: ApiClient | None = None) -> set[str]:
    """The job kinds the cluster serves, from API discovery (``/apis`` and each group-version)."""
    from kubernetes import client as k8s_client
    from kubernetes.client.exceptions import ApiException

    client = client or api_client()
    groups = k8s_client.ApisApi(client).get_api_versions().groups or []
    versions = {(g.name, v.version) for g in groups for v in (g.versions or [])}
    served: set[str] = set()
    for kind in JOB_KINDS.values():
        if (kind.group, kind.version) not in versions:
            continue
        try:
            resources = k8s_client.CustomObjectsApi(client).get_api_resources(kind.group, kind.version)
        except ApiException:
            continue
        if kind.plural in {r.name for r in (resources.resources or [])}:
            served.add(kind.kind)
    return served


def discover_train_launcher(launcher: str = "auto", client: ApiClient | None = None) -> str:
    """``trainjob`` or ``pytorchjob``: as asked, or (``auto``) TrainJob where Trainer v2 is served."""
    if launcher not in TRAIN_LAUNCHERS:
        raise ValueError(f"train launcher must be one of {', '.join(TRAIN_LAUNCHERS)}, got {launcher!r}")
    if launcher != "auto":
        return launcher
    served = served_kinds(client)
    if "TrainJob" in served:
        return "trainjob"
    if "PyTorchJob" in served:
        log.warning("Kubeflow Trainer v2 (TrainJob) is not served by this cluster: using the deprecated "
                    "Training Operator v1 (PyTorchJob)")
        return "pytorchjob"
    raise RuntimeError("the cluster serves neither TrainJob (trainer.kubeflow.org/v1alpha1) nor PyTorchJob "
                       "(kubeflow.org/v1): install Kubeflow Trainer v2 (docs/deploy.md)")


# ----------------------------------------------------------------------------------------------
# Stages on the cluster: name, render, run the job, read the stage's result back
# ----------------------------------------------------------------------------------------------
R = TypeVar("R", bound="StageResult")


def _run_and_read(manifest: dict[str, Any], result_type: type[R], prefix_uri: str, timeout_s: float,
                  client: ApiClient | None, watch_s: float, image_pull_grace_s: float) -> R:
    """Run the job to completion, then read the result its stage runner stored at ``prefix_uri``."""
    from medisyn.results import ResultError

    run_job(manifest, timeout_s=timeout_s, api_client=client, watch_s=watch_s,
            image_pull_grace_s=image_pull_grace_s)
    try:
        return result_type.load(prefix_uri)
    except ResultError as exc:
        raise RuntimeError(f"{manifest['kind']} {manifest['metadata']['name']} succeeded but its stage result "
                           f"cannot be read: {exc}") from exc


def preprocess_on_cluster(cfg: RunConfig, config_uri: str, raw_uri: str, dataset_uri: str, settings: ClusterSettings,
                          run_tag: str, timeout_s: float | None = None, client: ApiClient | None = None, *,
                          watch_s: float = 60.0) -> PreprocessResult:
    """Run ``medisyn preprocess`` as a RayJob and return the :class:`PreprocessResult` it stored.

    ``run_tag`` (the run's folder name) makes the job name unique per run and deterministic per
    step (a rerun adopts or replaces it); ``config_uri`` is the run's stored config, which the
    job's pods read. Storage must be configured (the stage runner does it).
    """
    from medisyn.data.preprocess import PreprocessResult

    manifest = render_rayjob(cfg, config_uri, raw_uri, dataset_uri, settings,
                             name=job_name(cfg.name, "preprocess-" + run_tag[-20:]))
    return _run_and_read(manifest, PreprocessResult, dataset_uri, settings.watch_timeout_s(timeout_s), client,
                         watch_s, settings.image_pull_grace_s)


def render_training_job(launcher: str, cfg: RunConfig, config_uri: str, cache_uri: str, checkpoints_uri: str,
                        settings: ClusterSettings, run_tag: str) -> dict[str, Any]:
    """The TrainJob (``trainjob``) or PyTorchJob (``pytorchjob``) of one run's training step."""
    render = {"trainjob": render_trainjob, "pytorchjob": render_pytorchjob}[launcher]
    return render(cfg, config_uri, cache_uri, checkpoints_uri, settings,
                  name=job_name(cfg.name, "train-" + run_tag[-20:]))


def train_on_cluster(cfg: RunConfig, config_uri: str, cache_uri: str, checkpoints_uri: str, settings: ClusterSettings,
                     run_tag: str, timeout_s: float | None = None, client: ApiClient | None = None, *,
                     launcher: str = "auto", watch_s: float = 60.0) -> TrainResult:
    """Run ``medisyn train`` as a TrainJob or PyTorchJob (``launcher``; ``auto`` = discovered) and return
    the :class:`TrainResult` its node rank 0 stored at ``<checkpoints_uri>/result.json``."""
    from medisyn.train.trainer import TrainResult

    client = client or api_client()
    kind = discover_train_launcher(launcher, client)
    manifest = render_training_job(kind, cfg, config_uri, cache_uri, checkpoints_uri, settings, run_tag)
    return _run_and_read(manifest, TrainResult, checkpoints_uri, settings.watch_timeout_s(timeout_s), client,
                         watch_s, settings.image_pull_grace_s)
