"""Reader study (issue #15): blinding, tokens, the database, the statistics (Fleiss' kappa by hand),
the human gate through the stage runner, and study creation from a registered tiny model.

The end-to-end browser test is tests/test_study_browser.py; the chart, tests/test_study_chart.py.
"""

from __future__ import annotations

import io
import json
import math
import re

import numpy as np
import pytest
from PIL import Image, PngImagePlugin

from helpers import fake_candidate, png_chunks, register_tiny_version, write_dataset
from medisyn import registry, stages
from medisyn.config import ConfigError, RunConfig, load_config
from medisyn.study import db
from medisyn.study.create import blind_png
from medisyn.study.report import compute_stats, fleiss_kappa, origin_stats

# ----------------------------------------------------------------------------------------------
# Fleiss' kappa, against hand-computed tables
# ----------------------------------------------------------------------------------------------
# Fleiss (1971) as tabulated on Wikipedia ("Fleiss' kappa", worked example): 10 subjects, 14 raters,
# 5 categories; P_bar = 0.378, P_e = 0.213, kappa = 0.210.
WIKIPEDIA = [[0, 0, 0, 0, 14], [0, 2, 6, 4, 2], [0, 0, 3, 5, 6], [0, 3, 9, 2, 0], [2, 2, 8, 1, 1],
             [7, 7, 0, 0, 0], [3, 2, 6, 3, 0], [2, 5, 3, 2, 2], [6, 5, 2, 1, 0], [0, 2, 2, 3, 7]]
KAPPA_CASES = [
    ("wikipedia", WIKIPEDIA, 0.20993),
    ("perfect agreement, two categories", [[3, 0], [0, 3], [3, 0]], 1.0),
    ("two raters, half agree", [[2, 0], [0, 2], [1, 1], [1, 1]], 0.0),  # P_bar = .5 = P_e
    ("two raters, the worked example below", [[2, 0], [0, 2], [1, 1], [0, 2]], 7 / 15),
    ("one category only: undefined", [[2, 0], [2, 0]], None),
]


@pytest.mark.parametrize("name,table,expected", KAPPA_CASES, ids=[c[0] for c in KAPPA_CASES])
def test_fleiss_kappa_matches_hand_computation(name, table, expected):
    got = fleiss_kappa(table)
    if expected is None:
        assert got is None
    else:
        assert got == pytest.approx(expected, abs=5e-5)


def test_fleiss_kappa_wikipedia_intermediate_values():
    t = np.asarray(WIKIPEDIA, float)
    p_j = t.sum(0) / t.sum()
    assert p_j.round(3).tolist() == [0.143, 0.200, 0.279, 0.150, 0.229]
    assert round(fleiss_kappa(WIKIPEDIA), 3) == 0.210


@pytest.mark.parametrize("table", [[], [[1, 0], [0, 1]], [[2, 0], [1, 2]]])
def test_fleiss_kappa_refuses_tables_it_cannot_score(table):
    with pytest.raises(ValueError):
        fleiss_kappa(table)


def test_origin_stats_counts_and_sample_sd():
    st = origin_stats([True, False, True, True], [5, 3, 4, 4])
    assert (st.n, st.correct, st.accuracy) == (4, 3, 0.75)
    assert st.confidence_mean == 4.0 and st.confidence_sd == pytest.approx(math.sqrt(2 / 3))
    empty = origin_stats([], [])
    assert (empty.n, empty.accuracy, empty.confidence_mean, empty.confidence_sd) == (0, None, None, None)
    assert origin_stats([True], [5]).confidence_sd is None


# ----------------------------------------------------------------------------------------------
# Blinding: one encoding for every image
# ----------------------------------------------------------------------------------------------
def _tagged_png(img: Image.Image) -> Image.Image:
    """An image carrying every kind of metadata a source might bring: text chunks, EXIF, dpi, ICC."""
    info = PngImagePlugin.PngInfo()
    info.add_text("Software", "diffusers sdxl synthetic")
    info.add_text("Comment", "real patient 1234")
    exif = Image.Exif()
    exif[0x010E] = "synthetic"  # ImageDescription
    buf = io.BytesIO()
    img.save(buf, format="PNG", pnginfo=info, exif=exif, dpi=(300, 300))
    return Image.open(io.BytesIO(buf.getvalue()))


