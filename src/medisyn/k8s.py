"""Pod building blocks shared by every Kubernetes manifest MediSyn renders (PyTorchJob, RayJob).

One place decides how our pods run, so a PyTorchJob replica, a Ray head, a Ray worker and the
RayJob submitter cannot drift apart: non-root as the image's user (uid/gid 1000), no privilege
escalation, every capability dropped, the RuntimeDefault seccomp profile and a **read-only root
filesystem**. Whatever a process writes goes to an ``emptyDir``:

* ``/tmp``: ``HOME`` (``~/.cache``, ``~/.config`` of the libraries we import) and anything that
  hard-codes ``/tmp``;
* ``/scratch`` (sized): ``TMPDIR`` (checkpoint staging, Ray's session directory, which follows
  ``TMPDIR``), ``HF_HOME`` and ``MEDISYN_CACHE_DIR`` (the per-node copy of the latent cache);
* ``/dev/shm`` (memory-backed, optional): NCCL, dataloader workers and Ray's object store need more
  than the runtime's 64 MiB default.

This module depends on nothing else in MediSyn, so every renderer can import it without a cycle.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

RUN_AS_ID = 1000  # the user and group of docker/Dockerfile.trainer (USER 1000:1000)
TMP_DIR = "/tmp"
SCRATCH_DIR = "/scratch"
SHM_DIR = "/dev/shm"

#: Where writers go on a read-only root filesystem; every value lies under a writable mount.
WRITABLE_ENV: dict[str, str] = {
    "HOME": TMP_DIR,
    "TMPDIR": SCRATCH_DIR,
    "HF_HOME": f"{SCRATCH_DIR}/hf",
    "MEDISYN_CACHE_DIR": f"{SCRATCH_DIR}/medisyn-cache",
}


def container_security_context() -> dict[str, Any]:
    """The securityContext of every container we render."""
    return {
        "runAsNonRoot": True,
        "runAsUser": RUN_AS_ID,
        "runAsGroup": RUN_AS_ID,
        "allowPrivilegeEscalation": False,
        "readOnlyRootFilesystem": True,
        "capabilities": {"drop": ["ALL"]},
        "seccompProfile": {"type": "RuntimeDefault"},
    }


def pod_security_context() -> dict[str, Any]:
    """The pod-level securityContext: fsGroup makes the emptyDirs writable by the container user."""
    return {
        "runAsNonRoot": True,
        "runAsUser": RUN_AS_ID,
        "runAsGroup": RUN_AS_ID,
        "fsGroup": RUN_AS_ID,
        "seccompProfile": {"type": "RuntimeDefault"},
    }


def writable_volumes(scratch_size: str | None = None,
                     shm_size: str | None = None) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """``(volumes, volumeMounts)``: emptyDirs at /tmp and /scratch, and /dev/shm when ``shm_size``."""
    scratch: dict[str, Any] = {"sizeLimit": scratch_size} if scratch_size else {}
    volumes: list[dict[str, Any]] = [{"name": "tmp", "emptyDir": {}}, {"name": "scratch", "emptyDir": scratch}]
    mounts: list[dict[str, Any]] = [{"name": "tmp", "mountPath": TMP_DIR},
                                    {"name": "scratch", "mountPath": SCRATCH_DIR}]
    if shm_size:
        volumes.append({"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": shm_size}})
        mounts.append({"name": "dshm", "mountPath": SHM_DIR})
    return volumes, mounts


def writable_env(env: Sequence[Mapping[str, Any]] = ()) -> list[dict[str, Any]]:
    """:data:`WRITABLE_ENV` followed by ``env``; a name in ``env`` replaces ours (no duplicate names)."""
    own = {str(e["name"]) for e in env}
    return [{"name": k, "value": v} for k, v in WRITABLE_ENV.items() if k not in own] + [dict(e) for e in env]


def pod_spec(
    containers: Sequence[Mapping[str, Any]],
    *,
    scratch_size: str | None = None,
    shm_size: str | None = None,
    service_account: str | None = None,
    node_selector: Mapping[str, str] | None = None,
    tolerations: Sequence[Mapping[str, Any]] | None = None,
    restart_policy: str | None = None,
) -> dict[str, Any]:
    """A hardened pod spec around ``containers``.

    Every container gets :func:`container_security_context`, the writable mounts and
    :func:`writable_env`; a container that sets its own ``securityContext`` or mounts is refused, so
    no caller can quietly loosen the policy.
    """
    volumes, mounts = writable_volumes(scratch_size, shm_size)
    hardened: list[dict[str, Any]] = []
    for c in containers:
        if "securityContext" in c or "volumeMounts" in c:
            raise ValueError(f"container {c.get('name')!r}: securityContext and volumeMounts come from medisyn.k8s")
        hardened.append({**c, "env": writable_env(c.get("env") or ()), "volumeMounts": [dict(m) for m in mounts],
                         "securityContext": container_security_context()})
    spec: dict[str, Any] = {
        "containers": hardened,
        "volumes": volumes,
        "securityContext": pod_security_context(),
    }
    if restart_policy:
        spec["restartPolicy"] = restart_policy
    if service_account:
        spec["serviceAccountName"] = service_account
    if node_selector:
        spec["nodeSelector"] = dict(node_selector)
    if tolerations:
        spec["tolerations"] = [dict(t) for t in tolerations]
    return spec


def resources(cpu: str | int, memory: str, gpus: int = 0) -> dict[str, dict[str, Any]]:
    """Requests = limits (Guaranteed QoS: a training or Ray pod is not the first one evicted)."""
    res: dict[str, Any] = {"cpu": str(cpu), "memory": memory}
    if gpus:
        res["nvidia.com/gpu"] = gpus
    return {"requests": dict(res), "limits": dict(res)}
