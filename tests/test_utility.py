"""Utility gate (paper 4.3.5 / 4.4): macro AUROC and the paired bootstrap against hand computations,
class-matched subsets, and the whole gate in both directions with injected generators (class-faithful
synthetic images must PASS, label-swapped ones must FAIL), plus fail-closed error paths."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
from PIL import Image

from medisyn import storage
from medisyn.config import RunConfig
from medisyn.evaluate.gates import run_gate
from medisyn.evaluate.utility import (
    bootstrap_auroc_difference,
    macro_auroc,
    resolve_tasks,
    stratified_subset,
    utility_gate,
)

RES = 32
# class -> dominant colour: trivially separable, so the tiny classifier learns it in a few epochs
DERM = {"melanoma": (200, 40, 40), "melanocytic nevi": (40, 40, 200)}
CXR = ("lung opacity", "edema")  # multi-label: red channel = lung opacity, green channel = edema


def _png(arr):
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def derm_image(label: str, rng) -> np.ndarray:
    base = np.array(DERM[label], dtype=float)
    return np.clip(base + rng.normal(0, 25, (RES, RES, 3)), 0, 255).astype(np.uint8)


def cxr_image(label: str, rng) -> np.ndarray:
    parts = label.split("|")
    base = np.array([200 if "lung opacity" in parts else 40, 200 if "edema" in parts else 40, 90], dtype=float)
    return np.clip(base + rng.normal(0, 25, (RES, RES, 3)), 0, 255).astype(np.uint8)


def derm_caption(label):
    return f"Dermoscopy image showing {label}."


def cxr_caption(label):
    return f"Frontal (AP) chest X-ray image showing {label.replace('|', ', ')}."


def write_dataset(root, n_train: int = 16, n_eval: int = 8, seed: int = 0, drop_test_class: str | None = None) -> str:
    """Per class: ``n_train`` train and ``n_eval`` val/test images, documented Parquet format."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    rng = np.random.default_rng(seed)
    cxr_labels = ["lung opacity", "edema", "lung opacity|edema"]
    for split, n in (("train", n_train), ("val", n_eval), ("test", n_eval)):
        rows = []
        for label in DERM:
            if split == "test" and label == drop_test_class:
                continue
            for _ in range(n):
                rows.append(("dermatology", "dermoscopy", label, derm_caption(label), derm_image(label, rng)))
        for label in cxr_labels:
            for _ in range(n):
                rows.append(("radiology", "chest_xray", label, cxr_caption(label), cxr_image(label, rng)))
        recs = [dict(image=_png(img), caption=cap, specialty=s, image_type=t, label=lab, source="phantom", split=split,
                     patient_hash=f"p{i}", image_hash=f"{split}{i}", pixel_hash=f"x{split}{i}", width=RES, height=RES)
                for i, (s, t, lab, cap, img) in enumerate(rows)]
        (root / split).mkdir(parents=True, exist_ok=True)
        pq.write_table(pa.Table.from_pylist(recs), root / split / "part-00000.parquet", row_group_size=16)
    (root / storage.COMPLETE_MARKER).write_text("{}")
    return str(root)


@pytest.fixture(autouse=True, scope="module")
def _one_torch_thread(one_torch_thread_module):
    yield


@pytest.fixture(scope="module")
def resnet_weights(tmp_path_factory):
    from medisyn.config import TinyModelsConfig
    from medisyn.models.resnet import build_tiny_resnet

    return str(build_tiny_resnet(TinyModelsConfig(), tmp_path_factory.mktemp("rn") / "resnet-tiny.pth"))


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return write_dataset(tmp_path_factory.mktemp("utility-data") / "dataset")


def gate_cfg(weights, tasks=None, **utility) -> RunConfig:
    u = dict(n_real_full=24, n_real_half=12, n_synthetic=12, epochs=2, batch_size=12, image_size=RES,
             classifier="tiny_resnet", bootstrap_resamples=100, learning_rate=1e-3,
             tasks=tasks if tasks is not None
             else [{"name": "derm", "specialty": "dermatology", "image_type": "dermoscopy"}])
    u.update(utility)
    return RunConfig.model_validate({"models": {"resnet50_weights": weights}, "runtime": {"device": "cpu"},
                                     "sampling": {"batch_size": 8}, "utility": u})


