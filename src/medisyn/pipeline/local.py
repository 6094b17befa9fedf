"""Run the MediSyn pipeline on this machine with ``kfp.local`` (the embedded default, no cluster).

The same compiled DAG as on Kubeflow runs here: every step is a subprocess of this interpreter
(``SubprocessRunner(use_venv=False)``), so the venv's ``medisyn`` is what runs; kfp-kubernetes
settings (GPUs, selectors, Secrets, emptyDirs) are ignored. Launchers must be ``local``: there is no
cluster to submit a RayJob or PyTorchJob to.

    python -m medisyn.pipeline.local --config configs/demo.yaml --raw demo-output/raw --root demo-output/runs --demo
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import tempfile
import warnings
from pathlib import Path
from typing import Any

from medisyn.config import RunConfig, load_config

log = logging.getLogger("medisyn.pipeline")

# Pipeline parameters a local run may not change: the cluster launchers have nothing to talk to.
_LOCAL_ONLY = {"preprocess_launcher": "local", "train_launcher": "local"}


def _task_outputs(run_dir: Path) -> dict[str, dict[str, Any]]:
    """{task name: {output name: value}} read back from each step's executor_output.json."""
    out: dict[str, dict[str, Any]] = {}
    for f in sorted(run_dir.glob("*/executor_output.json")):
        try:
            data = json.loads(f.read_text())
        except (OSError, ValueError):
            continue
        out[f.parent.name] = dict(data.get("parameterValues") or {})
    return out


def _verdicts(tasks: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """{gate: GateResult as a dict} read back from each gate's ``result.json`` (a gate that left no
    result counts as failed, as it does for promote)."""
    from medisyn.evaluate.gates import GateResult, failed_result
    from medisyn.results import ResultError
    from medisyn.stages import GATE_ORDER

    plan = tasks.get("plan-run") or {}
    verdicts: dict[str, dict[str, Any]] = {}
    for gate in GATE_ORDER:
        uri = plan.get(f"{gate}_uri")
        if not uri:
            continue
        try:
            verdicts[gate] = GateResult.load(uri).to_dict()
        except (ResultError, OSError) as exc:
            verdicts[gate] = failed_result(gate, f"no recorded result: {exc}").to_dict()
    return verdicts


def run_pipeline_locally(
    config: RunConfig | str | os.PathLike,
    raw_uri: str = "",
    root_uri: str = "",
    *,
    demo: bool = False,
    run_tag: str = "",
    pipeline_root: str | os.PathLike | None = None,
    overrides: list[str] | None = None,
    demo_n_per_class: int = 0,
    demo_seed: int = 0,
    **params: Any,
) -> dict[str, Any]:
    """Run the whole pipeline with kfp.local; returns what it produced.

    ``config`` is a validated ``RunConfig`` or a YAML path (``overrides`` apply to a path only).
    ``raw_uri`` is the landing zone (demo: where the phantom one is written); ``root_uri`` the base
    for outputs ("" = ``storage.root``). ``params`` are further pipeline parameters. Raises
    ``RuntimeError`` when a step fails. Returns ``{"model_uri", "run_dir", "pipeline_root",
    "tasks": {task: outputs}, "verdicts": {gate: verdict}}``.
    """
    import kfp.local

    from medisyn.pipeline.definition import medisyn_pipeline

    cfg = config if isinstance(config, RunConfig) else load_config(config, overrides)
    for key, required in _LOCAL_ONLY.items():
        if params.get(key, required) != required:
            raise ValueError(f"{key}={params[key]!r} needs a cluster; a local run uses {required!r}")
    if pipeline_root is None:
        from medisyn import storage

        base = root_uri or cfg.storage.root
        pipeline_root = (storage.local_path(base) / "_kfp_local" if not storage.is_remote(base)
                         else Path(tempfile.mkdtemp(prefix="medisyn-kfp-")))
    pipeline_root = Path(pipeline_root).resolve()
    pipeline_root.mkdir(parents=True, exist_ok=True)
    before = {p.name for p in pipeline_root.iterdir()}

    kfp.local.init(runner=kfp.local.SubprocessRunner(use_venv=False), pipeline_root=str(pipeline_root),
                   raise_on_error=True)
    log.info("running pipeline locally (pipeline root %s)", pipeline_root)
    with warnings.catch_warnings():
        # the project image name has no "python" in it; locally every step runs in this interpreter
        warnings.filterwarnings("ignore", message=".*non-Python base image.*", category=RuntimeWarning)
        # resource requests, display names, kfp-kubernetes settings: cluster-only by design
        warnings.filterwarnings("ignore", message=".*have no effect in the current local runner.*")
        medisyn_pipeline(
            config_json=json.dumps(cfg.model_dump(mode="json"), sort_keys=True),
            raw_uri=str(raw_uri), root_uri=str(root_uri), run_tag=run_tag, demo=demo,
            demo_n_per_class=demo_n_per_class, demo_seed=demo_seed, **params,
        )
    new_runs = sorted((p for p in pipeline_root.iterdir() if p.is_dir() and p.name not in before),
                      key=lambda p: p.stat().st_mtime)
    run_dir = new_runs[-1] if new_runs else pipeline_root
    tasks = _task_outputs(run_dir)
    return {
        "model_uri": (tasks.get("register") or {}).get("model_uri"),  # the pipeline has no output (ExitHandler)
        "run_dir": str(run_dir),
        "pipeline_root": str(pipeline_root),
        "tasks": tasks,
        "verdicts": _verdicts(tasks),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="Run the MediSyn pipeline locally with kfp.local.")
    p.add_argument("--config", required=True, help="run config YAML")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config override (repeatable)")
    p.add_argument("--raw", default="", help="landing zone URI (demo: where to write the phantom one)")
    p.add_argument("--root", default="", help="output base URI (default: the config's storage.root)")
    p.add_argument("--demo", action="store_true", help="build tiny models and a phantom landing zone first")
    p.add_argument("--run-tag", default="", help="run folder name under --root (default: the local run id)")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    result = run_pipeline_locally(args.config, args.raw, args.root, demo=args.demo, run_tag=args.run_tag,
                                  overrides=args.set)
    print(json.dumps({k: v for k, v in result.items() if k != "tasks"}, indent=2, default=str))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
