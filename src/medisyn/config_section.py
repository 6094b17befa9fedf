"""The base of every config section: unknown keys are errors, sections are frozen, and booleans
and numbers do not mix. A bottom module: :mod:`medisyn.config` and :mod:`medisyn.config_eval` build on it."""

from __future__ import annotations

import functools
from typing import Any

from pydantic import BaseModel, ConfigDict, TypeAdapter, ValidationError, ValidationInfo, field_validator


@functools.cache
def _adapter(annotation: Any) -> TypeAdapter[Any]:
    return TypeAdapter(annotation)


_INVALID = object()


def annotation_name(annotation: Any) -> str:
    """``int``, ``float | None``, ``Literal['no', 'bf16']``: a field's type as a reader writes it."""
    return getattr(annotation, "__name__", None) or str(annotation).replace("typing.", "")


def _validated(annotation: Any, value: Any, strict: bool = False) -> Any:
    """``value`` validated as ``annotation``, or ``_INVALID``."""
    try:
        return _adapter(annotation).validate_python(value, strict=strict)
    except ValidationError:
        return _INVALID


class _Section(BaseModel):
    # Unknown keys are errors (a typo must never silently fall back to a default); sections are
    # immutable once loaded so every stage sees the same run.
    model_config = ConfigDict(extra="forbid", frozen=True, validate_default=True)

    @field_validator("*", mode="before")
    @classmethod
    def _no_bool_for_a_number(cls, value: Any, info: ValidationInfo) -> Any:
        """Booleans and numbers do not mix (issue #12): ``epochs: true`` is not the integer 1, and
        ``use_ema: 1`` is not True (pydantic's lax mode converts either silently). A bool field still
        takes YAML's words as text (``yes``, ``off``), which is how ``--set`` passes them inside lists."""
        if info.field_name is None:
            return value
        annotation = cls.model_fields[info.field_name].annotation
        takes_bool = _validated(annotation, True, strict=True) is not _INVALID
        takes_int = _validated(annotation, 1, strict=True) is not _INVALID
        if isinstance(value, bool) and not takes_bool:
            raise ValueError(f"a boolean is not accepted here ({annotation_name(annotation)} expected)")
        if takes_bool and not takes_int and isinstance(value, (int, float)) and not isinstance(value, bool):
            raise ValueError("Input should be a valid boolean: true or false, not a number")
        return value
