"""The Kubeflow pipeline: ``medisyn pipeline compile | run | schedule | runs`` and what it needs.

* :mod:`medisyn.pipeline.components`: one thin lightweight KFP component per step, each a few lines over
  ``medisyn.stages.run``;
* :mod:`medisyn.pipeline.definition`: the DAG (``medisyn_pipeline``) and ``compile_pipeline``;
* :mod:`medisyn.pipeline.schedule`: upload a compiled version, (re)create the recurring run;
* :mod:`medisyn.pipeline.cli`: the ``medisyn pipeline`` command over ``kfp.Client``;
* :mod:`medisyn.pipeline.local`: the same DAG on this machine with ``kfp.local`` (``make demo`` uses it).

Composition layer (docs/architecture.md): it imports the stages' runner and its configs; nothing in the
library imports it but ``medisyn.cli``. Nothing is imported here, so ``medisyn pipeline --help`` does not
load kfp.
"""
