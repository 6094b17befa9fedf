"""The reader study's report (paper sections 2.1, 4.3.2-4.3.3, Figure 3b/3d).

Per reader and pooled, for real and for synthetic images: accuracy (correct / answered, with the
counts) and confidence (mean +- sample sd of the 1-5 ratings); across readers, the mean +- sample sd
of the per-reader accuracies (the paper's "83.66 +- 3.00 %" over three surgeons); a confusion matrix
per origin (rows: true class, columns: answered class); inter-reader agreement as Fleiss' kappa over
the images every reader answered (all, real only, synthetic only).

Written under an output prefix (``result.json`` = :class:`StudyReport`, ``reader_study.png``,
``confusion.png``, ``table.csv``, ``table.md``, ``definition.json``), logged to MLflow on the model
version's run (metrics, and the same files as artifacts under ``reader_study/<study id>/``), and
tagged on the version (``reader_study.*``; ``reader_study.report_uri`` names the prefix), so the
version's evaluation report reads it back with :func:`load_study_report`.

Only a closed study is reported: until then no answer leaves the database (issue #15).
"""

from __future__ import annotations

import csv
import io
import json
import logging
import math
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from sqlalchemy import Engine, select

from medisyn import storage
from medisyn.config import RunConfig
from medisyn.results import StageResult
from medisyn.study import db

log = logging.getLogger("medisyn.study.report")

ARTIFACT_DIR = "reader_study"
FIGURE_FILE = "reader_study.png"
CONFUSION_FILE = "confusion.png"
TABLE_CSV = "table.csv"
TABLE_MD = "table.md"
DEFINITION_FILE = "definition.json"
REPORT_URI_TAG = "reader_study.report_uri"


# ----------------------------------------------------------------------------------------------
# Statistics
# ----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class OriginStats:
    n: int  # answers
    correct: int
    accuracy: float | None  # correct / n; None without answers
    confidence_mean: float | None
    confidence_sd: float | None  # sample sd (ddof=1); None below two answers


@dataclass(frozen=True)
class ReaderStats:
    reader: str
    answered: int
    complete: bool  # answered every image of the study
    real: OriginStats
    synthetic: OriginStats
    confusion: dict[str, tuple[tuple[int, ...], ...]]  # origin -> [true class][answered class]


@dataclass(frozen=True)
class StudyStats:
    study_id: str
    name: str
    model_name: str
    model_version: str
    task: str
    classes: tuple[str, ...]
    seed: int
    n_items: int
    items_per_origin: dict[str, int]
    closed_at: str | None  # ISO time; None while open
    readers: tuple[ReaderStats, ...]
    pooled: dict[str, OriginStats]  # origin -> every answer of every reader
    accuracy_across_readers: dict[str, tuple[float | None, float | None]]  # origin -> (mean, sample sd)
    confusion: dict[str, tuple[tuple[int, ...], ...]]  # origin -> pooled over readers
    fleiss_kappa: dict[str, float | None]  # all | real | synthetic; None: < 2 readers, or undefined
    kappa_items: dict[str, int]  # images every reader answered, per key of fleiss_kappa


@dataclass(frozen=True)
class StudyReport(StageResult):
    stats: StudyStats
    out_uri: str
    figure_uri: str  # Figure 3b/3d: accuracy and confidence per reader, real vs synthetic
    confusion_figure_uri: str
    table_csv_uri: str
    table_md_uri: str
    definition_uri: str  # seed, ids, origins, classes: which image was which (study side only)
    mlflow_run_id: str | None  # the model version's run the report was logged to


def _mean(xs: Sequence[float]) -> float | None:
    return float(np.mean(xs)) if len(xs) else None


def _sd(xs: Sequence[float]) -> float | None:
    return float(np.std(xs, ddof=1)) if len(xs) > 1 else None


def origin_stats(correct: Sequence[bool], confidence: Sequence[int]) -> OriginStats:
    n = len(correct)
    k = int(sum(bool(c) for c in correct))
    return OriginStats(n=n, correct=k, accuracy=k / n if n else None,
                       confidence_mean=_mean([float(c) for c in confidence]),
                       confidence_sd=_sd([float(c) for c in confidence]))


