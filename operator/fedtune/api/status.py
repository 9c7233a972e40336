"""The FederatedFineTune status: one pydantic model that the operator writes and the CRD's status schema is
generated from, so `kubectl explain fft.status` documents every field the operator sets.

Status is written as a JSON merge patch of the fields that were set: a field set to None is removed from the
stored status, a field left unset keeps its stored value (storage being unreadable for a moment does not erase
the last round it reported).
"""

from __future__ import annotations

import logging
from datetime import datetime
from enum import StrEnum
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError
from pydantic.alias_generators import to_camel

log = logging.getLogger("fedtune.api")


class RunState(StrEnum):
    PENDING = "Pending"
    RUNNING = "Running"
    SUCCEEDED = "Succeeded"
    FAILED = "Failed"
    SUSPENDED = "Suspended"


TERMINAL = (RunState.SUCCEEDED, RunState.FAILED)
ConditionType = Literal["Ready", "Running", "Succeeded", "Failed", "Suspended"]


class StatusModel(BaseModel):
    """Base of the status models: camelCase on the wire; fields a newer or older operator wrote are ignored."""

    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True, extra="ignore")


class Condition(StatusModel):
    """A metav1.Condition: one aspect of the run, true or false, and since when."""

    type: ConditionType = Field(description="Ready, Running, Succeeded, Failed or Suspended.")
    status: Literal["True", "False", "Unknown"] = Field(description="True, False or Unknown.")
    reason: str = Field(description="Why, in one CamelCase word (e.g. RoundsInProgress, SecretNotFound).")
    message: str = Field(description="Why, in words a user can act on; names the field at fault.")
    last_transition_time: datetime = Field(description="When status last changed from True to False or back.")
    observed_generation: int | None = Field(None, description="The generation of the spec this condition saw.")


class PartyStatus(StatusModel):
    """The Job of one party of the run."""

    state: RunState = Field(description="Pending, Running, Succeeded or Failed: the state of the party's Job.")
    restarts: int = Field(description="Failed pods of the party's Job so far (each one counts against backoffLimit).")


class ClientStatus(PartyStatus):
    """The Job of one client; for an external client, what storage says of it."""

    name: str = Field(description="The client's name (spec.clients[].name).")
    external: bool | None = Field(
        None, description="It runs in its owner's cluster: its state comes from storage, not from a Job here."
    )
    last_round: int | None = Field(
        None, description="External clients: the last round whose aggregate took this client's update."
    )
    signed: bool | None = Field(
        None, description="External clients: whether a record signed with its pinned key is in storage (it joined)."
    )


class LastRound(StatusModel):
    """The record of the last closed round, as the aggregator signed it."""

    round: int = Field(description="The round's number, from 0.")
    participants: list[str] = Field(description="Clients whose updates were aggregated.")
    rejected: list[str] = Field(description="Clients whose updates failed validation (the reason is in the record).")
    train_loss: float | None = Field(None, description="Example-weighted training loss; unset under privacy.")
    eval_loss: float | None = Field(None, description="Example-weighted eval loss; unset under privacy.")
    epsilon: float | None = Field(None, description="Under privacy: the largest epsilon any client has spent.")
    client_epsilon: dict[str, float] | None = Field(None, description="Under privacy: epsilon spent, per client.")
    seconds: float = Field(description="Seconds from the round's global to the next one.")
    bytes: int = Field(description="Bytes of client updates the round read.")
    failed: str | None = Field(
        None, description="Why the round failed (too few valid updates in time); the global was kept."
    )
    excluded: list[str] | None = Field(
        None, description="Clients left out of sampling since they did not answer; a restarted client is readmitted."
    )


class RunStatus(StatusModel):
    """Observed state of the run, recomputed from its Jobs and its round records in storage."""

    state: RunState | None = Field(None, description="Pending, Running, Succeeded, Failed or Suspended.")
    observed_generation: int | None = Field(None, description="The generation of the spec this status describes.")
    current_round: int | None = Field(None, description="The round in progress, from 0 (rounds once done).")
    completed_rounds: int | None = Field(None, description="Rounds whose next global is committed.")
    progress: str | None = Field(None, description="Completed rounds / total rounds.")
    clients_ready: str | None = Field(None, description="Clients with a running pod / clients.")
    gpus: int | None = Field(None, description="GPUs requested by the run's pods.")
    clients: list[ClientStatus] | None = Field(None, description="Each client's Job, in spec order.")
    aggregator: PartyStatus | None = Field(None, description="The aggregator's Job.")
    run_root: str | None = Field(
        None,
        description="Where the run's records are: {storage.uri}/{storage.runRoot}, by default "
        "{storage.uri}/{namespace}/{name}-{uid}.",
    )
    start_time: datetime | None = Field(
        None, description="When the run last started or resumed; activeDeadlineSeconds counts from here."
    )
    completion_time: datetime | None = Field(
        None, description="When the run succeeded or failed; ttlSecondsAfterFinished counts from here."
    )
    conditions: list[Condition] | None = Field(
        None, description="Ready, Running, Succeeded, Failed and Suspended, as metav1.Conditions."
    )
    last_round: LastRound | None = Field(None, description="The last closed round.")
    adapter_uri: str | None = Field(None, alias="adapterURI", description="Where the final PEFT adapter is.")
    adapter_sha256: str | None = Field(
        None,
        alias="adapterSHA256",
        description="sha256 of the final adapter_model.safetensors, as the aggregator signed it.",
    )
    stopped_early: str | None = Field(
        None, description="Why the run ended before its rounds were done (privacy.targetEpsilon)."
    )
    final_eval_loss: float | None = Field(
        None, description="Example-weighted eval loss of the final adapter; unset under privacy."
    )

    @classmethod
    def read(cls, raw: Any) -> RunStatus:
        """The stored status; one that does not parse counts as none (it is then written afresh)."""
        try:
            return cls.model_validate(raw or {})
        except ValidationError as e:
            log.warning("stored status ignored: %s", e)
            return cls()

    def condition(self, type_: ConditionType) -> Condition | None:
        return next((c for c in self.conditions or [] if c.type == type_), None)

    def patch(self) -> dict[str, Any]:
        """This status as a JSON merge patch: the fields set, with None for those to remove."""
        return self.model_dump(mode="json", by_alias=True, exclude_unset=True)


def merged(doc: dict[str, Any], patch: dict[str, Any]) -> dict[str, Any]:
    """`doc` with a JSON merge patch applied (RFC 7386): what the API server will store."""
    out = dict(doc)
    for key, value in patch.items():
        if value is None:
            out.pop(key, None)
        elif isinstance(value, dict):
            base = out.get(key)
            out[key] = merged(base if isinstance(base, dict) else {}, value)
        else:
            out[key] = value
    return out
