"""Evaluation: FID checkpoint selection (``fid``) and the approval gates (``privacy``, ``utility``,
``gates``). Modules here judge checkpoints and models; they never import the trainer's code (only
``medisyn.train.list_checkpoints``, which is storage-only)."""
