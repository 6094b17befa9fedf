"""The MLflow server killed and restarted mid-run: logging resumes, and registration is idempotent
(one version per training run and checkpoint, however often the step is retried) (issue #12)."""

from __future__ import annotations

import threading

import pytest

from helpers import model_env, write_checkpoints
from medisyn import registry, tracking
from medisyn.demo.services import MLflowServer, free_port

pytestmark = [pytest.mark.mlflow, pytest.mark.slow, pytest.mark.timeout(600)]

MLFLOW_ENV = ("MLFLOW_HTTP_REQUEST_TIMEOUT", "MLFLOW_HTTP_REQUEST_MAX_RETRIES", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR",
              "MLFLOW_TRACKING_URI")


def _restart_in_background(server: MLflowServer, started: list[MLflowServer]) -> threading.Thread:
    """Kill the server, and start it again (same store, same port) while the client is retrying."""
    server.stop()
    t = threading.Thread(target=lambda: started.append(
        MLflowServer(server.store_dir, port=server.port, start_timeout_s=120).start()))
    t.start()
    return t


def test_mlflow_restart_mid_run_logging_resumes_and_registration_is_idempotent(tmp_path, monkeypatch):
    import mlflow
    from mlflow import MlflowClient

    from medisyn.evaluate.fid import ScoreResult

    for key in MLFLOW_ENV:  # the config's bounded retries apply (configure_uploads sets them once)
        monkeypatch.delenv(key, raising=False)
    servers = [MLflowServer(tmp_path / "mlflow", port=free_port()).start()]
    try:
        cfg, root = model_env(tmp_path / "models", [f"tracking.tracking_uri={servers[0].tracking_uri}",
                                                    "tracking.experiment=faults", "tracking.model_name=faults"])
        # 1. a stage run logging through a restart: the call in flight is retried until the server is back
        with tracking.stage_run(cfg, "train") as run:
            mlflow.log_metric("loss", 1.0, step=0)
            restart = _restart_in_background(servers[0], servers)
            mlflow.log_metric("loss", 0.5, step=1)
            restart.join()
        client = MlflowClient(servers[-1].tracking_uri)
        history = [(m.step, m.value) for m in client.get_metric_history(run.info.run_id, "loss")]
        assert sorted(history) == [(0, 1.0), (1, 0.5)]
        assert client.get_run(run.info.run_id).info.status == "FINISHED"

        # 2. register, the server restarts, the step is retried (as KFP retries a failed step): one version
        (ck,) = write_checkpoints(cfg, str(root / "checkpoints"), epochs=1)
        score = ScoreResult(out_uri=str(tmp_path / "scores"), best_epoch=1, best_checkpoint_uri=ck, best_fid=1.0,
                            fid_by_epoch={1: 1.0}, fid_by_specialty={}, fid_ci=None, num_samples=1, seed=0,
                            mode="full", provenance={}, dataset_hash="d", real_stats_uri="", real_stats_cached=False)
        first = registry.register_candidate(cfg, score, str(tmp_path / "no-dataset"))
        _restart_in_background(servers[-1], servers).join()
        again = registry.register_candidate(cfg, score, str(tmp_path / "no-dataset"))
        assert again.version == first.version and again.model_uri == first.model_uri
        versions = MlflowClient(servers[-1].tracking_uri).search_model_versions(f"name = '{first.name}'")
        assert [v.version for v in versions] == [first.version]
    finally:
        for server in servers:
            server.stop()
        mlflow.set_tracking_uri(None)
        tracking._CONFIGURED = None
