"""The model card (markdown) of every registered version: intended use and limits, data summary,
training config, FID, lineage, and the gate results as they arrive.

The static part (``context``, a JSON-able dict) is written once at registration and stored with the
version's run (``model_card/context.json``); the gate section is rebuilt from the version's tags each
time a gate reports, so the card always shows what the registry says.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

INTENDED_USE = """\
**Intended use.** Research on synthetic medical images: augmenting training sets of image
classifiers and studying generative models (paper sections 2-4). Generated images are synthetic;
they depict no patient.

**Not intended for** diagnosis, treatment decisions, or any clinical use; nor as evidence of a
finding in a real patient. Images can contain plausible-looking but wrong anatomy or findings.

**Limits.** Quality and text alignment vary by specialty and prompt (see the per-specialty FID).
FID measures distributional similarity to the training images, not clinical correctness. The model
may reproduce training images: the privacy gate (BiomedCLIP nearest neighbour + patch distance,
section 4.3.4) checks for it before approval. Only prompts of the catalog's templates were seen in
training."""


def _table(headers: list[str], rows: Sequence[Sequence[Any]]) -> str:
    if not rows:
        return "_none_\n"
    out = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    out += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return "\n".join(out) + "\n"


def _fmt(v: Any) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def _data_section(manifest: dict | None) -> str:
    if not manifest:
        return "_dataset manifest not available_\n"
    parts = []
    if manifest.get("dataset_hash"):
        parts.append(f"Dataset hash: `{manifest['dataset_hash']}`\n")
    # The manifest's count tables (docs/stages.md): render every mapping-of-counts it has.
    for key, value in manifest.items():
        if not isinstance(value, dict) or not value:
            continue
        if all(isinstance(v, dict) for v in value.values()):
            cols = sorted({c for v in value.values() for c in v})
            rows = [[k] + [v.get(c, "") for c in cols] for k, v in sorted(value.items())]
            parts.append(f"**{key}**\n\n" + _table([key] + cols, rows))
        elif all(isinstance(v, (int, float)) for v in value.values()):
            parts.append(f"**{key}**\n\n" + _table([key, "count"], sorted(value.items())))
    for key in ("n_rejected", "n_duplicates", "rejected", "duplicates", "total"):
        if isinstance(manifest.get(key), (int, float)):
            parts.append(f"- {key}: {manifest[key]}\n")
    return "\n".join(parts) or "_no count tables in the manifest_\n"


def render(context: dict[str, Any], gates: dict[str, dict[str, Any]] | None = None) -> str:
    """Markdown card from the registration ``context`` and the gate results ``{name: {status, details}}``."""
    name, version = context.get("name", "?"), context.get("version", "?")
    score = context.get("score", {})
    lines = [f"# Model card: {name} version {version}", ""]
    lines += ["## Intended use and limits", "", INTENDED_USE, ""]
    lines += ["## Model", ""]
    lines += [
        "- Architecture: SDXL (two CLIP text encoders, U-Net, VAE), only the U-Net fine-tuned (section 4.2)",
        f"- Checkpoint: `{context.get('checkpoint_uri')}` (epoch {context.get('epoch')})",
        f"- U-Net weights: safetensors, {context.get('package_dtype')}",
        f"- Frozen base components: {context.get('base_components_summary', '')}",
        f"- Gated sampling settings (what the gates judged, and what `generate`, the study and the pyfunc use by "
        f"default; other settings are served with a warning, recorded as not gated): "
        f"{json.dumps(context.get('sampling', {}), sort_keys=True)}",
        "",
    ]
    lines += ["## Data", "", _data_section(context.get("manifest")), ""]
    lines += ["## Training configuration", ""]
    train = context.get("train", {})
    lines += [_table(["field", "value"], [[k, _fmt(v)] for k, v in sorted(train.items())]), ""]
    lines += ["## FID (section 4.2)", ""]
    ci = score.get("fid_ci")
    ci_txt = f" (bootstrap 95% interval {ci[0]:.4g} - {ci[1]:.4g})" if ci else ""
    fid = score.get("fid")
    lines.append(f"Pooled FID at epoch {context.get('epoch')}: **{_fmt(fid)}**{ci_txt}, "
                 f"N = {score.get('num_samples')} real vs as many generated, mode {score.get('mode')}.")
    lines.append("")
    prov = score.get("provenance", {})
    lines.append(_table(["provenance", "value"], [[k, v] for k, v in sorted(prov.items()) if not isinstance(v, dict)]))
    lines.append("Per specialty:\n")
    by_specialty = sorted(score.get("fid_by_specialty", {}).items())
    lines.append(_table(["specialty", "FID"], [[k, _fmt(v)] for k, v in by_specialty]))
    lines.append("Per epoch:\n")
    by_epoch = sorted(score.get("fid_by_epoch", {}).items(), key=lambda kv: int(kv[0]))
    lines.append(_table(["epoch", "FID"], [[k, _fmt(v)] for k, v in by_epoch]))
    lines += ["## Gates", ""]
    if gates:
        rows = [[g, r.get("status", "?"), r.get("at", ""), json.dumps(r.get("details", {}), sort_keys=True)[:300]]
                for g, r in sorted(gates.items())]
        lines.append(_table(["gate", "result", "at", "details"], rows))
    else:
        lines.append("_no gate has reported yet: this version is not approved_\n")
    lines += ["## Lineage", ""]
    lines.append(_table(["", "value"], [[k, context.get(k, "")] for k in
                                        ("dataset_hash", "config_hash", "code_version", "pipeline_run_id", "run_id")]))
    return "\n".join(lines)
