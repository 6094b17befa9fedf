"""Evaluation components: FID scoring of every epoch, and the two approval gates.

The gates fail closed, in order, and their verdicts are recorded on the model version by the stage
runner (``medisyn.stages``), exactly as when a user runs ``medisyn privacy-gate`` by hand: an
evaluation that raises becomes a failed verdict with the error as its reason, and a gate whose
predecessor did not pass is recorded as a failed "skipped" verdict without running.
"""

from kfp import dsl

from medisyn.pipeline.components.image import MEDISYN_IMAGE


@dsl.component(base_image=MEDISYN_IMAGE, install_kfp_package=False)
def score(
    config_uri: str,       # the run config (fid + sampling sections)
    dataset_uri: str,      # output of preprocess (real images)
    checkpoints_uri: str,  # output of train
    scores_uri: str,       # output prefix: FID report per epoch, figures, result.json
) -> str:                  # the scores URI (ScoreResult.load(scores_uri): best epoch and its checkpoint)
    from medisyn import stages

    return stages.run("score", config_uri, dataset=dataset_uri, checkpoints=checkpoints_uri, out=scores_uri).out_uri


@dsl.component(base_image=MEDISYN_IMAGE, install_kfp_package=False)
def privacy_gate(
    config_uri: str,   # the run config (privacy section)
    model_uri: str,    # models:/<name>/<version> of the candidate
    dataset_uri: str,  # output of preprocess (train split = the memorization reference)
    out_uri: str,      # report + figures prefix, with the GateResult as result.json
) -> bool:             # whether the gate passed (already recorded on the version as gate.privacy)
    from medisyn import stages

    return stages.run("privacy-gate", config_uri, model=model_uri, dataset=dataset_uri, out=out_uri).passed


@dsl.component(base_image=MEDISYN_IMAGE, install_kfp_package=False)
def utility_gate(
    config_uri: str,   # the run config (utility section)
    model_uri: str,    # models:/<name>/<version> of the candidate
    dataset_uri: str,  # output of preprocess (train/val/test splits)
    out_uri: str,      # report + figures prefix, with the GateResult as result.json
) -> bool:             # whether the gate passed (already recorded on the version as gate.utility)
    from medisyn import stages

    return stages.run("utility-gate", config_uri, model=model_uri, dataset=dataset_uri, out=out_uri).passed
