"""One level-based pass over a run: make its children match the spec, then observe what exists.

Called on every handler call (create, resume, update, timer), so it must be idempotent: children are
created only if absent, and removed only when the spec says so (suspend) or the run has failed.
"""

from __future__ import annotations

import functools
import logging
from datetime import datetime
from typing import Literal

from fedtune.api.spec import FederatedFineTune
from fedtune.api.status import RunState, RunStatus
from fedtune.controller import builders, gang
from fedtune.controller.admission import STORAGE_KEYS, admission
from fedtune.controller.identities import KeyConflict, PinnedKeys, identities
from fedtune.controller.kube import Kube, NotServed, Obj
from fedtune.controller.names import aggregator_name, client_job_name, workload_name
from fedtune.controller.status import Observed, Progress, settled
from fedtune.errors import FedtuneError
from fedtune.federation import protocol as p
from fedtune.federation.records import Ledger
from fedtune.federation.signing import SignatureError, Trust
from fedtune.storage import ObjectStore, open_store

log = logging.getLogger("fedtune.operator")

# The operator only reads status from storage: a short retry keeps one slow bucket from stalling a tick.
STORAGE_RETRY_SECONDS = 5.0


def run_store(res: FederatedFineTune, secret: dict[str, str] | None) -> ObjectStore:
    """The run's root in storage, reached with the coordinator's credentials (the aggregator's Secret)."""
    storage = res.spec.storage
    creds = None
    if secret and set(STORAGE_KEYS) <= set(secret):
        creds = (secret["AWS_ACCESS_KEY_ID"], secret["AWS_SECRET_ACCESS_KEY"])
    endpoint = storage.endpoint or (secret or {}).get("AWS_ENDPOINT_URL")
    return _store(builders.run_root(res), endpoint, storage.region, creds)


@functools.lru_cache(maxsize=512)
def _store(root: str, endpoint: str | None, region: str | None, creds: tuple[str, str] | None) -> ObjectStore:
    """One store per run and credentials, kept between passes: every argument is in the key, so rotated
    credentials or a changed endpoint get a new client, and a pass costs no client set-up."""
    return open_store(root, endpoint=endpoint, region=region, credentials=creds, retry_seconds=STORAGE_RETRY_SECONDS)


def coordinator_secret(kube: Kube, res: FederatedFineTune) -> dict[str, str] | None:
    name = builders.storage_secret(res, res.spec.aggregator)
    found = kube.credentials(res.metadata.namespace, name).get(name) if name else None
    return found.data if found else None


def read_progress(ledger: Ledger, hint: int | None = None, external: tuple[str, ...] = ()) -> Progress:
    """The run's committed rounds, last summary and final summary, and which external clients have signed
    anything; `hint`: rounds known committed."""
    committed = ledger.latest_global(hint)
    final = ledger.final()
    last = ledger.summary(committed - 1) if committed else None
    signed = {name: bool(ledger.ready_nonce(name)) for name in external}
    return Progress(committed=committed, final=final, last=last, signed=signed)


def erase_storage(kube: Kube, res: FederatedFineTune) -> int:
    """Delete every object under the run's root (spec.storage.keep: false); returns how many."""
    store = run_store(res, coordinator_secret(kube, res))
    keys = store.list()
    for key in keys:
        store.delete(key)
    return len(keys)


def job_names(res: FederatedFineTune) -> list[str]:
    """The run's Jobs: the aggregator's, then one per client."""
    run = res.metadata.name
    return [aggregator_name(run), *(client_job_name(run, c.name) for c in res.spec.clients if not c.external)]


def children_plan(res: FederatedFineTune, old: RunStatus, progress: Progress) -> Literal["ensure", "remove", "keep"]:
    """What becomes of the run's Jobs: made to exist while it runs, removed while it is suspended or once it
    has failed, kept once it has a result (they finish by themselves, and their logs stay readable)."""
    if res.spec.suspend or (settled(old) and old.state == RunState.FAILED and progress.final is None):
        return "remove"
    if progress.final is not None or old.state == RunState.SUCCEEDED:
        return "keep"
    return "ensure"


def _read_storage(kube: Kube, res: FederatedFineTune, trust: Trust | None, hint: int | None) -> Progress | str:
    """What the run's records say, or why storage could not be read."""
    try:
        store = run_store(res, coordinator_secret(kube, res))
        if trust is None:
            store.list(p.LEASES)  # reachable before any pod starts (a HEAD reads a missing bucket as no key)
            return Progress()
        external = tuple(c.name for c in res.spec.clients if c.external)
        return read_progress(Ledger(store, trust), hint, external)
    except SignatureError as e:
        return f"a record was rejected: {e}"
    except FedtuneError as e:
        return str(e)


def _owned(jobs: dict[str, Obj], res: FederatedFineTune) -> dict[str, Obj]:
    """The Jobs this run owns: a Job that merely carries its label (or a former run's of the same name) is not."""
    uid = res.metadata.uid
    return {
        name: job
        for name, job in jobs.items()
        if any(o.get("uid") == uid for o in job["metadata"].get("ownerReferences") or [])
    }


