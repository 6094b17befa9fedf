"""The privacy gate's prompts and the groups (specialty, image type) their neighbours are searched in
(section 4.3.4): ``privacy.prompts``, else the catalog's privacy prompts, else the train captions."""

from __future__ import annotations

import logging
from dataclasses import dataclass

from medisyn.catalog import PromptSpec
from medisyn.config import RunConfig
from medisyn.data import iter_rows
from medisyn.evaluate.gates import dataset_catalog

log = logging.getLogger("medisyn.privacy")


@dataclass(frozen=True)
class PrivacyPrompt:
    prompt: str
    specialty: str
    image_type: str


def _train_groups(dataset_uri: str) -> dict[tuple[str, str], set[str]]:
    """{(specialty, image_type): distinct captions} of the train split (small columns only)."""
    groups: dict[tuple[str, str], set[str]] = {}
    for _, cols in iter_rows(dataset_uri, "train", ["specialty", "image_type", "caption"], batch_size=4096):
        for s, t, c in zip(cols["specialty"], cols["image_type"], cols["caption"], strict=True):
            groups.setdefault((s, t), set()).add(c)
    return groups


def _catalog_prompts(cfg: RunConfig, dataset_uri: str, specialties: set[str]) -> tuple[list[PromptSpec], str]:
    """The catalog's privacy prompts (section 4.3.4) for specialties present in the train split, or
    ([], why) when the catalog names none of them."""
    catalog = dataset_catalog(cfg, dataset_uri)
    specs = [p for p in catalog.privacy_prompt_specs() if p.specialty in specialties]
    if not specs:
        return [], f"catalog {catalog.origin!r} has no privacy prompts for specialties {sorted(specialties)}"
    return specs, "catalog"


def _common_prefix(a: str, b: str) -> int:
    n = 0
    for x, y in zip(a.lower(), b.lower(), strict=False):  # stops at the shorter string: intended
        if x != y:
            break
        n += 1
    return n


def _assign_group(prompt: str, groups: dict[tuple[str, str], set[str]]) -> tuple[str, str]:
    """The (specialty, image_type) whose training captions a prompt belongs to: an exact caption
    match, else the group with the longest common caption prefix (captions are templates such as
    "Dermoscopy image showing {disease}.", so the prefix names the image type)."""
    for key, captions in groups.items():
        if prompt in captions:
            return key
    best, best_len = None, 0
    for key, captions in sorted(groups.items()):
        length = max(_common_prefix(prompt, c) for c in captions)
        if length > best_len:
            best, best_len = key, length
    if best is None or best_len < 8:
        raise ValueError(f"privacy prompt {prompt!r} matches no specialty/image type of the training split")
    return best


def resolve_prompts(cfg: RunConfig, dataset_uri: str) -> tuple[list[PrivacyPrompt], str]:
    """Prompts to generate from and where to search their neighbours; returns (prompts, source).

    Order of preference: ``privacy.prompts``; the catalog's privacy prompts for specialties present
    in the train split; else every distinct caption of the train split (documented fallback).
    """
    groups = _train_groups(dataset_uri)
    if not groups:
        raise ValueError(f"{dataset_uri} has no training images: nothing to check memorization against")
    specialties = {s for s, _ in groups}
    # (prompt, its (specialty, image_type) when the source says) from the first source that has any
    candidates: list[tuple[str, tuple[str, str] | None]]
    if cfg.privacy.prompts:
        candidates, source = [(p, None) for p in cfg.privacy.prompts], "config"
    else:
        specs, source = _catalog_prompts(cfg, dataset_uri, specialties)
        candidates = [(p.prompt, (p.specialty, p.image_type)) for p in specs]
        if not candidates:
            log.warning("privacy prompts: %s; using the distinct captions of the train split", source)
            candidates = [(c, None) for c in sorted({c for caps in groups.values() for c in caps})]
            source = "train-captions"
    out: list[PrivacyPrompt] = []
    for text, group in candidates:
        if group is None or group not in groups:
            group = _assign_group(text, groups)
        out.append(PrivacyPrompt(text, *group))
    return list(dict.fromkeys(out)), source
