"""Cluster launch: render, validate, submit and watch the jobs MediSyn hands to Kubernetes operators.

* Training runs as a ``PyTorchJob`` (Kubeflow Training Operator, ``kubeflow.org/v1``): one Master and
  ``num_nodes - 1`` Workers, ``gpus_per_node`` GPUs each. Every replica runs the same command,
  ``medisyn train --config <config_uri> --cache ... --checkpoints ... --nproc auto``: the operator
  sets ``PET_NNODES`` / ``PET_NODE_RANK`` / ``PET_MASTER_ADDR`` / ``PET_MASTER_PORT`` and
  ``PET_NPROC_PER_NODE`` (from ``spec.nprocPerNode``), which :mod:`medisyn.train.torchrun` reads to
  start torchrun with a static rendezvous on the master pod.
* Preprocessing runs as a ``RayJob`` (KubeRay, ``ray.io/v1``): an ephemeral Ray cluster that runs
  ``medisyn preprocess --config <config_uri> --raw ... --out ...`` with Ray Data (KubeRay sets
  ``RAY_ADDRESS``, so the stage joins that cluster) and is torn down when the job finishes.

The run config reaches every pod one way: as ``config_uri`` (the pipeline stores the resolved config
once at ``<run_uri>/config.yaml``), read by ``--config``. The S3 endpoint travels as
``MEDISYN_S3_ENDPOINT_URL`` because the pod needs it to read that config in the first place.
Inside the job the stage runner writes the stage's ``result.json`` into its output prefix;
:func:`preprocess_on_cluster` and :func:`train_on_cluster` submit, wait and read it back.

Every pod spec comes from :func:`medisyn.k8s.pod_spec` (non-root, read-only root filesystem,
writable emptyDirs). There is no API server on CI machines: the tests render every manifest and
validate it against the operators' own CRD schemas, shipped in this package (``medisyn/crds``);
:func:`run_job` validates before every submission, and a missing CRD is an error, never a skip.
:func:`submit` and :func:`wait_for_job` take an injectable client.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shlex
import shutil
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from importlib import resources
from importlib.metadata import version
from importlib.resources.abc import Traversable
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

from medisyn import k8s
from medisyn.config import RunConfig

if TYPE_CHECKING:
    from medisyn.data.preprocess import PreprocessResult
    from medisyn.results import StageResult
    from medisyn.train.trainer import TrainResult

log = logging.getLogger("medisyn.launch")

#: The operators' CRDs, shipped as package data (medisyn/crds/*.yaml), by the kind they define.
CRD_FILES: dict[str, str] = {
    "PyTorchJob": "kubeflow.org_pytorchjobs.yaml",
    "RayJob": "ray.io_rayjobs.yaml",
    "TrainJob": "trainer.kubeflow.org_trainjobs.yaml",
}
PYTORCHJOB_CRD = CRD_FILES["PyTorchJob"]
RAYJOB_CRD = CRD_FILES["RayJob"]

#: (group, version, plural) per kind, for the CustomObjectsApi.
RESOURCES: dict[str, tuple[str, str, str]] = {
    "PyTorchJob": ("kubeflow.org", "v1", "pytorchjobs"),
    "RayJob": ("ray.io", "v1", "rayjobs"),
}
SERVICE_ACCOUNT_NAMESPACE_FILE = "/var/run/secrets/kubernetes.io/serviceaccount/namespace"
DEFAULT_TIMEOUT_S = 7 * 24 * 3600
_DNS1123 = re.compile(r"[^a-z0-9-]+")
_LABELS = {"app.kubernetes.io/part-of": "medisyn"}


class JobFailed(RuntimeError):
    """The operator reported the job as failed (the message carries its last condition)."""


class CustomObjectsApi(Protocol):
    """The two calls of ``kubernetes.client.CustomObjectsApi`` this module makes (tests pass a fake)."""

    def create_namespaced_custom_object(self, group: str, version: str, namespace: str, plural: str,
                                        body: dict[str, Any]) -> dict[str, Any]: ...

    def get_namespaced_custom_object(self, group: str, version: str, namespace: str, plural: str,
                                     name: str) -> dict[str, Any]: ...


@dataclass(frozen=True)
class ClusterSettings:
    """Where and how a job runs on the cluster; the pipeline fills it from its parameters."""

    namespace: str = ""                      # "" = the namespace of the pod we run in, else "default"
    image: str = "ghcr.io/medisyn/medisyn-trainer:0.1.0"  # the project image (docker/Dockerfile.trainer)
    service_account: str | None = None       # pod service account (S3 access via IRSA/workload identity)
    num_nodes: int = 1                       # PyTorchJob replicas (1 Master + num_nodes-1 Workers)
    gpus_per_node: int = 1                   # nvidia.com/gpu per replica = torchrun processes per node
    cpu: str = "8"                           # CPU request = limit per replica
    memory: str = "64Gi"                     # memory request = limit per replica
    shm_size: str = "16Gi"                   # /dev/shm (NCCL, dataloader workers, Ray's object store)
    scratch_size: str = "100Gi"              # emptyDir at /scratch (TMPDIR, HF_HOME, the latent cache copy)
    node_selector: dict[str, str] = field(default_factory=dict)   # PyTorchJob only, e.g. the GPU nodes
    tolerations: list[dict[str, Any]] = field(default_factory=list)  # PyTorchJob only, e.g. the GPU taint
    env_secrets: tuple[str, ...] = ("medisyn-s3", "medisyn-mlflow")  # Secrets mapped into env (optional)
    nccl_socket_ifname: str | None = None    # NCCL_SOCKET_IFNAME when the pod has several interfaces
    ray_workers: int = 2                     # RayJob worker replicas (preprocessing)
    ray_worker_cpu: str = "8"                # CPU per Ray worker (whole CPUs: Ray's num-cpus)
    ray_worker_memory: str = "32Gi"          # memory per Ray worker
    ray_head_cpu: str = "2"                  # the Ray head runs the driver only (num-cpus 0)
    ray_head_memory: str = "8Gi"
    active_deadline_s: int | None = None     # kill the job after this many seconds (None = no limit)
    backoff_limit: int = 2                   # operator-level retries of a failed PyTorchJob
    ttl_after_finished_s: int = 3600         # garbage-collect finished jobs after this many seconds

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


def job_name(prefix: str, suffix: str) -> str:
    """A DNS-1123 name <= 63 chars: ``prefix-suffix`` lower-cased, invalid characters dashed."""
    name = _DNS1123.sub("-", f"{prefix}-{suffix}".lower()).strip("-")
    return name[:63].rstrip("-")


# ----------------------------------------------------------------------------------------------
# In-pod commands: the same `medisyn <stage> --config <config_uri>` a user types
# ----------------------------------------------------------------------------------------------
def trainer_command(config_uri: str, cache_uri: str, checkpoints_uri: str) -> list[str]:
    """The command of every PyTorchJob replica.

    ``--nproc auto`` takes ``PET_NPROC_PER_NODE`` and the node topology from the operator's ``PET_*``
    variables (:mod:`medisyn.train.torchrun`), so Master and Workers run the same command; the stage
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