def test_blind_png_gives_one_length_no_metadata_one_mode():
    rng = np.random.default_rng(0)
    sources = [
        Image.fromarray(rng.integers(0, 255, (96, 96, 3), dtype=np.uint8)),  # noisy RGB (compresses badly)
        Image.fromarray(np.zeros((64, 64), np.uint8), mode="L"),  # flat grey (compresses to nothing)
        _tagged_png(Image.fromarray(rng.integers(0, 255, (80, 120), dtype=np.uint8), mode="L")),  # not square
        Image.fromarray(rng.integers(0, 255, (32, 32, 4), dtype=np.uint8), mode="RGBA"),
    ]
    assert _tagged_png(sources[0]).info  # the source really carries metadata
    out = [blind_png(im, 48) for im in sources]
    assert len({len(b) for b in out}) == 1  # the byte length says nothing about the content
    for b in out:
        assert set(png_chunks(b)) == {"IHDR", "IDAT", "IEND"} and png_chunks(b)[0] == "IHDR"
        img = Image.open(io.BytesIO(b))
        assert img.mode == "RGB" and img.size == (48, 48) and not img.info and not img.getexif()
        assert b"synthetic" not in b and b"patient" not in b
    assert blind_png(sources[0], 48) == out[0]  # deterministic


# ----------------------------------------------------------------------------------------------
# Database: migrations, tokens, answers
# ----------------------------------------------------------------------------------------------
CLASSES = ["a", "b"]
ITEMS = [("r1", "real", "a"), ("r2", "real", "b"), ("s1", "synthetic", "a"), ("s2", "synthetic", "b")]
# The worked example: reader X, reader Y; (item -> answer, confidence)
ANSWERS = {
    "X": {"r1": ("a", 5), "r2": ("b", 3), "s1": ("a", 4), "s2": ("b", 2)},
    "Y": {"r1": ("a", 4), "r2": ("b", 4), "s1": ("b", 1), "s2": ("b", 5)},
}


@pytest.fixture
def engine(tmp_path):
    eng = db.open_db(f"sqlite:///{tmp_path / 'study.db'}")
    yield eng
    db.dispose_all()


def make_study(engine, model=("m", "1"), items=ITEMS, classes=CLASSES) -> tuple[str, dict[str, str], str]:
    """A study written straight into the database (no generation): (study id, {label: item id}, admin token)."""
    study_id, admin = db.new_id(), db.new_token()
    ids = {label: db.new_id() for label, _, _ in items}
    definition = {"seed": 7, "classes": classes, "image_size": 16,
                  "items": [{"id": ids[lb], "origin": o, "class": c} for lb, o, c in items]}
    with db.session(engine) as s:
        s.add(db.Study(id=study_id, name="t", task="t", question="Which?", classes_json=json.dumps(classes),
                       model_name=model[0], model_version=model[1], definition_json=json.dumps(definition),
                       admin_token_hash=db.hash_token(admin), created_at=db.utcnow()))
        s.flush()
        for k, (label, origin, cls) in enumerate(items):
            s.add(db.StudyItem(id=ids[label], study_id=study_id, position=k, origin=origin, true_class=cls,
                               source=label, png=blind_png(Image.new("RGB", (16, 16), (k, k, k)), 16)))
    return study_id, ids, admin


def answer_all(engine, study_id, ids, answers=ANSWERS) -> dict[str, str]:
    tokens = {}
    for reader, given in answers.items():
        tokens[reader] = db.add_reader(engine, study_id, reader)
        for label, (cls, conf) in given.items():
            assert db.record_answer(engine, tokens[reader], ids[label], cls, conf) is True
    return tokens


