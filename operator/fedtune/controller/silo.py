"""One pass over a FederatedClient, in the silo's cluster: join the run from storage, make the client's Job,
report the client as its pod and the run's records show it.

The run is believed only as its aggregator signed it (see fedtune.federation.join); the pod is the same
client pod a run makes in its own cluster, given this silo's Secrets, data and placement, and the run's
keys as verified here. Nothing of the silo (Secrets, data location) is written to the bucket.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any
from urllib.parse import urlparse

import kopf

from fedtune.api import SpecError, parse_resource
from fedtune.api.fedclient import FEDCLIENT_KIND, FederatedClient, FederatedClientStatus
from fedtune.api.loading import parse_fedclient
from fedtune.api.spec import API_GROUP, API_VERSION, FederatedFineTune
from fedtune.api.status import Condition, RunState
from fedtune.controller import builders
from fedtune.controller.admission import STORAGE_KEYS, image_problem, secrets_problem
from fedtune.controller.kube import Kube, Obj
from fedtune.controller.names import client_job_name
from fedtune.controller.reconcile import read_progress
from fedtune.controller.status import Progress, invalid_spec_condition, state_of_job
from fedtune.errors import FedtuneError
from fedtune.federation.join import JoinError, joined_run
from fedtune.federation.records import Ledger
from fedtune.federation.run_config import RunConfig
from fedtune.federation.signing import KEY_FILE, InvalidKey, check_pair, parse_private
from fedtune.storage import open_store

log = logging.getLogger("fedtune.operator")
STORAGE_RETRY_SECONDS = 5.0
PENDING, RUNNING, SUCCEEDED, FAILED, _ = RunState


@dataclass
class SiloObserved:
    """What the status of a FederatedClient is computed from."""

    client: FederatedClient
    generation: int
    now: datetime
    old: FederatedClientStatus
    run: RunConfig | None = None
    blocked: tuple[str, str] | None = None
    job: Obj | None = None
    pods: list[Obj] = field(default_factory=list)
    progress: Progress = field(default_factory=Progress)


def local_run(fc: FederatedClient, run: RunConfig) -> FederatedFineTune:
    """The run as this silo's pod must see it: its own client entry made of this FederatedClient (data,
    placement, Secrets, image), the storage reached with the silo's credentials, named after the client."""
    doc: dict[str, Any] = run.resource.model_dump(mode="json", by_alias=True, exclude_none=True, exclude={"status"})
    spec, own = doc["spec"], fc.spec
    parsed = urlparse(own.run_root)
    spec["storage"] = {
        "uri": f"{parsed.scheme}://{parsed.netloc}",
        "runRoot": parsed.path.strip("/"),
        "secretRef": own.secret_ref,
        **({"endpoint": own.endpoint} if own.endpoint else {}),
        **({"region": own.region} if own.region else {}),
    }
    placement = own.model_dump(
        mode="json", by_alias=True, exclude_none=True, include={"resources", "node_selector", "tolerations", "affinity"}
    )
    for i, c in enumerate(spec["clients"]):
        if c["name"] == own.client_name:
            spec["clients"][i] = {
                "name": own.client_name,
                "data": own.data.model_dump(mode="json", by_alias=True, exclude_none=True),
                "secretRef": own.secret_ref,
                "publicKey": run.trust.clients[own.client_name],
                "signingKeySecretRef": own.signing_key_secret_ref,
                **({"weight": c["weight"]} if "weight" in c else {}),
                **placement,
            }
    spec.update(image=own.image, backoffLimit=own.backoff_limit)
    spec.pop("queueName", None)
    # What the pod mounts is the silo's to decide: the coordinator's token Secret and cache volume are not.
    model = spec["model"]
    if "volume" in model or "path" in model:
        raise FedtuneError("spec.model.volume: the run loads its model from a volume of the coordinator's cluster")
    model.pop("cache", None)
    model.pop("tokenSecretRef", None)
    if own.model_token_secret_ref:
        model["tokenSecretRef"] = own.model_token_secret_ref
    meta = {"name": fc.metadata.name, "namespace": fc.metadata.namespace, "uid": fc.metadata.uid}
    return parse_resource({**doc, "metadata": meta}, f"{FEDCLIENT_KIND} {fc.metadata.name}")


def children(fc: FederatedClient, run: RunConfig) -> list[Obj]:
    """The ConfigMap the pod reads (the run as verified here) and the client's Job, owned by the FederatedClient."""
    local = local_run(fc, run)
    client = local.spec.client(fc.spec.client_name)
    manifests = [builders.spec_config_map(local, run.trust), builders.client_job(local, client)]
    owner = {
        "apiVersion": f"{API_GROUP}/{API_VERSION}",
        "kind": FEDCLIENT_KIND,
        "name": fc.metadata.name,
        "uid": fc.metadata.uid,
        "controller": True,
        "blockOwnerDeletion": True,
    }
    for m in manifests:
        m["metadata"]["ownerReferences"] = [owner]
    return manifests


