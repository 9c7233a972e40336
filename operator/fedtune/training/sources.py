"""Where the base model's files come from: the hub, an object-store prefix or a folder."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fedtune.api.spec import FederatedFineTuneSpec
from fedtune.errors import FedtuneError
from fedtune.storage import StorageError, open_store
from fedtune.training import model_store

# Set in pods: where spec.model.volume is mounted, and the volume uri models are downloaded into.
MODEL_ROOT_ENV = "FEDTUNE_MODEL_ROOT"
MODEL_CACHE_ENV = "FEDTUNE_MODEL_CACHE"


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


def resolve_model(spec: FederatedFineTuneSpec, weights: bool = True) -> ModelSource | None:
    """The pretrained model's source, or None for a model built from spec.model.config.

    A uri model is downloaded (once per cache; without its weight files unless `weights`) before this
    returns, so every source but the hub is a local folder.
    """
    m = spec.model
    if m.name is not None:
        return ModelSource(m.name, m.revision, os.environ.get("HF_TOKEN") or None, local_files_only=False)
    if m.path is not None:
        return ModelSource(str(model_folder(m.path)))
    if m.uri is not None:
        try:
            store = open_store(m.uri, endpoint=spec.storage.endpoint, region=spec.storage.region)
        except StorageError as e:
            raise FedtuneError(f"spec.model.uri: {e}") from None
        return ModelSource(str(model_store.fetch(store, cache_root(), m.sha256, weights)))
    return None


def model_folder(path: str) -> Path:
    """spec.model.path inside the mounted model volume, or as a local path when no volume is mounted."""
    root = os.environ.get(MODEL_ROOT_ENV)
    folder = Path(root) / path.lstrip("/") if root else Path(path).expanduser()
    if not folder.is_dir():
        where = f" in the model volume (spec.model.volume, mounted at {root})" if root else ""
        raise FedtuneError(f"spec.model.path: {path}: no such folder{where}")
    if not (folder / "config.json").is_file():
        raise FedtuneError(f"spec.model.path: {path}: no config.json: not a folder saved with save_pretrained")
    return folder


def cache_root() -> Path:
    """Where uri models are kept, one folder per manifest digest: the pod's cache volume, or the user's cache."""
    return Path(os.environ.get(MODEL_CACHE_ENV) or Path.home() / ".cache" / "fedtune" / "models")
