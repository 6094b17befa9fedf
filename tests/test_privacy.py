"""Privacy gate (paper 4.3.4 / 4.4): eq. (3) against hand computations, the Wilcoxon decision, and the
whole gate in both directions with injected generators (copies of training images must FAIL,
unrelated noise must PASS)."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
from PIL import Image

from helpers import S3_BUCKET, copying_sampler, train_images
from medisyn import storage
from medisyn.config import RunConfig
from medisyn.evaluate.gates import GateResult, run_gate
from medisyn.evaluate.privacy import (
    PrivacyPrompt,
    patch_distance,
    privacy_gate,
    resolve_prompts,
    wilcoxon_above_threshold,
)

RES = 64
GROUPS = {
    ("dermatology", "dermoscopy"): ["Dermoscopy image showing melanoma.", "Dermoscopy image showing melanocytic nevi."],
    ("ophthalmology", "oct"): ["Optical coherence tomography image showing drusen."],
}


def _png(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def _phantom(rng: np.random.Generator) -> np.ndarray:
    """A smooth random image (a blurred colour field): far from uniform noise, unique per draw."""
    small = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)
    return np.asarray(Image.fromarray(small).resize((RES, RES), Image.Resampling.BICUBIC))


def write_dataset(root, n_per_caption: int = 6, seed: int = 0) -> str:
    """A tiny dataset prefix in the documented Parquet format (docs/stages.md), one shard per split."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    rng = np.random.default_rng(seed)
    uri = str(root / "dataset")
    for split in ("train", "val", "test"):
        rows = []
        for (spec, itype), captions in GROUPS.items():
            for cap in captions:
                for _ in range(n_per_caption):
                    arr = _phantom(rng)
                    rows.append(dict(
                        image=_png(arr), caption=cap, specialty=spec, image_type=itype,
                        label=cap.split("showing ")[1][:-1], source="phantom", split=split,
                        patient_hash=f"p{len(rows)}", image_hash=f"{split}-{len(rows):04d}",
                        pixel_hash=f"px{split}{len(rows)}", width=RES, height=RES,
                    ))
        (root / "dataset" / split).mkdir(parents=True, exist_ok=True)
        pq.write_table(pa.Table.from_pylist(rows), root / "dataset" / split / "part-00000.parquet", row_group_size=5)
    (root / "dataset" / storage.COMPLETE_MARKER).write_text("{}")
    return uri


@pytest.fixture(autouse=True, scope="module")
def _one_torch_thread(one_torch_thread_module):
    yield


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory):
    from medisyn.config import TinyModelsConfig
    from medisyn.models.biomedclip import build_tiny_biomedclip

    d = tmp_path_factory.mktemp("clip") / "biomedclip-tiny"
    build_tiny_biomedclip(TinyModelsConfig(), d)
    return d


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return write_dataset(tmp_path_factory.mktemp("privacy-data"))


def gate_cfg(clip_dir, **privacy) -> RunConfig:
    # the three training captions, so a copying generator has something to copy
    p = dict(images_per_prompt=4, patch_size=16, batch_size=8, prompts=[c for cs in GROUPS.values() for c in cs])
    p.update(privacy)
    return RunConfig.model_validate({
        "models": {"biomedclip": str(clip_dir)}, "runtime": {"device": "cpu"},
        "data": {"resolution": RES}, "sampling": {"batch_size": 5}, "privacy": p,
    })


# ----------------------------------------------------------------------------------------------
# eq. (3)
# ----------------------------------------------------------------------------------------------
PATCH_CASES = [
    # (real, synth, patch, expected) -- hand computed
    ("identical", np.full((4, 4), 7), np.full((4, 4), 7), 2, 0.0),
    ("black vs white", np.zeros((4, 4)), np.full((4, 4), 255), 2, 1.0),
    # one patch of four differs by 255 in one of its 4 pixels: sqrt(255^2)/sqrt(255^2*4) = 0.5
    ("one pixel", np.zeros((4, 4)), np.pad(np.full((1, 1), 255), ((0, 3), (0, 3))), 2, 0.5),
    # whole-image difference of 51 everywhere: 51/255 = 0.2 in every patch
    ("uniform 51", np.zeros((8, 8, 3)), np.full((8, 8, 3), 51), 4, 0.2),
    # max over patches: top-left patch differs by 102 (0.4), others by 51 (0.2) -> 0.4
    ("max over patches", np.zeros((4, 4)), np.array([[102, 102, 51, 51], [102, 102, 51, 51],
                                                      [51, 51, 51, 51], [51, 51, 51, 51]]), 2, 0.4),
    # a single patch = plain normalized Euclidean distance: diffs (255, 0, 0, 0) over 2x2x1 -> 0.5
    ("single patch", np.zeros((2, 2)), np.array([[255, 0], [0, 0]]), 2, 0.5),
]