def _joined(kube: Kube, fc: FederatedClient, old: FederatedClientStatus, o: SiloObserved) -> None:
    """Join the run at runRoot and read its progress, or say in o.blocked why not."""
    secrets = kube.credentials(fc.metadata.namespace)
    refs = fc.spec.secret_refs()
    o.blocked = secrets_problem(refs, fc.metadata.namespace, fc.metadata.uid, secrets) or image_problem(fc.spec.image)
    if o.blocked is not None:
        return
    storage = secrets[fc.spec.secret_ref].data
    try:
        store = open_store(
            fc.spec.run_root,
            endpoint=fc.spec.endpoint or storage.get("AWS_ENDPOINT_URL"),
            region=fc.spec.region,
            credentials=(storage[STORAGE_KEYS[0]], storage[STORAGE_KEYS[1]]),
            retry_seconds=STORAGE_RETRY_SECONDS,
        )
        run = joined_run(store, fc.spec.coordinator_public_key, fc.spec.client_name)
    except JoinError as e:
        o.blocked = (e.reason, str(e))
        return
    except FedtuneError as e:
        o.blocked = ("StorageUnreachable", f"spec.runRoot: {e}")
        return
    # The record must be this run's, at this root: a copy of another run's (same aggregator key) is not.
    here, its_root = fc.spec.run_root.rstrip("/"), builders.run_root(run.resource)
    if its_root != here or run.trust.run != builders.run_id(run.resource):
        o.blocked = ("RunNotJoinable", f"spec.runRoot: the record at {here} describes the run rooted at {its_root}")
        return
    if old.run_id and run.trust.run != old.run_id:
        o.blocked = ("RunReplaced", f"spec.runRoot: {here} now holds run {run.trust.run}, not {old.run_id}")
        return
    pem = secrets[fc.spec.signing_key_secret_ref].data[KEY_FILE]
    try:
        key = parse_private(pem, f"Secret {fc.spec.signing_key_secret_ref}")
        check_pair(key, run.trust.clients[fc.spec.client_name], "spec.signingKeySecretRef", "the run's pinned key")
    except InvalidKey as e:
        o.blocked = ("KeyMismatch", f"spec.signingKeySecretRef: {e}")
        return
    o.run = run
    try:
        o.progress = read_progress(Ledger(store, run.trust))
    except FedtuneError as e:
        o.blocked = ("StorageUnreachable", f"spec.runRoot: {e}")


def reconcile(
    kube: Kube, fc: FederatedClient, generation: int, old: FederatedClientStatus, now: datetime
) -> SiloObserved:
    """Join, make what is missing, observe."""
    ns, name = fc.metadata.namespace, fc.metadata.name
    o = SiloObserved(client=fc, generation=generation, now=now, old=old)
    _joined(kube, fc, old, o)
    job_name = client_job_name(name, fc.spec.client_name)
    o.job = kube.jobs(ns, name).get(job_name)
    if o.run is not None and o.blocked is None and o.job is None:
        _create(kube, fc, o)
        o.job = kube.jobs(ns, name).get(job_name)
    if o.job is not None and not any(
        r.get("uid") == fc.metadata.uid for r in o.job["metadata"].get("ownerReferences") or []
    ):
        o.blocked, o.job = _name_taken("Job", job_name, fc), None
    o.pods = kube.pods(ns, name) if o.job is not None else []
    return o


def _create(kube: Kube, fc: FederatedClient, o: SiloObserved) -> None:
    """The client's ConfigMap, then its Job; a ConfigMap of that name with other contents stops it."""
    assert o.run is not None
    try:
        manifests = children(fc, o.run)
    except FedtuneError as e:  # a spec this silo cannot run (a model on a volume, an invalid local view)
        o.blocked = ("RunNotJoinable", str(e))
        return
    for manifest in manifests:
        name = manifest["metadata"]["name"]
        if kube.create(manifest):
            log.info("created %s %s/%s", manifest["kind"], fc.metadata.namespace, name)
        elif manifest["kind"] == "ConfigMap" and kube.config_map(fc.metadata.namespace, name) != manifest["data"]:
            o.blocked = _name_taken("ConfigMap", name, fc)
            return


def _name_taken(kind: str, name: str, fc: FederatedClient) -> tuple[str, str]:
    return "NameConflict", (
        f"metadata.name: {kind} {fc.metadata.namespace}/{name} exists and is not this client's (a run of the "
        "same name in this namespace?): give the FederatedClient another name"
    )


