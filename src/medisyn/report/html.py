"""Render the evidence of one version as ONE self-contained HTML page.

No external resource of any kind: figures and images are inline ``data:image/png;base64`` URIs, the
CSS is inline, there is no script. Every section has a stable id (:data:`SECTIONS`), every image an
alt text, every table a caption. docs/report.md says how to read each section.
"""

from __future__ import annotations

import base64
import datetime as _dt
import html
import json
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, is_dataclass
from typing import Any

import numpy as np

from medisyn.evaluate.binomial import RECOGNISABILITY_CONFIDENCE, accuracy_lower_bound
from medisyn.report import figures
from medisyn.report.evidence import Evidence

# (id, heading, what of the paper it mirrors)
SECTIONS: tuple[tuple[str, str, str], ...] = (
    ("model-card", "Model card and lineage", "model card"),
    ("gates", "Gate verdicts", "section 4.4 decisions"),
    ("samples", "Sample grids per specialty and class", "Figures 1-2"),
    ("fid", "FID per epoch", "section 4.2"),
    ("table-1", "Table 1: distance to the nearest training image", "Table 1"),
    ("distance-histogram", "Distance histogram and calibrated reference", "Figure 4b"),
    ("pairs", "Closest and flagged pairs", "Figure 4c, Extended Data Fig. 1"),
    ("roc", "Classifier utility: ROC curves and AUROC", "Figure 5"),
    ("recognisability", "Recognisability of synthetic images", "Figure 3 (automatic stand-in)"),
    ("reader-study", "Reader study", "Figure 3"),
)

CSS = """
body{font-family:system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;margin:0 auto;max-width:1200px;
padding:1rem 2rem;color:#1b1b1b;line-height:1.4}
h1{font-size:1.6rem;margin-bottom:.2rem}h2{border-bottom:2px solid #ddd;padding-bottom:.2rem;margin-top:2.2rem}
h3{margin-top:1.4rem}nav ol{columns:2}table{border-collapse:collapse;margin:.6rem 0;font-size:.9rem}
caption{text-align:left;font-weight:600;padding:.3rem 0}th,td{border:1px solid #ccc;padding:.25rem .5rem;
vertical-align:top}th{background:#f3f3f3}td.num{text-align:right;font-variant-numeric:tabular-nums}
figure{margin:.6rem 0;display:inline-block;vertical-align:top}figcaption{font-size:.85rem;color:#444;max-width:60rem}
img.figure{max-width:100%}img.sample,img.pair{width:128px;height:auto;image-rendering:pixelated;
border:1px solid #bbb;margin:1px}.pair-box{display:inline-block;margin:.3rem .6rem .6rem 0;padding:.3rem;
border:1px solid #ddd;border-radius:4px}.passed{color:#11692b;font-weight:700}.failed{color:#a11;font-weight:700}
.missing{background:#fff6d6;border-left:4px solid #e0b000;padding:.4rem .6rem}pre{background:#f6f6f6;
padding:.6rem;overflow-x:auto;font-size:.8rem;white-space:pre-wrap}.muted{color:#666;font-size:.85rem}
"""


@dataclass(frozen=True)
class Page:
    html: str
    sections: list[str]


class Raw(str):
    """A table cell or fragment that is already HTML."""


def esc(x: Any) -> str:
    return x if isinstance(x, Raw) else html.escape(str(x))


def num(v: Any, digits: int = 3) -> str:
    """A number for a table cell; '-' for None/NaN."""
    if v is None or (isinstance(v, float) and not np.isfinite(v)):
        return "-"
    if isinstance(v, (int, np.integer)) and not isinstance(v, bool):
        return str(int(v))
    return f"{float(v):.{digits}f}"


def pvalue(p: Any) -> str:
    if p is None:
        return "-"
    return f"{p:.3g}" if p >= 1e-3 else f"{p:.2e}"


def pct(frac: Any) -> str:
    return "-" if frac is None else f"{100 * float(frac):.2f}%"


def img(png: bytes, alt: str, cls: str = "figure") -> Raw:
    data = base64.b64encode(png).decode()
    return Raw(f'<img class="{cls}" src="data:image/png;base64,{data}" alt="{html.escape(alt, quote=True)}">')