def test_migrations_build_exactly_the_models_schema(engine):
    from alembic.autogenerate import compare_metadata
    from alembic.runtime.migration import MigrationContext
    from sqlalchemy import inspect

    assert db.current_revision(engine) == "0001"
    with engine.connect() as conn:
        diff = compare_metadata(MigrationContext.configure(conn, opts={"version_table": db.VERSION_TABLE}),
                                db.Base.metadata)
        tables = set(inspect(conn).get_table_names())
    assert diff == []
    assert tables == {"study", "study_item", "study_reader", "study_answer", db.VERSION_TABLE}  # beside MLflow's
    db.migrate(engine)  # idempotent


def test_tokens_are_stored_hashed_and_checked(engine, tmp_path):
    study_id, ids, admin = make_study(engine)
    token = db.add_reader(engine, study_id, "Attending #1")
    assert len(token) >= 43
    raw = (tmp_path / "study.db").read_bytes()
    assert token.encode() not in raw and admin.encode() not in raw
    assert db.hash_token(token).encode() in raw
    with db.session(engine) as s:
        assert db.reader_for_token(s, token).name == "Attending #1"
        assert db.reader_for_token(s, token[:-1]) is None and db.reader_for_token(s, "") is None
        assert db.reader_for_token(s, db.hash_token(token)) is None  # the stored hash is not a credential
        assert db.study_for_admin_token(s, admin).id == study_id
        assert db.study_for_admin_token(s, token) is None
    with pytest.raises(db.StudyError, match="already has a reader"):
        db.add_reader(engine, study_id, "Attending #1")
    new_admin = db.rotate_admin_token(engine, study_id)
    with db.session(engine) as s:
        assert db.study_for_admin_token(s, admin) is None and db.study_for_admin_token(s, new_admin).id == study_id


def test_answers_are_stored_once_and_only_within_the_readers_study(engine):
    study_id, ids, _ = make_study(engine)
    other_id, other_ids, _ = make_study(engine, model=("m", "2"))
    token = db.add_reader(engine, study_id, "X")
    assert db.record_answer(engine, token, ids["r1"], "a", 5) is True
    assert db.record_answer(engine, token, ids["r1"], "b", 1) is False  # double submit: the first stands
    with db.session(engine) as s:
        rows = s.query(db.Answer).all()
        assert [(r.answer, r.confidence) for r in rows] == [("a", 5)]
        reader = db.reader_for_token(s, token)
        assert db.next_item(s, reader).item_id == ids["r2"]  # resume at the next unanswered image
        assert db.item_png(s, reader, other_ids["r1"]) is None  # another study's image
    for item, cls, conf, match in [(other_ids["r2"], "a", 3, "no such image"), (ids["r2"], "c", 3, "not one of"),
                                   (ids["r2"], "a", 6, "confidence"), (ids["r2"], "a", 0, "confidence")]:
        with pytest.raises(db.StudyError, match=match):
            db.record_answer(engine, token, item, cls, conf)
    with pytest.raises(db.StudyError, match="unknown reader"):
        db.record_answer(engine, "not-a-token", ids["r2"], "a", 3)
    db.close_study(engine, study_id)
    with pytest.raises(db.StudyError, match="closed"):
        db.record_answer(engine, token, ids["r2"], "a", 3)
    with pytest.raises(db.StudyError, match="closed"):
        db.add_reader(engine, study_id, "late")


