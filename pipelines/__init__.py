"""MediSyn pipelines: the KFP DAG (``medisyn_pipeline``), its local runner (``run_local``), the demo."""