def _label_of(prompt: str) -> str:
    if prompt.startswith("Dermoscopy"):
        return prompt[len("Dermoscopy image showing "):-1]
    return prompt[len("Frontal (AP) chest X-ray image showing "):-1].replace(", ", "|")


def faithful_sampler(prompts, seeds):
    """A good generator: images that look like real images of the prompted class."""
    out = []
    for p, s in zip(prompts, seeds, strict=True):
        rng = np.random.default_rng(s)
        lab = _label_of(p)
        out.append(Image.fromarray(derm_image(lab, rng) if lab in DERM else cxr_image(lab, rng)))
    return out


def swapped_sampler(prompts, seeds):
    """A bad generator: every dermoscopy image shows the OTHER class than prompted."""
    other = {"melanoma": "melanocytic nevi", "melanocytic nevi": "melanoma"}
    return [Image.fromarray(derm_image(other[_label_of(p)], np.random.default_rng(s)))
            for p, s in zip(prompts, seeds, strict=True)]


# ----------------------------------------------------------------------------------------------
# macro AUROC and the bootstrap
# ----------------------------------------------------------------------------------------------
AUROC_CASES = [
    # (name, y_true, scores, multilabel, expected) -- hand computed
    ("perfect binary", [0, 0, 1, 1], [[0.9, 0.1], [0.8, 0.2], [0.3, 0.7], [0.1, 0.9]], False, 1.0),
    ("reversed binary", [0, 0, 1, 1], [[0.1, 0.9], [0.2, 0.8], [0.7, 0.3], [0.9, 0.1]], False, 0.0),
    # class 1 scores (0.2, 0.6 | 0.4, 0.8): pairs pos>neg 3 of 4 -> 0.75; class 0 scores are 1-s -> 0.75
    ("3 of 4 pairs", [0, 0, 1, 1], [[0.8, 0.2], [0.4, 0.6], [0.6, 0.4], [0.2, 0.8]], False, 0.75),
    ("ties count half", [0, 1], [[0.5, 0.5], [0.5, 0.5]], False, 0.5),
    # 3 classes one-vs-rest: class 0 perfect (1), class 1 perfect (1), class 2: pos 0.3 vs negs 0.1, 0.5 -> 0.5
    ("3-class ovr", [0, 1, 2], [[0.9, 0.0, 0.1], [0.0, 0.5, 0.5], [0.2, 0.4, 0.3]], False, (1 + 1 + 0.5) / 3),
    # multi-label: label 0 perfect, label 1 inverted -> mean 0.5
    ("multilabel", [[1, 0], [1, 1], [0, 1], [0, 0]], [[0.9, 0.9], [0.8, 0.1], [0.1, 0.2], [0.2, 0.95]], True,
     (1.0 + 0.0) / 2),
    # label 1 has no negatives: left out of the mean -> label 0 only
    ("label without negatives", [[1, 1], [0, 1]], [[0.9, 0.1], [0.1, 0.9]], True, 1.0),
]


@pytest.mark.parametrize("name,y,s,multilabel,expected", AUROC_CASES, ids=[c[0] for c in AUROC_CASES])
def test_macro_auroc_hand_computed(name, y, s, multilabel, expected):
    assert macro_auroc(np.array(y), np.array(s), multilabel) == pytest.approx(expected)


@pytest.mark.parametrize("multilabel", [False, True])
def test_macro_auroc_matches_sklearn(multilabel):
    from sklearn.metrics import roc_auc_score

    rng = np.random.default_rng(0)
    s = rng.random((200, 4))
    if multilabel:
        y = (rng.random((200, 4)) < 0.4).astype(int)
        ref = roc_auc_score(y, s, average="macro")
    else:
        y = rng.integers(0, 4, 200)
        s = s / s.sum(axis=1, keepdims=True)
        ref = roc_auc_score(y, s, average="macro", multi_class="ovr")
    assert macro_auroc(y, s, multilabel) == pytest.approx(ref)