def _create_children(
    kube: Kube, res: FederatedFineTune, pinned: Trust | None, storage_error: str | None, jobs: dict[str, Obj]
) -> tuple[str, str] | None:
    """Check admission and storage, then create what is missing; (reason, message) if pods cannot start."""
    meta = res.metadata
    secrets = kube.credentials(meta.namespace)
    blocked = admission(res, secrets)
    if blocked is None and storage_error:
        # Pods that cannot reach their bucket would only crash-loop: wait for storage instead.
        blocked = ("StorageUnreachable", storage_error)
    if blocked is not None:
        return blocked
    try:
        trust = pinned or identities(kube, res, secrets)
    except KeyConflict as e:
        return "KeyConflict", str(e)
    manifests = builders.children(res, trust)
    if res.spec.queue_name:  # the Workload comes before the Jobs it admits
        manifests.insert(next(i for i, m in enumerate(manifests) if m["kind"] == "Job"), gang.workload(res))
    for manifest in manifests:
        # Only what is missing is posted: the ConfigMap, Service and Workload come before the Jobs, so once
        # any Job exists they were made, and a pass while Jobs are still being created skips those that exist.
        if (manifest["metadata"]["name"] in jobs) if manifest["kind"] == "Job" else bool(jobs):
            continue
        try:
            created = kube.create(manifest)
        except NotServed as e:
            return "KueueNotInstalled", f"spec.queueName: {e}"
        if created:
            log.info("created %s %s/%s", manifest["kind"], meta.namespace, manifest["metadata"]["name"])
    return None


def _finished(job: Obj) -> bool:
    conditions = (job.get("status") or {}).get("conditions") or []
    return any(c.get("type") in ("Complete", "Failed") and c.get("status") == "True" for c in conditions)


def _gate(kube: Kube, res: FederatedFineTune, jobs: dict[str, Obj]) -> tuple[str, str] | None:
    """A queued run's Jobs run exactly while Kueue admits its Workload; why it waits, or None once admitted."""
    ns, uid = res.metadata.namespace, res.metadata.uid
    name = workload_name(res.metadata.name)
    workload = kube.workload(ns, name)
    if workload is not None and not any(o.get("uid") == uid for o in workload["metadata"].get("ownerReferences") or []):
        # Anyone may create a Workload: one the run did not make must not start it (a forged admission).
        return "WorkloadConflict", f"spec.queueName: Workload {ns}/{name} exists and belongs to no run of this uid"
    if workload is None and jobs:  # deleted under a run that still needs it: queue the run again
        try:
            kube.create(gang.workload(res))
        except NotServed as e:
            return "KueueNotInstalled", f"spec.queueName: {e}"
    admitted, why = gang.admission(res, workload)
    pod_sets, flavors = gang.pod_sets_of_jobs(res), gang.assigned_flavors(workload or {})
    for job_name, job in jobs.items():
        if bool(job["spec"].get("suspend")) != admitted or _finished(job):
            continue
        if admitted:
            found = (kube.resource_flavor(f) for f in flavors.get(pod_sets.get(job_name, ""), []))
            kube.patch_job(ns, job_name, gang.start_patch(job, [f for f in found if f is not None]))
        else:
            kube.patch_job(ns, job_name, {"spec": {"suspend": True}})
        log.info("%s Job %s/%s", "started" if admitted else "suspended", ns, job_name)
    if (
        workload is not None
        and not admitted
        and why.startswith("evicted")
        and not any(_active(j) for j in jobs.values())
    ):
        kube.delete_workload(ns, name)  # its pods are gone: queue the run afresh (the next pass recreates it)
    return None if admitted else ("Queued", why)


def _active(job: Obj) -> bool:
    return bool((job.get("status") or {}).get("active"))


def reconcile(
    kube: Kube, keys: PinnedKeys, res: FederatedFineTune, generation: int, old: RunStatus, now: datetime
) -> Observed:
    """Make the run's Jobs what its state calls for and return the observations status is built from; no
    write while every Job exists."""
    ns, name = res.metadata.namespace, res.metadata.name
    observed = Observed(resource=res, generation=generation, old=old, now=now)
    pinned = keys.of(kube, res)
    read = _read_storage(kube, res, pinned, old.completed_rounds)
    if isinstance(read, str):
        observed.storage_error = read
    else:
        observed.progress = read
    observed.jobs = _owned(kube.jobs(ns, name), res)
    plan = children_plan(res, old, observed.progress)
    queued = res.spec.queue_name is not None
    if plan == "remove":
        for job in observed.jobs:
            kube.delete_job(ns, job)
        if queued:
            kube.delete_workload(ns, workload_name(name))  # its quota goes back to the queue
    elif plan == "keep" and queued and not settled(old):
        kube.delete_workload(ns, workload_name(name))  # the run has its result
    elif plan == "ensure":
        if not set(job_names(res)) <= set(observed.jobs):
            observed.blocked = _create_children(kube, res, pinned, observed.storage_error, observed.jobs)
            observed.jobs = _owned(kube.jobs(ns, name), res)
        if queued and observed.blocked is None:
            observed.blocked = _gate(kube, res, observed.jobs)
    observed.pods = kube.pods(ns, name)
    return observed
