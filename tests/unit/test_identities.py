"""The operator's signing keys for a run: generated once, reused only when the run owns them."""

from __future__ import annotations

from typing import Any

import pytest

from fedtune.controller import builders
from fedtune.controller.reconcile import Credentials, KeyConflict, admission, identities
from fedtune.federation.signing import KEY_FILE, generate, private_pem
from tests.unit.runs import UID, run


class FakeKube:
    """Just what identities() calls: create-if-absent Secrets and a labelled listing."""

    def __init__(self, existing: dict[str, Credentials] | None = None) -> None:
        self.secrets = dict(existing or {})
        self.created: list[str] = []

    def create(self, manifest: dict[str, Any]) -> bool:
        name = manifest["metadata"]["name"]
        if name in self.secrets:
            return False
        owners = frozenset(o["uid"] for o in manifest["metadata"]["ownerReferences"])
        self.secrets[name] = Credentials(dict(manifest["stringData"]), owners)
        self.created.append(name)
        return True

    def credentials(self, namespace: str, only: str | None = None) -> dict[str, Credentials]:
        return {k: v for k, v in self.secrets.items() if only is None or k == only}


def test_keys_are_generated_once_per_party_and_kept() -> None:
    res = run()
    kube = FakeKube()
    first = identities(kube, res, {})  # type: ignore[arg-type]
    assert len(kube.created) == 4
    again = identities(kube, res, kube.secrets)  # type: ignore[arg-type]
    assert again == first and len(kube.created) == 4
    assert first.run == f"team-a/quickstart/{UID}"


def test_a_key_secret_this_run_does_not_own_is_never_used() -> None:
    res = run()
    planted = builders.key_secret_name("quickstart", "client bank")
    kube = FakeKube({planted: Credentials({KEY_FILE: private_pem(generate())}, frozenset({"another-uid"}))})
    with pytest.raises(KeyConflict, match=f"Secret team-a/{planted} exists and does not belong to this run"):
        identities(kube, res, kube.secrets)  # type: ignore[arg-type]


def test_a_run_may_not_reference_another_runs_generated_key() -> None:
    res = run(aggregator={"publicKey": "ed25519:" + "A" * 43 + "=", "signingKeySecretRef": "their-key"})
    secrets = {
        "their-key": Credentials({KEY_FILE: private_pem(generate())}, frozenset({"another-uid"})),
        **{f"fedtune-{p}": Credentials({"AWS_ACCESS_KEY_ID": "a", "AWS_SECRET_ACCESS_KEY": "b"}) for p in ("s3",)},
    }
    reason, message = admission(res, secrets) or ("", "")
    assert reason == "SecretNotAllowed" and message.startswith("spec.aggregator.signingKeySecretRef: ")