def figure(png: bytes, alt: str, caption: str) -> str:
    return f"<figure>{img(png, alt)}<figcaption>{esc(caption)}</figcaption></figure>"


def table(caption: str, headers: Sequence[str], rows: Iterable[Sequence[Any]], table_id: str = "",
          numeric: Sequence[int] = ()) -> str:
    ident = f' id="{table_id}"' if table_id else ""
    head = "".join(f'<th scope="col">{esc(h)}</th>' for h in headers)
    body = []
    for r in rows:
        cells = [f'<td class="num">{esc(c)}</td>' if i in numeric else f"<td>{esc(c)}</td>" for i, c in enumerate(r)]
        body.append("<tr>" + "".join(cells) + "</tr>")
    return (f"<table{ident}><caption>{esc(caption)}</caption><thead><tr>{head}</tr></thead>"
            f"<tbody>{''.join(body)}</tbody></table>")


def missing(text: str) -> str:
    return f'<p class="missing" role="note">{esc(text)}</p>'


def verdict(status: str) -> Raw:
    cls = "passed" if status == "passed" else "failed"
    return Raw(f'<span class="{cls}">{esc(status)}</span>')


# ----------------------------------------------------------------------------------------------
# Sections
# ----------------------------------------------------------------------------------------------
LINEAGE_TAGS = ("epoch", "checkpoint_uri", "dataset_hash", "dataset_uri", "config_hash", "code_version",
                "pipeline_run_id", "base.model_identity", "unet_dtype", "scores_uri")


def _promotion(ev: Evidence) -> str:
    """One sentence: approved (by whom, when, as which version), revoked, or not approved."""
    own = f"(aliases of {esc(ev.name)} v{esc(ev.version)}: {esc(', '.join(ev.aliases) or 'none')})."
    a = ev.approval
    if not a:
        return f"<strong>not approved</strong> {own}"
    where = f"{esc(a['name'])} v{esc(a['version'])}"
    tags = a.get("tags", {})
    if "approved" in a.get("aliases", []):
        by, at = tags.get("approval.by", "?"), tags.get("approval.at", "")
        return (f"<strong>approved</strong> as {where} @approved, by {esc(by)}"
                f"{' at ' + esc(at) if at else ''} {own}")
    if "revoked" in tags:
        return f"<strong>revoked</strong>: was approved as {where}; reason: {esc(tags['revoked'])} {own}"
    return f"<strong>approved earlier</strong> as {where}, no longer @approved {own}"


def _model_card(ev: Evidence) -> str:
    rows = [("registered model", ev.name), ("version", ev.version), ("aliases", ", ".join(ev.aliases) or "-"),
            ("registered at", ev.created or "-"), ("MLflow run", ev.run_id or "-")]
    rows += [(k, ev.tags[k]) for k in LINEAGE_TAGS if k in ev.tags]
    out = [table("Version and lineage (registry tags)", ["field", "value"], rows, "lineage-table")]
    if ev.notes.get("model-card"):
        out.append(missing(ev.notes["model-card"]))
    if ev.card_markdown:
        out.append("<details><summary>Model card (the version's description in the registry, markdown): expand"
                   f"</summary><pre>{esc(ev.card_markdown)}</pre></details>")
    else:
        out.append(missing("the version has no model card"))
    return "".join(out)


def _gates(ev: Evidence) -> str:
    rows = []
    for gate, rec in sorted(ev.gates.items()):
        details = rec.get("details")
        reasons = details.get("reasons", []) if isinstance(details, dict) else [str(details)[:300]]
        items = "".join(f"<li>{esc(r)}</li>" for r in reasons) or "<li>-</li>"
        rows.append((gate, verdict(str(rec.get("status"))), rec.get("at", ""), Raw(f"<ul>{items}</ul>")))
    head = (f"<p>Promotion: {_promotion(ev)} A version is approved only when every gate passed; a gate that "
            "errored or was skipped counts as failed.</p>")
    if not rows:
        return head + missing("no gate has recorded a verdict on this version")
    return head + table("Each gate's verdict and reasons, as recorded on the version", ["gate", "verdict",
                                                                                       "recorded at", "reasons"],
                        rows, "gates-table")