@pytest.mark.parametrize("y,s,multilabel,match", [
    (np.array([0, 0]), np.array([[0.5, 0.5], [0.4, 0.6]]), False, "undefined"),
    (np.array([0, 3]), np.array([[0.5, 0.5], [0.4, 0.6]]), False, "class indices"),
    (np.array([0, 1]), np.array([0.5, 0.4]), False, "scores must be"),
    (np.array([0, 1]), np.array([[0.5, 0.5], [0.4, 0.6]]), True, "multi-label"),
    (np.array([0, 1, 1]), np.array([[0.5, 0.5], [0.4, 0.6]]), False, "labels but"),
])
def test_macro_auroc_errors(y, s, multilabel, match):
    with pytest.raises(ValueError, match=match):
        macro_auroc(y, s, multilabel)


def test_bootstrap_identical_models_have_zero_difference():
    rng = np.random.default_rng(1)
    y = rng.integers(0, 3, 100)
    s = rng.random((100, 3))
    assert bootstrap_auroc_difference(y, s, s.copy(), 300, 0.95, 0) == (0.0, 0.0, 0.0)


def test_bootstrap_perfect_vs_random_and_determinism():
    rng = np.random.default_rng(2)
    y = rng.integers(0, 2, 300)
    perfect = np.eye(2)[y] * 0.8 + 0.1
    noise = rng.random((300, 2))
    diff, lo, hi = bootstrap_auroc_difference(y, perfect, noise, 500, 0.95, seed=7)
    assert diff == pytest.approx(1.0 - macro_auroc(y, noise, False))
    assert 0 < lo <= diff <= hi
    assert bootstrap_auroc_difference(y, perfect, noise, 500, 0.95, seed=7) == (diff, lo, hi)  # seeded
    # a wider CI level gives a wider interval from the same resamples
    _, lo99, hi99 = bootstrap_auroc_difference(y, perfect, noise, 500, 0.99, seed=7)
    assert lo99 <= lo and hi99 >= hi
    # no resamples: the interval collapses to the point estimate
    assert bootstrap_auroc_difference(y, perfect, noise, 0, 0.95, 7) == (diff, diff, diff)


def test_bootstrap_matches_a_hand_rolled_paired_bootstrap():
    from sklearn.metrics import roc_auc_score

    rng = np.random.default_rng(3)
    y = (rng.random((80, 2)) < 0.5).astype(int)
    a, b = rng.random((80, 2)), rng.random((80, 2))
    diff, lo, hi = bootstrap_auroc_difference(y, a, b, 200, 0.9, seed=11)
    r = np.random.default_rng(11)
    ref = []
    for _ in range(200):
        i = r.integers(0, 80, 80)
        ref.append(roc_auc_score(y[i], a[i]) - roc_auc_score(y[i], b[i]))
    assert (lo, hi) == pytest.approx(tuple(np.percentile(ref, [5, 95])))
    assert diff == pytest.approx(roc_auc_score(y, a) - roc_auc_score(y, b))


@pytest.mark.parametrize("kwargs,match", [
    (dict(ci_level=1.0), "ci_level"),
    (dict(n_resamples=-1), "n_resamples"),
])
def test_bootstrap_errors(kwargs, match):
    y = np.array([0, 1, 0, 1])
    s = np.array([[0.6, 0.4], [0.3, 0.7], [0.5, 0.5], [0.2, 0.8]])
    args = dict(n_resamples=10, ci_level=0.95, seed=0) | kwargs
    with pytest.raises(ValueError, match=match):
        bootstrap_auroc_difference(y, s, s, **args)
    with pytest.raises(ValueError, match="shape"):
        bootstrap_auroc_difference(y, s, s[:, :1], 10, 0.95, 0)


@pytest.mark.parametrize("strata,n,expected", [
    (["a"] * 6 + ["b"] * 4, 5, {"a": 3, "b": 2}),
    (["a"] * 50 + ["b"] * 30 + ["c"] * 20, 10, {"a": 5, "b": 3, "c": 2}),
    (["a"] * 2 + ["b"] * 1, 2, {"a": 1, "b": 1}),  # remainders: 1.33 / 0.67 -> 1 + 1
    (["a"] * 4, 4, {"a": 4}),
])
def test_stratified_subset_keeps_class_shares(strata, n, expected):
    idx = stratified_subset(strata, n, np.random.default_rng(0))
    assert len(idx) == len(set(idx)) == n
    got: dict[str, int] = {}
    for i in idx:
        got[strata[i]] = got.get(strata[i], 0) + 1
    assert got == expected