@pytest.mark.parametrize("name,real,synth,patch,expected", PATCH_CASES, ids=[c[0] for c in PATCH_CASES])
def test_patch_distance_hand_computed(name, real, synth, patch, expected):
    assert patch_distance(real, synth, patch) == pytest.approx(expected, abs=1e-12)
    assert patch_distance(synth, real, patch) == pytest.approx(expected, abs=1e-12)  # symmetric


def test_patch_distance_paper_geometry_16_patches():
    """512 px, 128 px patches: only the patch that differs counts; d equals that patch's own distance."""
    a = np.zeros((512, 512, 3), dtype=np.uint8)
    b = a.copy()
    b[128:256, 384:512] = 51  # one of the 16 patches differs by 51 -> 51/255
    assert patch_distance(a, b, 128) == pytest.approx(0.2)
    # a tiny change spread over the whole image would be smaller than one localised copy difference
    c = np.full_like(a, 10)
    assert patch_distance(a, c, 128) == pytest.approx(10 / 255)


@pytest.mark.parametrize("real,synth,patch,match", [
    (np.zeros((4, 4)), np.zeros((4, 6)), 2, "shape"),
    (np.zeros((6, 6)), np.zeros((6, 6)), 4, "divisible"),
    (np.zeros((4, 4)), np.full((4, 4), 300), 2, "0..255"),
    (np.zeros((2, 2, 2, 2)), np.zeros((2, 2, 2, 2)), 1, "shape"),
])
def test_patch_distance_errors(real, synth, patch, match):
    with pytest.raises(ValueError, match=match):
        patch_distance(real, synth, patch)


def test_wilcoxon_matches_scipy_and_edge_cases():
    from scipy.stats import wilcoxon

    d = np.array([0.3, 0.25, 0.4, 0.2, 0.35, 0.5, 0.28, 0.22])
    assert wilcoxon_above_threshold(d, 0.15) == pytest.approx(wilcoxon(d - 0.15, alternative="greater").pvalue)
    # all 8 above: exact one-sided p = 1 / 2^8
    assert wilcoxon_above_threshold(d, 0.15) == pytest.approx(1 / 256)
    assert wilcoxon_above_threshold(d - 0.3, 0.15) > 0.5  # all below: no evidence at all
    assert wilcoxon_above_threshold([], 0.15) == 1.0
    assert wilcoxon_above_threshold([0.15, 0.15], 0.15) == 1.0


# ----------------------------------------------------------------------------------------------
# prompts
# ----------------------------------------------------------------------------------------------
def test_resolve_prompts_from_config_assigns_groups(clip_dir, dataset):
    cfg = gate_cfg(clip_dir, prompts=["Dermoscopy image showing melanoma.",
                                      "Dermoscopy image showing basal cell carcinoma.",
                                      "Optical coherence tomography image showing drusen."])
    prompts, source = resolve_prompts(cfg, dataset)
    assert source == "config"
    assert prompts == [
        PrivacyPrompt("Dermoscopy image showing melanoma.", "dermatology", "dermoscopy"),
        # not a training caption: assigned by its template prefix
        PrivacyPrompt("Dermoscopy image showing basal cell carcinoma.", "dermatology", "dermoscopy"),
        PrivacyPrompt("Optical coherence tomography image showing drusen.", "ophthalmology", "oct"),
    ]


def test_resolve_prompts_unknown_prompt_is_an_error(clip_dir, dataset):
    cfg = gate_cfg(clip_dir, prompts=["Zzz unrelated prompt"])
    with pytest.raises(ValueError, match="matches no specialty"):
        resolve_prompts(cfg, dataset)


