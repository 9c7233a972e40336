"""One level-based pass over a run: make its children match the spec, then observe what exists.

Called from every handler (create, resume, update, timer), so it must be idempotent: children are
created only if absent, and removed only when the spec says so (suspend) or the run has ended.
"""

from __future__ import annotations

import base64
import fnmatch
import logging
import os
from dataclasses import dataclass
from typing import Any

from kubernetes import client as k8s
from kubernetes.client.exceptions import ApiException

from fedtune.api.spec import CREDENTIALS_LABEL, KIND, FederatedFineTune
from fedtune.controller import builders
from fedtune.controller.status import TERMINAL, Observed, Progress
from fedtune.errors import FedtuneError
from fedtune.federation import protocol as p
from fedtune.federation.records import Ledger
from fedtune.federation.run_config import KEYS_FILE
from fedtune.federation.signing import (
    AGGREGATOR,
    KEY_FILE,
    InvalidKey,
    SignatureError,
    Trust,
    check_pair,
    client_party,
    encode_public,
    generate,
    parse_private,
    private_pem,
)
from fedtune.storage import ObjectStore, open_store

log = logging.getLogger("fedtune.operator")

Obj = dict[str, Any]
# The operator only reads status from storage: a short retry keeps one slow bucket from stalling a tick.
STORAGE_RETRY_SECONDS = 5.0
STORAGE_KEYS = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")
# A run's pinned keys never change once its ConfigMap exists: kept per resource uid.
_trust: dict[str, Trust] = {}


@dataclass(frozen=True)
class Credentials:
    """A labelled Secret's data, and the runs (uids) that own it: a run's generated keys are its own."""

    data: dict[str, str]
    runs: frozenset[str] = frozenset()


class Kube:
    """The few API calls the operator makes (and RBAC grants)."""

    def __init__(self, api: k8s.ApiClient | None = None) -> None:
        self.api = api or k8s.ApiClient()
        self.core = k8s.CoreV1Api(self.api)
        self.batch = k8s.BatchV1Api(self.api)
        self.custom = k8s.CustomObjectsApi(self.api)

    def create(self, manifest: Obj) -> bool:
        """Create the object unless one of its name exists; True if created."""
        ns = manifest["metadata"]["namespace"]
        kind = manifest["kind"]
        try:
            if kind == "Job":
                self.batch.create_namespaced_job(ns, manifest)
            elif kind == "ConfigMap":
                self.core.create_namespaced_config_map(ns, manifest)
            elif kind == "Service":
                self.core.create_namespaced_service(ns, manifest)
            elif kind == "Secret":
                self.core.create_namespaced_secret(ns, manifest)
            else:
                raise FedtuneError(f"cannot create a {kind}")
        except ApiException as e:
            if e.status == 409:
                return False
            raise
        return True

    def delete_job(self, namespace: str, name: str) -> None:
        try:
            self.batch.delete_namespaced_job(name, namespace, propagation_policy="Background")
        except ApiException as e:
            if e.status != 404:
                raise

    def jobs(self, namespace: str, run: str) -> dict[str, Obj]:
        found = self.batch.list_namespaced_job(namespace, label_selector=f"{builders.RUN_LABEL}={run}")
        return {j.metadata.name: self.api.sanitize_for_serialization(j) for j in found.items}

    def pods(self, namespace: str, run: str) -> list[Obj]:
        found = self.core.list_namespaced_pod(namespace, label_selector=f"{builders.RUN_LABEL}={run}")
        return [self.api.sanitize_for_serialization(pod) for pod in found.items]

    def credentials(self, namespace: str, only: str | None = None) -> dict[str, Credentials]:
        """The Secrets labelled for fedtune (or the one named `only`), by name.

        Selected by label on the server, so the operator never receives an unlabelled Secret's data.
        """
        fields = f"metadata.name={only}" if only else None
        found = self.core.list_namespaced_secret(namespace, label_selector=CREDENTIALS_LABEL, field_selector=fields)
        return {
            s.metadata.name: Credentials(
                data={k: base64.b64decode(v).decode() for k, v in (s.data or {}).items()},
                runs=frozenset(o.uid for o in s.metadata.owner_references or [] if o.kind == KIND),
            )
            for s in found.items
        }

    def config_map(self, namespace: str, name: str) -> dict[str, str] | None:
        try:
            return dict(self.core.read_namespaced_config_map(name, namespace).data or {})
        except ApiException as e:
            if e.status == 404:
                return None
            raise