def test_stratified_subset_too_many():
    with pytest.raises(ValueError, match="cannot take"):
        stratified_subset(["a", "b"], 3, np.random.default_rng(0))


# ----------------------------------------------------------------------------------------------
# tasks
# ----------------------------------------------------------------------------------------------
def test_resolve_tasks_default_is_the_catalog_restricted_to_the_dataset(resnet_weights, dataset):
    cfg = gate_cfg(resnet_weights, tasks=None).model_copy(
        update={"utility": RunConfig().utility.model_copy(update={"tasks": None})})
    tasks, notes = resolve_tasks(cfg, dataset)
    assert sorted(t.name for t in tasks) == ["chest_xray", "dermoscopy"]
    cxr = next(t for t in tasks if t.name == "chest_xray")
    assert cxr.multilabel and cxr.classes == ("lung opacity", "pleural effusion", "cardiomegaly", "edema")
    assert any("prostatectomy" in n for n in notes)


def test_resolve_tasks_config_task_missing_from_dataset_is_an_error(resnet_weights, dataset):
    cfg = gate_cfg(resnet_weights, tasks=[{"name": "oct", "specialty": "ophthalmology", "image_type": "oct"}])
    with pytest.raises(ValueError, match="no images in the train split"):
        resolve_tasks(cfg, dataset)


# ----------------------------------------------------------------------------------------------
# the gate, both directions
# ----------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_gate_passes_with_class_faithful_synthetic_images(resnet_weights, dataset, tmp_path):
    cfg = gate_cfg(resnet_weights)
    out = str(tmp_path / "utility")
    result = utility_gate(cfg, "fake-model", dataset, out, sampler=faithful_sampler)
    assert result.passed is True, result.reasons
    report = json.loads(storage.read_text(result.report_uri))
    (task,) = report["tasks"]
    assert task["n_train"] == {"real_full": 24, "real_half": 12, "synthetic": 12, "pool": 32}
    assert task["n_val"] == 16 and task["n_test"] == 16
    # class-matched: (i) and (ii) keep the pool's 50/50 split, (iii) doubles (ii)'s counts
    half = task["class_counts"]["real_half"]
    assert sum(half.values()) == 12
    assert task["class_counts"]["real_plus_synthetic"] == {k: 2 * v for k, v in half.items()}
    assert task["test_macro_auroc"]["real_full"] > 0.9
    d = task["diff_full_vs_synthetic"]
    assert d["lo"] <= d["diff"] <= d["hi"] <= cfg.utility.max_auroc_drop
    assert len(task["history"]["real_full"]) == cfg.utility.epochs
    assert [u.rsplit("/", 1)[1] for u in result.figures] == ["utility_roc_derm.png"]
    assert storage.exists(result.figures[0]) and storage.is_complete(out)
    assert result.metrics["derm.auroc_real_full"] == task["test_macro_auroc"]["real_full"]


@pytest.mark.slow
def test_gate_fails_with_label_swapped_synthetic_images(resnet_weights, dataset, tmp_path):
    # synthetic images outnumber the real subset 3:1, so a generator that draws the wrong class
    # teaches the classifier the inverse rule (AUROC is a ranking: a merely diluted signal on these
    # trivially separable phantoms would still rank perfectly)
    cfg = gate_cfg(resnet_weights, n_real_half=6, n_synthetic=18)
    result = utility_gate(cfg, "fake-model", dataset, str(tmp_path / "utility"), sampler=swapped_sampler)
    assert result.passed is False
    assert result.metrics["derm.diff_full_vs_synthetic_hi"] > cfg.utility.max_auroc_drop
    assert result.metrics["derm.auroc_real_plus_synthetic"] < result.metrics["derm.auroc_real_full"]
    assert "derm" in result.reasons[0] and " > max_auroc_drop" in result.reasons[0]


