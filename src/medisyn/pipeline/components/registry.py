"""Registry components: register the best checkpoint as a candidate, and promote.

A model version enters the candidates' registered model with alias ``candidate``; ``promote`` (run
as the promoter identity: on the cluster this step mounts the promoter's Secret, mlflow/REGISTRY.md)
approves it only when every gate's own run proves it passed, copying it into the approved model. A
few lines each over ``medisyn.stages.run``.
"""

from typing import NamedTuple

from kfp import dsl

from medisyn.pipeline.components.image import MEDISYN_IMAGE


@dsl.component(base_image=MEDISYN_IMAGE, install_kfp_package=False)
def register(
    config_uri: str,   # the run config (tracking section: MLflow URI, model name, aliases)
    scores_uri: str,   # output of score: its result names the best epoch's checkpoint
    dataset_uri: str,  # the dataset the model was trained on (lineage tag)
    out_uri: str,      # where the RegisteredModel result.json goes
) -> NamedTuple("Registered", [("model_uri", str), ("version", str)]):  # models:/<name>/<version>, version
    from medisyn import stages

    reg = stages.run("register", config_uri, scores=scores_uri, dataset=dataset_uri, out=out_uri)
    return reg.model_uri, reg.version


@dsl.component(base_image=MEDISYN_IMAGE, install_kfp_package=False)
def promote(
    config_uri: str,  # the run config (tracking section)
    model_uri: str,   # models:/<name>/<version> to approve
    gate_names: str,  # comma-separated gates that must be recorded as passed
    out_uri: str,     # where the PromoteResult result.json goes
) -> bool:            # whether the version is now approved
    from medisyn import stages

    gates = [g.strip() for g in gate_names.split(",") if g.strip()]
    return stages.run("promote", config_uri, model=model_uri, gates=gates, out=out_uri).approved