def _samples(ev: Evidence) -> str:
    out = []
    if ev.privacy and ev.privacy.samples:
        out.append("<p>Synthetic images of the privacy gate's prompts (one prompt per specialty and class, "
                   "section 4.3.4), the first images generated for each; seeds in the alt text.</p>")
        by_spec: dict[str, dict[str, list[dict]]] = {}
        for s in ev.privacy.samples:
            by_spec.setdefault(s["specialty"], {}).setdefault(s["prompt"], []).append(s)
        for spec, prompts in sorted(by_spec.items()):
            out.append(f"<h3>{esc(spec)}</h3>")
            for prompt, rows in prompts.items():
                imgs = "".join(img(r["png"], f"synthetic image for prompt '{prompt}', seed {r['seed']}", "sample")
                               for r in rows)
                out.append(f'<figure class="grid">{imgs}<figcaption>Prompt: &ldquo;{esc(prompt)}&rdquo; '
                           f"({len(rows)} images)</figcaption></figure><br>")
    else:
        out.append(missing(ev.notes.get("privacy") or "the privacy gate kept no sample images (older version)"))
    if ev.fid_grids:
        epoch = ev.score.best_epoch if ev.score else "?"
        out.append(f"<h3>FID sample grids (selected epoch {esc(epoch)}, captions of the FID sample)</h3>")
        for slug, png in sorted(ev.fid_grids.items()):
            out.append(figure(png, f"grid of images generated for the {slug} captions of the FID sample",
                              f"{slug}: images from the FID sample's captions at the selected epoch"))
    return "".join(out)


def _fid(ev: Evidence) -> str:
    out = []
    if ev.notes.get("fid"):
        out.append(missing(ev.notes["fid"]))
    s = ev.score
    if s is None:
        score = ev.card_context.get("score") or {}
        by_epoch = {int(k): float(v) for k, v in (score.get("fid_by_epoch") or {}).items()}
        if not by_epoch:
            return "".join(out) + missing("no FID recorded for this version")
        n = int(score.get("num_samples") or 0)
        out.append(figure(figures.fid_curve(by_epoch, n, None), "FID per epoch", f"FID per epoch, N={n}"))
        out.append(table("FID per epoch (from the model card)", ["epoch", "FID", "N real", "N synthetic"],
                         [(e, num(v), n, n) for e, v in sorted(by_epoch.items())], "fid-table", (0, 1, 2, 3)))
        return "".join(out)
    small = (s.halving or {}).get("fid_small_by_epoch") or {}
    small = {int(k): float(v) for k, v in small.items()}
    small_n = (s.halving or {}).get("small_n")
    out.append(figure(figures.fid_curve(s.fid_by_epoch, s.num_samples, s.best_epoch, small, small_n),
                      "line chart of FID against epoch with the selected epoch marked",
                      f"FID per epoch at N={s.num_samples} real training images vs {s.num_samples} images generated "
                      f"from their captions; mode {s.mode}; the checkpoint with the lowest FID is selected."))
    epochs = sorted(set(s.fid_by_epoch) | set(small))
    diff = s.fid_diff_ci_by_epoch

    def versus_selected(e: int) -> tuple[str, str]:
        if e == s.best_epoch:
            return "-", "selected"
        if e not in diff:
            return "-", ""
        lo, hi = diff[e]
        return f"{num(lo)} to {num(hi)}", "not distinguishable" if lo <= 0.0 <= hi else "worse"

    rows = [(e, num(s.fid_by_epoch.get(e)), s.num_samples if e in s.fid_by_epoch else "-",
             s.num_samples if e in s.fid_by_epoch else "-", *([num(small.get(e))] if small else []),
             *versus_selected(e)) for e in epochs]
    small_head = [f"FID at N={small_n} (successive halving)"] if small else []
    out.append(table("FID per epoch, and each epoch against the selected one (paired bootstrap 95% interval of "
                     "the FID difference: the same captions and seeds in every epoch)",
                     ["epoch", "FID", "N real", "N synthetic", *small_head, "FID − selected (95% CI)",
                      "vs selected"], rows, "fid-table", (0, 1, 2, 3, 4)))
    ci = f"{num(s.fid_ci[0])} to {num(s.fid_ci[1])}" if s.fid_ci else "-"
    out.append(f"<p>Selected epoch <strong>{s.best_epoch}</strong>: pooled FID <strong>{num(s.best_fid)}</strong>"
               f" (bootstrap 95% interval {ci}).</p>")
    if diff:
        same = s.epochs_indistinguishable_from_best
        learned = s.learning_detected
        out.append("<p id=\"fid-distinguishable\">"
                   + (f"Not distinguishable from the selected epoch at N={s.num_samples}: epoch"
                      f"{'s' if len(same) > 1 else ''} {', '.join(map(str, same))} (their paired interval "
                      "contains 0: a larger FID sample would be needed to choose between them). "
                      if same else f"Every other epoch is worse than the selected one beyond its paired "
                                   f"interval at N={s.num_samples}. ")
                   + ("Learning curve: the first scored epoch is worse than the selected one beyond the paired "
                      "interval (the model learned)." if learned else
                      "Learning curve: the first scored epoch is <strong>not</strong> distinguishable from the "
                      "selected one at this N." if learned is False else "")
                   + "</p>")
    prov = [(k, json.dumps(v, sort_keys=True) if isinstance(v, dict) else v) for k, v in sorted(s.provenance.items())]
    prov += [("dataset_hash", s.dataset_hash), ("real statistics", s.real_stats_uri)]
    out.append(table("Feature extractor provenance (implementation, weights file sha256, resize)", ["field", "value"],
                     prov, "fid-provenance"))
    if s.fid_by_specialty:
        out.append(table("FID per specialty at the selected epoch", ["specialty", "FID"],
                         [(k, num(v)) for k, v in sorted(s.fid_by_specialty.items())], "fid-specialty", (1,)))
    return "".join(out)