@pytest.mark.slow
def test_gate_multilabel_task(resnet_weights, dataset, tmp_path):
    tasks = [{"name": "cxr", "specialty": "radiology", "image_type": "chest_xray", "multilabel": True}]
    cfg = gate_cfg(resnet_weights, tasks=tasks, n_real_full=30, n_real_half=15, n_synthetic=15, epochs=1)
    result = utility_gate(cfg, "fake-model", dataset, str(tmp_path / "u"), sampler=faithful_sampler)
    report = json.loads(storage.read_text(result.report_uri))
    (task,) = report["tasks"]
    assert task["task"]["classes"] == ["edema", "lung opacity"]
    # synthetic labels replay (ii)'s label combinations: per-label counts exactly double
    half = task["class_counts"]["real_half"]
    assert task["class_counts"]["real_plus_synthetic"] == {k: 2 * v for k, v in half.items()}
    assert 0.0 <= task["test_macro_auroc"]["real_full"] <= 1.0
    assert result.passed == (task["diff_full_vs_synthetic"]["hi"] <= cfg.utility.max_auroc_drop)


def test_too_few_training_images_fails_closed(resnet_weights, dataset, tmp_path):
    cfg = gate_cfg(resnet_weights, n_real_full=1000, n_real_half=500)
    result = run_gate("utility", utility_gate, cfg, "m", dataset, str(tmp_path / "u"), sampler=faithful_sampler)
    assert result.passed is False and result.error
    assert "32 training images" in result.reasons[0] and "n_real_full=1000" in result.reasons[0]
    assert not storage.exists(str(tmp_path / "u"))


def test_test_split_missing_a_class_fails_closed(resnet_weights, tmp_path):
    ds = write_dataset(tmp_path / "ds", drop_test_class="melanoma")
    cfg = gate_cfg(resnet_weights, epochs=1)
    result = run_gate("utility", utility_gate, cfg, "m", ds, str(tmp_path / "u"), sampler=faithful_sampler)
    assert result.passed is False and "test split" in result.reasons[0]


def test_half_larger_than_full_is_an_error(resnet_weights, dataset, tmp_path):
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match="n_real_half=20 must not exceed n_real_full=10"):
        gate_cfg(resnet_weights, n_real_full=10, n_real_half=20)
    # a config built without validation is still refused by the gate itself
    cfg = gate_cfg(resnet_weights)
    cfg = cfg.model_copy(update={"utility": cfg.utility.model_copy(update={"n_real_full": 10, "n_real_half": 20})})
    with pytest.raises(ValueError, match="n_real_half"):
        utility_gate(cfg, "m", dataset, str(tmp_path / "u"), sampler=faithful_sampler)


def test_config_classes_restrict_the_task(resnet_weights, dataset):
    tasks = [{"name": "cxr", "specialty": "radiology", "image_type": "chest_xray", "multilabel": True,
              "classes": ["edema", "lung opacity", "cardiomegaly"]}]
    (task,), _ = resolve_tasks(gate_cfg(resnet_weights, tasks=tasks), dataset)
    assert task.classes == ("edema", "lung opacity", "cardiomegaly") and task.multilabel


def test_a_class_absent_from_test_and_val_fails_closed(resnet_weights, dataset, tmp_path):
    """A configured class no val/test image shows: its AUROC is undefined, so the gate must not pass."""
    tasks = [{"name": "derm", "specialty": "dermatology", "image_type": "dermoscopy",
              "classes": ["melanoma", "melanocytic nevi", "basal cell carcinoma"]}]
    cfg = gate_cfg(resnet_weights, tasks=tasks, epochs=1)
    result = run_gate("utility", utility_gate, cfg, "m", dataset, str(tmp_path / "u"), sampler=faithful_sampler)
    assert result.passed is False and "basal cell carcinoma" in result.reasons[0]


