"""Report component: the evaluation report of the model version (docs/report.md), after promote.

One self-contained HTML page with the paper's evidence (sample grids, FID curve, Table 1 with its
calibrated reference, flagged pairs, ROC curves, recognisability, gate verdicts, model card),
written to ``out_uri`` and logged to MLflow on the version. A few lines over ``medisyn.stages.run``.
"""

from kfp import dsl

from medisyn.pipeline.components.image import MEDISYN_IMAGE


@dsl.component(base_image=MEDISYN_IMAGE, install_kfp_package=False)
def report(
    config_uri: str,  # the run config (tracking section: MLflow URI)
    model_uri: str,   # models:/<name>/<version> the report describes (gated and promoted or not)
    out_uri: str,     # where report.html and the ReportResult result.json go
) -> str:             # the report.html URI
    from medisyn import stages

    return stages.run("report", config_uri, model=model_uri, out=out_uri).report_uri