def _table1(ev: Evidence) -> str:
    if ev.privacy is None:
        return missing(ev.notes.get("privacy", "no privacy evidence"))
    rep = ev.privacy.report
    thr = rep.get("config", {}).get("distance_threshold", 0.15)
    per = rep.get("per_specialty")
    if not per:
        return missing("the privacy report has no per-specialty table (gate run before the report existed)")
    ref = (rep.get("reference") or {}).get("per_specialty", {})
    rows = []
    for spec, r in sorted(per.items()):
        f = ref.get(spec) or {}
        rows.append((spec, r["n"], f"{num(r['mean'])} ± {num(r['sd'])}", f"{r['n_below']} ({pct(r['fraction_below'])})",
                     pvalue(r["wilcoxon_p"]), f.get("n", 0), f"{num(f.get('mean'))} ± {num(f.get('sd'))}",
                     f"{f.get('n_below', 0)} ({pct(f.get('fraction_below'))})"))
    m = rep.get("metrics", {})
    return (f"<p>Each synthetic image against its nearest training image (BiomedCLIP cosine similarity, same "
            f"specialty and image type) by the maximum normalized patch distance (eq. 3). Pairs at or below "
            f"{thr} count as potential reproductions; the one-sided Wilcoxon signed-rank test asks whether the "
            f"distances lie above {thr}. Overall: {m.get('n_pairs', '-')} pairs, {m.get('n_below', '-')} at or below "
            f"{thr}, p = {pvalue(m.get('wilcoxon_p'))}.</p>"
            + table(f"Table 1 per specialty: normalized distance to the nearest training image (mean ± 1 sd), "
                    f"pairs at or below {thr}, Wilcoxon p; right: the calibrated reference (held-out real test "
                    f"images to their nearest training image)",
                    ["specialty", "image pairs", "distance", f"pairs ≤ {thr}", "Wilcoxon p", "reference pairs",
                     "reference distance", f"reference ≤ {thr}"], rows, "table-1-table", (1, 2, 3, 4, 5, 6, 7)))


def _histogram(ev: Evidence) -> str:
    if ev.privacy is None:
        return missing(ev.notes.get("privacy", "no privacy evidence"))
    thr = ev.privacy.report.get("config", {}).get("distance_threshold", 0.15)
    syn: dict[str, list[float]] = {}
    for p in ev.privacy.pairs:
        syn.setdefault(p.get("specialty", "all"), []).append(p["distance"])
    ref: dict[str, list[float]] = {}
    for r in ev.privacy.reference:
        ref.setdefault(r["specialty"], []).append(r["distance"])
    out = [figure(figures.distance_histograms(syn, ref, thr),
                  "histograms of synthetic-to-training distances per specialty with the reference distribution",
                  "Bars: each synthetic image's distance to its nearest training image. Outline: the calibrated "
                  "reference, held-out real test images (other patients) to their nearest training image, same "
                  f"embedding and distance. Dashed: the {thr} threshold. Synthetic distances far left of the "
                  "reference would mean the model reproduces training images.")]
    if not ev.privacy.reference:
        out.append(missing("no reference distribution: the dataset has no test images of these specialties, "
                           "or the gate ran before the reference existed"))
    return "".join(out)