def fleiss_kappa(counts: np.ndarray | Sequence[Sequence[int]]) -> float | None:
    """Fleiss' kappa of an items x categories table of how many raters chose each category.

    Every row must sum to the same number of raters n >= 2. Returns None when kappa is undefined
    (every rating falls in one category: expected agreement is 1).
    """
    table = np.asarray(counts, dtype=float)
    if table.ndim != 2 or table.shape[0] == 0:
        raise ValueError("fleiss_kappa needs a non-empty items x categories table")
    raters = table.sum(axis=1)
    if not np.all(raters == raters[0]) or raters[0] < 2:
        raise ValueError(f"every item needs the same number (>= 2) of ratings, got {sorted(set(raters.tolist()))}")
    n_items, n = table.shape[0], raters[0]
    p_cat = table.sum(axis=0) / (n_items * n)
    p_item = (np.sum(table * table, axis=1) - n) / (n * (n - 1))
    p_bar, p_e = float(p_item.mean()), float(np.sum(p_cat * p_cat))
    if math.isclose(p_e, 1.0):
        return None
    return (p_bar - p_e) / (1.0 - p_e)


def _confusion(pairs: Sequence[tuple[str, str]], classes: Sequence[str]) -> tuple[tuple[int, ...], ...]:
    index = {c: i for i, c in enumerate(classes)}
    m = np.zeros((len(classes), len(classes)), dtype=int)
    for truth, given in pairs:
        m[index[truth], index[given]] += 1
    return tuple(tuple(int(x) for x in row) for row in m)


class StudyOpenError(db.StudyError):
    """The study is still open: its answers stay in the database."""


def compute_stats(engine: Engine, study_id: str, allow_open: bool = False) -> StudyStats:
    """Every statistic of the report, from the database (refuses an open study unless ``allow_open``)."""
    with db.session(engine) as s:
        study = db.get_study(s, study_id)
        if not study.closed and not allow_open:
            raise StudyOpenError(f"study {study_id} is still open: close it first (medisyn study close)")
        definition = json.loads(study.definition_json)
        classes = tuple(study.classes)
        items = {i.id: (i.origin, i.true_class) for i in s.scalars(
            select(db.StudyItem).where(db.StudyItem.study_id == study_id).order_by(db.StudyItem.position))}
        readers = list(s.scalars(select(db.Reader).where(db.Reader.study_id == study_id).order_by(db.Reader.id)))
        answers = {r.id: list(s.scalars(select(db.Answer).where(db.Answer.reader_id == r.id))) for r in readers}
        meta = (study.name, study.model_name, study.model_version, study.task,
                study.closed_at.isoformat() if study.closed_at else None)

    per_origin = {o: sum(1 for og, _ in items.values() if og == o) for o in db.ORIGINS}
    reader_stats: list[ReaderStats] = []
    pooled: dict[str, list[tuple[bool, int, str, str]]] = {o: [] for o in db.ORIGINS}
    for r in readers:
        mine: dict[str, list[tuple[bool, int, str, str]]] = {o: [] for o in db.ORIGINS}
        for a in answers[r.id]:
            origin, truth = items[a.item_id]
            row = (a.answer == truth, a.confidence, truth, a.answer)
            mine[origin].append(row)
            pooled[origin].append(row)
        stats = {o: origin_stats([x[0] for x in mine[o]], [x[1] for x in mine[o]]) for o in db.ORIGINS}
        reader_stats.append(ReaderStats(
            reader=r.name, answered=len(answers[r.id]), complete=len(answers[r.id]) == len(items),
            real=stats["real"], synthetic=stats["synthetic"],
            confusion={o: _confusion([(x[2], x[3]) for x in mine[o]], classes) for o in db.ORIGINS}))

    across = {}
    for o in db.ORIGINS:
        accs = [getattr(rs, o).accuracy for rs in reader_stats if getattr(rs, o).accuracy is not None]
        across[o] = (_mean(accs), _sd(accs))

    # Fleiss' kappa over the images every reader answered (a reader who stopped early would break
    # the equal-raters-per-item requirement).
    kappa: dict[str, float | None] = {}
    kappa_items: dict[str, int] = {}
    by_item: dict[str, dict[int, str]] = {}
    for r in readers:
        for a in answers[r.id]:
            by_item.setdefault(a.item_id, {})[r.id] = a.answer
    full = [i for i, given in by_item.items() if len(given) == len(readers)]
    for key in ("all", *db.ORIGINS):
        chosen = [i for i in full if key == "all" or items[i][0] == key]
        kappa_items[key] = len(chosen)
        if len(readers) < 2 or not chosen:
            kappa[key] = None
            continue
        table = [[sum(1 for g in by_item[i].values() if g == c) for c in classes] for i in chosen]
        kappa[key] = fleiss_kappa(table)

    return StudyStats(
        study_id=study_id, name=meta[0], model_name=meta[1], model_version=meta[2], task=meta[3],
        classes=classes, seed=int(definition["seed"]), n_items=len(items), items_per_origin=per_origin,
        closed_at=meta[4], readers=tuple(reader_stats),
        pooled={o: origin_stats([x[0] for x in pooled[o]], [x[1] for x in pooled[o]]) for o in db.ORIGINS},
        accuracy_across_readers=across,
        confusion={o: _confusion([(x[2], x[3]) for x in pooled[o]], classes) for o in db.ORIGINS},
        fleiss_kappa=kappa, kappa_items=kappa_items,
    )


