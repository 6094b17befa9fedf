"""Build a reader study: N synthetic images per class from a model version, N real test-split images
per class, shuffled with a recorded seed, blinded, stored under random ids (sections 4.3.2-4.3.3).

Blinding (docs/study.md): every image, real or synthetic, goes through :func:`blind_png`, which
re-encodes it the same way: RGB, one fixed side (center crop + Lanczos resize), a PNG built from the
bare pixel array (no text, time, ICC, EXIF or physical-size chunks: only IHDR, IDAT, IEND), stored
uncompressed, so every served file has exactly the same byte length whatever it shows (a smoother
synthetic image would otherwise compress smaller). Ids come from ``secrets``, never from the image.
"""

from __future__ import annotations

import io
import json
import logging
import random
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageOps

from medisyn import registry, storage, tracking
from medisyn.config import RunConfig, StudyTask
from medisyn.results import StageResult
from medisyn.study import db

log = logging.getLogger("medisyn.study")

TEST_SPLIT = "test"  # sections 4.3.2-4.3.3: the real images come from the held-out test set


@dataclass(frozen=True)
class StudyCreated(StageResult):
    study_id: str
    name: str
    model: str  # the reference as given
    model_name: str
    model_version: str  # aliases resolved at creation time
    dataset_uri: str
    task: str
    classes: tuple[str, ...]
    images_per_class: int  # per origin
    n_items: int
    seed: int
    image_size: int
    db: str  # the database URL, password redacted


def task_by_name(cfg: RunConfig, name: str | None = None) -> StudyTask:
    name = name or cfg.study.task
    for task in cfg.study.tasks:
        if task.name == name:
            return task
    raise ValueError(f"no study task {name!r}; tasks: {', '.join(t.name for t in cfg.study.tasks)}")


def blind_png(image: Image.Image, size: int) -> bytes:
    """The one encoding of every study image (real and synthetic): RGB, ``size`` x ``size``, a PNG
    with only IHDR/IDAT/IEND, uncompressed (its byte length depends on ``size`` only)."""
    rgb = image.convert("RGB")
    if rgb.size != (size, size):
        rgb = ImageOps.fit(rgb, (size, size), method=Image.Resampling.LANCZOS)
    bare = Image.fromarray(np.array(rgb, dtype=np.uint8), mode="RGB")  # a new image: no info, no profile
    buf = io.BytesIO()
    bare.save(buf, format="PNG", compress_level=0)
    return buf.getvalue()


def _real_images(dataset_uri: str, task: StudyTask, n: int, rng: np.random.Generator) -> list[tuple[str, bytes, str]]:
    """(class, PNG bytes, image_hash) of ``n`` test-split images per class, chosen at random."""
    from medisyn.data import iter_rows

    chosen: list[tuple[str, bytes, str]] = []
    for label in task.classes:
        where = {"specialty": task.specialty, "image_type": task.image_type, "label": label}
        ids = [int(i) for row_ids, _ in iter_rows(dataset_uri, TEST_SPLIT, ["image_hash"], where=where)
               for i in row_ids]
        if len(ids) < n:
            raise ValueError(f"the {TEST_SPLIT} split of {dataset_uri} has {len(ids)} {task.image_type} images of "
                             f"class {label!r}; the study needs {n} (study.images_per_class)")
        keep = set(int(i) for i in rng.choice(np.asarray(ids), size=n, replace=False))
        for row_ids, cols in iter_rows(dataset_uri, TEST_SPLIT, ["image", "image_hash"], where=where):
            for rid, png, ihash in zip(row_ids, cols["image"], cols["image_hash"], strict=True):
                if int(rid) in keep:
                    chosen.append((label, png, str(ihash)))
    return chosen


