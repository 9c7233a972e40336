"""`fedtune baseline`: what the run's data would give without federating, to tell whether federating pays.

Both baselines train the run's model and adapter with the client's own data loading, AdamW settings
(schedule, weight decay, clipping, batch size, accumulation) and evaluation, on the same held-out
examples, for the optimizer steps the federation takes: rounds × clientsPerRound × localSteps client steps
in all (fewer only where a round closes without every selected client, or DP's budget ends the run early;
the comparison then says so).

- `centralized` takes that many steps in one process, on the union of the clients' training splits;
- `local` trains one adapter per client on its own split, sharing those steps out evenly: the steps a client
  takes in the federation on average (rounds × localSteps when every client is selected every round).

A baseline round is the steps the federation spends in one round: each is scored before it, like a global
entering its round; AdamW restarts at each unless spec.training.keepOptimizerState; batches are drawn in an
order seeded like a client's round (`{seed}:{name}:{round}`), so a one-client run's local baseline is that
run; and step i of k in a round takes the rate of local step i × localSteps // k, so the schedule runs
through the run at the federation's pace. Neither adds FedProx's proximal term (there is no global to stay
near) nor DP noise.
"""

from __future__ import annotations

import hashlib
import logging
import time
from dataclasses import dataclass
from functools import partial
from pathlib import Path

from fedtune.api import FederatedFineTuneSpec
from fedtune.api.spec import TrainingSpec
from fedtune.federation.client import held_out_loss, load_splits, local_options, trainable_model
from fedtune.local.report import BASELINES, BaselineSummary, Mode, baseline_key, plot_loss, record, write_metrics
from fedtune.training import data as d
from fedtune.training.model import adapter_state, base_dtype, load_adapter
from fedtune.training.schedule import learning_rate
from fedtune.training.tokenizer import build_tokenizer
from fedtune.training.trainer import autocast_dtype, train

log = logging.getLogger("fedtune.baseline")


@dataclass(frozen=True)
class Scored:
    loss: float
    tokens: int


@dataclass(frozen=True)
class Round:
    """One baseline round of one trainer: its clients' scores entering it, its mean train loss."""

    evals: dict[str, Scored]
    train_loss: float | None  # None: a round with no step of this trainer's (a small share)
    seconds: float


@dataclass(frozen=True)
class Trajectory:
    """One trainer's rounds, its clients' final scores and the optimizer steps it took."""

    rounds: list[Round]
    final: dict[str, Scored]
    steps: int


@dataclass(frozen=True)
class Job:
    """One adapter to train for `steps` optimizer steps on `train`, scored on the held-out split of each of
    `clients`; `name` seeds its batch order as a client's name does."""

    name: str
    train: list[d.Example]
    clients: list[str]
    steps: int


def scored_sha256(examples: list[d.Example], training: TrainingSpec) -> str:
    """Digest of the input ids of the examples the evaluation scores (the first evalBatches batches), in order."""
    h = hashlib.sha256()
    for e in examples[: training.batch_size * training.eval_batches]:
        h.update(e.input_ids.tobytes())
        h.update(b"\0")
    return h.hexdigest()


