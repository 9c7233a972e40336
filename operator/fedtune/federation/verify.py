"""`fedtune verify`: check every signature, digest and link of a run, finished or running.

Walks the chain of globals from round 0, and for each closed round its summary and every update the
summary names, then the final summary: the adapter it names must hash to the digest it carries, and
its chain must be the chain walked. The first object that fails is named.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from fedtune.errors import FedtuneError
from fedtune.federation import protocol as p
from fedtune.federation.records import Ledger


class VerifyError(FedtuneError):
    """The first object of a run that fails its check."""


@dataclass
class Verified:
    globals: int = 0
    updates: int = 0
    evals: int = 0
    epochs: list[int] = field(default_factory=list)
    final: p.FinalSummary | None = None


def _check(cond: bool, where: str, why: str) -> None:
    if not cond:
        raise VerifyError(f"{where}: {why}")


def verify_run(ledger: Ledger) -> Verified:
    """Every record checked; VerifyError naming the first object that fails."""
    url = ledger.store.url
    out = Verified()
    try:
        latest = ledger.latest_global()
        _check(latest is not None, url(p.global_marker(0)), "no committed global: not a run root, or not started")
        assert latest is not None
        prev: p.GlobalMarker | None = None
        for r in range(latest + 1):
            gm = ledger.global_marker(r)
            where = url(p.global_marker(r))
            _check(gm is not None, where, "missing, while a later global is committed")
            assert gm is not None
            _check(gm.parent_sha256 == (prev.sha256 if prev else None), where, "parent link does not match")
            _check(not prev or gm.epoch >= prev.epoch, where, f"lease epoch {gm.epoch} went backwards")
            _check(not prev or not prev.final, where, "follows a final global")
            ledger.global_bytes(gm)
            ledger.server_state_bytes(gm)
            if prev is not None:
                out.updates += _verify_round(ledger, prev, gm)
            out.epochs.append(gm.epoch)
            out.globals += 1
            prev = gm
        assert prev is not None
        out.final = ledger.final()
        if out.final is not None:
            _verify_final(ledger, prev, out.final)
            out.evals = sum(ledger.eval_marker(prev.round, c) is not None for c in prev.selected)
    except VerifyError:
        raise
    except FedtuneError as e:
        raise VerifyError(str(e)) from None
    return out


def _verify_round(ledger: Ledger, gm: p.GlobalMarker, nxt: p.GlobalMarker) -> int:
    """Round gm.round's summary, and each participant's update trained on gm; returns how many updates."""
    where = ledger.store.url(p.global_marker(nxt.round))
    _check(nxt.summary_sha256 is not None, where, "names no summary of the round that produced it")
    summary = ledger.summary(gm.round)
    assert summary is not None
    for client in summary.participants:
        marker = ledger.update_marker(gm.round, client)
        uwhere = ledger.store.url(p.update_marker(gm.round, client))
        _check(marker is not None, uwhere, "missing, while the round summary names it as a participant")
        assert marker is not None
        _check(marker.global_sha256 == gm.sha256, uwhere, "trained on another global")
        # What was aggregated is what the signed summary names, not whatever the client's prefix holds now.
        named = summary.updates.get(client)
        _check(named == marker.sha256, uwhere, "is not the update the round summary says was aggregated")
        ledger.data(p.update_data(gm.round, client, marker.sha256), marker.sha256)
    return len(summary.participants)


def _verify_final(ledger: Ledger, last: p.GlobalMarker, final: p.FinalSummary) -> None:
    url = ledger.store.url
    where = url(p.FINAL_SUMMARY)
    _check(last.final, where, f"written while round {last.round}'s global is not final")
    chain = [ledger.global_marker(r) for r in range(last.round + 1)]
    _check(final.chain == [g.sha256 for g in chain if g], where, "its chain differs from the committed globals")
    closed = ledger.summary(last.round - 1) if last.round else None
    failed = closed.failed_total if closed else 0
    _check(
        final.rounds == last.round - failed, where, f"names {final.rounds} rounds, the chain has {last.round - failed}"
    )
    ledger.data(p.FINAL_ADAPTER, final.adapter_sha256)
    ledger.data(p.FINAL_CONFIG, final.config_sha256)