def _pair_box(p: dict[str, Any]) -> str:
    alt = f"synthetic image (prompt '{p['prompt']}', seed {p['seed']})"
    return (f'<div class="pair-box">{img(p["synthetic_png"], alt, "pair")}'
            f'{img(p["real_png"], "its nearest training image " + str(p.get("real_image_hash", "")), "pair")}'
            f'<div class="muted">synthetic | nearest training image<br>d = {num(p["distance"])}, '
            f'cos = {num(p["cosine_similarity"])}<br>{esc(p["prompt"])}</div></div>')


def _pairs(ev: Evidence) -> str:
    if ev.privacy is None:
        return missing(ev.notes.get("privacy", "no privacy evidence"))
    thr = ev.privacy.report.get("config", {}).get("distance_threshold", 0.15)
    out = []
    specs = sorted({p.get("specialty", "all") for p in ev.privacy.pairs})
    for spec in specs:
        out.append(f"<h3>{esc(spec)}</h3>")
        imgs = [p for p in ev.privacy.pair_images if p.get("specialty") == spec]
        closest = sorted((p for p in imgs if p.get("closest_rank") is not None), key=lambda p: p["closest_rank"])
        if closest:
            out.append("<p>Closest pairs:</p>" + "".join(_pair_box(p) for p in closest))
        else:
            out.append(missing("no pair images kept (gate run before the report existed)"))
        flagged = sorted((p for p in ev.privacy.pairs if p.get("specialty", "all") == spec and p["distance"] <= thr),
                         key=lambda p: (p["distance"], p["synthetic"]))
        if not flagged:
            out.append(f"<p>No pair at or below {thr} in {esc(spec)}.</p>")
            continue
        out.append(table(f"All {len(flagged)} flagged pairs of {spec} (distance ≤ {thr}): inspect each",
                         ["synthetic #", "prompt", "seed", "training image (salted hash)", "cosine", "distance"],
                         [(p["synthetic"], p["prompt"], p["seed"], p["real_image_hash"], num(p["cosine_similarity"]),
                           num(p["distance"])) for p in flagged], f"flagged-{spec}", (0, 2, 4, 5)))
        shown = [p for p in imgs if p.get("flagged")]
        if shown:
            out.append(f"<p>Flagged pairs as images ({len(shown)} of {len(flagged)}):</p>"
                       + "".join(_pair_box(p) for p in shown))
    return "".join(out) or missing("no pairs")