# ----------------------------------------------------------------------------------------------
# Statistics of a study, against the worked example computed by hand
# ----------------------------------------------------------------------------------------------
def test_report_statistics_equal_the_hand_computation(engine):
    from medisyn.study.report import StudyOpenError

    study_id, ids, _ = make_study(engine)
    answer_all(engine, study_id, ids)
    with pytest.raises(StudyOpenError):
        compute_stats(engine, study_id)  # answers stay in the database until the study is closed
    db.close_study(engine, study_id)
    st = compute_stats(engine, study_id)
    x, y = st.readers
    assert (x.reader, x.real.correct, x.real.n, x.synthetic.correct) == ("X", 2, 2, 2)
    assert (x.real.confidence_mean, x.real.confidence_sd) == (4.0, pytest.approx(math.sqrt(2)))
    assert (y.synthetic.correct, y.synthetic.accuracy) == (1, 0.5)
    assert y.synthetic.confidence_sd == pytest.approx(math.sqrt(8))
    assert y.real.confidence_sd == 0.0 and x.complete and y.complete
    assert (st.pooled["real"].correct, st.pooled["real"].n, st.pooled["synthetic"].correct) == (4, 4, 3)
    assert st.pooled["real"].confidence_sd == pytest.approx(math.sqrt(2 / 3))
    assert st.pooled["synthetic"].confidence_sd == pytest.approx(math.sqrt(10 / 3))
    assert st.accuracy_across_readers["real"] == (1.0, 0.0)
    assert st.accuracy_across_readers["synthetic"][0] == 0.75
    assert st.accuracy_across_readers["synthetic"][1] == pytest.approx(math.sqrt(0.125))  # sd of [1, .5], ddof 1
    assert st.confusion["real"] == ((2, 0), (0, 2)) and st.confusion["synthetic"] == ((1, 1), (0, 2))
    assert x.confusion["synthetic"] == ((1, 0), (0, 1))
    assert st.fleiss_kappa["all"] == pytest.approx(7 / 15)
    assert st.fleiss_kappa["real"] == pytest.approx(1.0) and st.fleiss_kappa["synthetic"] == pytest.approx(-1 / 3)
    assert st.kappa_items == {"all": 4, "real": 2, "synthetic": 2}
    assert st.items_per_origin == {"real": 2, "synthetic": 2} and st.seed == 7


def test_report_files_and_result_round_trip(engine, tmp_path):
    from medisyn.study.report import StudyReport, load_study_report, study_report

    study_id, ids, _ = make_study(engine)
    answer_all(engine, study_id, ids)
    db.close_study(engine, study_id)
    cfg = RunConfig()
    out = str(tmp_path / "report")
    report = study_report(cfg, study_id, out, db_url=str(engine.url), log_mlflow=False)
    assert load_study_report(out) == report == StudyReport.load(out)
    assert load_study_report(out + "/result.json") == report
    csv_text = (tmp_path / "report" / "table.csv").read_text()
    assert "X,real,2,2,100.00,4.00,1.41" in csv_text
    assert "all readers,synthetic,4,3,75.00 ± 35.36 (readers),3.00,1.83" in csv_text
    md = (tmp_path / "report" / "table.md").read_text()
    assert "| a | 1 | 1 |" in md and "all 0.467 (n=4)" in md
    fig = Image.open(tmp_path / "report" / "reader_study.png")
    assert fig.size[0] > 1000
    definition = json.loads((tmp_path / "report" / "definition.json").read_text())
    assert {it["id"]: it["origin"] for it in definition["items"]} == {ids[lb]: o for lb, o, _ in ITEMS}


# ----------------------------------------------------------------------------------------------
# The app (Flask test client): isolation between studies, admin view
# ----------------------------------------------------------------------------------------------
def test_app_isolates_studies_and_admin_never_shows_answers(engine):
    from medisyn.study.app import create_app

    study_id, ids, admin = make_study(engine)
    other_id, other_ids, other_admin = make_study(engine, model=("m", "2"))
    tokens = answer_all(engine, study_id, ids, {"X": {"r1": ("a", 5)}})
    other_token = db.add_reader(engine, other_id, "Reader of the other study")
    client = create_app(engine=engine).test_client()
    assert client.get(f"/read/{tokens['X']}/image/{ids['r2']}").status_code == 200
    assert client.get(f"/read/{tokens['X']}/image/{other_ids['r1']}").status_code == 404
    assert client.get(f"/read/{other_token}/image/{ids['r1']}").status_code == 404
    r = client.post(f"/read/{other_token}/answer", data={"item": ids["r2"], "label": "a", "confidence": "3"})
    assert r.status_code == 400
    page = client.get(f"/read/{tokens['X']}")
    assert ids["r2"] in page.get_data(as_text=True) and "Image 2 of 4" in page.get_data(as_text=True)
    incomplete = client.post(f"/read/{tokens['X']}/answer", data={"item": ids["r2"], "label": "a"})
    assert incomplete.status_code == 400
    html = client.get(f"/admin/{admin}").get_data(as_text=True)
    assert '<th scope="row">X</th><td>1 / 4</td>' in html and "Reader of the other study" not in html
    # answers move only the counts and the time: with digits masked, the page is the same whatever was answered
    assert db.record_answer(engine, tokens["X"], ids["r2"], "b", 2)
    after = client.get(f"/admin/{admin}").get_data(as_text=True)
    assert "2 / 4" in after and re.sub(r"\d", "N", after) == re.sub(r"\d", "N", html)
    assert client.get(f"/admin/{tokens['X']}").status_code == 404
    assert client.get(f"/admin/{other_admin}").status_code == 200
    assert client.get("/read/x" * 100).status_code == 404


