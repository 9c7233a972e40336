"""Reading a run spec from YAML or a dict, with every problem reported by its field path."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, TypeVar

import yaml
from pydantic import ValidationError

from fedtune.api.fedclient import FederatedClient
from fedtune.api.spec import FederatedFineTune, Resource
from fedtune.errors import FedtuneError

_FIELD_PREFIX = re.compile(r"^[A-Za-z][\w\[\].]*: ")


class SpecError(FedtuneError):
    """A spec that does not validate; `problems` holds one line per field."""

    def __init__(self, source: str, problems: list[str]) -> None:
        self.source = source
        self.problems = problems
        super().__init__(f"{source}: " + "; ".join(problems))


def _path(loc: tuple[int | str, ...]) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += f".{part}" if out else str(part)
    return out


def format_errors(err: ValidationError) -> list[str]:
    """One `field.path: message` line per pydantic error, field paths in camelCase as users wrote them."""
    lines = []
    for e in err.errors():
        loc = _path(tuple(p for p in e["loc"] if not (isinstance(p, str) and p.startswith("function-"))))
        msg = e["msg"].removeprefix("Value error, ")
        if _FIELD_PREFIX.match(msg):
            loc, msg = (f"{loc}.{msg}" if loc else msg), ""
        lines.append(f"{loc}: {msg}" if msg else loc)
    return lines


R = TypeVar("R", bound=Resource)


def _parse(model: type[R], doc: Any, source: str) -> R:
    if not isinstance(doc, dict):
        raise SpecError(source, ["the document must be a mapping with apiVersion, kind, metadata and spec"])
    try:
        return model.model_validate(doc)
    except ValidationError as err:
        raise SpecError(source, format_errors(err)) from None


def parse_resource(doc: Any, source: str = "spec") -> FederatedFineTune:
    """Validate a resource given as a mapping (apiVersion/kind/metadata/spec)."""
    return _parse(FederatedFineTune, doc, source)


def parse_fedclient(doc: Any, source: str = "FederatedClient") -> FederatedClient:
    """Validate a FederatedClient given as a mapping (apiVersion/kind/metadata/spec)."""
    return _parse(FederatedClient, doc, source)


def load_resource(path: str | Path) -> FederatedFineTune:
    """Read and validate a FederatedFineTune YAML (or JSON) file."""
    p = Path(path)
    try:
        text = p.read_text()
    except FileNotFoundError:
        raise FedtuneError(f"{p}: no such file") from None
    except OSError as e:
        raise FedtuneError(f"{p}: cannot read: {e.strerror}") from None
    try:
        doc = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark is not None else ""
        raise SpecError(str(p), [f"not valid YAML{where}: {getattr(e, 'problem', e)}"]) from None
    return parse_resource(doc, str(p))