def _roc(ev: Evidence) -> str:
    if ev.utility is None:
        return missing(ev.notes.get("utility", "no utility evidence"))
    rep = ev.utility.report
    u = rep.get("config", {})
    out = [f"<p>Per task, three ResNet classifiers: (i) {u.get('n_real_full')} real images, (ii) a "
           f"class-matched {u.get('n_real_half')}-image subset of (i), (iii) (ii) plus {u.get('n_synthetic')} "
           f"synthetic images; best validation epoch, scored on the held-out test set. CIs: paired bootstrap, "
           f"{u.get('bootstrap_resamples')} resamples, level {u.get('ci_level')}. The gate requires the upper "
           f"bound of AUROC(i) - AUROC(iii) to be at most {u.get('max_auroc_drop')}.</p>"]
    for t in rep.get("tasks", []):
        name = t["task"]["name"]
        out.append(f"<h3>{esc(name)} ({esc(t['task']['specialty'])}/{esc(t['task']['image_type'])})</h3>")
        per = t.get("test_auroc_per_class") or {}
        arrays = ev.utility.roc.get(name)
        if arrays is not None:
            out.append(figure(figures.roc_curves(name, arrays, per),
                              f"ROC curves per class for task {name}, one panel per training set",
                              f"{name}: ROC curve per class (legend: its AUROC) and the macro average, per "
                              f"training set; test set of {t.get('n_test')} images."))
        else:
            out.append(missing(f"no ROC arrays for {name} (gate run before the report existed)"))
        classes = t["task"]["classes"]
        arms = figures.ARM_LABELS
        rows = [(c, *(num(per.get(a, {}).get(c)) for a in arms)) for c in classes]
        rows.append((Raw("<strong>macro</strong>"), *(num(t["test_macro_auroc"].get(a)) for a in arms)))
        out.append(table(f"{name}: test AUROC per class and macro-averaged", ["class", *arms.values()], rows,
                         f"auroc-{name}", (1, 2, 3)))
        d1, d2 = t["diff_full_vs_half"], t["diff_full_vs_synthetic"]
        # Each row carries its own condition's verdict: a task that fails on the synthetic signal
        # must not show its AUROC difference as failed (and vice versa).
        drop = u.get("max_auroc_drop")
        drop_ok = None if drop is None or d2.get("hi") is None else d2["hi"] <= drop
        rows = [("AUROC(i) - AUROC(ii)", num(d1["diff"]), num(d1["lo"]), num(d1["hi"]), "reported"),
                ("AUROC(i) - AUROC(iii)", num(d2["diff"]), num(d2["lo"]), num(d2["hi"]),
                 verdict("passed" if drop_ok else "failed") if drop_ok is not None else "-")]
        out.append(table(f"{name}: bootstrap differences of macro AUROC", ["difference", "estimate", "CI low",
                                                                           "CI high", "gates"],
                         rows, f"auroc-diff-{name}", (1, 2, 3)))
        sig, floor = t.get("synthetic_signal"), u.get("min_synthetic_signal")
        if sig is not None and floor is not None:
            frac = sig.get("fraction")
            sig_ok = frac is not None and frac >= floor
            out.append(table(
                f"{name}: class signal of the synthetic images (real-trained classifier (i))",
                ["AUROC on real test", "AUROC on synthetic", "signal (syn - 0.5) / (real - 0.5)", "required",
                 "gates"],
                [(num(sig.get("real_auroc")), num(sig.get("synthetic_auroc")),
                  num(frac) if frac is not None else "undefined", f"≥ {floor}",
                  verdict("passed" if sig_ok else "failed"))],
                f"synthetic-signal-{name}", (0, 1, 2)))
    return "".join(out)


def _recognisability(ev: Evidence) -> str:
    if ev.utility is None:
        return missing(ev.notes.get("utility", "no utility evidence"))
    out = ["<p>The classifier trained on real images only (arm (i)) labels the held-out real test images and "
           "the synthetic images generated for each class. Synthetic accuracy clearly above chance means the "
           "images show their class in a way a real-trained model recognises: the automatic stand-in for the "
           "paper's reader study (Figure 3), where clinicians labelled real and synthetic images.</p>"]
    for t in ev.utility.report.get("tasks", []):
        name = t["task"]["name"]
        r = t.get("recognisability")
        out.append(f"<h3>{esc(name)}</h3>")
        if not r:
            out.append(missing(f"no recognisability for {name} (gate run before the report existed)"))
            continue
        chance = r["chance"]
        level = r.get("confidence") or RECOGNISABILITY_CONFIDENCE
        rows = []
        for x in r["per_class"]:
            lower = x.get("synthetic_accuracy_lower")
            if "synthetic_accuracy_lower" not in x and x["synthetic_accuracy"] is not None:
                # a gate report from before the bound was stored: the same bound from its counts
                lower = accuracy_lower_bound(round(x["synthetic_accuracy"] * x["n_synthetic"]), x["n_synthetic"],
                                             level)
            rows.append((x["class"], x["n_real"], num(x["real_accuracy"]), x["n_synthetic"],
                         num(x["synthetic_accuracy"]), num(lower), num(chance),
                         "yes" if lower is not None and lower > chance else "no"))
        bound = f"{level:.0%} lower bound"
        out.append(table(f"{name}: per-class accuracy of the real-trained classifier ({r['rule']}), real test vs "
                         f"synthetic images; above chance when the one-sided Clopper-Pearson {bound} of the "
                         f"synthetic accuracy exceeds chance", ["class", "n real", "accuracy real", "n synthetic",
                                                                "accuracy synthetic", f"synthetic {bound}",
                                                                "chance", "synthetic above chance"],
                         rows, f"recognisability-{name}", (1, 2, 3, 4, 5, 6)))
        out.append(figure(figures.recognisability_bars(name, r["per_class"], chance),
                          f"bar chart of per-class accuracy on real and synthetic images for {name}",
                          f"{name}: accuracy per class, real test images vs synthetic images; dashed: chance."))
    return "".join(out)


