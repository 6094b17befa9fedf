"""Evaluation components: FID scoring of every epoch, and the two approval gates.

The gates fail closed: each runs its stage function through ``medisyn.evaluate.gates.run_gate``, so
an evaluation that raises becomes a *failed verdict* (with the error as its reason) instead of a
crashed step; the pipeline then records that verdict and never promotes.
"""

from typing import NamedTuple

from kfp import dsl

from components.image import MEDISYN_IMAGE

# NamedTuple outputs are spelled inline: KFP ships only the function's source to the pod.


@dsl.component(base_image=MEDISYN_IMAGE, install_kfp_package=False)
def score(
    config_json: str,      # the run config (fid + sampling sections)
    dataset_uri: str,      # output of preprocess (real images)
    checkpoints_uri: str,  # output of train
    scores_uri: str,       # output prefix: FID report per epoch
) -> NamedTuple("Score", [("best_checkpoint_uri", str), ("score_json", str)]):  # best epoch, ScoreResult JSON
    import json

    from medisyn import storage
    from medisyn.config import config_from_json
    from medisyn.evaluate.fid import score_checkpoints

    cfg = config_from_json(config_json)
    storage.configure(cfg.storage.s3_endpoint_url)
    result = score_checkpoints(cfg, dataset_uri, checkpoints_uri, scores_uri)
    return result.best_checkpoint_uri, json.dumps(result.to_dict(), sort_keys=True, default=str)


@dsl.component(base_image=MEDISYN_IMAGE, install_kfp_package=False)
def privacy_gate(
    config_json: str,  # the run config (privacy section)
    model_uri: str,    # models:/<name>/<version> of the candidate
    dataset_uri: str,  # output of preprocess (train split = the memorization reference)
    out_uri: str,      # report + figures prefix
) -> str:              # verdict JSON {"gate", "passed", "result": GateResult.to_dict()}; never raises
    from medisyn import storage
    from medisyn.config import config_from_json
    from medisyn.evaluate.gates import run_gate, verdict_json
    from medisyn.evaluate.privacy import privacy_gate as gate

    cfg = config_from_json(config_json)
    storage.configure(cfg.storage.s3_endpoint_url)
    return verdict_json(run_gate("privacy", gate, cfg, model_uri, dataset_uri, out_uri))


@dsl.component(base_image=MEDISYN_IMAGE, install_kfp_package=False)
def utility_gate(
    config_json: str,  # the run config (utility section)
    model_uri: str,    # models:/<name>/<version> of the candidate
    dataset_uri: str,  # output of preprocess (train/val/test splits)
    out_uri: str,      # report + figures prefix
) -> str:              # verdict JSON {"gate", "passed", "result": GateResult.to_dict()}; never raises
    from medisyn import storage
    from medisyn.config import config_from_json
    from medisyn.evaluate.gates import run_gate, verdict_json
    from medisyn.evaluate.utility import utility_gate as gate

    cfg = config_from_json(config_json)
    storage.configure(cfg.storage.s3_endpoint_url)
    return verdict_json(run_gate("utility", gate, cfg, model_uri, dataset_uri, out_uri))
