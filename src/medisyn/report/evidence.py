"""What the evaluation report shows for one model version (:class:`Evidence`), as plain data.

:mod:`medisyn.report.build` collects it from MLflow and storage and :mod:`medisyn.report.html`
renders it; both import it from here, so the page never imports the collector (issue #22).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from medisyn.evaluate.fid import ScoreResult


@dataclass
class PrivacyEvidence:
    prefix: str
    report: dict[str, Any]
    pairs: list[dict[str, Any]]  # every synthetic image and its nearest training image (pairs.jsonl)
    reference: list[dict[str, Any]]  # held-out test image -> nearest training image (reference.jsonl)
    samples: list[dict[str, Any]]  # samples.json rows + "png" (bytes)
    pair_images: list[dict[str, Any]]  # pair_images.json rows + "synthetic_png", "real_png"


@dataclass
class UtilityEvidence:
    prefix: str
    report: dict[str, Any]
    roc: dict[str, dict[str, np.ndarray]]  # task -> y_true, classes, multilabel, one score array per arm


@dataclass
class Evidence:
    """What the report shows for one version; ``notes`` say why a section has nothing to show."""

    model: str
    name: str
    version: str
    aliases: list[str]
    tags: dict[str, str]
    run_id: str
    created: str
    card_markdown: str
    card_context: dict[str, Any]
    gates: dict[str, dict[str, Any]]
    score: ScoreResult | None = None
    fid_grids: dict[str, bytes] = field(default_factory=dict)  # specialty slug -> PNG (best epoch)
    privacy: PrivacyEvidence | None = None
    utility: UtilityEvidence | None = None
    study: Any | None = None  # medisyn.study.report.StudyReport when the version has a closed study
    # For a candidate: the approved model's version copied from it (registry.promote), its aliases and
    # tags (approval record, revocation); None when it was never approved (mlflow/REGISTRY.md).
    approval: dict[str, Any] | None = None
    notes: dict[str, str] = field(default_factory=dict)  # section id -> what is missing and why