def _as_dict(obj: Any) -> Any:
    if is_dataclass(obj) and not isinstance(obj, type):
        return asdict(obj)
    return obj


def _reader_study(ev: Evidence) -> str:
    """The hook for the reader study (issue #15): rendered when the version has a closed study."""
    from medisyn import storage

    rep = ev.study
    if rep is None:
        return missing(ev.notes.get("reader-study", "no reader study recorded for this version")
                       + ". The recognisability section above is the automatic stand-in.")
    out = []
    stats = getattr(rep, "stats", None)
    pooled = getattr(stats, "pooled", {}) or {}
    if pooled:
        rows = [(origin, getattr(o, "n", "-"), pct(getattr(o, "accuracy", None)),
                 f"{num(getattr(o, 'confidence_mean', None), 2)} ± {num(getattr(o, 'confidence_sd', None), 2)}")
                for origin, o in sorted(pooled.items())]
        out.append(table(f"Reader study {getattr(stats, 'name', '')}: pooled over readers",
                         ["images", "answers", "accuracy", "confidence (1-5)"], rows, "reader-study-table", (1, 2)))
    for attr, alt in (("figure_uri", "reader accuracy and confidence, real vs synthetic"),
                      ("confusion_figure_uri", "confusion matrices of the readers' answers")):
        uri = getattr(rep, attr, None)
        try:
            if uri and storage.exists(uri):
                out.append(figure(storage.read_bytes(uri), alt, alt))
        except Exception:  # noqa: BLE001 - an unreadable figure leaves the table
            out.append(missing(f"{alt}: figure at {uri} unreadable"))
    if not out:
        out.append(f"<pre>{esc(json.dumps(_as_dict(rep), indent=1, default=str)[:20000])}</pre>")
    return "".join(out)


RENDERERS = {
    "model-card": _model_card, "gates": _gates, "samples": _samples, "fid": _fid, "table-1": _table1,
    "distance-histogram": _histogram, "pairs": _pairs, "roc": _roc, "recognisability": _recognisability,
    "reader-study": _reader_study,
}


def render(ev: Evidence) -> Page:
    """The page for ``ev``: header, contents, one ``<section id=...>`` per entry of :data:`SECTIONS`."""
    now = _dt.datetime.now(_dt.UTC).strftime("%Y-%m-%d %H:%M UTC")
    title = f"Evaluation report: {ev.name} version {ev.version}"
    nav = "".join(f'<li><a href="#{sid}">{esc(head)}</a> <span class="muted">({esc(paper)})</span></li>'
                  for sid, head, paper in SECTIONS)
    body = []
    for sid, head, paper in SECTIONS:
        try:
            content = RENDERERS[sid](ev)
        except Exception as exc:  # noqa: BLE001 - one broken section must not hide the others
            content = missing(f"this section could not be rendered: {type(exc).__name__}: {exc}")
        body.append(f'<section id="{sid}" aria-labelledby="{sid}-h"><h2 id="{sid}-h">{esc(head)} '
                    f'<span class="muted">({esc(paper)})</span></h2>{content}</section>')
    page = (f'<!DOCTYPE html><html lang="en"><head><meta charset="utf-8">'
            f'<meta name="viewport" content="width=device-width, initial-scale=1">'
            f"<title>{esc(title)}</title><style>{CSS}</style></head><body>"
            f"<header><h1>{esc(title)}</h1><p class=\"muted\">MediSyn evaluation report (docs/report.md), "
            f"generated {now} from the registry and the stages' stored outputs. Aliases: "
            f"{esc(', '.join(ev.aliases) or 'none')}.</p></header>"
            f'<nav aria-label="contents"><h2>Contents</h2><ol>{nav}</ol></nav>'
            f"<main>{''.join(body)}</main></body></html>\n")
    return Page(html=page, sections=[sid for sid, _, _ in SECTIONS])
