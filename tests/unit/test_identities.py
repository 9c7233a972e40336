"""The operator's signing keys for a run: generated once, reused only when the run owns them."""

from __future__ import annotations

import pytest

from fedtune.controller.admission import admission
from fedtune.controller.identities import KeyConflict, identities
from fedtune.controller.kube import Credentials
from fedtune.controller.names import key_secret_name
from fedtune.federation.signing import KEY_FILE, generate, private_pem
from tests.unit.fake_kube import FakeKube
from tests.unit.runs import UID, run


def test_keys_are_generated_once_per_party_and_kept() -> None:
    res = run()
    kube = FakeKube()
    first = identities(kube, res, {})
    assert len(kube.created) == 4
    again = identities(kube, res, kube.secrets)
    assert again == first and len(kube.created) == 4
    assert first.run == f"team-a/quickstart/{UID}"


def test_a_key_secret_this_run_does_not_own_is_never_used() -> None:
    res = run()
    planted = key_secret_name("quickstart", "client bank")
    kube = FakeKube({planted: Credentials({KEY_FILE: private_pem(generate())}, frozenset({"another-uid"}))})
    with pytest.raises(KeyConflict, match=f"Secret team-a/{planted} exists and does not belong to this run"):
        identities(kube, res, kube.secrets)


def test_a_run_may_not_reference_another_runs_generated_key() -> None:
    res = run(aggregator={"publicKey": "ed25519:" + "A" * 43 + "=", "signingKeySecretRef": "their-key"})
    secrets = {
        "their-key": Credentials({KEY_FILE: private_pem(generate())}, frozenset({"another-uid"})),
        **{f"fedtune-{p}": Credentials({"AWS_ACCESS_KEY_ID": "a", "AWS_SECRET_ACCESS_KEY": "b"}) for p in ("s3",)},
    }
    reason, message = admission(res, secrets) or ("", "")
    assert reason == "SecretNotAllowed" and message.startswith("spec.aggregator.signingKeySecretRef: ")