def create_study(cfg: RunConfig, model: str, dataset: str, task: str | None = None, name: str = "",
                 db_url: str | None = None) -> tuple[StudyCreated, str]:
    """Build a study in the database; returns its description and the admin token (shown once).

    ``model`` is a registered version (``models:/<name>/<version>``, ``models:/<name>@<alias>`` or a
    version number); ``dataset`` a preprocessed dataset prefix whose test split holds the real images.
    """
    from medisyn.generate import load_model, sample, served_sampling

    spec = task_by_name(cfg, task)
    n = cfg.study.images_per_class
    seed = cfg.study.seed
    tracking.require_tracking(cfg)
    model_name, version = registry.resolve_version(cfg, model)
    rng = np.random.default_rng(seed)
    real = _real_images(dataset, spec, n, rng)

    prompts = [spec.prompt_template.format(label=label) for label in spec.classes for _ in range(n)]
    labels = [label for label in spec.classes for _ in range(n)]
    seeds = [int(s) for s in rng.integers(0, 2**31 - 1, size=len(prompts))]
    pipe = load_model(cfg, f"models:/{model_name}/{version}")  # the resolved version, not a moving alias
    settings, gated = served_sampling(cfg, pipe)  # readers judge what the gates judged (issue #25)
    synthetic = sample(pipe, prompts, seeds, settings, cfg.sampling_resolution(), desc="study")
    del pipe

    items: list[dict] = []
    for label, png, ihash in real:
        items.append({"origin": "real", "class": label, "source": f"image_hash={ihash}",
                      "png": blind_png(Image.open(io.BytesIO(png)), cfg.study.image_size)})
    for label, image, image_seed, prompt in zip(labels, synthetic, seeds, prompts, strict=True):
        items.append({"origin": "synthetic", "class": label, "source": f"seed={image_seed}; prompt={prompt}",
                      "png": blind_png(image, cfg.study.image_size)})
    random.Random(seed).shuffle(items)  # the reading order; recorded below with the ids
    for position, item in enumerate(items):
        item["id"], item["position"] = db.new_id(), position

    study_id = db.new_id()
    study_name = name or f"{spec.name} {model_name} v{version}"
    definition = {
        "study_id": study_id, "name": study_name, "task": spec.name, "question": spec.question,
        "prompt_template": spec.prompt_template, "classes": list(spec.classes), "seed": seed,
        "images_per_class": n, "image_size": cfg.study.image_size, "model": model, "model_name": model_name,
        "model_version": version, "dataset_uri": storage.normalize(dataset), "split": TEST_SPLIT,
        "sampling": settings.model_dump(mode="json") | {"resolution": cfg.sampling_resolution(), "gated": gated},
        "items": [{k: it[k] for k in ("id", "position", "origin", "class", "source")} for it in items],
    }
    admin_token = db.new_token()
    engine = db.open_db(db_url or cfg.study.db_url)
    with db.session(engine) as s:
        s.add(db.Study(id=study_id, name=study_name, task=spec.name, question=spec.question,
                       classes_json=json.dumps(list(spec.classes)), model_name=model_name, model_version=version,
                       definition_json=json.dumps(definition), admin_token_hash=db.hash_token(admin_token),
                       created_at=db.utcnow()))
        s.flush()
        for it in items:
            s.add(db.StudyItem(id=it["id"], study_id=study_id, position=it["position"], origin=it["origin"],
                               true_class=it["class"], source=it["source"], png=it["png"]))
    log.info("study %s: %d images (%d real, %d synthetic) of %s v%s, seed %d", study_id, len(items), len(real),
             len(synthetic), model_name, version, seed)
    created = StudyCreated(
        study_id=study_id, name=study_name, model=str(model), model_name=model_name, model_version=version,
        dataset_uri=storage.normalize(dataset), task=spec.name, classes=tuple(spec.classes), images_per_class=n,
        n_items=len(items), seed=seed, image_size=cfg.study.image_size,
        db=db.redact(db.resolve_db_url(db_url or cfg.study.db_url)),
    )
    return created, admin_token


def study_definition(engine, study_id: str) -> dict:
    """The recorded definition (seed, ids, origins, classes, sources): study side only, never served."""
    with db.session(engine) as s:
        return dict(json.loads(db.get_study(s, study_id).definition_json))
