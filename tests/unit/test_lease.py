"""The aggregator lease: only claims the aggregator signed count; a later genuine epoch stops the holder."""

from __future__ import annotations

import pytest

from fedtune.federation import protocol as p
from fedtune.federation.lease import Lease, LeaseLost
from fedtune.federation.records import Ledger
from fedtune.storage.memory import MemoryStore
from tests.unit.runs import AGGREGATOR_SIGNER, TRUST


def test_junk_and_forged_claims_neither_block_nor_stop_an_aggregator(request: pytest.FixtureRequest) -> None:
    store = MemoryStore(request.node.name, "run")
    store.put(f"{p.LEASES}/x.json", b"{}")  # not an epoch
    store.put(p.lease_claim(7), b'{"epoch": 7, "holder": "forger", "seconds": 1}')  # not signed
    lease = Lease(Ledger(store, TRUST, AGGREGATOR_SIGNER), seconds=60)
    try:
        assert lease.acquire(done=lambda: False) and lease.epoch == 1
        store.put(p.lease_claim(2), b'{"epoch": 2, "holder": "forger", "seconds": 1}')
        lease.check()  # a forged next epoch does not stop it
        rival = Ledger(store, TRUST, AGGREGATOR_SIGNER)
        assert rival.commit(p.lease_claim(2), p.LeaseClaim(epoch=2, holder="other", seconds=60)) is False
        store.put(p.lease_claim(2), rival.signed(p.lease_claim(2), p.LeaseClaim(epoch=2, holder="other", seconds=60)))
        with pytest.raises(LeaseLost, match="epoch 1 was taken over by epoch 2"):
            lease.check()
    finally:
        lease.release()
