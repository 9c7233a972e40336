"""The round protocol over object storage: object layout and records (no torch here).

One prefix per party: the coordinator writes `coordinator/`, client c writes `clients/c/`. Data first,
marker last: a reader trusts an object only once a marker signed by the prefix's owner names its
sha256. Markers are created with create-if-absent, so a committed round is never rewritten.
"""

from __future__ import annotations

import hashlib
import json
import random
from typing import Annotated, TypeVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from fedtune.errors import FedtuneError

COORDINATOR = "coordinator"
CLIENTS = "clients"
SPEC = f"{COORDINATOR}/spec.json"
LEASES = f"{COORDINATOR}/lease"
FINAL = f"{COORDINATOR}/final"
FINAL_ADAPTER = f"{FINAL}/adapter_model.safetensors"
FINAL_CONFIG = f"{FINAL}/adapter_config.json"
FINAL_SUMMARY = f"{FINAL}/summary.json"

M = TypeVar("M", bound=BaseModel)
# What a client writes is bounded by type, so no field of a hostile record can overflow a float or a
# counter, and a digest can only ever name an object inside the writer's own prefix.
Count = Annotated[int, Field(ge=0, le=2**53)]
Finite = Annotated[float, Field(allow_inf_nan=False)]
Digest = Annotated[str, Field(pattern=r"^[0-9a-f]{64}$")]

# Data objects are named by their sha256 (content-addressed) and reached through the marker that commits
# them, so two writers racing on one round can never leave a marker naming bytes it did not hash.


def round_dir(r: int) -> str:
    return f"{COORDINATOR}/rounds/{r:06d}"


def global_data(r: int, digest: str) -> str:
    return f"{round_dir(r)}/global.{digest}.safetensors"


def global_marker(r: int) -> str:
    return f"{round_dir(r)}/global.json"


def server_state(r: int, digest: str) -> str:
    return f"{round_dir(r)}/server_state.{digest}.safetensors"


def summary(r: int, digest: str) -> str:
    return f"{round_dir(r)}/summary.{digest}.json"


def summary_name(r: int) -> str:
    """What a round summary's signature covers: its key holds the digest of the signed bytes, so cannot."""
    return f"{round_dir(r)}/summary.json"


def client_dir(client: str) -> str:
    return f"{CLIENTS}/{client}"


def update_data(r: int, client: str, digest: str) -> str:
    return f"{client_dir(client)}/rounds/{r:06d}/update.{digest}.safetensors"


def update_marker(r: int, client: str) -> str:
    return f"{client_dir(client)}/rounds/{r:06d}/update.json"


def optimizer_state_data(r: int, client: str, digest: str) -> str:
    """The AdamW moments a client kept after training round r: read back only by the client itself."""
    return f"{client_dir(client)}/rounds/{r:06d}/optimizer.{digest}.safetensors"


def optimizer_state_marker(r: int, client: str) -> str:
    return f"{client_dir(client)}/rounds/{r:06d}/optimizer.json"


def ready(client: str) -> str:
    return f"{client_dir(client)}/ready.json"


def eval_marker(r: int, client: str) -> str:
    return f"{client_dir(client)}/evals/{r:06d}.json"


def rejection(r: int, client: str) -> str:
    """The aggregator's record that a client's update of round r was rejected: never read again."""
    return f"{round_dir(r)}/rejected/{client}.json"


def lease_claim(epoch: int) -> str:
    return f"{LEASES}/{epoch:06d}.json"


def lease_beat(epoch: int) -> str:
    return f"{LEASES}/{epoch:06d}.beat"


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


class Record(BaseModel):
    """Base of the JSON records; unknown keys are kept so newer writers do not break older readers."""

    model_config = ConfigDict(extra="allow")


class GlobalMarker(Record):
    """Commits the global adapter entering round `round`, and links it to its parent."""

    round: Count
    sha256: Digest
    parent_sha256: Digest | None = Field(None, description="The previous round's global; None for round 0.")
    summary_sha256: Digest | None = Field(None, description="The record of the round that made this global.")
    selected: list[str]
    deadline: float = Field(description="Unix time after which the round may close with minClients updates.")
    final: bool = False
    server_state_sha256: Digest | None = None
    epoch: Count = Field(description="The aggregator lease this marker was committed under.")
    failed: Count = Field(0, description="Rounds that failed before this one: round - failed rounds have trained.")
    created: float


