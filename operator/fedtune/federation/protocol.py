"""The round protocol over object storage: object layout and commit markers (no torch here).

Data first, marker last: a reader trusts an object only once its marker exists and the sha256 in the
marker matches. Markers are created with create-if-absent, so a committed round is never rewritten.
"""

from __future__ import annotations

import hashlib
import json
import random
from typing import TypeVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from fedtune.errors import FedtuneError
from fedtune.storage import ObjectStore

SPEC = "spec.json"
FINAL_ADAPTER = "final/adapter_model.safetensors"
FINAL_CONFIG = "final/adapter_config.json"
FINAL_SUMMARY = "final/summary.json"

M = TypeVar("M", bound=BaseModel)


def round_dir(r: int) -> str:
    return f"rounds/{r:06d}"


def global_data(r: int) -> str:
    return f"{round_dir(r)}/global.safetensors"


def global_marker(r: int) -> str:
    return f"{round_dir(r)}/global.json"


def server_state(r: int) -> str:
    return f"{round_dir(r)}/server_state.safetensors"


def update_data(r: int, client: str) -> str:
    return f"{round_dir(r)}/updates/{client}.safetensors"


def update_marker(r: int, client: str) -> str:
    return f"{round_dir(r)}/updates/{client}.json"


def eval_marker(r: int, client: str) -> str:
    return f"{round_dir(r)}/evals/{client}.json"


def summary(r: int) -> str:
    return f"{round_dir(r)}/summary.json"


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


class Record(BaseModel):
    """Base of the JSON records; unknown keys are kept so newer writers do not break older readers."""

    model_config = ConfigDict(extra="allow")


class GlobalMarker(Record):
    """Commits the global adapter entering round `round`."""

    round: int
    sha256: str
    selected: list[str]
    deadline: float = Field(description="Unix time after which the round may close with minClients updates.")
    final: bool = False
    server_state_sha256: str | None = None
    created: float


class ClientMetrics(Record):
    train_loss: float | None = None
    eval_loss: float | None = None
    eval_examples: int = 0
    seconds: float = 0.0


class UpdateMarker(Record):
    """Commits one client's update for one round."""

    client: str
    round: int
    sha256: str
    examples: int
    steps: int
    encoding: str = "fp32"
    bytes: int
    metrics: ClientMetrics


class EvalMarker(Record):
    """A client's evaluation of the final global adapter."""

    client: str
    round: int
    eval_loss: float
    eval_examples: int


class Rejection(Record):
    client: str
    reason: str


class RoundSummary(Record):
    """The aggregator's record of a closed round."""

    round: int
    participants: list[str]
    rejected: list[Rejection] = Field(default_factory=list)
    missing: list[str] = Field(default_factory=list)
    train_loss: float | None = None
    eval_loss: float | None = None
    client_metrics: dict[str, ClientMetrics] = Field(default_factory=dict)
    seconds: float
    bytes: int
    update_norms: dict[str, float] = Field(default_factory=dict)
    epsilon: float | None = None


class FinalSummary(Record):
    rounds: int
    eval_loss: float | None = None
    client_eval_loss: dict[str, float] = Field(default_factory=dict)
    adapter: str
    stopped_early: str | None = None


def dumps(record: BaseModel) -> bytes:
    return json.dumps(record.model_dump(mode="json"), indent=2, sort_keys=True).encode()


def read_record(store: ObjectStore, key: str, model: type[M]) -> M | None:
    """The record at key, or None if it is not there yet."""
    raw = store.get_or_none(key)
    if raw is None:
        return None
    try:
        return model.model_validate_json(raw)
    except ValidationError as e:
        raise FedtuneError(f"{store.url(key)}: not a valid {model.__name__}: {e.errors()[0]['msg']}") from None


def read_verified(store: ObjectStore, key: str, expected_sha256: str) -> bytes:
    """Object bytes whose sha256 matches its marker; a mismatch means tampering or corruption."""
    data = store.get(key)
    got = sha256(data)
    if got != expected_sha256:
        raise IntegrityError(f"{store.url(key)}: sha256 {got[:12]}… does not match its marker {expected_sha256[:12]}…")
    return data


class IntegrityError(FedtuneError):
    """An object does not match the sha256 its marker commits to."""


def latest_global(store: ObjectStore, hint: int | None = None) -> int | None:
    """The highest round with a committed global marker (the global after the last round is the result).

    Globals are committed in order, so from a `hint` known to be committed it steps forward one marker
    at a time instead of listing every key of the run (pollers call this every second).
    """
    if hint is not None and hint >= 0 and store.exists(global_marker(hint)):
        while store.exists(global_marker(hint + 1)):
            hint += 1
        return hint
    rounds = [int(k.split("/")[1]) for k in store.list("rounds") if k.endswith("/global.json")]
    return max(rounds, default=None)


def select_clients(names: list[str], k: int, seed: int, r: int) -> list[str]:
    """Clients sampled for round r: a pure function of the run's seed, so restarts agree."""
    rng = random.Random(f"fedtune:{seed}:{r}")
    return sorted(rng.sample(sorted(names), k))