def _env_from(settings: ClusterSettings) -> list[dict[str, Any]]:
    # optional: a cluster using IRSA / workload identity has no S3 key Secret
    return [{"secretRef": {"name": s, "optional": True}} for s in settings.env_secrets]


def _metadata(cfg: RunConfig, name: str, namespace: str, stage: str) -> dict[str, Any]:
    return {"name": name, "namespace": namespace,
            "labels": {**_LABELS, "medisyn/stage": stage, "medisyn/run": job_name(cfg.name, "")}}


# ----------------------------------------------------------------------------------------------
# PyTorchJob
# ----------------------------------------------------------------------------------------------
def render_pytorchjob(cfg: RunConfig, config_uri: str, cache_uri: str, checkpoints_uri: str,
                      settings: ClusterSettings | None = None, name: str | None = None) -> dict[str, Any]:
    """The PyTorchJob that trains ``cfg`` (read by every pod from ``config_uri``) from ``cache_uri``
    into ``checkpoints_uri``."""
    s = settings or ClusterSettings()
    if s.num_nodes < 1 or s.gpus_per_node < 0:
        raise ValueError(f"num_nodes must be >= 1 and gpus_per_node >= 0 (got {s.num_nodes}, {s.gpus_per_node})")
    name = name or job_name(cfg.name, "train")
    env = _env(cfg) + [
        {"name": "OMP_NUM_THREADS", "value": "1"},
        {"name": "NCCL_DEBUG", "value": "WARN"},
        # surface a hung collective as an error instead of a silent stall (train.nccl_timeout_s)
        {"name": "TORCH_NCCL_ASYNC_ERROR_HANDLING", "value": "1"},
        {"name": "MEDISYN_NCCL_TIMEOUT_S", "value": str(cfg.train.nccl_timeout_s)},
    ]
    if s.nccl_socket_ifname:
        env.append({"name": "NCCL_SOCKET_IFNAME", "value": s.nccl_socket_ifname})
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
# Submission and watching
# ----------------------------------------------------------------------------------------------
def _custom_objects_api() -> CustomObjectsApi:
    """A ``CustomObjectsApi`` from the in-cluster config, else ~/.kube/config."""
    from kubernetes import client, config

    try:
        config.load_incluster_config()
    except config.ConfigException:
        config.load_kube_config()
    api: CustomObjectsApi = client.CustomObjectsApi()
    return api


