"""Run the preprocess stage on a KubeRay cluster: a RayJob (ray.io/v1) manifest.

KubeRay creates a RayCluster (one head, ``num_workers`` workers), submits the entrypoint
``python -m medisyn.cli preprocess ...`` to it and tears the cluster down when the job ends. Inside
the cluster KubeRay sets ``RAY_ADDRESS``, so ``preprocess`` connects to it instead of starting a
local Ray; the same function runs on a laptop and on the cluster, only the config differs.

The run config travels either as a ConfigMap mounted at ``/etc/medisyn/config.yaml``
(``config_map=`` names it; :func:`render_config_map` renders one) or inline as
``--config-json '<json>'``. Object-storage credentials come from a Secret (``s3_secret=``: its keys
become environment variables, e.g. ``AWS_ACCESS_KEY_ID``/``AWS_SECRET_ACCESS_KEY``). Pods run
non-root with a read-only root filesystem, all capabilities dropped and the RuntimeDefault seccomp
profile; Ray's scratch space is an ``emptyDir`` at ``/tmp``. Submit with ``kubectl apply -f``.
"""

from __future__ import annotations

import json
import re
import shlex
from importlib.metadata import version
from typing import Any

import yaml

from medisyn.config import RunConfig

CONFIG_MOUNT_DIR = "/etc/medisyn"
CONFIG_FILE = "config.yaml"


def _dns_name(text: str, limit: int = 40) -> str:
    name = re.sub(r"[^a-z0-9-]+", "-", text.lower()).strip("-")[:limit].strip("-")
    return name or "medisyn"


def _security_context() -> dict[str, Any]:
    return {
        "runAsNonRoot": True,
        "runAsUser": 1000,
        "runAsGroup": 1000,
        "allowPrivilegeEscalation": False,
        "readOnlyRootFilesystem": True,
        "capabilities": {"drop": ["ALL"]},
        "seccompProfile": {"type": "RuntimeDefault"},
    }


def _resources(cpu: int | str, memory: str) -> dict[str, Any]:
    return {"requests": {"cpu": str(cpu), "memory": memory}, "limits": {"cpu": str(cpu), "memory": memory}}


def entrypoint(cfg: RunConfig, raw_uri: str, out_uri: str, config_map: str | None = None) -> str:
    """The shell command KubeRay submits to the cluster."""
    args = ["python", "-m", "medisyn.cli", "preprocess"]
    if config_map:
        args += ["--config", f"{CONFIG_MOUNT_DIR}/{CONFIG_FILE}"]
    else:
        args += ["--config-json", json.dumps(cfg.model_dump(mode="json"), sort_keys=True, separators=(",", ":"))]
    args += ["--raw", raw_uri, "--out", out_uri]  # flags of medisyn.cli preprocess
    return shlex.join(args)


def render_config_map(cfg: RunConfig, name: str, namespace: str = "medisyn") -> dict[str, Any]:
    """A ConfigMap holding the run config as ``config.yaml`` (mount it with ``config_map=name``)."""
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {"name": name, "namespace": namespace, "labels": {"app.kubernetes.io/part-of": "medisyn"}},
        "data": {CONFIG_FILE: cfg.to_yaml()},
    }