def run_store(res: FederatedFineTune, secret: dict[str, str] | None) -> ObjectStore:
    """The run's root in storage, reached with the coordinator's credentials (the aggregator's Secret)."""
    storage = res.spec.storage
    creds = None
    if secret and set(STORAGE_KEYS) <= set(secret):
        creds = (secret["AWS_ACCESS_KEY_ID"], secret["AWS_SECRET_ACCESS_KEY"])
    endpoint = storage.endpoint or (secret or {}).get("AWS_ENDPOINT_URL")
    return open_store(
        builders.run_root(res),
        endpoint=endpoint,
        region=storage.region,
        credentials=creds,
        retry_seconds=STORAGE_RETRY_SECONDS,
    )


def coordinator_secret(kube: Kube, res: FederatedFineTune) -> dict[str, str] | None:
    name = builders.storage_secret(res, res.spec.aggregator)
    found = kube.credentials(res.metadata.namespace, name).get(name) if name else None
    return found.data if found else None


def read_progress(ledger: Ledger, hint: int | None = None) -> Progress:
    """The run's committed rounds, last summary and final summary; `hint`: rounds known committed."""
    committed = ledger.latest_global(hint)
    final = ledger.final()
    last = ledger.summary(committed - 1) if committed else None
    return Progress(committed=committed, final=final, last=last)


def forget(kube: Kube, res: FederatedFineTune) -> int:
    """Delete every object under the run's root (spec.storage.keep: false); returns how many."""
    store = run_store(res, coordinator_secret(kube, res))
    keys = store.list()
    for key in keys:
        store.delete(key)
    return len(keys)


def allowed_images() -> list[str]:
    """Image patterns the chart allows (values.allowedImages); empty allows any."""
    return os.environ.get("FEDTUNE_ALLOWED_IMAGES", "").replace(",", " ").split()


def admission(res: FederatedFineTune, secrets: dict[str, Credentials]) -> tuple[str, str] | None:
    """What keeps this run's pods from being created, as (reason, message naming the field), or None."""
    spec, ns = res.spec, res.metadata.namespace
    allowed = allowed_images()
    if allowed and not any(fnmatch.fnmatchcase(spec.image, pat) for pat in allowed):
        return (
            "ImageNotAllowed",
            f"spec.image: {spec.image} is not among the operator's allowedImages ({', '.join(allowed)})",
        )
    for path, name in spec.secret_refs():
        found = secrets.get(name)
        if found is None:
            return "SecretNotFound", (
                f"{path}: Secret {ns}/{name} not found, or not labelled {CREDENTIALS_LABEL} (the operator reads "
                f"only labelled Secrets: kubectl label secret {name} {CREDENTIALS_LABEL}=true)"
            )
        if found.runs and res.metadata.uid not in found.runs:
            return "SecretNotAllowed", f"{path}: Secret {ns}/{name} belongs to another run (its generated key)"
        need = (KEY_FILE,) if path.endswith("signingKeySecretRef") else STORAGE_KEYS
        if not set(need) <= set(found.data):
            return "SecretInvalid", f"{path}: Secret {ns}/{name} needs keys {' and '.join(need)}"
    for path, party in spec.parties():
        if party.public_key and party.signing_key_secret_ref:
            pem = secrets[party.signing_key_secret_ref].data[KEY_FILE]
            try:
                check_pair(
                    parse_private(pem, f"{path}.signingKeySecretRef"),
                    party.public_key,
                    f"{path}.publicKey",
                    f"Secret {ns}/{party.signing_key_secret_ref}",
                )
            except InvalidKey as e:
                return "KeyMismatch", str(e)
    return None