# ----------------------------------------------------------------------------------------------
# The human gate, through the stage runner, against a real MLflow registry (SQLite)
# ----------------------------------------------------------------------------------------------
@pytest.fixture
def gate_env(tmp_path, monkeypatch):
    import mlflow
    from mlflow import MlflowClient

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    study_db = f"sqlite:///{tmp_path / 'study.db'}"
    monkeypatch.setattr("medisyn.tracking._CONFIGURED", None)
    cfg = load_config(None, [f"tracking.tracking_uri={uri}", f"study.db_url={study_db}",
                             "tracking.model_name=m-approved",
                             "tracking.candidate_model_name=m",  # the candidates (mlflow/REGISTRY.md): models:/m/1
                             "study.human_gate.min_readers=2", "study.human_gate.margin=0.3"])
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    client.create_experiment(cfg.tracking.experiment, artifact_location=(tmp_path / "artifacts").as_uri())
    fake_candidate(client, cfg, tmp_path)
    for gate in stages.GATE_ORDER:  # the human gate runs after these (GATE_ORDER): passed unless a test says
        registry.set_gate_result(cfg, "models:/m/1", gate, True, {})  # real verdicts: gate runs, not tags
    yield cfg, client, db.open_db(study_db)
    db.dispose_all()
    mlflow.set_tracking_uri(None)


def _with(cfg: RunConfig, *overrides: str) -> RunConfig:
    """``cfg`` with ``--set``-style overrides applied (through its YAML, as the CLI would read it)."""
    import tempfile
    from pathlib import Path

    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "config.yaml"
        path.write_text(cfg.to_yaml())
        return load_config(path, list(overrides))


def test_human_gate_fails_closed_without_a_closed_study(gate_env, tmp_path):
    from medisyn.evaluate.gates import GateResult

    cfg, client, engine = gate_env
    result = stages.run("human-gate", cfg, model="models:/m/1", out=str(tmp_path / "g"))
    assert not result.passed and "no closed" in result.reasons[0]
    assert GateResult.load(str(tmp_path / "g")) == result
    tags = client.get_model_version("m", "1").tags
    assert tags["gate.human"] == "failed" and "no closed" in json.loads(tags["gate.human.details"])["reasons"][0]
    study_id, ids, _ = make_study(engine)
    answer_all(engine, study_id, ids)  # complete but still open: not counted
    assert not stages.run("human-gate", cfg, model="models:/m/1", out=str(tmp_path / "g")).passed


