"""The FederatedClient API: one client of a run, declared in its owner's cluster (a silo).

The coordinator's cluster holds the FederatedFineTune, naming the client `external`; the silo's cluster
holds this object, with everything that must stay in the silo: its data, its GPUs, its storage
credentials and its signing key. The two meet only in the bucket.
"""

from __future__ import annotations

from datetime import datetime

from pydantic import Field

from fedtune.api.spec import (
    CREDENTIALS_LABEL,
    DNS_LABEL,
    PUBLIC_KEY,
    DataSpec,
    PlacementSpec,
    Resource,
    scheme_rule,
)
from fedtune.api.status import Condition, RunState, StatusModel

FEDCLIENT_KIND = "FederatedClient"
FEDCLIENT_PLURAL = "federatedclients"
FEDCLIENT_SHORT_NAMES = ["fedclient"]


class FederatedClientSpec(PlacementSpec):
    """Which run to join as which client, and what of the silo the client's pod gets."""

    run_root: str = Field(
        ...,
        min_length=1,
        max_length=2048,
        description="The run's root in the shared bucket, s3://bucket/prefix/runRoot (`fedtune join` prints it).",
    )
    endpoint: str | None = Field(None, max_length=2048, description="S3 endpoint URL for S3-compatible servers.")
    region: str | None = Field(None, max_length=64, description="S3 region.")
    coordinator_public_key: str = Field(
        ...,
        pattern=PUBLIC_KEY,
        description="The run aggregator's Ed25519 public key: the run's spec and keys are believed only with "
        "its signature.",
    )
    client_name: str = Field(
        ..., min_length=1, max_length=40, pattern=DNS_LABEL, description="This client's name in the run's spec."
    )
    data: DataSpec = Field(..., description="This client's private training data; it never leaves this cluster.")
    secret_ref: str = Field(
        ...,
        max_length=253,
        description="Secret with this silo's storage credentials (AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY). "
        f"Needs the label {CREDENTIALS_LABEL}.",
    )
    signing_key_secret_ref: str = Field(
        ...,
        max_length=253,
        description="Secret with this client's private key (key signing.key, PEM), whose public half the run "
        f"pins for it. Needs the label {CREDENTIALS_LABEL}.",
    )
    model_token_secret_ref: str | None = Field(
        None,
        max_length=253,
        description="Secret with this silo's HF_TOKEN, for a run whose base model comes from the hub and is gated "
        f"(the coordinator's token never reaches this cluster). Needs the label {CREDENTIALS_LABEL}.",
    )
    image: str = Field("ghcr.io/fedtune/trainer:0.1.0", max_length=512, description="Image of the client's pod.")
    backoff_limit: int = Field(3, ge=0, le=100, description="Restarts of the client's pod before it fails.")

    rules = (scheme_rule("runRoot", lambda s: s.run_root),)

    def secret_refs(self) -> list[tuple[str, str]]:
        """(field path, Secret name) of every Secret this client references."""
        refs = [("spec.secretRef", self.secret_ref), ("spec.signingKeySecretRef", self.signing_key_secret_ref)]
        if self.data.secret_ref:
            refs.append(("spec.data.secretRef", self.data.secret_ref))
        if self.model_token_secret_ref:
            refs.append(("spec.modelTokenSecretRef", self.model_token_secret_ref))
        return refs


class FederatedClientStatus(StatusModel):
    """What the silo's operator sees of its client: its pod, and the run as storage shows it."""

    state: RunState | None = Field(None, description="Pending, Running, Succeeded or Failed.")
    observed_generation: int | None = Field(None, description="The generation this status describes.")
    run: str | None = Field(None, description="The run joined: namespace/name of its FederatedFineTune.")
    run_id: str | None = Field(
        None, description="The run first joined (namespace/name/uid): another run found at runRoot later is refused."
    )
    progress: str | None = Field(None, description="Rounds committed, of the run's total: n/N.")
    last_round: int | None = Field(None, description="The last round whose aggregate took this client's update.")
    last_update: datetime | None = Field(None, description="When this client's update last went into a round.")
    eval_loss: float | None = Field(None, description="The run's latest eval loss (unset under privacy).")
    restarts: int | None = Field(None, description="Failed pods of the client's Job so far.")
    conditions: list[Condition] | None = Field(None, description="Ready says what, if anything, blocks the client.")


class FederatedClient(Resource):
    """A whole FederatedClient as kubectl sends it."""

    kind: str = Field(FEDCLIENT_KIND, pattern=rf"^{FEDCLIENT_KIND}$")
    spec: FederatedClientSpec
    status: FederatedClientStatus | None = None