def identities(kube: Kube, res: FederatedFineTune, secrets: dict[str, Credentials]) -> Trust:
    """The run's pinned public keys: each party's own publicKey, or a key pair generated once for the run.

    Generated private keys go into one Secret per party (owned by the run, mounted into that party's pod
    only); a Secret that already exists (a restarted operator) is reused, never replaced.
    """
    spec, meta = res.spec, res.metadata
    keys: dict[str, str] = {}
    for party_name, party in [(AGGREGATOR, spec.aggregator), *((client_party(c.name), c) for c in spec.clients)]:
        if party.public_key:
            keys[party_name] = party.public_key
            continue
        name = builders.key_secret_name(meta.name, party_name)
        found = secrets.get(name)
        if found is None:
            pem = private_pem(generate())
            if not kube.create(builders.key_secret(res, party_name, pem)):
                found = kube.credentials(meta.namespace, name).get(name)
        if found is not None:
            if found.runs != {meta.uid}:  # a Secret of that name this run did not create: never use its key
                raise KeyConflict(f"Secret {meta.namespace}/{name} exists and does not belong to this run")
            pem = found.data[KEY_FILE]
        keys[party_name] = encode_public(parse_private(pem, f"Secret {meta.namespace}/{name}").public_key())
    clients = {c.name: keys[client_party(c.name)] for c in spec.clients}
    return Trust(run=builders.run_id(res), aggregator=keys[AGGREGATOR], clients=clients)


class KeyConflict(FedtuneError):
    """The name of a run's generated key Secret is taken by a Secret the run does not own."""


def pinned_trust(kube: Kube, res: FederatedFineTune) -> Trust | None:
    """The keys in the run's ConfigMap (what its pods verify with), once it exists."""
    uid = res.metadata.uid or ""
    if uid not in _trust:
        data = kube.config_map(res.metadata.namespace, builders.spec_config_map_name(res.metadata.name))
        if not data or KEYS_FILE not in data:
            return None
        _trust[uid] = Trust.from_json(data[KEYS_FILE], f"ConfigMap {builders.spec_config_map_name(res.metadata.name)}")
    return _trust[uid]


def forget_trust(res: FederatedFineTune) -> None:
    _trust.pop(res.metadata.uid or "", None)


def _ensure_children(kube: Kube, res: FederatedFineTune, observed: Observed) -> None:
    """Check admission and storage, then create what is missing; no API call while every Job exists."""
    meta = res.metadata
    wanted = {
        builders.aggregator_name(meta.name),
        *(builders.client_job_name(meta.name, c.name) for c in res.spec.clients),
    }
    if wanted <= set(observed.jobs):
        return
    secrets = kube.credentials(meta.namespace)
    observed.blocked = admission(res, secrets)
    if observed.blocked is None and observed.storage_error:
        # Pods that cannot reach their bucket would only crash-loop: wait for storage instead.
        observed.blocked = ("StorageUnreachable", observed.storage_error)
    if observed.blocked is not None:
        return
    try:
        trust = pinned_trust(kube, res) or identities(kube, res, secrets)
    except KeyConflict as e:
        observed.blocked = ("KeyConflict", str(e))
        return
    for manifest in builders.children(res, trust):
        if kube.create(manifest):
            log.info("created %s %s/%s", manifest["kind"], meta.namespace, manifest["metadata"]["name"])


def reconcile(kube: Kube, res: FederatedFineTune, generation: int, old_status: Obj) -> Observed:
    """Ensure children for the spec's desired state and return the observations status is built from."""
    meta, spec = res.metadata, res.spec
    ns, name = meta.namespace, meta.name
    observed = Observed(resource=res, generation=generation, old=old_status)

    trust = pinned_trust(kube, res)
    try:
        store = run_store(res, coordinator_secret(kube, res))
        if trust is None:
            store.list(p.LEASES)  # reachable before any pod starts (a HEAD reads a missing bucket as no key)
        else:
            observed.progress = read_progress(Ledger(store, trust), old_status.get("completedRounds"))
    except SignatureError as e:
        observed.storage_error = f"a record was rejected: {e}"
    except FedtuneError as e:
        observed.storage_error = str(e)
    observed.jobs = kube.jobs(ns, name)

    finished = old_status.get("state") in TERMINAL or observed.progress.final is not None
    if spec.suspend or (finished and observed.progress.final is None):
        for job in (builders.aggregator_name(name), *(builders.client_job_name(name, c.name) for c in spec.clients)):
            kube.delete_job(ns, job)
    elif not finished:
        _ensure_children(kube, res, observed)
        observed.jobs = kube.jobs(ns, name)
    observed.pods = kube.pods(ns, name)
    return observed