def test_resolve_prompts_default_is_the_catalog_for_present_specialties(clip_dir, dataset):
    prompts, source = resolve_prompts(gate_cfg(clip_dir, prompts=None), dataset)
    assert source == "catalog"
    # section 4.3.4: four dermoscopy and four OCT prompts; no radiology/pathology/... (absent from train)
    assert {(p.specialty, p.image_type) for p in prompts} == set(GROUPS)
    assert "Dermoscopy image showing seborrheic keratosis." in [p.prompt for p in prompts]
    assert len(prompts) == 8


def test_resolve_prompts_falls_back_to_train_captions(clip_dir, dataset, tmp_path):
    import yaml

    from medisyn.catalog import builtin_catalog_text

    data = yaml.safe_load(builtin_catalog_text())
    data.pop("privacy_prompts")  # a catalog that names no privacy prompts
    empty = tmp_path / "catalog.yaml"
    empty.write_text(yaml.safe_dump(data))
    data = RunConfig().data.model_copy(update={"catalog": str(empty)})
    cfg = gate_cfg(clip_dir, prompts=None).model_copy(update={"data": data})
    prompts, source = resolve_prompts(cfg, dataset)
    assert source == "train-captions"
    assert sorted(p.prompt for p in prompts) == sorted(c for cs in GROUPS.values() for c in cs)


# ----------------------------------------------------------------------------------------------
# the gate, both directions
# ----------------------------------------------------------------------------------------------
def noise_sampler(prompts, seeds):
    return [Image.fromarray(np.random.default_rng(s).integers(0, 256, (RES, RES, 3), dtype=np.uint8)) for s in seeds]


def test_gate_fails_on_memorized_training_images(clip_dir, dataset, tmp_path):
    cfg = gate_cfg(clip_dir)
    out = str(tmp_path / "privacy")
    result = privacy_gate(cfg, "fake-model", dataset, out, sampler=copying_sampler(dataset))
    assert isinstance(result, GateResult) and result.gate == "privacy"
    assert result.passed is False
    assert result.metrics["n_pairs"] == 3 * 4
    # every synthetic image is a near-copy: its nearest neighbour must be found and be within 0.15
    assert result.metrics["fraction_below"] == 1.0
    assert result.metrics["distance_median"] < 0.02
    assert any("memorization" in r for r in result.reasons)
    report = json.loads(storage.read_text(result.report_uri))
    assert report["passed"] is False and report["metrics"]["n_below"] == 12
    pairs = [json.loads(line) for line in storage.read_text(storage.join(out, "pairs.jsonl")).splitlines()]
    assert len(pairs) == 12 and all(p["cosine_similarity"] > 0.99 for p in pairs)
    # the matched real image is the very image that was copied (same caption, index seed % n)
    assert all(p["real_image_hash"].startswith("train-") for p in pairs)
    for f in result.figures:
        assert storage.exists(f)
    assert storage.is_complete(out)


def test_gate_passes_on_unrelated_noise(clip_dir, dataset, tmp_path):
    cfg = gate_cfg(clip_dir)
    result = privacy_gate(cfg, "fake-model", dataset, str(tmp_path / "privacy"), sampler=noise_sampler)
    assert result.passed is True, result.reasons
    assert result.metrics["fraction_below"] == 0.0
    assert result.metrics["distance_min"] > 0.15
    # 12 pairs all above the threshold: exact one-sided Wilcoxon p = 2^-12
    assert result.metrics["wilcoxon_p"] == pytest.approx(2.0 ** -12)
    names = sorted(u.rsplit("/", 1)[1] for u in result.figures)
    assert names == ["privacy_closest_pairs.png", "privacy_distance_histogram.png"]


def test_gate_fails_when_too_few_pairs_for_significance(clip_dir, dataset, tmp_path):
    """3 pairs can never reach p < 0.05 one-sided (min p = 1/8): fail, never a silent pass."""
    cfg = gate_cfg(clip_dir, images_per_prompt=1)
    result = privacy_gate(cfg, "fake-model", dataset, str(tmp_path / "p"), sampler=noise_sampler)
    assert result.passed is False
    assert result.metrics["wilcoxon_p"] == pytest.approx(1 / 8)
    assert any("Wilcoxon" in r for r in result.reasons)


