"""Kubeflow Pipelines components: one thin lightweight component per MediSyn pipeline step.

Each calls ``medisyn.stages.run`` inside the function body (KFP ships only the function's source)
and runs in the project image (:data:`medisyn.pipeline.components.image.MEDISYN_IMAGE`).
"""

from medisyn.pipeline.components.data import (
    build_tiny_models,
    check_landing_zone,
    demo_data,
    plan_run,
    preprocess,
    preprocess_rayjob,
)
from medisyn.pipeline.components.evaluation import privacy_gate, score, utility_gate
from medisyn.pipeline.components.image import DEFAULT_IMAGE, MEDISYN_IMAGE
from medisyn.pipeline.components.outcome import record_outcome
from medisyn.pipeline.components.registry import promote, register
from medisyn.pipeline.components.report import report
from medisyn.pipeline.components.training import encode, train, train_job

ALL_COMPONENTS = {
    "plan_run": plan_run, "build_tiny_models": build_tiny_models, "demo_data": demo_data,
    "check_landing_zone": check_landing_zone, "preprocess": preprocess, "preprocess_rayjob": preprocess_rayjob,
    "encode": encode, "train": train, "train_job": train_job, "score": score,
    "register": register, "privacy_gate": privacy_gate, "utility_gate": utility_gate, "promote": promote,
    "report": report, "record_outcome": record_outcome,
}

__all__ = ["ALL_COMPONENTS", "DEFAULT_IMAGE", "MEDISYN_IMAGE", *ALL_COMPONENTS]
