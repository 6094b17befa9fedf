"""Data components: run planning, demo landing zone, tiny models, preprocessing (local or RayJob).

Thin wrappers over ``src/medisyn`` stage functions (docs/stages.md). Imports live inside each
function because KFP ships only the function's source to the pod. No ``from __future__`` here: KFP
reads the real annotations.
"""

from typing import NamedTuple

from kfp import dsl

from components.image import MEDISYN_IMAGE

# NamedTuple outputs are spelled inline in the signatures: KFP ships only the function's source to
# the pod, so a module-level alias would be undefined there. Values are returned in field order.


@dsl.component(base_image=MEDISYN_IMAGE, install_kfp_package=False)
def plan_run(
    config_json: str,  # the run config (RunConfig as JSON); validated here, before any work starts
    root_uri: str,     # base URI for this run's outputs; "" = the config's storage.root
    run_tag: str,      # this run's folder name; "" = job_id
    job_id: str,       # the KFP run id (placeholder), unique per (recurring) run
) -> NamedTuple("RunPlan", [  # one storage URI per stage output under <root>/<run tag>/
    ("run_uri", str), ("dataset_uri", str), ("cache_uri", str), ("checkpoints_uri", str),
    ("scores_uri", str), ("privacy_uri", str), ("utility_uri", str), ("config_hash", str),
]):
    from medisyn import storage
    from medisyn.config import config_from_json

    cfg = config_from_json(config_json)
    storage.configure(cfg.storage.s3_endpoint_url)
    run_uri = storage.join(storage.normalize(root_uri or cfg.storage.root), run_tag or job_id)
    return (
        run_uri,
        storage.join(run_uri, "dataset"),
        storage.join(run_uri, "latent-cache"),
        storage.join(run_uri, "checkpoints"),
        storage.join(run_uri, "scores"),
        storage.join(run_uri, "gates", "privacy"),
        storage.join(run_uri, "gates", "utility"),
        cfg.config_hash(),
    )


@dsl.component(base_image=MEDISYN_IMAGE, install_kfp_package=False)
def build_tiny_models(
    config_json: str,  # the run config; models.tiny must be set (demo/test configs only)
) -> str:              # JSON {model name: path} of the tiny random-init models built
    import json

    from medisyn.config import config_from_json
    from medisyn.models import build_tiny_models as build

    return json.dumps(build(config_from_json(config_json)), sort_keys=True)


@dsl.component(base_image=MEDISYN_IMAGE, install_kfp_package=False)
def demo_data(
    out_uri: str,      # where to write the phantom landing zone (raw files + labels + catalog.yaml)
    run_uri: str,      # this run's prefix; the zone goes to <run_uri>/raw when out_uri is ""
    n_per_class: int,  # phantom images per class
    seed: int,         # random seed of the phantom generator
    models_json: str,  # output of build_tiny_models: orders the demo branch (models exist before encode)
) -> str:              # the landing zone URI (input of preprocess)
    from medisyn import storage
    from medisyn.data.demo import write_landing_zone

    out_uri = out_uri or storage.join(run_uri, "raw")
    write_landing_zone(out_uri, n_per_class=n_per_class, seed=seed)
    return storage.normalize(out_uri)


@dsl.component(base_image=MEDISYN_IMAGE, install_kfp_package=False)
def check_landing_zone(
    config_json: str,  # the run config (for the S3 endpoint)
    raw_uri: str,      # the landing zone of a production run
) -> str:              # the same URI, once it is known to exist (fail fast instead of an empty run)
    from medisyn import storage
    from medisyn.config import config_from_json

    storage.configure(config_from_json(config_json).storage.s3_endpoint_url)
    if not storage.exists(raw_uri):
        raise FileNotFoundError(f"raw landing zone {raw_uri} does not exist")
    return storage.normalize(raw_uri)


@dsl.component(base_image=MEDISYN_IMAGE, install_kfp_package=False)
def preprocess(
    config_json: str,  # the run config (data section)
    raw_uri: str,      # landing zone: raw DICOM/PNG/JPEG/TIFF + labels tables + catalog.yaml
    dataset_uri: str,  # output prefix: Parquet shards per split + manifest.json + _COMPLETE
) -> NamedTuple("Dataset", [("dataset_uri", str), ("dataset_hash", str), ("summary_json", str)]):  # URI, content hash, PreprocessResult JSON
    import json

    from medisyn import storage
    from medisyn.config import config_from_json
    from medisyn.data.preprocess import preprocess as run

    cfg = config_from_json(config_json)
    storage.configure(cfg.storage.s3_endpoint_url)
    result = run(cfg, raw_uri, dataset_uri).to_dict()
    return dataset_uri, str(result.get("dataset_hash", "")), json.dumps(result, sort_keys=True, default=str)


@dsl.component(base_image=MEDISYN_IMAGE, install_kfp_package=False)
def preprocess_rayjob(
    config_json: str,         # the run config (data section)
    raw_uri: str,             # landing zone URI (must be s3:// on a cluster)
    dataset_uri: str,         # output prefix (s3://)
    cluster_json: str,        # medisyn.launch.ClusterSettings as JSON (namespace, image, workers...)
    image: str,               # image of the job's pods ("" = the one in cluster_json / the default)
    run_uri: str,             # this run's prefix; its last path element makes the job name unique
    timeout_s: int,           # give up waiting after this many seconds
) -> NamedTuple("Dataset", [("dataset_uri", str), ("dataset_hash", str), ("summary_json", str)]):  # as preprocess (hash from manifest.json)
    import json

    from medisyn import launch, storage
    from medisyn.config import config_from_json

    cfg = config_from_json(config_json)
    storage.configure(cfg.storage.s3_endpoint_url)
    settings = launch.ClusterSettings.from_pipeline(cluster_json, image)
    run_tag = run_uri.rstrip("/").rsplit("/", 1)[-1]
    manifest = launch.render_rayjob(cfg, raw_uri, dataset_uri, settings,
                                    name=launch.job_name(cfg.name, "preprocess-" + run_tag[-20:]))
    launch.run_job(manifest, timeout_s=timeout_s)
    storage.require_complete(dataset_uri)  # the RayJob succeeded only if the dataset was published
    summary = storage.read_json(storage.join(dataset_uri, "manifest.json"))
    return dataset_uri, str(summary.get("dataset_hash", "")), json.dumps(summary, sort_keys=True, default=str)