@pytest.mark.slow
def test_gate_end_to_end_with_the_tiny_sdxl(tiny_cfg, dataset, tmp_path):
    """The default sampler (medisyn.generate on the shared tiny SDXL) and the shared tiny ResNet."""
    cfg = tiny_cfg.model_copy(update={
        "utility": gate_cfg(tiny_cfg.models.resnet50_weights, epochs=1, n_synthetic=6).utility,
        "sampling": tiny_cfg.sampling.model_copy(update={"num_inference_steps": 2}),
    })
    result = run_gate("utility", utility_gate, cfg, cfg.models.sdxl_base, dataset, str(tmp_path / "u"))
    assert result.error is None, result.reasons
    report = json.loads(storage.read_text(result.report_uri))
    assert report["tasks"][0]["n_train"]["synthetic"] == 6
    hi = result.metrics["derm.diff_full_vs_synthetic_hi"]
    signal = report["tasks"][0]["synthetic_signal"]["fraction"]  # the random tiny U-Net: little or none
    signal_ok = signal is not None and signal >= cfg.utility.min_synthetic_signal
    assert result.passed == (hi <= cfg.utility.max_auroc_drop and signal_ok)


def test_synthetic_signal_is_the_share_of_the_real_class_signal():
    from medisyn.evaluate.utility import synthetic_signal

    assert synthetic_signal(1.0, 0.75)["fraction"] == pytest.approx(0.5)
    assert synthetic_signal(0.9, 0.9)["fraction"] == pytest.approx(1.0)
    assert synthetic_signal(0.9, 0.3)["fraction"] == pytest.approx(-0.5)  # worse than chance
    assert synthetic_signal(0.5, 0.9)["fraction"] is None  # the real classifier itself is at chance
    assert synthetic_signal(0.9, float("nan"))["fraction"] is None  # synthetic AUROC undefined


def test_catalog_task_keeps_only_classes_present_in_the_dataset(resnet_weights, dataset, tmp_path):
    """Default tasks come from the catalog (four dermoscopy classes); the dataset holds two of them."""
    cfg = gate_cfg(resnet_weights, epochs=1)
    cfg = cfg.model_copy(update={"utility": cfg.utility.model_copy(update={"tasks": None})})
    result = run_gate("utility", utility_gate, cfg, "m", dataset, str(tmp_path / "u"), sampler=faithful_sampler)
    assert result.error is None, result.reasons
    report = json.loads(storage.read_text(result.report_uri))
    tasks = {t["task"]["name"]: t for t in report["tasks"]}
    assert set(tasks) == {"chest_xray", "dermoscopy"}
    assert tasks["dermoscopy"]["task"]["classes"] == ["melanoma", "melanocytic nevi"]  # catalog order
    assert "basal cell carcinoma" in tasks["dermoscopy"]["notes"][0]
    assert tasks["chest_xray"]["task"]["classes"] == ["lung opacity", "edema"]
    assert any("prostatectomy" in n for n in report["notes"])