def _have_kubernetes_client() -> bool:
    try:
        import kubernetes  # noqa: F401
    except ImportError:
        return False
    return True


def submit(manifest: dict[str, Any], namespace: str | None = None,
           api: CustomObjectsApi | None = None) -> dict[str, Any]:
    """Create the job; returns the object the API server stored.

    Uses the kubernetes python client (``api``: a ``CustomObjectsApi`` or a fake with the same
    ``create_namespaced_custom_object``); without the client installed, falls back to ``kubectl``.
    """
    kind = manifest["kind"]
    if kind not in RESOURCES:
        raise ValueError(f"cannot submit kind {kind!r}; known: {sorted(RESOURCES)}")
    group, ver, plural = RESOURCES[kind]
    namespace = namespace or manifest.get("metadata", {}).get("namespace") or "default"
    log.info("submitting %s %s/%s", kind, namespace, manifest["metadata"]["name"])
    if api is None and not _have_kubernetes_client():
        kubectl = shutil.which("kubectl")
        if not kubectl:
            raise RuntimeError("neither the kubernetes python client nor kubectl is available")
        out = subprocess.run([kubectl, "create", "-n", namespace, "-o", "json", "-f", "-"],
                             input=json.dumps(manifest), capture_output=True, text=True, check=True)
        created: dict[str, Any] = json.loads(out.stdout)
        return created
    api = api or _custom_objects_api()
    return api.create_namespaced_custom_object(group, ver, namespace, plural, manifest)


def job_state(kind: str, obj: dict[str, Any]) -> tuple[str, str]:
    """('running'|'succeeded'|'failed', reason) from a PyTorchJob or RayJob status."""
    status = obj.get("status") or {}
    if kind == "RayJob":
        job_status = status.get("jobStatus", "")
        deploy = status.get("jobDeploymentStatus", "")
        reason = status.get("message") or status.get("reason") or f"{deploy}/{job_status}"
        if job_status == "SUCCEEDED":
            return "succeeded", reason
        if job_status in ("FAILED", "STOPPED") or deploy in ("Failed", "ValidationFailed"):
            return "failed", reason
        return "running", reason
    # Training Operator jobs: conditions Created/Running/Restarting/Succeeded/Failed
    for cond in reversed(status.get("conditions") or []):
        if cond.get("status") != "True":
            continue
        reason = f"{cond.get('type')}: {cond.get('reason', '')} {cond.get('message', '')}".strip()
        if cond.get("type") == "Succeeded":
            return "succeeded", reason
        if cond.get("type") == "Failed":
            return "failed", reason
    return "running", ""


