"""The parties of a run in one process, each with its own key, for tests that play them by hand."""

from __future__ import annotations

from dataclasses import dataclass, field

from fedtune.api import FederatedFineTuneSpec
from fedtune.federation import protocol as p
from fedtune.federation.aggregator import Aggregator
from fedtune.federation.records import Ledger
from fedtune.federation.signing import AGGREGATOR, Signer, Trust, client_party, generate
from fedtune.storage import ObjectStore


@dataclass
class Parties:
    """Fresh key pairs for the aggregator and every client of `spec`, pinned in `trust`."""

    spec: FederatedFineTuneSpec
    run: str = "test/run"
    signers: dict[str, Signer] = field(init=False)
    trust: Trust = field(init=False)

    def __post_init__(self) -> None:
        names = [AGGREGATOR, *(client_party(c.name) for c in self.spec.clients)]
        self.signers = {n: Signer(self.run, n, generate()) for n in names}
        self.trust = Trust(
            run=self.run,
            aggregator=self.signers[AGGREGATOR].public,
            clients={c.name: self.signers[client_party(c.name)].public for c in self.spec.clients},
        )

    def ledger(self, store: ObjectStore, party: str = AGGREGATOR) -> Ledger:
        return Ledger(store, self.trust, self.signers[party])

    def client(self, store: ObjectStore, name: str) -> Ledger:
        return self.ledger(store, client_party(name))

    def aggregator(self, store: ObjectStore) -> Aggregator:
        """An aggregator that already holds the run's lease."""
        agg = Aggregator(self.ledger(store), self.spec)
        assert agg.lease.acquire(done=lambda: False)
        return agg


def submit_update(
    ledger: Ledger,
    gm: p.GlobalMarker,
    client: str,
    payload: bytes,
    stored: bytes | None = None,
    **fields: object,
) -> p.UpdateMarker:
    """Commit an update for gm's round as a client would; `stored` differs from payload to tamper."""
    digest = p.sha256(payload)
    ledger.store.put(p.update_data(gm.round, client, digest), payload if stored is None else stored)
    marker = p.UpdateMarker(
        client=client,
        round=gm.round,
        sha256=digest,
        global_sha256=gm.sha256,
        examples=10,
        steps=1,
        bytes=len(payload),
        metrics=p.ClientMetrics(train_loss=1.0, eval_loss=1.0, eval_examples=5),
    ).model_copy(update=fields)
    ledger.commit(p.update_marker(gm.round, client), marker)
    return marker
