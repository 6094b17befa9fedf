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
   of its spec (annotation :data:`~medisyn.launch.lifecycle.SPEC_HASH_ANNOTATION`). A job of that name
   with the same hash that has not failed is adopted (a retried step whose pod was evicted picks its
   job up again); a job with another hash, or one that failed, is deleted and created anew. Never two
   GPU jobs for one step;
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

This package's parts, one purpose each: :mod:`~medisyn.launch.settings` (``ClusterSettings``, deadlines,
names), :mod:`~medisyn.launch.render` (the manifests), :mod:`~medisyn.launch.crd` (validation),
:mod:`~medisyn.launch.operators` (job kinds, states, failure reasons) and
:mod:`~medisyn.launch.lifecycle` (:func:`run_job`). This module holds the entry points: API
discovery and the stages run on the cluster.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any, TypeVar

from medisyn.config import RunConfig
from medisyn.launch.crd import validate_against_crd
from medisyn.launch.lifecycle import JobCancelled, JobFailed, api_client, run_job
from medisyn.launch.operators import JOB_KINDS
from medisyn.launch.render import (
    preprocess_command,
    render_pytorchjob,
    render_rayjob,
    render_training_job,
    render_trainjob,
    trainer_command,
)
from medisyn.launch.settings import ClusterSettings, job_name

if TYPE_CHECKING:
    from kubernetes.client import ApiClient

    from medisyn.data.preprocess import PreprocessResult
    from medisyn.results import StageResult
    from medisyn.train.trainer import TrainResult

__all__ = [
    "TRAIN_LAUNCHERS", "ClusterSettings", "JobCancelled", "JobFailed", "api_client", "discover_train_launcher",
    "job_name", "preprocess_command", "preprocess_on_cluster", "render_pytorchjob", "render_rayjob",
    "render_trainjob", "render_training_job", "run_job", "served_kinds", "train_on_cluster", "trainer_command",
    "validate_against_crd",
]

log = logging.getLogger("medisyn.launch")

TRAIN_LAUNCHERS = ("auto", "trainjob", "pytorchjob")


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
