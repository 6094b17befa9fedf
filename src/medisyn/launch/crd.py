"""Validation of every job against its operator's own CRD, offline, from package data
(``medisyn/crds/*.yaml``; a missing CRD is an error, never a skip)."""

from __future__ import annotations

import os
from importlib import resources
from importlib.resources.abc import Traversable
from pathlib import Path
from typing import Any

#: The operators' CRDs, shipped as package data (medisyn/crds/*.yaml), by the kind they define.
CRD_FILES: dict[str, str] = {
    "PyTorchJob": "kubeflow.org_pytorchjobs.yaml",
    "RayJob": "ray.io_rayjobs.yaml",
    "TrainJob": "trainer.kubeflow.org_trainjobs.yaml",
    "TrainingRuntime": "trainer.kubeflow.org_trainingruntimes.yaml",
}
PYTORCHJOB_CRD = CRD_FILES["PyTorchJob"]
RAYJOB_CRD = CRD_FILES["RayJob"]
TRAINJOB_CRD = CRD_FILES["TrainJob"]

_CRD_CACHE: dict[str, dict[str, Any]] = {}


def crd_resource(kind: str) -> Traversable:
    """The packaged CRD file of ``kind``; ``FileNotFoundError`` when the installation lacks it."""
    filename = CRD_FILES.get(kind)
    if filename is None:
        raise ValueError(f"no packaged CRD for kind {kind!r}; known: {sorted(CRD_FILES)}")
    res = resources.files("medisyn").joinpath("crds", filename)
    if not res.is_file():
        raise FileNotFoundError(f"the {kind} CRD {filename} is missing from the installed medisyn package "
                                "(package data medisyn/crds): reinstall medisyn")
    return res


def _load_crd(crd: Traversable | str | os.PathLike[str]) -> dict[str, Any]:
    import yaml

    key = str(crd)
    if key not in _CRD_CACHE:
        text = Path(crd).read_text() if isinstance(crd, (str, os.PathLike)) else crd.read_text()
        # the CRDs are MBs of YAML: the C loader reads them ~10x faster when PyYAML has it
        loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
        _CRD_CACHE[key] = yaml.load(text, Loader=loader)
    return _CRD_CACHE[key]


def validate_against_crd(manifest: dict[str, Any], crd: Traversable | str | os.PathLike[str] | None = None) -> None:
    """Raise ``ValueError`` listing every violation of ``manifest`` against its CRD's OpenAPI schema.

    ``crd`` defaults to the packaged CRD of the manifest's kind (:func:`crd_resource`). Checks that
    apiVersion and kind match a served version of the CRD, then validates the whole object with
    jsonschema.
    """
    import jsonschema

    kind = str(manifest.get("kind"))
    source = crd if crd is not None else crd_resource(kind)
    doc = _load_crd(source)
    names, group = doc["spec"]["names"], doc["spec"]["group"]
    if kind != names["kind"]:
        raise ValueError(f"kind {kind!r} does not match the CRD's kind {names['kind']!r}")
    api_version = str(manifest.get("apiVersion", ""))
    grp, _, ver = api_version.rpartition("/")
    versions = {v["name"]: v for v in doc["spec"]["versions"] if v.get("served", True)}
    if grp != group or ver not in versions:
        raise ValueError(f"apiVersion {api_version!r} is not served by this CRD ({group}/{'|'.join(versions)})")
    schema = versions[ver]["schema"]["openAPIV3Schema"]
    meta = manifest.get("metadata") or {}
    if not meta.get("name"):
        raise ValueError("metadata.name is required")
    validator = jsonschema.Draft7Validator(schema)
    errors = sorted(validator.iter_errors(manifest), key=lambda e: [str(p) for p in e.absolute_path])
    if errors:
        lines = [f"{kind} {meta.get('name')} is invalid against {Path(str(source)).name}:"]
        for e in errors[:20]:
            path = ".".join(str(p) for p in e.absolute_path) or "<root>"
            lines.append(f"  {path}: {e.message[:300]}")
        raise ValueError("\n".join(lines))