def test_a_single_copy_fails_the_gate_by_default(clip_dir, dataset, tmp_path):
    copy = copying_sampler(dataset)

    def mostly_noise(prompts, seeds):
        out = noise_sampler(prompts, seeds)
        if 0 in seeds:  # exactly one of the 12 images is a near-copy
            k = seeds.index(0)
            out[k] = copy(prompts[k:k + 1], seeds[k:k + 1])[0]
        return out

    cfg = gate_cfg(clip_dir)
    result = privacy_gate(cfg, "fake-model", dataset, str(tmp_path / "p"), sampler=mostly_noise)
    assert result.metrics["n_below"] >= 1
    assert result.passed is False
    # the same run is tolerated when the config allows that fraction
    lenient = gate_cfg(clip_dir, max_fraction_below=0.5)
    result = privacy_gate(lenient, "fake-model", dataset, str(tmp_path / "p2"), sampler=mostly_noise)
    assert result.passed is True, result.reasons


def test_gate_errors_fail_closed(clip_dir, dataset, tmp_path):
    def broken(prompts, seeds):
        return []  # breaks the sampler contract

    result = run_gate("privacy", privacy_gate, gate_cfg(clip_dir), "m", dataset, str(tmp_path / "p"), sampler=broken)
    assert result.passed is False and result.error and "sampler returned 0 images" in result.reasons[0]
    result = run_gate("privacy", privacy_gate, gate_cfg(clip_dir), "m", str(tmp_path / "missing"), str(tmp_path / "p"),
                      sampler=noise_sampler)
    assert result.passed is False and "incomplete" in result.reasons[0]
    assert not storage.exists(str(tmp_path / "p"))


@pytest.mark.slow
def test_gate_end_to_end_with_the_tiny_sdxl(tiny_cfg, dataset, tmp_path):
    """The default sampler: medisyn.generate.load_model + sample on the shared tiny SDXL."""
    captions = [c for cs in GROUPS.values() for c in cs]
    cfg = tiny_cfg.model_copy(update={
        "privacy": tiny_cfg.privacy.model_copy(update={"prompts": captions, "images_per_prompt": 3}),
        "sampling": tiny_cfg.sampling.model_copy(update={"num_inference_steps": 2}),
    })
    out = str(tmp_path / "privacy")
    result = run_gate("privacy", privacy_gate, cfg, cfg.models.sdxl_base, dataset, out)
    assert result.error is None, result.reasons
    assert result.metrics["n_pairs"] == 9
    m = result.metrics
    expected = m["wilcoxon_p"] < cfg.privacy.alpha and m["fraction_below"] <= cfg.privacy.max_fraction_below
    assert result.passed == expected
    report = json.loads(storage.read_text(result.report_uri))
    assert report["model_uri"] == cfg.models.sdxl_base and len(report["per_prompt"]) == 3


@pytest.mark.slow
def test_gate_logs_report_figures_and_metrics_to_mlflow(clip_dir, dataset, tmp_path, monkeypatch):
    import mlflow
    import mlflow.tracking._model_registry.utils as registry_utils
    from mlflow.tracking._tracking_service import utils as tracking_utils

    # stage_run points the global mlflow client at our database: undo that after the test
    monkeypatch.setattr(tracking_utils, "_tracking_uri", tracking_utils._tracking_uri)
    monkeypatch.setattr(registry_utils, "_registry_uri", registry_utils._registry_uri)

    db = f"sqlite:///{tmp_path / 'mlflow.db'}"
    cfg = gate_cfg(clip_dir).model_copy(update={"tracking": RunConfig().tracking.model_copy(
        update={"tracking_uri": db, "experiment": "gates-test"})})
    mlflow.set_tracking_uri(db)
    # artifacts under tmp_path, not ./mlruns of the working directory
    mlflow.MlflowClient(db).create_experiment("gates-test", artifact_location=(tmp_path / "artifacts").as_uri())
    result = privacy_gate(cfg, "fake-model", dataset, str(tmp_path / "p"), sampler=noise_sampler)
    client = mlflow.MlflowClient(db)
    exp = client.get_experiment_by_name("gates-test")
    (run,) = client.search_runs([exp.experiment_id])
    assert run.data.tags["medisyn.stage"] == "privacy-gate"
    assert run.data.metrics["privacy.wilcoxon_p"] == pytest.approx(result.metrics["wilcoxon_p"])
    arts = {a.path for a in client.list_artifacts(run.info.run_id, "gates")}
    assert arts == {"gates/privacy_report.json", "gates/privacy_distance_histogram.png",
                    "gates/privacy_closest_pairs.png"}


