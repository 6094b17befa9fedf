"""Scaffolding for the demo and the tests, kept out of the library proper (issue #22; STYLE.md: the
library ships what users run).

- :mod:`medisyn.demo.phantoms`: the phantom landing zone (``medisyn demo-data``);
- :mod:`medisyn.demo.tiny_models`: tiny stand-ins for every pretrained model
  (``medisyn build-tiny-models``), optionally pretrained on phantoms by :mod:`medisyn.demo.pretrain`;
- :mod:`medisyn.demo.services`: the local MLflow and S3 (moto) servers of the demo and the tests.

Nothing else in ``medisyn`` imports this package, except the stage runner's two demo stages
(``medisyn.stages``); ``tests/test_import_graph.py`` checks it.
"""
