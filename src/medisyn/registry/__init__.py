"""The MLflow model registry side of MediSyn: package, register, tag, promote, pull.

One room per purpose (issue #22): :mod:`.names` (the two registered models, references, tag names,
errors), :mod:`.package` (packaging and registration), :mod:`.card` (the model card), :mod:`.verdicts`
(recording and verifying gate verdicts), :mod:`.promotion` (promote, revoke) and :mod:`.consumer` (pull).
Their public names are re-exported here: ``from medisyn import registry; registry.promote(...)``.

Conventions (docs/registry.md):

* Two registered models (mlflow/REGISTRY.md, issue #10): candidates in ``<tracking.model_name>-candidates``,
  which the pipeline identity may edit (alias ``candidate``); approved versions in ``tracking.model_name``,
  which only the promoting identity may edit (alias ``approved``). MLflow's permissions cannot let an
  identity create versions without also letting it set aliases, so the split is what stops the
  pipeline (or anyone else) from approving: approval is enforced by the server, not by convention.
* A verdict is the gate's MLflow run, not a tag: the run records (as immutable params) the gate, the
  candidate version it judged, the model's manifest digest, the sha256 of its verdict and report
  artifacts and the identity that wrote it; ``promote`` re-reads and re-hashes all of it. A hand-set
  ``gate.<name>`` tag is display only. Every approval records who, when and that evidence on the
  approved version; ``revoke`` withdraws one with a reason.
* Integrity: the sha256 of the packaged manifest and of the U-Net weights are recorded on the version
  when it is registered (and copied onto the approved version and its approval record); every
  consumer path (``pull``, ``generate``, ``pyfunc.load_model``) verifies them.
* A version is an MLflow pyfunc logged from code (``medisyn/pyfunc_model.py``) whose artifact
  ``pipeline`` is a complete diffusers SDXL directory: the fine-tuned U-Net (safetensors, in
  ``tracking.package_dtype``, bf16 by default) plus byte-identical copies of the frozen base
  components (text encoders, tokenizers, the fp16-fix VAE), pinned by sha256 in
  ``medisyn_model.json``. Self-contained on purpose: a consumer needs only the registry.
* Version tags carry the lineage: epoch, FID (pooled, per specialty, interval), FID provenance,
  dataset hash, config hash, code version, pipeline run id; ``gate.<name>`` = passed|failed.
* The model card (markdown) is the version's description and a run artifact, rebuilt on each gate.
"""

from medisyn.registry.card import gates_from_tags
from medisyn.registry.consumer import pull, pull_cached, resolve_for_consumer
from medisyn.registry.names import (
    CANDIDATE_TAG,
    CANDIDATES_SUFFIX,
    CARD_CONTEXT,
    CARD_FILE,
    GATE_FAILED,
    GATE_PASSED,
    MANIFEST_DIGEST_TAG,
    MANIFEST_FILE,
    MODEL_INFO_FILE,
    PIPELINE_ARTIFACT,
    UNET_DIGEST_TAG,
    UNET_WEIGHTS,
    VERDICT_ARTIFACT,
    IntegrityError,
    RegistryError,
    approved_model,
    candidates_model,
    identity,
    is_outage,
    parse_model_uri,
    resolve_version,
)
from medisyn.registry.package import RegisteredModel, build_pipeline_dir, register_candidate
from medisyn.registry.promotion import PromoteResult, RevokeResult, promote, revoke
from medisyn.registry.verdicts import gate_statuses, gates_not_passed, set_gate_result, verified_gates

__all__ = [
    "CANDIDATES_SUFFIX", "CANDIDATE_TAG", "CARD_CONTEXT", "CARD_FILE", "GATE_FAILED", "GATE_PASSED",
    "MANIFEST_DIGEST_TAG", "MANIFEST_FILE", "MODEL_INFO_FILE", "PIPELINE_ARTIFACT", "UNET_DIGEST_TAG",
    "UNET_WEIGHTS", "VERDICT_ARTIFACT", "IntegrityError", "PromoteResult", "RegisteredModel", "RegistryError",
    "RevokeResult", "approved_model", "build_pipeline_dir", "candidates_model", "gate_statuses",
    "gates_from_tags", "gates_not_passed", "identity", "is_outage", "parse_model_uri", "promote", "pull",
    "pull_cached", "register_candidate", "resolve_for_consumer", "resolve_version", "revoke",
    "set_gate_result", "verified_gates",
]