# ----------------------------------------------------------------------------------------------
# Table and figures
# ----------------------------------------------------------------------------------------------
def _fmt(x: float | None, pct: bool = False, digits: int = 2) -> str:
    if x is None:
        return "-"
    return f"{100 * x:.{digits}f}" if pct else f"{x:.{digits}f}"


def table_rows(stats: StudyStats) -> list[dict[str, str]]:
    """One row per reader and origin, then the pooled rows (every answer of every reader)."""
    rows = []
    for who, per in [(r.reader, {"real": r.real, "synthetic": r.synthetic}) for r in stats.readers] + [
            ("all readers", stats.pooled)]:
        for origin in db.ORIGINS:
            st = per[origin]
            row = {"reader": who, "origin": origin, "answers": str(st.n), "correct": str(st.correct),
                   "accuracy_pct": _fmt(st.accuracy, pct=True), "confidence_mean": _fmt(st.confidence_mean),
                   "confidence_sd": _fmt(st.confidence_sd)}
            if who == "all readers":
                mean, sd = stats.accuracy_across_readers[origin]
                row["accuracy_pct"] = f"{_fmt(mean, pct=True)} ± {_fmt(sd, pct=True)} (readers)"
            rows.append(row)
    return rows


def table_csv(stats: StudyStats) -> str:
    rows = table_rows(stats)
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(rows[0]))
    writer.writeheader()
    writer.writerows(rows)
    return buf.getvalue()


def table_markdown(stats: StudyStats) -> str:
    rows = table_rows(stats)
    head = ["reader", "origin", "answers", "correct", "accuracy (%)", "confidence mean", "confidence sd"]
    lines = [f"# Reader study {stats.name} ({stats.study_id})", "",
             f"Model {stats.model_name} version {stats.model_version}; task {stats.task}; classes "
             f"{', '.join(stats.classes)}; {stats.n_items} images ({stats.items_per_origin['real']} real, "
             f"{stats.items_per_origin['synthetic']} synthetic); seed {stats.seed}; closed {stats.closed_at}.", "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        lines.append("| " + " | ".join(r[k] for k in ("reader", "origin", "answers", "correct", "accuracy_pct",
                                                      "confidence_mean", "confidence_sd")) + " |")
    lines += ["", "Fleiss' kappa (images every reader answered): "
              + "; ".join(f"{k} {_fmt(v, digits=3)} (n={stats.kappa_items[k]})" for k, v in stats.fleiss_kappa.items()),
              ""]
    for origin in db.ORIGINS:
        lines += [f"Confusion matrix, {origin} images (rows: true class, columns: answered class):", "",
                  "| true \\ answered | " + " | ".join(stats.classes) + " |", "|" + "---|" * (len(stats.classes) + 1)]
        for c, row in zip(stats.classes, stats.confusion[origin], strict=True):
            lines.append(f"| {c} | " + " | ".join(str(x) for x in row) + " |")
        lines.append("")
    return "\n".join(lines)


COLOURS = {"real": "#6b7280", "synthetic": "#1d4ed8"}  # grey / blue, distinguishable in greyscale too


