"""Training components: latent cache, and the U-Net fine-tune in-process or as a PyTorchJob.

Thin wrappers over ``src/medisyn`` stage functions (docs/stages.md); imports inside each function.
"""

from typing import NamedTuple

from kfp import dsl

from components.image import MEDISYN_IMAGE

# NamedTuple outputs are spelled inline: KFP ships only the function's source to the pod.


@dsl.component(base_image=MEDISYN_IMAGE, install_kfp_package=False)
def encode(
    config_json: str,  # the run config (models + data sections)
    dataset_uri: str,  # output of preprocess (train split is encoded)
    cache_uri: str,    # output prefix: VAE latents + text embeddings
) -> str:              # EncodeResult as JSON
    import json

    from medisyn import storage
    from medisyn.config import config_from_json
    from medisyn.train.encode import encode as run

    cfg = config_from_json(config_json)
    storage.configure(cfg.storage.s3_endpoint_url)
    return json.dumps(run(cfg, dataset_uri, cache_uri).to_dict(), sort_keys=True, default=str)


@dsl.component(base_image=MEDISYN_IMAGE, install_kfp_package=False)
def train(
    config_json: str,      # the run config (train section)
    cache_uri: str,        # output of encode
    checkpoints_uri: str,  # output prefix: epoch-NNNN/ checkpoints, each with _COMPLETE
) -> NamedTuple("Trained", [("checkpoints_uri", str), ("summary_json", str)]):  # prefix, TrainResult JSON (in this pod)
    import json

    import torch

    from medisyn import storage
    from medisyn.config import config_from_json
    from medisyn.train.launch import launch

    cfg = config_from_json(config_json)
    storage.configure(cfg.storage.s3_endpoint_url)
    # one process per visible GPU (torchrun --standalone); none visible: trainer.train in-process
    result = launch(cfg, cache_uri, checkpoints_uri, nproc=torch.cuda.device_count() or 1)
    return checkpoints_uri, json.dumps(result.to_dict(), sort_keys=True, default=str)


@dsl.component(base_image=MEDISYN_IMAGE, install_kfp_package=False)
def train_pytorchjob(
    config_json: str,      # the run config (train section)
    cache_uri: str,        # output of encode (s3://)
    checkpoints_uri: str,  # output prefix (s3://), written by the PyTorchJob's rank 0
    cluster_json: str,     # medisyn.launch.ClusterSettings as JSON (nodes, GPUs, selectors...)
    image: str,            # image of the job's pods ("" = the one in cluster_json / the default)
    run_uri: str,          # this run's prefix; its last path element makes the job name unique
    timeout_s: int,        # give up waiting after this many seconds
) -> NamedTuple("Trained", [("checkpoints_uri", str), ("summary_json", str)]):  # prefix, JSON {job, result}
    import json

    from medisyn import launch, storage
    from medisyn.config import config_from_json

    cfg = config_from_json(config_json)
    storage.configure(cfg.storage.s3_endpoint_url)
    settings = launch.ClusterSettings.from_pipeline(cluster_json, image)
    run_tag = run_uri.rstrip("/").rsplit("/", 1)[-1]
    result_uri = storage.join(run_uri, "train-result.json")  # rank 0 writes the TrainResult here
    manifest = launch.render_pytorchjob(cfg, cache_uri, checkpoints_uri, settings, result_json_uri=result_uri,
                                        name=launch.job_name(cfg.name, "train-" + run_tag[-20:]))
    launch.run_job(manifest, timeout_s=timeout_s)
    if not storage.exists(result_uri):
        raise RuntimeError(f"PyTorchJob {manifest['metadata']['name']} succeeded but wrote no {result_uri}")
    summary = {"job": manifest["metadata"]["name"], "result": storage.read_json(result_uri)}
    return checkpoints_uri, json.dumps(summary, sort_keys=True, default=str)
