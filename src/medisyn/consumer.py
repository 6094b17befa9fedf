"""What a consumer of MediSyn models calls (issue #21): approved versions only, verified before use.

Every path a consumer takes — ``medisyn pull``, ``medisyn generate``, and :func:`load_pyfunc` for MLflow
users — goes through the same steps, and fails closed with a one-line reason:

1. resolve the reference to one version; a revoked version is refused (the registry is asked every time);
2. download every file of the version;
3. verify the promoter's signature over all of them against the trust policy
   (``$MEDISYN_TRUST_DIR/promoter*.pub``): a candidate (never signed), another version's signature, a key
   outside the policy, or any changed, added or missing file is refused;
4. only then load (or hand over) the files.

``mlflow.pyfunc.load_model("models:/...")`` imports the model's loader code before anything can check it,
so a replaced loader would run; :func:`load_pyfunc` verifies first and loads the verified local copy.

Offline use is explicit: :func:`verify_pulled` checks a directory made by ``medisyn pull`` against the
trust policy with no registry, so a revocation after the pull is the caller's stated risk.
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path
from typing import Any

from medisyn.registry.consumer import pull, resolve_for_consumer, verify_approval, verify_pulled
from medisyn.registry.names import APPROVAL_FILE, APPROVAL_SIGNATURE_TAG

__all__ = ["load_pyfunc", "pull", "verify_pulled"]


def load_pyfunc(model_uri: str, dst: str | None = None) -> Any:
    """An approved version (``models:/<name>@approved`` or ``models:/<name>/<version>``) as an MLflow pyfunc,
    its files verified against the promoter's signature before MLflow imports any of its code.

    The verified copy is kept in ``dst`` (default: a new temporary directory). Python writes no bytecode
    into it while loading, so the copy stays exactly the signed files (the pyfunc checks them again)."""
    import mlflow

    name, version, tags = resolve_for_consumer(model_uri)
    dest = Path(dst) if dst else Path(tempfile.mkdtemp(prefix="medisyn-pyfunc-"))
    local = Path(mlflow.artifacts.download_artifacts(artifact_uri=f"models:/{name}/{version}", dst_path=str(dest)))
    verify_approval(name, version, tags.get(APPROVAL_SIGNATURE_TAG), local)
    (local / APPROVAL_FILE).write_text(tags[APPROVAL_SIGNATURE_TAG])
    before = sys.dont_write_bytecode
    sys.dont_write_bytecode = True
    try:
        return mlflow.pyfunc.load_model(str(local))
    finally:
        sys.dont_write_bytecode = before
