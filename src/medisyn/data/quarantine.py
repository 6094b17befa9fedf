"""How preprocessing refuses input: one file (:class:`Quarantine`, which becomes a ``rejected.jsonl``
record, :func:`reject_row`) or the whole run (:class:`PreprocessError`). docs/preprocessing.md,
Hostile input."""

from __future__ import annotations

from typing import Any


class PreprocessError(RuntimeError):
    """The stage failed as a whole (error rate past ``data.max_error_rate``, no input, bad catalog)."""


class Quarantine(Exception):
    """One file (or labels-table line) is refused at ``stage`` for ``reason``; the run goes on."""

    def __init__(self, stage: str, reason: str, detail: str = ""):
        super().__init__(detail or reason)
        self.stage, self.reason, self.detail = stage, reason, detail


def reject_row(path: str, source: str, stage: str, reason: str, detail: str = "") -> dict[str, Any]:
    """A ``rejected.jsonl`` record (the detail cut to 300 characters)."""
    return {"path": path, "source": source, "stage": stage, "reason": reason, "detail": detail[:300]}
