"""The live view of a local run: round n/N and each client's state and loss, read from storage."""

from __future__ import annotations

from types import TracebackType
from typing import TYPE_CHECKING

from rich.console import Console, Group
from rich.live import Live
from rich.table import Table
from rich.text import Text

from fedtune.api import FederatedFineTuneSpec
from fedtune.federation import protocol as p
from fedtune.federation.records import Ledger

if TYPE_CHECKING:
    from fedtune.local.runner import Proc


class Progress:
    """Redrawn in place on a terminal; elsewhere (CI, pipes) one line per closed round."""

    def __init__(
        self, ledger: Ledger, spec: FederatedFineTuneSpec, procs: list[Proc], console: Console, live: bool
    ) -> None:
        self.ledger, self.spec, self.procs, self.console = ledger, spec, procs, console
        self.live = (
            Live(console=console, refresh_per_second=4, transient=False) if live and console.is_terminal else None
        )
        self.printed = 0
        self.latest: int | None = None

    def __enter__(self) -> Progress:
        if self.live:
            self.live.__enter__()
        return self

    def __exit__(self, t: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None) -> None:
        if self.live:
            self.live.__exit__(t, e, tb)

    def _state(self, client: str, gm: p.GlobalMarker | None) -> tuple[str, str, str]:
        proc = next(pr for pr in self.procs if pr.name == client)
        if proc.failed:
            return "failed", "-", "-"
        if gm is None:
            return "starting", "-", "-"
        if client not in gm.selected:
            return "idle", "-", "-"
        if gm.final:
            ev = self.ledger.eval_marker(gm.round, client)
            return ("done", "-", f"{ev.eval_loss:.4f}") if ev else ("evaluating", "-", "-")
        up = self.ledger.update_marker(gm.round, client)
        if up is None:
            return ("training" if not proc.restarts else f"training (restart {proc.restarts})"), "-", "-"
        m = up.metrics
        return "uploaded", _f(m.train_loss), _f(m.eval_loss)

    def refresh(self) -> None:
        latest = self.ledger.latest_global(hint=self.latest)
        self.latest = latest
        gm = self.ledger.global_marker(latest) if latest is not None else None
        total = self.spec.aggregation.rounds
        if self.live:
            current = "final evaluation" if gm and gm.final else f"round {(latest or 0) + 1}/{total}"
            table = Table(box=None)
            for col in ("client", "state", "train loss", "eval loss", "restarts"):
                table.add_column(col)
            for c in self.spec.clients:
                state, tl, el = self._state(c.name, gm)
                restarts = next(pr.restarts for pr in self.procs if pr.name == c.name)
                table.add_row(c.name, state, tl, el, str(restarts))
            last = self.ledger.summary(latest - 1) if latest else None
            if last is not None:
                current += (
                    f"  (round {last.round + 1}: train loss {_f(last.train_loss)}, eval loss {_f(last.eval_loss)})"
                )
            self.live.update(Group(Text(f"fedtune: {current}", style="bold"), table))
            return
        for r in range(self.printed, latest or 0):
            s = self.ledger.summary(r)
            if s is not None:
                self.console.print(
                    f"round {r + 1}/{total}: {len(s.participants)} clients, train loss {_f(s.train_loss)}, "
                    f"eval loss {_f(s.eval_loss)}, {s.seconds:.1f}s"
                    + (f", rejected {', '.join(x.client for x in s.rejected)}" if s.rejected else "")
                )
        self.printed = max(self.printed, latest or 0)


def _f(x: float | None) -> str:
    return "-" if x is None else f"{x:.4f}"
