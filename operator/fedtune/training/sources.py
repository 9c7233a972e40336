"""Where the base model's files come from: the hub, an object-store prefix or a folder."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

from fedtune.api.spec import FederatedFineTuneSpec


@dataclass(frozen=True)
class ModelSource:
    """What from_pretrained needs to load the model (and its tokenizer) from one place."""

    location: str  # a hub id, or a local folder
    revision: str | None = None
    token: str | None = None
    local_files_only: bool = True  # every source but the hub is read offline

    def kwargs(self) -> dict[str, Any]:
        out: dict[str, Any] = {"local_files_only": self.local_files_only}
        if self.revision is not None:
            out["revision"] = self.revision
        if self.token is not None:
            out["token"] = self.token
        return out


def resolve_model(spec: FederatedFineTuneSpec) -> ModelSource | None:
    """The pretrained model's source, or None for a model built from spec.model.config."""
    m = spec.model
    if m.name is not None:
        return ModelSource(m.name, m.revision, os.environ.get("HF_TOKEN") or None, local_files_only=False)
    if m.path is not None:
        return ModelSource(m.path)
    return None
