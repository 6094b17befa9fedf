"""The pipeline's exit handler: the run's outcome on its parent MLflow run and its model version.

Runs whatever happened inside the run (``dsl.ExitHandler``), so it sees only the pipeline's
parameters and the final status: ``medisyn.outcome`` finds the run from its folder
(``<root>/<run tag>``). A few lines over ``medisyn.stages.run``.
"""

from kfp import dsl

from medisyn.pipeline.components.image import MEDISYN_IMAGE


@dsl.component(base_image=MEDISYN_IMAGE, install_kfp_package=False)
def record_outcome(
    config_json: str,  # the run config as the pipeline got it (the run's stored config is read when it exists)
    root_uri: str,     # base URI of run outputs; "" = the config's storage.root
    run_tag: str,      # the run's folder name; "" = job_id
    job_id: str,       # the KFP run id (placeholder)
    status: dsl.PipelineTaskFinalStatus,  # the run's final status (state, error message), from KFP
) -> str:              # the run's final state: SUCCEEDED, FAILED or CANCELLED
    from medisyn import stages
    from medisyn.config import config_from_json

    return stages.run("record-outcome", config_from_json(config_json), root=root_uri, run_tag=run_tag or job_id,
                      pipeline_run_id=job_id, status=status.state, error=status.error_message or "").status