@pytest.mark.parametrize("overrides,passed,why", [
    ((), True, "within the margin"),  # real 100 %, synthetic 75 %: a gap of 25 points <= 30
    (("study.human_gate.margin=0.05",), False, "beyond the margin"),
    (("study.human_gate.min_readers=3",), False, "gate needs 3"),
])
def test_human_gate_verdicts(gate_env, tmp_path, overrides, passed, why):
    from medisyn.cli import EXIT_NOT_PASSED, main

    cfg, client, engine = gate_env
    study_id, ids, _ = make_study(engine, model=("m", "1"))
    answer_all(engine, study_id, ids)
    db.close_study(engine, study_id)
    make_study(engine, model=("m", "2"))  # another version's study is never used
    cfg = _with(cfg, *overrides)
    result = stages.run("human-gate", cfg, model="models:/m/1", out=str(tmp_path / "g"))
    assert result.passed is passed and why in result.reasons[0]
    if passed:
        assert result.metrics["real_accuracy"] == 1.0 and result.metrics["synthetic_accuracy"] == 0.75
    assert client.get_model_version("m", "1").tags["gate.human"] == ("passed" if passed else "failed")
    config = tmp_path / "cfg.yaml"
    config.write_text(cfg.to_yaml())
    code = main(["human-gate", "--config", str(config), "--model", "models:/m/1", "--out", str(tmp_path / "c")])
    assert code == (0 if passed else EXIT_NOT_PASSED)


def test_promote_requires_the_human_gate_only_when_enabled(gate_env, tmp_path):
    cfg, client, engine = gate_env
    off = stages.run("promote", cfg, model="models:/m/1", out=str(tmp_path / "p0"))
    assert off.approved and "human" not in off.gates  # the default: privacy then utility, unchanged
    on = _with(cfg, "study.human_gate.enabled=true")
    assert stages.gate_order(on) == ("privacy", "utility", "human") and stages.gate_order(cfg) == stages.GATE_ORDER
    refused = stages.run("promote", on, model="models:/m/1", out=str(tmp_path / "p1"))
    assert not refused.approved and refused.gates["human"] == "missing"
    assert "approved" not in client.get_registered_model("m").aliases
    study_id, ids, _ = make_study(engine)
    answer_all(engine, study_id, ids)
    db.close_study(engine, study_id)
    assert stages.run("human-gate", on, model="models:/m/1", out=str(tmp_path / "g")).passed
    approved = stages.run("promote", on, model="models:/m/1", gates=["privacy"], out=str(tmp_path / "p2"))
    assert approved.approved and approved.gates == {"privacy": "passed", "utility": "passed", "human": "passed"}
    # an earlier gate not passed: the human gate is recorded as skipped, without reading the study
    client.set_model_version_tag("m", "1", "gate.utility", "failed")
    skipped = stages.run("human-gate", on, model="models:/m/1", out=str(tmp_path / "g2"))
    assert not skipped.passed and skipped.reasons[0].startswith("skipped: the utility gate is failed")


def test_study_config_is_validated():
    cfg = RunConfig()
    assert cfg.study.images_per_class * 3 * 2 == 102  # section 4.3.2: 51 synthetic + 51 real, 3 classes
    assert [t.name for t in cfg.study.tasks] == ["surgery", "oct"] and not cfg.study.human_gate.enabled
    with pytest.raises(ConfigError, match="study.task"):
        load_config(None, ["study.task=dermoscopy"])
    with pytest.raises(ConfigError, match="label"):
        load_config(None, ["study.tasks=[{name: x, specialty: s, image_type: t, prompt_template: 'no slot', "
                           "classes: [a, b]}]", "study.task=x"])
    with pytest.raises(ConfigError, match="margin"):
        load_config(None, ["study.human_gate.margin=2"])


# ----------------------------------------------------------------------------------------------
# Creation from a registered tiny model and a real test split
# ----------------------------------------------------------------------------------------------
STUDY_SETTINGS = [
    "study.images_per_class=2", "study.image_size=64", "study.task=oct", "study.seed=3",
    "study.tasks=[{name: oct, specialty: ophthalmology, image_type: oct, "
    "prompt_template: 'Optical coherence tomography image showing {label}.', classes: [drusen, normal findings]}]",
]


