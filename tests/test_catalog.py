"""medisyn.catalog: the built-in catalog (paper sections 4.1, 4.3), captions, prompts, validation."""

from __future__ import annotations

import pytest
import yaml

from medisyn.catalog import CatalogError, builtin_catalog_text, join_label_texts, load_catalog, parse_catalog

CAPTION_CASES = [
    # (source, raw label(s), caption) -- templates quoted in sections 4.3.2 - 4.3.5
    ("chest_ct_pe", "1", "Chest CT pulmonary angiography image showing pulmonary embolism."),
    ("chest_ct_pe", "0", "Chest CT pulmonary angiography image showing no presence of pulmonary embolism."),
    ("dermoscopy", "MEL", "Dermoscopy image showing melanoma."),
    ("lymph_node_histopathology", "1", "Histopathological lymph node image showing metastasis at 40x magnification."),
    ("oct", "DME", "Optical coherence tomography image showing diabetic macular edema."),
    ("cholecystectomy_phases", "CalotTriangleDissection",
     "Laparoscopic cholecystectomy image during Calot's triangle dissection."),
    ("gi_endoscopy", "dyed-lifted-polyps", "Gastrointestinal endoscopy image showing dyed and lifted polyps."),
    ("prostatectomy_actions", "pushing_needle",
     "Robot-assisted radical prostatectomy image of pushing the needle through the tissue."),
    ("chest_xray_ap", "edema", "Frontal (AP) chest X-ray image showing edema."),
    ("chest_xray_ap", "edema|lung_opacity", "Frontal (AP) chest X-ray image showing lung opacity and edema."),
    ("chest_xray_ap", "cardiomegaly|edema|pleural_effusion",
     "Frontal (AP) chest X-ray image showing pleural effusion, cardiomegaly and edema."),
]


@pytest.mark.parametrize("source,raw,caption", CAPTION_CASES)
def test_builtin_captions(source, raw, caption):
    assert load_catalog("builtin").source(source).caption_for(raw) == caption


def test_builtin_covers_the_papers_sources():
    cat = load_catalog()
    assert {(s.specialty, s.image_type) for s in cat.sources} == {
        ("radiology", "chest_ct"), ("radiology", "chest_xray"), ("dermatology", "dermoscopy"),
        ("pathology", "lymph_node_histopathology"), ("ophthalmology", "oct"),
        ("surgery", "laparoscopic_cholecystectomy"), ("gastroenterology", "gi_endoscopy"),
        ("surgery", "robot_assisted_prostatectomy"),
    }
    assert cat.source("chest_ct_pe").rule == "hu_window"
    assert cat.source("lymph_node_histopathology").tile == {"size": 512}
    assert len(cat.digest) == 64


def test_privacy_prompts_six_specialties():
    prompts = load_catalog().privacy_prompts()
    assert sorted(prompts) == ["dermatology", "gastroenterology", "ophthalmology", "pathology", "radiology", "surgery"]
    assert [len(prompts[s]) for s in sorted(prompts)] == [4, 4, 4, 2, 2, 4]  # section 4.3.4
    assert "Laparoscopic cholecystectomy image during gallbladder packaging." in prompts["surgery"]
    specs = load_catalog().privacy_prompt_specs()
    assert all(s.prompt.endswith(".") and s.image_type for s in specs) and len(specs) == 20


def test_utility_tasks_section_4_3_5():
    tasks = {t.name: t for t in load_catalog().utility_tasks()}
    assert sorted(tasks) == ["chest_xray", "dermoscopy", "prostatectomy"]
    assert tasks["chest_xray"].multilabel and tasks["chest_xray"].classes == (
        "lung opacity", "pleural effusion", "cardiomegaly", "edema")
    assert tasks["dermoscopy"].classes == (
        "melanoma", "melanocytic nevi", "basal cell carcinoma", "seborrheic keratosis")
    assert not tasks["prostatectomy"].multilabel and len(tasks["prostatectomy"].prompts) == 4
    assert tasks["dermoscopy"].to_dict()["specialty"] == "dermatology"


@pytest.mark.parametrize(
    "texts,joined", [([], ""), (["a"], "a"), (["a", "b"], "a and b"), (["a", "b", "c"], "a, b and c")]
)
def test_join_label_texts(texts, joined):
    assert join_label_texts(texts) == joined


def _minimal(**over):
    src = {"prefix": "x", "specialty": "s", "image_type": "t", "caption_template": "T {label}.",
           "label_map": {"a": "A"}}
    src.update(over)
    return {"sources": {"x": src}}


BAD_CATALOGS = [
    ({"sources": {}}, "non-empty"),
    ({"sources": {"x": {}}, "extra": 1}, "unknown top-level"),
    (_minimal(caption_template="no placeholder"), "{label}"),
    (_minimal(rule="sharpen"), "rule"),
    (_minimal(rule="hu_window", rule_params={"low": 1}), "rule_params"),
    (_minimal(colour="blue"), "unknown field"),
    (_minimal(prefix="../escape"), "prefix"),
    (_minimal(label_map=None), "label_map"),
    (_minimal(tile={"size": 4}), "tile"),
    ({**_minimal(), "utility_tasks": [{"name": "n", "source": "x", "labels": ["zzz"]}]}, "utility_tasks"),
    ({**_minimal(), "privacy_prompts": [{"specialty": "s", "source": "nope", "labels": ["a"]}]}, "privacy_prompts"),
]


@pytest.mark.parametrize("data,message", BAD_CATALOGS)
def test_invalid_catalogs_name_the_problem(data, message):
    with pytest.raises(CatalogError, match=message.replace("{", r"\{").replace("}", r"\}")):
        parse_catalog(data, "test.yaml")


def test_label_errors():
    src = parse_catalog(_minimal()).source("x")
    with pytest.raises(KeyError):
        src.caption_for("b")
    with pytest.raises(KeyError):
        src.caption_for("")
    with pytest.raises(KeyError):
        src.label_texts(["a", "a2"])


def test_load_from_file_and_errors(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text(builtin_catalog_text())
    assert load_catalog(str(p)).digest == load_catalog("builtin").digest
    assert load_catalog(f"file://{p}").origin == f"file://{p}"
    with pytest.raises(CatalogError, match="cannot read"):
        load_catalog(str(tmp_path / "missing.yaml"))
    (tmp_path / "bad.yaml").write_text("sources: [unclosed")
    with pytest.raises(CatalogError, match="YAML"):
        load_catalog(str(tmp_path / "bad.yaml"))
    with pytest.raises(KeyError, match="no source"):
        load_catalog().source("nope")


def test_builtin_yaml_is_documented():
    assert builtin_catalog_text().startswith("#") and yaml.safe_load(builtin_catalog_text())["version"] == 1
