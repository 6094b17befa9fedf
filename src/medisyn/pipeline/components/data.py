"""Data components: run planning, demo landing zone, tiny models, preprocessing (local or RayJob).

Each is a few lines over ``medisyn.stages.run`` (docs/stages.md): the same runner as the CLI and
the cluster jobs. Imports live inside each function because KFP ships only the function's source to
the pod. No ``from __future__`` here: KFP reads the real annotations. Every step after ``plan_run``
reads the run's resolved config from ``config_uri`` (``<run>/config.yaml``).
"""

from typing import NamedTuple

from kfp import dsl

from medisyn.pipeline.components.image import MEDISYN_IMAGE

# NamedTuple outputs are spelled inline in the signatures: KFP ships only the function's source to
# the pod, so a module-level alias would be undefined there. Values are returned in field order.


@dsl.component(base_image=MEDISYN_IMAGE, install_kfp_package=False)
def plan_run(
    config_json: str,  # the run config (RunConfig as JSON); validated here, before any work starts
    root_uri: str,     # base URI for this run's outputs; "" = the config's storage.root
    run_tag: str,      # this run's folder name; "" = job_id
    job_id: str,       # the KFP run id (placeholder), unique per (recurring) run
    raw_uri: str,      # the landing zone; "" = <run>/raw (where the demo writes its phantom zone)
    pipeline_version: str,  # the KFP pipeline version that runs (tagged on the parent MLflow run)
) -> NamedTuple("RunPlan", [  # one storage URI per stage output under <root>/<run tag>/ (RunPlan)
    ("run_uri", str), ("run_tag", str), ("config_uri", str), ("raw_uri", str), ("dataset_uri", str), ("cache_uri", str),
    ("checkpoints_uri", str), ("scores_uri", str), ("register_uri", str), ("privacy_uri", str),
    ("utility_uri", str), ("promote_uri", str), ("report_uri", str),
]):
    from medisyn import stages
    from medisyn.config import config_from_json

    p = stages.run("plan", config_from_json(config_json), root=root_uri, run_tag=run_tag or job_id, raw=raw_uri,
                   pipeline_run_id=job_id, pipeline_version=pipeline_version)
    return (p.run_uri, p.run_tag, p.config_uri, p.raw_uri, p.dataset_uri, p.cache_uri, p.checkpoints_uri, p.scores_uri,
            p.register_uri, p.privacy_uri, p.utility_uri, p.promote_uri, p.report_uri)


@dsl.component(base_image=MEDISYN_IMAGE, install_kfp_package=False)
def build_tiny_models(
    config_uri: str,  # the run config; models.tiny must be set (demo/test configs only)
) -> str:             # the config URI again, once the tiny random-init models exist at its model paths
    from medisyn import stages

    stages.run("build-tiny-models", config_uri)
    return config_uri


@dsl.component(base_image=MEDISYN_IMAGE, install_kfp_package=False)
def demo_data(
    config_uri: str,   # the run config (output of build_tiny_models: the models exist before encode)
    out_uri: str,      # where to write the phantom landing zone (raw files + labels + catalog.yaml)
    n_per_class: int,  # phantom images per class (0 = the config's demo.images_per_class)
    seed: int,         # random seed of the phantom generator
) -> str:              # the landing zone URI (input of preprocess)
    from medisyn import stages

    return stages.run("demo-data", config_uri, out=out_uri, n_per_class=n_per_class, seed=seed).uri


@dsl.component(base_image=MEDISYN_IMAGE, install_kfp_package=False)
def check_landing_zone(
    config_uri: str,  # the run config (for the S3 endpoint)
    raw_uri: str,     # the landing zone of a production run
) -> str:             # the same URI, once it is known to exist (fail fast instead of an empty run)
    from medisyn import stages

    return stages.run("check-landing-zone", config_uri, raw=raw_uri).uri


@dsl.component(base_image=MEDISYN_IMAGE, install_kfp_package=False)
def preprocess(
    config_uri: str,   # the run config (data section)
    raw_uri: str,      # landing zone: raw DICOM/PNG/JPEG/TIFF + labels tables + catalog.yaml
    dataset_uri: str,  # output prefix: Parquet shards per split + manifest.json + result.json
) -> str:              # the dataset URI (PreprocessResult.load(dataset_uri) reads the result)
    from medisyn import stages

    return stages.run("preprocess", config_uri, raw=raw_uri, out=dataset_uri).dataset_uri


@dsl.component(base_image=MEDISYN_IMAGE, install_kfp_package=False)
def preprocess_rayjob(
    config_uri: str,    # the run config (data section); the RayJob's pods read it too
    raw_uri: str,       # landing zone URI (must be s3:// on a cluster)
    dataset_uri: str,   # output prefix (s3://), with the job's result.json
    cluster_json: str,  # medisyn.launch.ClusterSettings as JSON (namespace, image, workers...)
    image: str,         # image of the job's pods ("" = the one in cluster_json / the default)
    run_tag: str,       # this run's folder name (output of plan_run): makes the job name unique
    timeout_s: int,     # give up waiting after this many seconds
) -> str:               # the dataset URI, once the RayJob published it
    from medisyn import stages

    return stages.run("preprocess-rayjob", config_uri, job_config=config_uri, raw=raw_uri, out=dataset_uri,
                      cluster_json=cluster_json, image=image, run_tag=run_tag, timeout_s=timeout_s).dataset_uri