def render_rayjob(
    cfg: RunConfig,
    raw_uri: str,
    out_uri: str,
    image: str,
    namespace: str = "medisyn",
    *,
    name: str | None = None,
    config_map: str | None = None,
    s3_secret: str | None = None,
    num_workers: int = 2,
    worker_cpus: int = 4,
    worker_memory: str = "16Gi",
    head_cpus: int = 2,
    head_memory: str = "8Gi",
    service_account: str | None = None,
    ttl_seconds_after_finished: int = 3600,
    active_deadline_seconds: int | None = 24 * 3600,
    image_pull_policy: str = "IfNotPresent",
) -> dict[str, Any]:
    """A RayJob manifest that runs ``preprocess(cfg, raw_uri, out_uri)`` on a fresh KubeRay cluster.

    Each worker offers ``worker_cpus`` Ray CPUs (one image per CPU at a time). ``data.ray_num_cpus``
    is ignored on the cluster: the cluster's size decides.
    """
    if num_workers < 0 or worker_cpus < 1 or head_cpus < 1:
        raise ValueError("num_workers must be >= 0, worker_cpus and head_cpus >= 1")
    job_name = _dns_name(name or f"{cfg.name}-preprocess")
    env: list[dict[str, Any]] = [{"name": "RAY_AUTH_MODE", "value": "disabled"}, {"name": "HOME", "value": "/tmp"}]
    if cfg.storage.s3_endpoint_url:
        env.append({"name": "MEDISYN_S3_ENDPOINT_URL", "value": cfg.storage.s3_endpoint_url})
    env_from = [{"secretRef": {"name": s3_secret}}] if s3_secret else []
    mounts = [{"name": "tmp", "mountPath": "/tmp"}]
    volumes: list[dict[str, Any]] = [{"name": "tmp", "emptyDir": {}}]
    if config_map:
        mounts.append({"name": "medisyn-config", "mountPath": CONFIG_MOUNT_DIR, "readOnly": True})
        volumes.append({"name": "medisyn-config", "configMap": {"name": config_map}})

    def pod(container_name: str, cpus: int, memory: str, ports: list[dict[str, Any]] | None = None) -> dict[str, Any]:
        container: dict[str, Any] = {
            "name": container_name,
            "image": image,
            "imagePullPolicy": image_pull_policy,
            "env": env,
            "resources": _resources(cpus, memory),
            "securityContext": _security_context(),
            "volumeMounts": mounts,
        }
        if env_from:
            container["envFrom"] = env_from
        if ports:
            container["ports"] = ports
        spec: dict[str, Any] = {
            "containers": [container],
            "volumes": volumes,
            "securityContext": {"runAsNonRoot": True, "fsGroup": 1000, "seccompProfile": {"type": "RuntimeDefault"}},
        }
        if service_account:
            spec["serviceAccountName"] = service_account
        return {"metadata": {"labels": {"app.kubernetes.io/part-of": "medisyn", "medisyn/stage": "preprocess"}}, "spec": spec}

    cluster: dict[str, Any] = {
        "rayVersion": version("ray"),  # the image's Ray must match the cluster's
        "headGroupSpec": {
            # the head schedules no image work: num-cpus 0 keeps it responsive for the driver
            "rayStartParams": {"num-cpus": "0", "dashboard-host": "0.0.0.0"},
            "template": pod(
                "ray-head", head_cpus, head_memory,
                [{"containerPort": 6379, "name": "gcs"}, {"containerPort": 8265, "name": "dashboard"},
                 {"containerPort": 10001, "name": "client"}],
            ),
        },
    }
    if num_workers:
        cluster["workerGroupSpecs"] = [
            {
                "groupName": "preprocess",
                "replicas": num_workers,
                "minReplicas": num_workers,
                "maxReplicas": num_workers,
                "rayStartParams": {"num-cpus": str(worker_cpus)},
                "template": pod("ray-worker", worker_cpus, worker_memory),
            }
        ]
    spec: dict[str, Any] = {
        "entrypoint": entrypoint(cfg, raw_uri, out_uri, config_map),
        "shutdownAfterJobFinishes": True,
        "ttlSecondsAfterFinished": ttl_seconds_after_finished,
        "submissionMode": "K8sJobMode",
        "backoffLimit": 0,  # preprocess is idempotent; a failed run is rerun by the pipeline, not here
        "rayClusterSpec": cluster,
        "submitterPodTemplate": {
            "spec": {
                "restartPolicy": "Never",
                "containers": [{
                    "name": "ray-job-submitter",
                    "image": image,
                    "imagePullPolicy": image_pull_policy,
                    "resources": _resources(1, "1Gi"),
                    "securityContext": _security_context(),
                    "env": [{"name": "HOME", "value": "/tmp"}],
                    "volumeMounts": [{"name": "tmp", "mountPath": "/tmp"}],
                }],
                "volumes": [{"name": "tmp", "emptyDir": {}}],
                "securityContext": {"runAsNonRoot": True, "seccompProfile": {"type": "RuntimeDefault"}},
            }
        },
    }
    if active_deadline_seconds:
        spec["activeDeadlineSeconds"] = active_deadline_seconds
    return {
        "apiVersion": "ray.io/v1",
        "kind": "RayJob",
        "metadata": {
            "name": job_name,
            "namespace": namespace,
            "labels": {"app.kubernetes.io/part-of": "medisyn", "medisyn/stage": "preprocess", "medisyn/run": _dns_name(cfg.name)},
        },
        "spec": spec,
    }


def rayjob_yaml(*args: Any, **kwargs: Any) -> str:
    """:func:`render_rayjob` as YAML, ready for ``kubectl apply -f -``."""
    return yaml.safe_dump(render_rayjob(*args, **kwargs), sort_keys=False)