# ----------------------------------------------------------------------------------------------
# recognisability (issue #11): the real-trained classifier on synthetic vs real images, per class
# ----------------------------------------------------------------------------------------------
def test_per_class_accuracy_and_recognisability_hand_computed():
    from medisyn.evaluate.utility import per_class_accuracy, recognisability

    y_real = np.array([0, 0, 1, 2])
    s_real = np.array([[.8, .1, .1], [.2, .7, .1], [.1, .8, .1], [.3, .3, .4]])  # right, wrong, right, right
    acc, n = per_class_accuracy(y_real, s_real, 3, False)
    assert acc.tolist() == [0.5, 1.0, 1.0] and n.tolist() == [2, 1, 1]
    y_syn = np.array([0, 1, 1, 2, 2])
    s_syn = np.array([[.6, .2, .2], [.1, .5, .4], [.5, .4, .1], [.2, .7, .1], [0, .1, .9]])  # r, r, w, w, r
    rec = recognisability(y_real, s_real, y_syn, s_syn, ["a", "b", "c"], False)
    assert rec["chance"] == pytest.approx(1 / 3) and rec["classifier"] == "real_full"
    # one-sided 95% Clopper-Pearson lower bounds: 1 of 1 -> 0.05; 1 of 2 -> 1 - sqrt(0.95)
    assert rec["per_class"] == [
        {"class": "a", "n_real": 2, "real_accuracy": 0.5, "n_synthetic": 1, "synthetic_accuracy": 1.0,
         "synthetic_accuracy_lower": pytest.approx(0.05), "synthetic_above_chance": False},
        {"class": "b", "n_real": 1, "real_accuracy": 1.0, "n_synthetic": 2, "synthetic_accuracy": 0.5,
         "synthetic_accuracy_lower": pytest.approx(1 - 0.95 ** 0.5), "synthetic_above_chance": False},
        {"class": "c", "n_real": 1, "real_accuracy": 1.0, "n_synthetic": 2, "synthetic_accuracy": 0.5,
         "synthetic_accuracy_lower": pytest.approx(1 - 0.95 ** 0.5), "synthetic_above_chance": False},
    ]
    # point estimates above chance (1/3) on 1-2 images each are not evidence: not above chance by the bound
    assert rec["macro_synthetic_accuracy"] == pytest.approx(2 / 3) and not rec["all_synthetic_above_chance"]
    # 25 of 30 images right on each of three classes: bound 0.68 > 1/3
    y_many = np.repeat(np.arange(3), 30)
    s_many = np.eye(3)[np.where(np.arange(90) % 30 < 25, y_many, (y_many + 1) % 3)]
    rec = recognisability(y_real, s_real, y_many, s_many, ["a", "b", "c"], False)
    assert [r["synthetic_accuracy"] for r in rec["per_class"]] == [pytest.approx(25 / 30)] * 3
    assert rec["all_synthetic_above_chance"] and rec["per_class"][0]["synthetic_accuracy_lower"] > 0.65
    # a class with no synthetic image has no accuracy, and then not every class is shown above chance
    rec = recognisability(y_real, s_real, np.array([0]), np.array([[1.0, 0, 0]]), ["a", "b", "c"], False)
    assert rec["per_class"][1]["synthetic_accuracy"] is None and not rec["all_synthetic_above_chance"]
    # multi-label: per-label sensitivity at probability 0.5, chance 0.5
    y = np.array([[1, 0], [1, 1], [0, 1]])
    s = np.array([[.9, .2], [.4, .6], [.1, .3]])
    acc, n = per_class_accuracy(y, s, 2, True)
    assert acc.tolist() == [0.5, 0.5] and n.tolist() == [2, 2]
    rec = recognisability(y, s, y, s, ["x", "y"], True)
    assert rec["chance"] == 0.5 and not rec["all_synthetic_above_chance"]  # 0.5 is not above chance


def test_accuracy_lower_bound_is_the_exact_binomial_bound():
    """Cross-checked against scipy's exact binomial test: the one-sided Clopper-Pearson bound is the accuracy
    p0 at which observing ``hits`` or more of ``n`` has probability exactly 1 - confidence."""
    from scipy.stats import binomtest

    from medisyn.evaluate.binomial import accuracy_lower_bound

    for hits, n in ((23, 33), (13, 34), (30, 30), (1, 10), (0, 5)):
        lower = accuracy_lower_bound(hits, n)
        assert lower == pytest.approx(binomtest(hits, n, alternative="greater").proportion_ci(0.95).low, abs=1e-9)
        if hits:
            assert binomtest(hits, n, p=lower, alternative="greater").pvalue == pytest.approx(0.05, abs=1e-6)
    assert accuracy_lower_bound(0, 0) is None
    # the issue's case: 13 of 34 nevi (0.38) is not above chance; the developers' 29 of 34 (0.85) is
    assert accuracy_lower_bound(13, 34) < 0.5 < accuracy_lower_bound(29, 34)


def test_per_class_auroc_matches_sklearn():
    from sklearn.metrics import roc_auc_score

    from medisyn.evaluate.utility import per_class_auroc

    rng = np.random.default_rng(0)
    y = rng.integers(0, 3, 40)
    s = rng.random((40, 3))
    got = per_class_auroc(y, s, ["a", "b", "c"], False)
    assert got == pytest.approx({c: roc_auc_score(y == k, s[:, k]) for k, c in enumerate("abc")})
    assert np.mean(list(got.values())) == pytest.approx(macro_auroc(y, s, False))
    one_class = per_class_auroc(np.array([0, 0]), np.array([[.6, .4], [.3, .7]]), ["a", "b"], False)
    assert one_class == {"a": None, "b": None}  # no negatives / no positives: undefined