def compute(o: SiloObserved) -> FederatedClientStatus:
    """The FederatedClient's status from what was observed; what storage did not answer for is kept."""
    old, prog, me = o.old, o.progress, o.client.spec.client_name
    job_state, failures = state_of_job(o.job, o.pods)
    total = o.run.resource.spec.aggregation.rounds if o.run else None
    took_part = prog.last is not None and me in prog.last.participants
    last_round = prog.last.round if took_part and prog.last else old.last_round
    if prog.final is not None:
        state = SUCCEEDED if not prog.final.failed else FAILED
    elif old.state in (SUCCEEDED, FAILED):
        state = old.state  # settled: a later storage outage does not reopen it
    elif job_state == FAILED:
        state = FAILED
    else:
        state = RUNNING if job_state == RUNNING else PENDING
    reason, message = o.blocked or (
        ("Joined", f"taking part; last in round {last_round}")
        if last_round is not None
        else ("WaitingForSelection", "joined the run; no round has taken this client's update yet")
    )
    before = next((c for c in old.conditions or [] if c.type == "Ready"), None)
    ready = o.blocked is None
    value = "True" if ready else "False"
    condition = Condition(
        type="Ready",
        status=value,
        reason=reason,
        message=message,
        last_transition_time=before.last_transition_time if before and before.status == value else o.now,
        observed_generation=o.generation,
    )
    committed = prog.final.rounds if prog.final else prog.committed
    return FederatedClientStatus(
        state=state,
        observed_generation=o.generation,
        run=f"{o.run.resource.metadata.namespace}/{o.run.resource.metadata.name}" if o.run else old.run,
        run_id=o.run.trust.run if o.run else old.run_id,
        progress=f"{committed}/{total}" if committed is not None and total else old.progress,
        last_round=last_round,
        last_update=o.now if last_round is not None and last_round != old.last_round else old.last_update,
        eval_loss=(prog.final.eval_loss if prog.final else prog.last.eval_loss if prog.last else None) or old.eval_loss,
        restarts=failures,
        conditions=[condition],
    )


def step(body: Mapping[str, Any], patch: kopf.Patch, kube: Kube, now: datetime | None = None) -> None:
    """One pass over the FederatedClient in `body`; status written only when it changed."""
    now = now or datetime.now(UTC)
    old = FederatedClientStatus.model_validate(body.get("status") or {})
    generation = int(body["metadata"].get("generation") or 0)
    doc = {k: body[k] for k in ("apiVersion", "kind", "metadata", "spec")}
    try:
        fc = parse_fedclient(doc, f"{FEDCLIENT_KIND} {body['metadata']['name']}")
    except SpecError as e:
        new = invalid(old, e.problems, generation, now)
    else:
        new = compute(reconcile(kube, fc, generation, old, now))
    stored = dict(body.get("status") or {})
    changes = new.model_dump(mode="json", by_alias=True, exclude_none=True)
    if {**stored, **changes} != stored:
        patch.status.update(changes)


def invalid(old: FederatedClientStatus, problems: list[str], generation: int, now: datetime) -> FederatedClientStatus:
    """A FederatedClient whose spec fails its checks: say which, and make nothing."""
    before = next((c for c in old.conditions or [] if c.type == "Ready"), None)
    condition = invalid_spec_condition("Ready", "False", problems, before, generation, now)
    return FederatedClientStatus(state=FAILED, observed_generation=generation, conditions=[condition])


def join_manifest(res: FederatedFineTune, aggregator_key: str, client: str, name: str, namespace: str) -> Obj:
    """A FederatedClient that joins `res` as `client`, for its owner to fill in its own Secrets and data."""
    found = next((c for c in res.spec.clients if c.name == client), None)
    if found is None or not found.external:
        listed = ", ".join(c.name for c in res.spec.clients if c.external) or "none"
        raise FedtuneError(f"{client}: not an external client of {res.metadata.name} (external clients: {listed})")
    storage = res.spec.storage
    spec: Obj = {
        "runRoot": builders.run_root(res),
        **({"endpoint": storage.endpoint} if storage.endpoint else {}),
        **({"region": storage.region} if storage.region else {}),
        "coordinatorPublicKey": aggregator_key,
        "clientName": client,
        "data": {"uri": "s3://YOUR-BUCKET/YOUR-DATA.jsonl", "secretRef": f"{client}-data"},
        "secretRef": f"{client}-s3",
        "signingKeySecretRef": f"{client}-key",
        "resources": found.resources.model_dump(mode="json", by_alias=True, exclude_none=True),
        "image": res.spec.image,
    }
    meta = {"name": name, "namespace": namespace}
    return {"apiVersion": f"{API_GROUP}/{API_VERSION}", "kind": FEDCLIENT_KIND, "metadata": meta, "spec": spec}