def wait_for_job(kind: str, name: str, namespace: str, timeout_s: float = DEFAULT_TIMEOUT_S, poll_s: float = 30.0,
                 api: CustomObjectsApi | None = None,
                 sleep: Callable[[float], None] = time.sleep) -> dict[str, Any]:
    """Poll until the job succeeds (returns its object), fails (``JobFailed``) or times out."""
    group, ver, plural = RESOURCES[kind]
    api = api or _custom_objects_api()
    deadline = time.monotonic() + timeout_s
    last = None
    while True:
        obj = api.get_namespaced_custom_object(group, ver, namespace, plural, name)
        state, reason = job_state(kind, obj)
        if (state, reason) != last:
            log.info("%s %s/%s: %s %s", kind, namespace, name, state, reason)
            last = (state, reason)
        if state == "succeeded":
            return obj
        if state == "failed":
            raise JobFailed(f"{kind} {namespace}/{name} failed: {reason}")
        if time.monotonic() >= deadline:
            raise TimeoutError(f"{kind} {namespace}/{name} did not finish within {timeout_s:.0f}s")
        sleep(poll_s)


def run_job(manifest: dict[str, Any], timeout_s: float = DEFAULT_TIMEOUT_S, poll_s: float = 30.0,
            api: CustomObjectsApi | None = None, sleep: Callable[[float], None] = time.sleep) -> dict[str, Any]:
    """Validate against the packaged CRD (always: an invalid or unknown job is never submitted),
    submit, and wait; returns the finished object."""
    validate_against_crd(manifest)
    ns = manifest["metadata"]["namespace"]
    submitted = submit(manifest, ns, api=api)
    name = (submitted.get("metadata") or {}).get("name") or manifest["metadata"]["name"]
    return wait_for_job(manifest["kind"], name, ns, timeout_s=timeout_s, poll_s=poll_s, api=api, sleep=sleep)


# ----------------------------------------------------------------------------------------------
# Stages on the cluster: name, render, validate, submit, wait, read the stage's result back
# ----------------------------------------------------------------------------------------------
R = TypeVar("R", bound="StageResult")


def _run_and_read(manifest: dict[str, Any], result_type: type[R], prefix_uri: str, timeout_s: float,
                  api: CustomObjectsApi | None, poll_s: float, sleep: Callable[[float], None]) -> R:
    """Run the job to completion, then read the result its stage runner stored at ``prefix_uri``."""
    from medisyn.results import ResultError

    run_job(manifest, timeout_s=timeout_s, poll_s=poll_s, api=api, sleep=sleep)
    try:
        return result_type.load(prefix_uri)
    except ResultError as exc:
        raise RuntimeError(f"{manifest['kind']} {manifest['metadata']['name']} succeeded but its stage result "
                           f"cannot be read: {exc}") from exc


def preprocess_on_cluster(cfg: RunConfig, config_uri: str, raw_uri: str, dataset_uri: str, settings: ClusterSettings,
                          run_tag: str, timeout_s: float, api: CustomObjectsApi | None = None, *,
                          poll_s: float = 30.0, sleep: Callable[[float], None] = time.sleep) -> PreprocessResult:
    """Run ``medisyn preprocess`` as a RayJob and return the :class:`PreprocessResult` it stored.

    ``run_tag`` (the run's folder name) makes the job name unique per run; ``config_uri`` is the
    run's stored config, which the job's pods read. Storage must be configured (the stage runner
    does it) so that ``<dataset_uri>/result.json`` can be read back.
    """
    from medisyn.data.preprocess import PreprocessResult

    manifest = render_rayjob(cfg, config_uri, raw_uri, dataset_uri, settings,
                             name=job_name(cfg.name, "preprocess-" + run_tag[-20:]))
    return _run_and_read(manifest, PreprocessResult, dataset_uri, timeout_s, api, poll_s, sleep)


def train_on_cluster(cfg: RunConfig, config_uri: str, cache_uri: str, checkpoints_uri: str, settings: ClusterSettings,
                     run_tag: str, timeout_s: float, api: CustomObjectsApi | None = None, *,
                     poll_s: float = 30.0, sleep: Callable[[float], None] = time.sleep) -> TrainResult:
    """Run ``medisyn train`` as a PyTorchJob and return the :class:`TrainResult` its node rank 0 stored
    at ``<checkpoints_uri>/result.json``."""
    from medisyn.train.trainer import TrainResult

    manifest = render_pytorchjob(cfg, config_uri, cache_uri, checkpoints_uri, settings,
                                 name=job_name(cfg.name, "train-" + run_tag[-20:]))
    return _run_and_read(manifest, TrainResult, checkpoints_uri, timeout_s, api, poll_s, sleep)
