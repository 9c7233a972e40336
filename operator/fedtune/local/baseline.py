"""`fedtune baseline`: what the run's data would give without federating, to tell whether federating pays.

Both baselines train the run's model and adapter with the client's own data loading, AdamW settings
(schedule, weight decay, clipping, batch size, accumulation) and evaluation, on the same held-out
examples, for the optimizer steps the federation takes:

- the federation takes rounds × clientsPerRound × localSteps client steps in all;
- `centralized` takes that many steps in one process, on the union of the clients' training splits;
- `local` trains one adapter per client on its own split for rounds × localSteps steps: the steps the
  client takes when it is selected every round.

A baseline round is the steps the federation takes in one round (clientsPerRound × localSteps, or
localSteps for `local`): each is scored before it, like a global entering its round, AdamW restarts at
each unless spec.training.keepOptimizerState, and step i of a centralized round takes the rate of local
step i // clientsPerRound, so the schedule runs through the run at the federation's pace. Neither adds
FedProx's proximal term (there is no global to stay near) nor DP noise.
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections.abc import Iterator
from dataclasses import dataclass
from functools import partial
from itertools import islice
from pathlib import Path
from typing import Any

from fedtune.api import FederatedFineTuneSpec
from fedtune.api.spec import TrainingSpec
from fedtune.federation.client import held_out_loss, load_splits, local_options, trainable_model
from fedtune.local.report import BASELINES, BaselineSummary, Mode, plot_loss, write_metrics
from fedtune.training import data as d
from fedtune.training.model import base_dtype
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
    train_loss: float
    seconds: float


@dataclass(frozen=True)
class Trajectory:
    """One trainer's rounds, its clients' final scores and the optimizer steps it took."""

    rounds: list[Round]
    final: dict[str, Scored]
    steps: int


@dataclass(frozen=True)
class Job:
    """One adapter to train: on `train`, scored on the held-out split of each of `clients`."""

    name: str
    train: list[d.Example]
    clients: list[str]
    per_round: int  # clients' local steps in one round of the federation


def scored_sha256(examples: list[d.Example], training: TrainingSpec) -> str:
    """Digest of the token ids the evaluation scores (the first evalBatches batches), in order."""
    h = hashlib.sha256()
    for e in examples[: training.batch_size * training.eval_batches]:
        h.update(e.input_ids.tobytes())
        h.update(b"\0")
    return h.hexdigest()


def _rate(training: TrainingSpec, rounds: int, r: int, per_round: int, i: int) -> float:
    return learning_rate(training, rounds, r, i // per_round)


class Baseline:
    """The run's data, tokenizer and settings, ready to train either baseline."""

    def __init__(self, spec: FederatedFineTuneSpec) -> None:
        self.spec = spec
        self.tokenizer = build_tokenizer(spec)
        self.pad_id = int(self.tokenizer.pad_token_id)
        self.autocast = autocast_dtype(base_dtype(spec.model.dtype))
        self.splits = {c.name: load_splits(spec, c.name, self.tokenizer) for c in spec.clients}

    def jobs(self, mode: Mode) -> list[Job]:
        names = list(self.splits)
        if mode == Mode.LOCAL:
            return [Job(n, self.splits[n][0], [n], 1) for n in names]
        union = [e for n in names for e in self.splits[n][0]]
        return [Job(str(mode), union, names, self.spec.clients_per_round)]

    def score(self, model: Any, clients: list[str]) -> dict[str, Scored]:
        out = {}
        for c in clients:
            loss, tokens = held_out_loss(model, self.spec, self.splits[c][1], self.pad_id, self.autocast)
            out[c] = Scored(loss, tokens)
        return out

    def train(self, job: Job) -> Trajectory:
        spec, t, rounds = self.spec, self.spec.training, self.spec.aggregation.rounds
        model = trainable_model(spec, self.tokenizer)
        steps = job.per_round * t.local_steps
        seed = f"{spec.seed}:baseline:{job.name}"
        batches = d.train_batches(job.train, t.batch_size, rounds * steps, seed, self.pad_id, t.gradient_accumulation)
        out, kept, taken = [], None, 0
        for r in range(rounds):
            started = time.monotonic()
            evals = self.score(model, job.clients)
            options = local_options(spec, partial(_rate, t, rounds, r, job.per_round), self.autocast)
            trained = train(model, islice(batches, steps), options, kept)
            kept = trained.moments if t.keep_optimizer_state else None
            taken += trained.steps
            out.append(Round(evals, trained.loss, time.monotonic() - started))
            log.info("%s round %d: train_loss=%.4f", job.name, r, trained.loss)
        return Trajectory(out, self.score(model, job.clients), taken)

    def run(self, mode: Mode, folder: Path) -> BaselineSummary:
        """Train the baseline; write metrics.json, loss.png and summary.json into folder/baselines/<mode>/."""
        done = [self.train(job) for job in self.jobs(mode)]
        final = {c: s for tr in done for c, s in tr.final.items()}
        out = folder / BASELINES / str(mode)
        out.mkdir(parents=True, exist_ok=True)
        records = list(_records(done, self.spec.aggregation.rounds, final))
        write_metrics(records, out)
        plot_loss(records, out)
        steps = {c: tr.steps for tr in done for c in tr.final}
        summary = BaselineSummary(
            mode=str(mode),
            seed=self.spec.seed,
            steps=sum(tr.steps for tr in done),
            client_steps=steps,
            client_eval_loss={c: s.loss for c, s in final.items()},
            client_eval_tokens={c: s.tokens for c, s in final.items()},
            client_eval_sha256={c: scored_sha256(self.splits[c][1], self.spec.training) for c in final},
        )
        summary.write(out)
        return summary


def _mean(scores: dict[str, Scored]) -> float | None:
    tokens = sum(s.tokens for s in scores.values())
    return sum(s.loss * s.tokens for s in scores.values()) / tokens if tokens else None


def _records(done: list[Trajectory], rounds: int, final: dict[str, Scored]) -> Iterator[dict[str, Any]]:
    """metrics.json's records, shaped as a federated run's: round r joins every trainer's round r."""
    clients = sorted(final)
    for r in range(rounds):
        at = [tr.rounds[r] for tr in done]
        yield {
            "round": r,
            "participants": clients,
            "rejected": [],
            "train_loss": sum(x.train_loss for x in at) / len(at),
            "eval_loss": _mean({c: s for x in at for c, s in x.evals.items()}),
            "seconds": round(sum(x.seconds for x in at), 3),
            "bytes": 0,
            "epsilon": None,
        }
    yield {
        "round": rounds,
        "participants": clients,
        "rejected": [],
        "train_loss": None,
        "eval_loss": _mean(final),
        "seconds": 0.0,
        "bytes": 0,
        "epsilon": None,
    }