def step_rate(training: TrainingSpec, rounds: int, r: int, k: int, i: int) -> float:
    """Step i of k in round r runs at the rate of local step i × localSteps // k."""
    return learning_rate(training, rounds, r, i * training.local_steps // k)


def share(total: int, parts: int, i: int) -> int:
    """Part i of `total` cut into `parts` shares as even as whole numbers allow (they add up to total)."""
    return total * (i + 1) // parts - total * i // parts


class Baseline:
    """The run's data, tokenizer and settings, ready to train either baseline."""

    def __init__(self, spec: FederatedFineTuneSpec) -> None:
        self.spec = spec
        self.tokenizer = build_tokenizer(spec)
        self.pad_id = int(self.tokenizer.pad_token_id)
        self.autocast = autocast_dtype(base_dtype(spec.model.dtype))
        self.splits = {c.name: load_splits(spec, c.name, self.tokenizer) for c in spec.clients}
        self.model = trainable_model(spec, self.tokenizer)
        self.initial = adapter_state(self.model)  # the round-0 global, restored for every job

    def jobs(self, mode: Mode) -> list[Job]:
        """The adapters a mode trains; their steps add up to the federation's."""
        names = list(self.splits)
        total = self.spec.aggregation.rounds * self.spec.clients_per_round * self.spec.training.local_steps
        if mode == Mode.LOCAL:
            return [Job(n, self.splits[n][0], [n], share(total, len(names), i)) for i, n in enumerate(names)]
        union = [e for n in names for e in self.splits[n][0]]
        return [Job(str(mode), union, names, total)]

    def score(self, clients: list[str]) -> dict[str, Scored]:
        out = {}
        for c in clients:
            loss, tokens = held_out_loss(self.model, self.spec, self.splits[c][1], self.pad_id, self.autocast)
            out[c] = Scored(loss, tokens)
        return out

    def train(self, job: Job) -> Trajectory:
        spec, t, rounds = self.spec, self.spec.training, self.spec.aggregation.rounds
        load_adapter(self.model, self.initial)
        out, kept, taken = [], None, 0
        for r in range(rounds):
            started = time.monotonic()
            evals = self.score(job.clients)
            k = share(job.steps, rounds, r)
            batches = d.train_batches(
                job.train, t.batch_size, k, f"{spec.seed}:{job.name}:{r}", self.pad_id, t.gradient_accumulation
            )
            rate = partial(step_rate, t, rounds, r, max(k, 1))
            trained = train(self.model, batches, local_options(spec, rate, self.autocast), kept) if k else None
            if trained is not None:
                kept = trained.moments if t.keep_optimizer_state else None
                taken += trained.steps
            loss = trained.loss if trained else None
            out.append(Round(evals, loss, time.monotonic() - started))
            log.info("%s round %d: %d steps, train_loss=%s", job.name, r, k, loss)
        return Trajectory(out, self.score(job.clients), taken)

    def run(self, mode: Mode, folder: Path) -> BaselineSummary:
        """Train the baseline; write metrics.json, loss.png and summary.json into folder/baselines/<mode>/."""
        done = [self.train(job) for job in self.jobs(mode)]
        final = {c: s for tr in done for c, s in tr.final.items()}
        out = folder / BASELINES / str(mode)
        out.mkdir(parents=True, exist_ok=True)
        clients = sorted(final)
        records = [
            record(r, clients, _mean([x.train_loss for x in at]), _scored([x.evals for x in at]))
            | {"seconds": round(sum(x.seconds for x in at), 3)}
            for r, at in enumerate(zip(*(tr.rounds for tr in done), strict=True))
        ]
        records.append(record(self.spec.aggregation.rounds, clients, None, _scored([final])))
        write_metrics(records, out)
        plot_loss(records, out)
        summary = BaselineSummary(
            mode=str(mode),
            seed=self.spec.seed,
            spec_key=baseline_key(self.spec),
            steps=sum(tr.steps for tr in done),
            client_steps={c: tr.steps for tr in done for c in tr.final},
            client_eval_loss={c: s.loss for c, s in final.items()},
            client_eval_tokens={c: s.tokens for c, s in final.items()},
            client_eval_sha256={c: scored_sha256(self.splits[c][1], self.spec.training) for c in final},
        )
        summary.write(out)
        return summary


def _mean(losses: list[float | None]) -> float | None:
    """The trainers' mean train loss in a round, over those that trained in it."""
    trained = [x for x in losses if x is not None]
    return sum(trained) / len(trained) if trained else None


def _scored(evals: list[dict[str, Scored]]) -> float | None:
    """The token-weighted mean eval loss over every client scored, as a round summary takes it."""
    scores = [s for e in evals for s in e.values()]
    tokens = sum(s.tokens for s in scores)
    return sum(s.loss * s.tokens for s in scores) / tokens if tokens else None
