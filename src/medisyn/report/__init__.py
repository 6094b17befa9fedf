"""The evaluation report of a model version: one self-contained HTML page holding the paper's evidence
(issue #11; docs/report.md).

``medisyn report models:/<name>@<alias> --out DIR`` (the ``report`` stage, run by the pipeline after
``promote``) collects what the stages left for the version (registry tags and the model card from
MLflow; the FID, privacy and utility outputs from storage: :mod:`medisyn.report.build`, into the
plain data of :mod:`medisyn.report.evidence`), renders one page with inline figures and no external
resources (:mod:`medisyn.report.html`), writes ``DIR/report.html`` atomically and logs it to MLflow
on the version's run (``report/report.html``, version tag ``report``).
"""

from medisyn.report.build import ReportResult, collect_evidence, write_report
from medisyn.report.evidence import Evidence

__all__ = ["Evidence", "ReportResult", "collect_evidence", "write_report"]
