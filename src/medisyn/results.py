"""Typed, versioned stage results stored with the outputs they describe.

Every stage returns a frozen dataclass that mixes in :class:`StageResult`. The stage runner
(:mod:`medisyn.stages`) writes it as ``<output prefix>/result.json``::

    {"kind": "medisyn.ScoreResult", "version": 1, "result": {...the dataclass fields...}}

and downstream steps read it back with ``ScoreResult.load(scores_uri)``: the orchestrator hands
URIs from step to step, never result JSON strings. ``result.json`` is written after the stage's
data prefix is complete (``_COMPLETE``), as one atomic object: its presence means the stage ran to
the end, its absence that the stage must be rerun.

``from_dict`` validates the stored JSON against the dataclass's annotations (pydantic), so
``dict[int, float]`` keys come back as ints and tuples as tuples; a result written by another
``version`` of the schema is refused with a message that says which.
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar, TypeVar

from medisyn import storage

RESULT_FILE = "result.json"

R = TypeVar("R", bound="StageResult")


class ResultError(ValueError):
    """A ``result.json`` that is missing, of another kind, or of another schema version."""


class StageResult:
    """Mixin for the frozen result dataclass of a stage (``to_dict`` / ``save`` / ``load``)."""

    VERSION: ClassVar[int] = 1  # bump when a field changes meaning; load() refuses other versions

    @classmethod
    def kind(cls) -> str:
        return f"medisyn.{cls.__name__}"

    def to_dict(self) -> dict[str, Any]:
        """The fields as JSON-ready values (tuples become lists, int keys stay ints until dumped)."""
        if not dataclasses.is_dataclass(self):
            raise TypeError(f"{type(self).__name__} must be a dataclass")
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls: type[R], data: dict[str, Any]) -> R:
        from pydantic import TypeAdapter

        return TypeAdapter(cls).validate_python(data)

    def envelope(self) -> dict[str, Any]:
        return {"kind": self.kind(), "version": self.VERSION, "result": self.to_dict()}

    def save(self, prefix_uri: str) -> str:
        """Write ``<prefix_uri>/result.json`` atomically; returns its URI."""
        uri = storage.join(prefix_uri, RESULT_FILE)
        storage.write_json(uri, self.envelope())
        return uri

    @classmethod
    def load(cls: type[R], prefix_uri: str) -> R:
        """The result stored in ``<prefix_uri>/result.json`` (a clear error when absent or foreign)."""
        uri = storage.join(prefix_uri, RESULT_FILE)
        if not storage.exists(uri):
            raise ResultError(f"{prefix_uri} has no {RESULT_FILE}: the stage that writes it did not finish; rerun it")
        data = storage.read_json(uri)
        if not isinstance(data, dict) or data.get("kind") != cls.kind():
            found = data.get("kind") if isinstance(data, dict) else type(data).__name__
            raise ResultError(f"{uri} holds a {found!r}, not a {cls.kind()!r}")
        if data.get("version") != cls.VERSION:
            raise ResultError(f"{uri} is {cls.kind()} schema version {data.get('version')}, this code reads "
                              f"version {cls.VERSION}: rerun the stage with this version of MediSyn")
        return cls.from_dict(data["result"])
