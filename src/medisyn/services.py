"""Moved to :mod:`medisyn.demo.services` (issue #22). This shim keeps ``medisyn.services`` importable for
tests/test_pipeline_e2e.py and tests/test_auth_integration.py; new code imports medisyn.demo.services.
It is one of the allowed importers of medisyn.demo in tests/test_import_graph.py."""

from medisyn.demo.services import MLflowServer, MotoS3Server, free_port

__all__ = ["MLflowServer", "MotoS3Server", "free_port"]