@pytest.mark.slow
@pytest.mark.mlflow
def test_create_study_from_a_registered_model(tmp_path):
    import mlflow

    from medisyn import tracking
    from medisyn.cli import main
    from medisyn.study.create import create_study, study_definition

    cfg, model = register_tiny_version(tmp_path, STUDY_SETTINGS)
    try:
        dataset = write_dataset(str(tmp_path / "dataset"), n_per_specialty=8, split="test")
        url = f"sqlite:///{tmp_path / 'study.db'}"
        created, admin = create_study(cfg, model, dataset, db_url=url)
        again, _ = create_study(cfg, model, dataset, db_url=url)
        engine = db.open_db(url)
        assert (created.n_items, created.model_version, created.classes) == (8, "1", ("drusen", "normal findings"))
        first, second = study_definition(engine, created.study_id), study_definition(engine, again.study_id)
        # the recorded seed fixes the order, the real images and the generation seeds; the ids are random
        assert [(i["origin"], i["class"], i["source"]) for i in first["items"]] == \
            [(i["origin"], i["class"], i["source"]) for i in second["items"]]
        assert not {i["id"] for i in first["items"]} & {i["id"] for i in second["items"]}
        assert first["seed"] == 3 and first["model_version"] == "1"
        counts = {(o, c): 0 for o in db.ORIGINS for c in created.classes}
        for it in first["items"]:
            counts[(it["origin"], it["class"])] += 1
        assert set(counts.values()) == {2}
        assert [i["origin"] for i in first["items"]] != sorted(i["origin"] for i in first["items"])  # shuffled
        with db.session(engine) as s:
            pngs = [i.png for i in s.query(db.StudyItem).filter_by(study_id=created.study_id)]
            assert db.study_for_admin_token(s, admin).id == created.study_id
        assert len({len(p) for p in pngs}) == 1 and len(set(pngs)) == 8
        assert all(Image.open(io.BytesIO(p)).size == (64, 64) for p in pngs)
        too_many = _with(cfg, "study.images_per_class=5")
        with pytest.raises(ValueError, match="needs 5"):
            create_study(too_many, model, dataset, db_url=url)
        config = tmp_path / "cfg.yaml"
        config.write_text(cfg.to_yaml())
        assert main(["study", "add-reader", "--config", str(config), "--db", url, "--study", created.study_id,
                     "--name", "Attending #1"]) == 0
        assert main(["study", "add-reader", "--config", str(config), "--db", url, "--study", "nope",
                     "--name", "x"]) == 2
    finally:
        db.dispose_all()
        mlflow.set_tracking_uri(None)
        tracking._CONFIGURED = None


# ----------------------------------------------------------------------------------------------
# PostgreSQL (the chart's database), beside an MLflow-style alembic_version table
# ----------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_postgresql_migrates_beside_mlflow_and_stores_answers_once(postgres_url):
    try:
        _migrate_and_answer(postgres_url)
    finally:
        db.dispose_all()  # before the shared fixture stops the server


def _migrate_and_answer(postgres_url):
    from sqlalchemy import create_engine, text

    raw = create_engine(postgres_url)
    with raw.begin() as conn:  # MLflow's own Alembic bookkeeping, as in the chart's shared database
        conn.execute(text("CREATE TABLE alembic_version (version_num VARCHAR(32) PRIMARY KEY)"))
        conn.execute(text("INSERT INTO alembic_version VALUES ('mlflow-head')"))
    raw.dispose()
    engine = db.open_db(postgres_url)
    assert db.current_revision(engine) == "0001"
    with engine.connect() as conn:
        assert conn.execute(text("SELECT version_num FROM alembic_version")).scalar() == "mlflow-head"
    study_id, ids, _ = make_study(engine)
    token = db.add_reader(engine, study_id, "X")
    assert db.record_answer(engine, token, ids["r1"], "a", 5) is True
    assert db.record_answer(engine, token, ids["r1"], "b", 2) is False
    answer_all(engine, study_id, ids, {"Y": ANSWERS["Y"]})
    db.close_study(engine, study_id)
    stats = compute_stats(engine, study_id)
    assert [(r.reader, r.answered) for r in stats.readers] == [("X", 1), ("Y", 4)]
    with db.session(engine) as s:
        assert s.query(db.StudyItem).filter_by(id=ids["r1"]).one().png[:8] == b"\x89PNG\r\n\x1a\n"
