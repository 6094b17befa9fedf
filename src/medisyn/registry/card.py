"""The model card: its context stored at registration, re-rendered as the version's description
(and a run artifact) with the version's current gate tags whenever a gate records a verdict."""

from __future__ import annotations

import json
import logging
import re
from typing import TYPE_CHECKING, Any

from medisyn import model_card
from medisyn.config import RunConfig
from medisyn.registry.names import CARD_CONTEXT, CARD_FILE, MODEL_INFO_FILE, _client

if TYPE_CHECKING:
    from medisyn.evaluate.fid import ScoreResult

log = logging.getLogger("medisyn.registry")


def _card_context(cfg: RunConfig, name: str, run_id: str, epoch: int, checkpoint_uri: str, info: dict[str, Any],
                  manifest: dict[str, Any], score: ScoreResult, best: bool, fid_value: float,
                  spec_fid: dict[str, float], dhash: str, tags: dict[str, str],
                  pipeline_run_id: str) -> dict[str, Any]:
    """What the model card says about a registered checkpoint (its version is filled in when rendered)."""
    prov = score.provenance
    return {
        "name": name, "run_id": run_id, "epoch": epoch, "checkpoint_uri": checkpoint_uri,
        "package_dtype": cfg.tracking.package_dtype,
        "base_components_summary": f"{info['base_components']['sdxl_base']} + VAE {info['base_components']['vae']} "
                                   f"(identity {info['base_components']['model_identity']}, "
                                   f"sha256 per file in {MODEL_INFO_FILE})",
        "sampling": info["sampling"], "manifest": manifest, "train": cfg.train.model_dump(mode="json"),
        "score": {"fid": fid_value, "fid_ci": score.fid_ci if best else None,
                  "num_samples": score.num_samples, "mode": score.mode,
                  "provenance": {k: v for k, v in prov.items() if not isinstance(v, dict)},
                  "fid_by_specialty": spec_fid, "fid_by_epoch": score.fid_by_epoch},
        "dataset_hash": dhash, "config_hash": tags["config_hash"], "code_version": tags["code_version"],
        "pipeline_run_id": pipeline_run_id,
    }


def gates_from_tags(tags: dict[str, str]) -> dict[str, dict[str, Any]]:
    """{gate: {status, at, details}} of a version's tags (the model card, the evaluation report)."""
    gates: dict[str, dict[str, Any]] = {}
    for key, value in tags.items():
        m = re.fullmatch(r"gate\.([^.]+)", key)
        if m:
            g = m.group(1)
            details = tags.get(f"gate.{g}.details", "{}")
            try:
                details = json.loads(details)
            except json.JSONDecodeError:
                pass
            gates[g] = {"status": value, "at": tags.get(f"gate.{g}.at", ""), "details": details}
    return gates


def _update_card(cfg: RunConfig, name: str, version: str, context: dict | None = None) -> str:
    """Re-render the card from its stored context and the version's current gate tags."""
    import mlflow

    client = _client()
    mv = client.get_model_version(name, version)
    if context is None:
        try:  # stored before the version existed: the version is filled in here
            context = {**mlflow.artifacts.load_dict(f"runs:/{mv.run_id}/{CARD_CONTEXT}"), "version": version}
        except Exception as exc:  # noqa: BLE001 - a card without context still shows the gates
            log.warning("model card context of %s v%s unavailable: %s", name, version, exc)
            context = {"name": name, "version": version}
    card = model_card.render(context, gates_from_tags(dict(mv.tags)))
    client.update_model_version(name, version, description=card)
    if mv.run_id:
        client.log_text(mv.run_id, card, CARD_FILE)
    return card
