"""Names of a run's children: readable where they are unambiguous, hashed where two runs could meet.

`{run}-client-{client}` alone is ambiguous: run `a` with client `b-client-c` and run `a-client-b` with client
`c` would share one Job, and each operator pass would act on the other run's. A plain name is used only when
`parse` gives back the run, role and member it was made from; any other name is cut and ends in `--` and a
hash of (run, role, member). Plain names never contain `--`, so the two kinds cannot meet, and two plain names are equal
only if they parse to the same run.
"""

from __future__ import annotations

import hashlib

MAX_NAME = 63  # a Job's name is also its pods' job-name label value
DIGEST = 16  # hex digits: 64 bits, so a colliding name cannot be searched for
# Roles followed by a member (a client's name, a key's party), and roles that end a name.
MEMBER_ROLES = ("client", "key")
END_ROLES = ("aggregator", "spec", "metrics", "workload")


def parse(name: str) -> tuple[str, str, str | None] | None:
    """(run, role, member) that a plain name stands for; None for a name that cannot be plain."""
    if "--" in name:
        return None
    found = [(i, role) for role in MEMBER_ROLES if (i := name.find(f"-{role}-")) > 0]
    if found:
        i, role = min(found)
        return name[:i], role, name[i + len(role) + 2 :]
    for role in END_ROLES:
        if name.endswith(f"-{role}") and len(name) > len(role) + 1:
            return name[: -len(role) - 1], role, None
    return None


def child_name(run: str, role: str, member: str | None = None, prefix: str = "") -> str:
    """`{prefix}{run}-{role}[-{member}]`, or that name cut to fit and hashed when it is not unambiguous."""
    name = f"{prefix}{run}-{role}" + (f"-{member}" if member else "")
    if len(name) <= MAX_NAME and parse(name) == (run, role, member):
        return name
    digest = hashlib.sha256(f"{run}/{role}/{member or ''}".encode()).hexdigest()[:DIGEST]
    return f"{name[: MAX_NAME - DIGEST - 2]}--{digest}"


def aggregator_name(run: str) -> str:
    return child_name(run, "aggregator")


def client_job_name(run: str, client: str) -> str:
    return child_name(run, "client", client)


def spec_config_map_name(run: str) -> str:
    return child_name(run, "spec")


def key_secret_name(run: str, party: str) -> str:
    """The Secret holding the signing key the operator generated for a party without its own."""
    return child_name(run, "key", party.replace(" ", "-"))


def metrics_service_name(run: str) -> str:
    # A Service name must start with a letter; a run name may start with a digit.
    return child_name(run, "metrics", prefix="" if run[0].isalpha() else "fft-")


def workload_name(run: str) -> str:
    """The Kueue Workload that admits a queued run as one gang."""
    return child_name(run, "workload")