def test_search_is_restricted_to_the_same_specialty_and_image_type(clip_dir, dataset, tmp_path):
    """Dermoscopy prompts answered with copies of OCT training images: the copies are NOT found,
    because neighbours are searched among dermoscopy training images only (section 4.3.4)."""
    oct_images = train_images(dataset)["Optical coherence tomography image showing drusen."]

    def oct_copies(prompts, seeds):
        return [Image.fromarray(oct_images[s % len(oct_images)]) for s in seeds]

    cfg = gate_cfg(clip_dir, prompts=GROUPS[("dermatology", "dermoscopy")])
    out = str(tmp_path / "p")
    result = privacy_gate(cfg, "fake-model", dataset, out, sampler=oct_copies)
    pairs = [json.loads(line) for line in storage.read_text(storage.join(out, "pairs.jsonl")).splitlines()]
    n_derm_train = 2 * 6  # rows 0..11 of the train shard are the dermoscopy images
    assert len(pairs) == 8 and all(p["real_row"] < n_derm_train for p in pairs)
    assert result.metrics["n_below"] == 0


def test_synthetic_images_at_another_resolution_are_resized(clip_dir, dataset, tmp_path):
    """A generator at 2x the dataset resolution that upsamples training images is still caught."""
    copy = copying_sampler(dataset, jitter=0)

    def upscaled(prompts, seeds):
        return [im.resize((2 * RES, 2 * RES), Image.Resampling.BICUBIC) for im in copy(prompts, seeds)]

    result = privacy_gate(gate_cfg(clip_dir), "fake-model", dataset, str(tmp_path / "p"), sampler=upscaled)
    assert result.passed is False and result.metrics["fraction_below"] == 1.0


@pytest.mark.s3
@pytest.mark.slow
def test_gate_reads_and_writes_s3(clip_dir, dataset, s3_endpoint, tmp_path):
    """Dataset on s3:// (streamed through pyarrow's S3 filesystem), report published to s3://."""
    src = storage.local_path(dataset)
    ds_uri = f"s3://{S3_BUCKET}/privacy-test/dataset"
    with storage.staged_dir(ds_uri) as d:
        import shutil

        shutil.copytree(src, d, dirs_exist_ok=True)
    out = f"s3://{S3_BUCKET}/privacy-test/report"
    result = privacy_gate(gate_cfg(clip_dir), "fake-model", ds_uri, out, sampler=copying_sampler(dataset))
    assert result.passed is False and result.metrics["fraction_below"] == 1.0
    assert result.report_uri == out + "/report.json"
    assert json.loads(storage.read_text(result.report_uri))["metrics"]["n_pairs"] == 12
    assert storage.is_complete(out)


# ----------------------------------------------------------------------------------------------
# evidence for the evaluation report (docs/report.md): Table 1 rows, the calibrated reference, images
# ----------------------------------------------------------------------------------------------
def test_distance_summary_hand_computed():
    from medisyn.evaluate.privacy import distance_summary

    d = [0.1, 0.2, 0.3, 0.6]
    s = distance_summary(d, 0.15)
    assert s["n"] == 4 and s["mean"] == pytest.approx(0.3) and s["median"] == pytest.approx(0.25)
    # sample sd (ddof 1): deviations -0.2, -0.1, 0, 0.3 -> sqrt(0.14 / 3)
    assert s["sd"] == pytest.approx(np.sqrt(0.14 / 3))
    assert s["n_below"] == 1 and s["fraction_below"] == 0.25 and s["min"] == 0.1
    assert s["wilcoxon_p"] == wilcoxon_above_threshold(d, 0.15)
    assert distance_summary([0.15], 0.15)["n_below"] == 1  # "at or below"
    assert distance_summary([0.4], 0.15)["sd"] == 0.0
    assert distance_summary([], 0.15)["n"] == 0 and distance_summary([], 0.15)["mean"] is None


