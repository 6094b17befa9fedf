"""Registry components: register the best checkpoint, record gate verdicts, promote.

A model version enters the registry with alias ``candidate``; each gate's verdict is written on the
version (``medisyn.registry.set_gate_result``) whatever it is; ``promote`` sets ``approved`` only
when every named gate is recorded as passed (it re-reads the tags, so it fails closed on its own).
"""

from typing import NamedTuple

from kfp import dsl

from components.image import MEDISYN_IMAGE

# NamedTuple outputs are spelled inline: KFP ships only the function's source to the pod.


@dsl.component(base_image=MEDISYN_IMAGE, install_kfp_package=False)
def register(
    config_json: str,     # the run config (tracking section: MLflow URI, model name, aliases)
    checkpoint_uri: str,  # the best epoch's checkpoint (output of score)
    score_json: str,      # the ScoreResult as JSON (FID figures become version tags)
    dataset_uri: str,     # the dataset the model was trained on (lineage tag)
) -> NamedTuple("Registered", [("model_uri", str), ("version", str)]):  # models:/<name>/<version>, version
    import json

    from medisyn import registry, storage
    from medisyn.config import config_from_json

    cfg = config_from_json(config_json)
    storage.configure(cfg.storage.s3_endpoint_url)
    model = registry.register_candidate(cfg, checkpoint_uri, json.loads(score_json), dataset_uri)
    return model.model_uri, str(model.version)


@dsl.component(base_image=MEDISYN_IMAGE, install_kfp_package=False)
def record_gate_result(
    config_json: str,   # the run config (tracking section)
    model_uri: str,     # models:/<name>/<version> the verdict is about
    verdict_json: str,  # output of a gate component (or a synthesized "skipped" failure)
) -> bool:              # whether the gate passed; the pipeline's dsl.If reads this recorded value
    import json

    from medisyn import registry
    from medisyn.config import config_from_json

    cfg = config_from_json(config_json)
    verdict = json.loads(verdict_json)
    passed = verdict.get("passed") is True  # anything but an explicit True is a failure
    registry.set_gate_result(cfg, model_uri, verdict["gate"], passed, verdict.get("result") or {})
    return passed


@dsl.component(base_image=MEDISYN_IMAGE, install_kfp_package=False)
def promote(
    config_json: str,  # the run config (tracking section)
    version: str,      # the model version to approve
    gate_names: str,   # comma-separated gates that must be recorded as passed
) -> str:              # PromoteResult as JSON
    import json

    from medisyn import registry
    from medisyn.config import config_from_json

    cfg = config_from_json(config_json)
    gates = [g.strip() for g in gate_names.split(",") if g.strip()]
    return json.dumps(registry.promote(cfg, version, gates).to_dict(), sort_keys=True, default=str)