def figure(stats: StudyStats):
    """Figure 3b/3d: accuracy (%) and confidence (mean +- sd) per reader and for all readers, real vs synthetic."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [r.reader for r in stats.readers] + ["All readers"]
    x = np.arange(len(names))
    w = 0.38
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.6), constrained_layout=True)
    for k, origin in enumerate(db.ORIGINS):
        per = [getattr(r, origin) for r in stats.readers]
        mean, sd = stats.accuracy_across_readers[origin]
        acc = [100 * (p.accuracy or 0.0) for p in per] + [100 * (mean or 0.0)]
        off = (k - 0.5) * w
        bars = axes[0].bar(x + off, acc, w, color=COLOURS[origin], label=origin.capitalize())
        # the across-readers sd only on the "All readers" bars (one reader has no spread)
        axes[0].errorbar(x[-1] + off, acc[-1], yerr=100 * (sd or 0.0), color="black", capsize=4)
        labels = [f"{p.correct}/{p.n}" for p in per] + [f"{stats.pooled[origin].correct}/{stats.pooled[origin].n}"]
        for bar, text in zip(bars, labels, strict=True):  # counts at the foot of each bar, clear of the error bar
            axes[0].text(bar.get_x() + bar.get_width() / 2, 2, text, ha="center", va="bottom", color="white",
                         fontsize=9, fontweight="bold")
        conf = [p.confidence_mean or 0.0 for p in per] + [stats.pooled[origin].confidence_mean or 0.0]
        conf_err = [p.confidence_sd or 0.0 for p in per] + [stats.pooled[origin].confidence_sd or 0.0]
        axes[1].bar(x + off, conf, w, yerr=conf_err, capsize=4, color=COLOURS[origin], label=origin.capitalize())
    axes[0].set_ylabel("Accuracy (%)")
    axes[0].set_ylim(0, 115)
    axes[0].set_title("Classification accuracy")
    axes[1].set_ylabel("Confidence (1-5), mean ± sd")
    axes[1].set_ylim(0, 6)
    axes[1].set_title("Confidence")
    for ax in axes:
        ax.set_xticks(x, names, rotation=15, ha="right")
        ax.legend(loc="upper left", ncols=2, frameon=False)
        ax.spines[["top", "right"]].set_visible(False)
    kappa = stats.fleiss_kappa.get("all")
    fig.suptitle(f"Reader study: {stats.task} ({stats.model_name} v{stats.model_version}), "
                 f"{stats.n_items} images; Fleiss' kappa {_fmt(kappa, digits=2)}")
    return fig


def confusion_figure(stats: StudyStats):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    k = len(stats.classes)
    fig, axes = plt.subplots(1, 2, figsize=(5 + 2.2 * k, 1.5 + 1.3 * k), constrained_layout=True)
    for ax, origin in zip(axes, db.ORIGINS, strict=True):
        m = np.asarray(stats.confusion[origin])
        ax.imshow(m, cmap="Blues", vmin=0, vmax=max(1, int(m.max())))
        for i in range(k):
            for j in range(k):
                ax.text(j, i, str(m[i, j]), ha="center", va="center",
                        color="white" if m[i, j] > m.max() / 2 else "black")
        ax.set_xticks(range(k), stats.classes, rotation=20, ha="right")
        ax.set_yticks(range(k), stats.classes)
        ax.set_xlabel("answered class")
        ax.set_ylabel("true class")
        ax.set_title(f"{origin} images (all readers)")
    return fig


def _png(fig) -> bytes:
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    try:
        fig.savefig(buf, format="png", dpi=130)
    finally:
        plt.close(fig)
    return buf.getvalue()


# ----------------------------------------------------------------------------------------------
# The stage: write, log, tag
# ----------------------------------------------------------------------------------------------
def _log_to_version(cfg: RunConfig, stats: StudyStats, files: dict[str, bytes], report_uri: str) -> str | None:
    """Log metrics and files to the model version's run and tag the version; returns the run id."""
    from mlflow import MlflowClient

    from medisyn import tracking

    if not tracking.configure(cfg):
        log.warning("no MLflow tracking URI: the reader study report is not logged to the registry")
        return None
    client = MlflowClient()
    mv = client.get_model_version(stats.model_name, stats.model_version)
    run_id = mv.run_id
    if not run_id:  # a version registered without a run: give the study one in the run's experiment
        exp = client.get_experiment_by_name(cfg.tracking.experiment)
        exp_id = exp.experiment_id if exp else client.create_experiment(cfg.tracking.experiment)
        run_id = client.create_run(exp_id, run_name=f"reader-study-{stats.study_id}",
                                   tags={"medisyn.stage": "study-report"}).info.run_id
        client.set_terminated(run_id)
    prefix = f"study.{stats.task}"
    for origin in db.ORIGINS:
        st = stats.pooled[origin]
        for key, value in (("accuracy", st.accuracy), ("confidence_mean", st.confidence_mean),
                           ("confidence_sd", st.confidence_sd), ("answers", float(st.n))):
            if value is not None:
                client.log_metric(run_id, f"{prefix}.{origin}.{key}", float(value))
    for key, value in stats.fleiss_kappa.items():
        if value is not None:
            client.log_metric(run_id, f"{prefix}.fleiss_kappa.{key}", float(value))
    with tempfile.TemporaryDirectory(prefix="medisyn-study-report-") as tmp:
        for name, data in files.items():
            (Path(tmp) / name).write_bytes(data)  # byte for byte what the output prefix holds
        client.log_artifacts(run_id, tmp, f"{ARTIFACT_DIR}/{stats.study_id}")
    tags = {
        "reader_study.study_id": stats.study_id,
        REPORT_URI_TAG: report_uri,
        "reader_study.artifacts": f"runs:/{run_id}/{ARTIFACT_DIR}/{stats.study_id}",
        "reader_study.accuracy.real": _fmt(stats.pooled["real"].accuracy, digits=4),
        "reader_study.accuracy.synthetic": _fmt(stats.pooled["synthetic"].accuracy, digits=4),
        "reader_study.fleiss_kappa": _fmt(stats.fleiss_kappa.get("all"), digits=4),
        "reader_study.readers": str(len(stats.readers)),
    }
    for key, text in tags.items():
        client.set_model_version_tag(stats.model_name, stats.model_version, key, text)
    return str(run_id)