def test_reference_pairs_each_held_out_test_image_with_its_nearest_training_image(clip_dir, tmp_path):
    """Held-out test images that are jittered copies of training images: each must be matched with the
    very image it copies, at the patch distance computed by hand, per group, without changing the decision."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from medisyn.evaluate.privacy import SAMPLES_PER_PROMPT, distance_summary

    ds = write_dataset(tmp_path)
    root = storage.local_path(ds)
    train = pq.read_table(root / "train" / "part-00000.parquet").to_pylist()
    rng = np.random.default_rng(5)
    test_rows = []
    for r in train[::2]:  # half of the training images, jittered by +-3, as the test split
        arr = np.asarray(Image.open(io.BytesIO(r["image"])).convert("RGB")).astype(int)
        noisy = np.clip(arr + rng.integers(-3, 4, arr.shape), 0, 255).astype(np.uint8)
        test_rows.append(r | {"image": _png(noisy), "split": "test", "image_hash": "copy-of-" + r["image_hash"]})
    pq.write_table(pa.Table.from_pylist(test_rows), root / "test" / "part-00000.parquet")
    out = tmp_path / "p"
    result = privacy_gate(gate_cfg(clip_dir), "fake-model", ds, str(out), sampler=noise_sampler)
    assert result.passed, result.reasons  # the reference is reported, never part of the decision
    ref = [json.loads(line) for line in (out / "reference.jsonl").read_text().splitlines()]
    # as many reference pairs per group as it has synthetic images, at most its test images:
    # dermoscopy 8 synthetic / 6 test -> 6; OCT 4 synthetic / 3 test -> 3
    assert sorted(r["specialty"] for r in ref) == ["dermatology"] * 6 + ["ophthalmology"] * 3
    by_hash = {r["image_hash"]: np.asarray(Image.open(io.BytesIO(r["image"])).convert("RGB")) for r in train}
    for r in ref:
        test = test_rows[r["test_row"]]
        assert r["real_image_hash"] == test["image_hash"].removeprefix("copy-of-")
        expected = patch_distance(by_hash[r["real_image_hash"]],
                                  np.asarray(Image.open(io.BytesIO(test["image"])).convert("RGB")), 16)
        assert r["distance"] == pytest.approx(expected, abs=1e-12) and r["distance"] <= 3 / 255
    report = json.loads((out / "report.json").read_text())
    assert report["reference"]["per_specialty"]["dermatology"] == distance_summary(
        [r["distance"] for r in ref if r["specialty"] == "dermatology"], 0.15)
    assert report["reference"]["pooled"]["n"] == 9 and report["reference"]["pooled"]["n_below"] == 9
    # Table 1 per specialty from the pairs themselves
    pairs = [json.loads(line) for line in (out / "pairs.jsonl").read_text().splitlines()]
    for spec, row in report["per_specialty"].items():
        assert row == distance_summary([p["distance"] for p in pairs if p["specialty"] == spec], 0.15)
    # sample grids: the first SAMPLES_PER_PROMPT images of each prompt; closest pairs: images on both sides
    samples = json.loads((out / "samples.json").read_text())
    assert len(samples) == 3 * SAMPLES_PER_PROMPT and all((out / s["file"]).exists() for s in samples)
    kept = json.loads((out / "pair_images.json").read_text())
    assert {k["specialty"] for k in kept} == {"dermatology", "ophthalmology"}
    for spec in ("dermatology", "ophthalmology"):
        ranks = sorted(k["closest_rank"] for k in kept if k["specialty"] == spec)
        assert ranks == [0, 1, 2, 3]
        closest = sorted(p["distance"] for p in pairs if p["specialty"] == spec)[:4]
        assert sorted(k["distance"] for k in kept if k["specialty"] == spec) == closest
    assert all((out / k["synthetic_file"]).exists() and (out / k["real_file"]).exists() for k in kept)