class ClientMetrics(Record):
    train_loss: Finite | None = None
    eval_loss: Finite | None = None
    eval_examples: Count = 0
    seconds: Finite = 0.0


class UpdateMarker(Record):
    """Commits one client's update for one round, trained on the global named by `global_sha256`."""

    client: str
    round: Count
    sha256: Digest
    global_sha256: Digest
    examples: Count
    steps: Count
    encoding: str = "fp32"
    bytes: Count
    metrics: ClientMetrics


class OptimizerStateMarker(Record):
    """Commits the AdamW moments a client kept after round `round`, tied to the update that training made."""

    client: str
    round: Count
    sha256: Digest
    update_sha256: Digest
    bytes: Count


class EvalMarker(Record):
    """A client's evaluation of the final global adapter."""

    client: str
    round: Count
    global_sha256: Digest
    eval_loss: Finite
    eval_examples: Count


class Rejection(Record):
    client: str
    reason: str
    round: int | None = None


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
    updates: dict[str, str] = Field(
        default_factory=dict, description="sha256 of each participant's update: what was aggregated, for the audit."
    )
    epsilon: float | None = Field(None, description="Under DP: the largest epsilon any client has spent.")
    client_epsilon: dict[str, float] = Field(default_factory=dict, description="Under DP: epsilon per client.")
    taken_part: dict[str, int] = Field(
        default_factory=dict, description="Under DP: rounds each client has taken part in so far."
    )
    failed: str | None = Field(None, description="Why the round failed and left the global unchanged, if it did.")
    failed_streak: int = Field(0, description="Failed rounds in a row, this one included.")
    failed_total: int = Field(0, description="Failed rounds so far, this one included.")
    excluded: dict[str, str] = Field(
        default_factory=dict,
        description="Clients left out of sampling since they did not answer, with the ready nonce they had then.",
    )


class FinalSummary(Record):
    """The run's result: the adapter's digests and the chain of globals that led to it."""

    rounds: int = Field(description="Rounds that updated the global (failed rounds not counted).")
    eval_loss: float | None = None
    client_eval_loss: dict[str, float] = Field(default_factory=dict)
    adapter: str
    adapter_sha256: str
    config_sha256: str
    chain: list[str] = Field(description="sha256 of every global from round 0 to the final one.")
    stopped_early: str | None = None
    failed: str | None = Field(None, description="Why the run failed, if it did (too many failed rounds).")
    epoch: int


class ReadyRecord(Record):
    """A client's sign of life, rewritten each time it starts: a new nonce readmits it to sampling."""

    client: str
    nonce: str
    started: float


class SpecRecord(Record):
    """The spec the run executes, as the aggregator read it from its mounted config; with the whole resource
    and its pinned keys, so that a client in another cluster, pinning only the aggregator's key, can join."""

    spec: dict[str, object]
    resource: dict[str, object] | None = None
    keys: dict[str, object] | None = None


class LeaseClaim(Record):
    """An aggregator's claim of the lease for one epoch; created only if absent."""

    epoch: int
    holder: str
    seconds: float


def dumps(record: BaseModel) -> dict[str, object]:
    """A record as the JSON object that gets signed."""
    out: dict[str, object] = json.loads(record.model_dump_json())
    return out


def parse(model: type[M], body: dict[str, object], where: str) -> M:
    try:
        return model.model_validate(body)
    except ValidationError as e:
        raise FedtuneError(f"{where}: not a valid {model.__name__}: {e.errors()[0]['msg']}") from None


class IntegrityError(FedtuneError):
    """An object does not match the sha256 its marker commits to."""


def check_digest(where: str, data: bytes, expected: str) -> bytes:
    got = sha256(data)
    if got != expected:
        raise IntegrityError(f"{where}: sha256 {got[:12]}… does not match its marker {expected[:12]}…")
    return data


def select_clients(names: list[str], k: int, seed: int, r: int) -> list[str]:
    """Clients sampled for round r: a pure function of the run's seed, so restarts agree."""
    rng = random.Random(f"fedtune:{seed}:{r}")
    return sorted(rng.sample(sorted(names), k))