def study_report(cfg: RunConfig, study_id: str, out: str, db_url: str | None = None,
                 log_mlflow: bool = True) -> StudyReport:
    """Report a closed study under ``out`` (files + ``result.json``), log it on the model version."""
    engine = db.open_db(db_url or cfg.study.db_url)
    stats = compute_stats(engine, study_id)
    with db.session(engine) as s:
        definition = json.loads(db.get_study(s, study_id).definition_json)
    files = {
        FIGURE_FILE: _png(figure(stats)),
        CONFUSION_FILE: _png(confusion_figure(stats)),
        TABLE_CSV: table_csv(stats).encode(),
        TABLE_MD: table_markdown(stats).encode(),
        DEFINITION_FILE: json.dumps(definition, indent=2).encode(),
    }
    out = storage.normalize(out)
    with storage.staged_dir(out, metadata={"study_id": study_id}) as d:
        for name, data in files.items():
            (d / name).write_bytes(data)
    run_id = None
    if log_mlflow:
        draft = _report(stats, out, None)
        files_with_result = {**files, "result.json": json.dumps(draft.envelope(), indent=2, default=str).encode()}
        run_id = _log_to_version(cfg, stats, files_with_result, out)
    report = _report(stats, out, run_id)
    report.save(out)
    log.info("reader study %s: real %s %%, synthetic %s %% (kappa %s) -> %s", study_id,
             _fmt(stats.pooled["real"].accuracy, pct=True), _fmt(stats.pooled["synthetic"].accuracy, pct=True),
             _fmt(stats.fleiss_kappa.get("all"), digits=3), out)
    return report


def _report(stats: StudyStats, out: str, run_id: str | None) -> StudyReport:
    return StudyReport(stats=stats, out_uri=out, figure_uri=storage.join(out, FIGURE_FILE),
                       confusion_figure_uri=storage.join(out, CONFUSION_FILE),
                       table_csv_uri=storage.join(out, TABLE_CSV), table_md_uri=storage.join(out, TABLE_MD),
                       definition_uri=storage.join(out, DEFINITION_FILE), mlflow_run_id=run_id)


def load_study_report(prefix_or_uri: str) -> StudyReport:
    """The typed report of a study, from its output prefix, the ``result.json`` in it, or a model
    version (``models:/<name>/<version>``: the prefix its ``reader_study.report_uri`` tag names,
    through the current MLflow registry). Raises :class:`medisyn.results.ResultError` when absent."""
    from medisyn.results import RESULT_FILE, ResultError

    ref = str(prefix_or_uri)
    if ref.startswith("models:/"):
        from mlflow import MlflowClient

        body = ref[len("models:/"):].strip("/")
        name, _, version = body.rpartition("/")
        if "@" in body:
            name, alias = body.split("@", 1)
            mv = MlflowClient().get_model_version_by_alias(name, alias)
        else:
            mv = MlflowClient().get_model_version(name, version)
        uri = dict(mv.tags).get(REPORT_URI_TAG)
        if not uri:
            raise ResultError(f"{ref} has no reader study report (no {REPORT_URI_TAG} tag): run medisyn study report")
        ref = uri
    if ref.rstrip("/").endswith("/" + RESULT_FILE) or ref == RESULT_FILE:
        ref = ref.rstrip("/")[: -len(RESULT_FILE)].rstrip("/") or "."
    return StudyReport.load(ref)
