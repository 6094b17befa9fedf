"""Training components: latent cache, and the U-Net fine-tune in the step's pod or as a cluster job
(a Kubeflow Trainer v2 TrainJob, or a PyTorchJob on v1 clusters).

A few lines each over ``medisyn.stages.run`` (docs/stages.md); imports inside each function.
"""

from kfp import dsl

from medisyn.pipeline.components.image import MEDISYN_IMAGE


@dsl.component(base_image=MEDISYN_IMAGE, install_kfp_package=False)
def encode(
    config_uri: str,   # the run config (models + data sections)
    dataset_uri: str,  # output of preprocess (train split is encoded)
    cache_uri: str,    # output prefix: VAE latents + text embeddings + result.json
) -> str:              # the cache URI (EncodeResult.load(cache_uri) reads the result)
    from medisyn import stages

    return stages.run("encode", config_uri, dataset=dataset_uri, cache=cache_uri).cache_uri


@dsl.component(base_image=MEDISYN_IMAGE, install_kfp_package=False)
def train(
    config_uri: str,       # the run config (train section)
    cache_uri: str,        # output of encode
    checkpoints_uri: str,  # output prefix: epoch-NNNN/ checkpoints, each with _COMPLETE, + result.json
) -> str:                  # the checkpoints URI (TrainResult.load(checkpoints_uri) reads the result)
    from medisyn import stages

    # one process per visible GPU (torchrun --standalone); none visible: in-process
    stages.run("train", config_uri, cache=cache_uri, checkpoints=checkpoints_uri, nproc="auto")
    return checkpoints_uri


@dsl.component(base_image=MEDISYN_IMAGE, install_kfp_package=False)
def train_job(
    config_uri: str,       # the run config (train section); the job's pods read it too
    cache_uri: str,        # output of encode (s3://)
    checkpoints_uri: str,  # output prefix (s3://), written by the job (result.json by its node rank 0)
    cluster_json: str,     # medisyn.launch.ClusterSettings as JSON (nodes, GPUs, selectors, deadline...)
    image: str,            # image of the job's pods ("" = the one in cluster_json / the default)
    run_tag: str,          # this run's folder name (output of plan_run): the job's deterministic name
    timeout_s: int,        # give up (and delete the job) after this many seconds
    launcher: str,         # "auto" (TrainJob where Kubeflow Trainer v2 is served, else PyTorchJob), "trainjob"...
) -> str:                  # the checkpoints URI, once the job succeeded and wrote its result
    from medisyn import stages

    stages.run("train-job", config_uri, job_config=config_uri, cache=cache_uri, checkpoints=checkpoints_uri,
               cluster_json=cluster_json, image=image, run_tag=run_tag, timeout_s=timeout_s, launcher=launcher)
    return checkpoints_uri
