"""The source catalog: which repository is which specialty, image type, caption and modality rule.

The paper converted each public repository "into an image-text format by converting modality
information and existing class labels into descriptive text captions" (section 4.1) and lists the
prompt templates in section 4.3. The catalog states that conversion as data, one entry per source, so
a new repository is a YAML edit and not a code change. ``catalog.yaml`` next to this module is the
built-in catalog (the paper's sources); ``docs/preprocessing.md`` documents every field.

The gates use two helpers: :meth:`Catalog.privacy_prompts` (section 4.3.4, six specialties) and
:meth:`Catalog.utility_tasks` (section 4.3.5, three classification tasks).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from importlib import resources
from typing import Any

import yaml

BUILTIN = "builtin"
RULES = ("auto", "hu_window", "percentile_clip", "minmax", "keep")
_RULE_PARAMS = {
    "auto": {"level", "width", "low", "high", "apply_voi_lut"},
    "hu_window": {"level", "width"},
    "percentile_clip": {"low", "high"},
    "minmax": {"apply_voi_lut"},
    "keep": set(),
}


class CatalogError(ValueError):
    """A catalog file is invalid; the message names the source and field."""


def join_label_texts(texts: list[str]) -> str:
    """Multi-label caption text: "a", "a and b", "a, b and c" (section 4.3.5 "{disease(s)}")."""
    if len(texts) <= 1:
        return "".join(texts)
    return ", ".join(texts[:-1]) + " and " + texts[-1]


@dataclass(frozen=True)
class Source:
    """One image repository on object storage and how its files become image-text pairs."""

    name: str
    prefix: str  # relative to the landing zone (raw_uri)
    specialty: str
    image_type: str
    caption_template: str  # "{label}" is replaced by the label text
    label_map: dict[str, str]  # raw label -> label text (order = caption/label order)
    labels_table: str | None = "labels.csv"  # None: label = name of the file's parent folder
    path_column: str = "file"
    label_column: str = "label"
    patient_id_column: str | None = None
    patient_id_dicom_tag: str | None = None
    multilabel: bool = False
    label_separator: str = "|"
    rule: str = "auto"
    rule_params: dict[str, Any] = field(default_factory=dict)
    tile: dict[str, Any] | None = None  # {"size": 512} for whole-slide images

    def label_texts(self, raw: str | Iterable[str]) -> list[str]:
        """Raw label(s) -> label texts in ``label_map`` order; KeyError names an unknown label."""
        if isinstance(raw, str):
            parts = [p.strip() for p in raw.split(self.label_separator)] if self.multilabel else [raw.strip()]
        else:
            parts = [str(p).strip() for p in raw]
        parts = [p for p in parts if p]
        if not parts:
            raise KeyError(f"empty label for source {self.name!r}")
        unknown = [p for p in parts if p not in self.label_map]
        if unknown:
            raise KeyError(f"label {unknown[0]!r} is not in the label_map of source {self.name!r}")
        if len(parts) > 1 and not self.multilabel:
            raise KeyError(f"source {self.name!r} is single-label but got {len(parts)} labels")
        keys = list(self.label_map)
        return [self.label_map[k] for k in sorted(set(parts), key=keys.index)]

    def caption_for(self, labels: str | Iterable[str]) -> str:
        """The paper's caption for raw label(s), e.g. ``caption_for("1")`` ->
        "Chest CT pulmonary angiography image showing pulmonary embolism." (section 4.3.4)."""
        return self.caption_template.format(label=join_label_texts(self.label_texts(labels)))

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class PromptSpec:
    """One section 4.3.4 prompt: the caption the model is asked to reproduce."""

    specialty: str
    image_type: str
    source: str
    label: str  # label text
    prompt: str

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class UtilityTaskSpec:
    """One section 4.3.5 classification task."""

    name: str
    source: str
    specialty: str
    image_type: str
    classes: tuple[str, ...]  # label texts, the classifier's outputs (= `label` column values)
    multilabel: bool
    prompts: tuple[str, ...]  # one caption per class (multi-label: one per single disease)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class Catalog:
    sources: tuple[Source, ...]
    privacy: tuple[dict[str, Any], ...] = ()
    utility: tuple[dict[str, Any], ...] = ()
    origin: str = BUILTIN
    digest: str = ""  # sha256 of the canonical catalog, recorded in the manifest for lineage

    def source(self, name: str) -> Source:
        for s in self.sources:
            if s.name == name:
                return s
        raise KeyError(f"no source {name!r} in catalog {self.origin} (have: {', '.join(self.names)})")

    @property
    def names(self) -> list[str]:
        return [s.name for s in self.sources]

    def specialties(self) -> list[str]:
        return sorted({s.specialty for s in self.sources})

    def privacy_prompt_specs(self) -> list[PromptSpec]:
        out = []
        for entry in self.privacy:
            src = self.source(entry["source"])
            for raw in entry["labels"]:
                out.append(PromptSpec(src.specialty, src.image_type, src.name, src.label_map[raw],
                                      src.caption_for(raw)))
        return out

    def privacy_prompts(self) -> dict[str, list[str]]:
        """specialty -> prompts (section 4.3.4), e.g. radiology -> the two chest CT PE captions."""
        out: dict[str, list[str]] = {}
        for spec in self.privacy_prompt_specs():
            out.setdefault(spec.specialty, []).append(spec.prompt)
        return out

    def utility_tasks(self) -> list[UtilityTaskSpec]:
        """The section 4.3.5 tasks (chest X-ray multi-label, dermoscopy, prostatectomy)."""
        out = []
        for entry in self.utility:
            src = self.source(entry["source"])
            raws = list(entry["labels"])
            out.append(
                UtilityTaskSpec(
                    name=entry["name"],
                    source=src.name,
                    specialty=src.specialty,
                    image_type=src.image_type,
                    classes=tuple(src.label_map[r] for r in raws),
                    multilabel=bool(entry.get("multilabel", src.multilabel)),
                    prompts=tuple(src.caption_for(r) for r in raws),
                )
            )
        return out

    def to_dict(self) -> dict[str, Any]:
        return {
            "origin": self.origin,
            "digest": self.digest,
            "sources": [s.to_dict() for s in self.sources],
            "privacy_prompts": list(self.privacy),
            "utility_tasks": list(self.utility),
        }


_SOURCE_FIELDS = set(Source.__dataclass_fields__) - {"name"}


def _parse_source(name: str, entry: Any, origin: str) -> Source:
    where = f"catalog {origin}: sources.{name}"
    if not isinstance(entry, dict):
        raise CatalogError(f"{where}: must be a mapping")
    unknown = set(entry) - _SOURCE_FIELDS
    if unknown:
        raise CatalogError(f"{where}: unknown field(s) {sorted(unknown)} (see docs/preprocessing.md)")
    for req in ("prefix", "specialty", "image_type", "caption_template", "label_map"):
        if not entry.get(req):
            raise CatalogError(f"{where}.{req}: required")
    if "{label}" not in entry["caption_template"]:
        raise CatalogError(f"{where}.caption_template: must contain '{{label}}'")
    if not isinstance(entry["label_map"], dict):
        raise CatalogError(f"{where}.label_map: must map raw label -> label text")
    rule = entry.get("rule", "auto")
    if rule not in RULES:
        raise CatalogError(f"{where}.rule: {rule!r} is not one of {', '.join(RULES)}")
    params = dict(entry.get("rule_params") or {})
    bad = set(params) - _RULE_PARAMS[rule]
    if bad:
        raise CatalogError(f"{where}.rule_params: {sorted(bad)} not accepted by rule {rule!r}")
    tile = entry.get("tile")
    if tile is not None and (not isinstance(tile, dict) or int(tile.get("size", 0)) < 16):
        raise CatalogError(f"{where}.tile: must be a mapping with size >= 16")
    if str(entry["prefix"]).startswith("/") or ".." in str(entry["prefix"]).split("/"):
        raise CatalogError(f"{where}.prefix: must be relative to the landing zone, without '..'")
    kwargs = dict(entry)
    kwargs["label_map"] = {str(k): str(v) for k, v in entry["label_map"].items()}
    kwargs["rule_params"] = params
    return Source(name=name, **kwargs)


def parse_catalog(data: Any, origin: str = "<dict>") -> Catalog:
    """Validate a catalog mapping (the YAML's content)."""
    if not isinstance(data, dict) or not isinstance(data.get("sources"), dict) or not data["sources"]:
        raise CatalogError(f"catalog {origin}: needs a non-empty 'sources' mapping")
    unknown = set(data) - {"version", "sources", "privacy_prompts", "utility_tasks"}
    if unknown:
        raise CatalogError(f"catalog {origin}: unknown top-level key(s) {sorted(unknown)}")
    sources = tuple(_parse_source(str(n), e, origin) for n, e in data["sources"].items())
    cat = Catalog(sources=sources, origin=origin)
    privacy = tuple(data.get("privacy_prompts") or ())
    utility = tuple(data.get("utility_tasks") or ())
    for i, entry in enumerate(privacy + utility):
        kind = "privacy_prompts" if i < len(privacy) else "utility_tasks"
        try:
            src = cat.source(entry["source"])
            for raw in entry["labels"]:
                src.label_texts([raw])
        except (KeyError, TypeError) as exc:
            raise CatalogError(f"catalog {origin}: {kind} entry {entry!r}: {exc}") from None
    canonical = json.dumps(
        {"sources": [s.to_dict() for s in sources], "privacy": privacy, "utility": utility}, sort_keys=True
    )
    digest = hashlib.sha256(canonical.encode()).hexdigest()
    return Catalog(sources=sources, privacy=privacy, utility=utility, origin=origin, digest=digest)


def builtin_catalog_text() -> str:
    return resources.files("medisyn").joinpath("catalog.yaml").read_text()


def load_catalog(uri_or_builtin: str = BUILTIN) -> Catalog:
    """``"builtin"`` (the paper's sources, shipped as package data) or a YAML path / file:// / s3:// URI."""
    if uri_or_builtin == BUILTIN:
        text, origin = builtin_catalog_text(), BUILTIN
    else:
        from medisyn import storage

        origin = str(uri_or_builtin)
        try:
            text = storage.read_text(origin)
        except (OSError, ValueError) as exc:
            raise CatalogError(f"cannot read catalog {origin}: {exc}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise CatalogError(f"catalog {origin} is not valid YAML: {exc}") from None
    return parse_catalog(data, origin)
