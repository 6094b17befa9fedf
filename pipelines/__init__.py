"""``make demo`` (``python -m pipelines.demo``) and the committed compiled pipeline (``medisyn_pipeline.yaml``).

The pipeline itself (components, DAG, ``medisyn pipeline`` CLI, kfp.local runner) is the package's
``medisyn.pipeline``; the demo stays here because it starts the scaffolding's servers (``medisyn.demo``),
which nothing in the library imports but the runner's demo stages (docs/architecture.md).
"""
