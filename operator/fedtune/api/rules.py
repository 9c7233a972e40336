"""Cross-field rules, each written once: a Python check for pydantic and a CEL expression for the API server.

`fedtune validate` and the operator check a spec with pydantic; `kubectl apply` is checked by the API server
against the CRD. Both read the same Rule, so the two can only differ in how much detail an error carries.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

M = TypeVar("M")


@dataclass(frozen=True)
class Violation:
    """Where a rule is broken (a path below the model; the rule's field when None) and the values involved."""

    path: str | None = None
    detail: str = ""


def unless(holds: bool, detail: str = "") -> Violation | None:
    """No violation when the rule holds; otherwise one at the rule's own field."""
    return None if holds else Violation(detail=detail)


@dataclass(frozen=True)
class Rule(Generic[M]):
    """One cross-field rule of a model.

    field: the camelCase path below the model that the error names (CEL's fieldPath); empty for the model.
    cel: the rule as the API server evaluates it, with `self` the model's object.
    find: the first violation in a model instance, or None.
    cel_message: a CEL messageExpression, where the API server can name the values involved.
    """

    field: str
    message: str
    cel: str
    find: Callable[[M], Violation | None]
    cel_message: str | None = None

    def check(self, model: M) -> None:
        """Raise a ValueError whose text starts with the offending field's path, as pydantic reports it."""
        found = self.find(model)
        if found is None:
            return
        path = self.field if found.path is None else found.path
        text = f"{path}: {self.message}" if path else self.message
        raise ValueError(f"{text}; {found.detail}" if found.detail else text)

    def validation(self) -> dict[str, str]:
        """The rule as one entry of a schema's x-kubernetes-validations."""
        out = {"rule": self.cel, "message": self.message}
        if self.cel_message:
            out["messageExpression"] = self.cel_message
        if self.field:
            out["fieldPath"] = f".{self.field}"
        return out


def add_validations(schema: dict[str, Any], model: type[Any]) -> None:
    """pydantic's json_schema_extra hook: a model's rules become its schema's x-kubernetes-validations."""
    rules: tuple[Rule[Any], ...] = getattr(model, "rules", ())
    if rules:
        schema["x-kubernetes-validations"] = [r.validation() for r in rules]
