"""A client with resources.gpus 2 runs itself under torchrun (two gloo ranks on a CPU) and sends the
update one process sends on the same data and seed."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from rich.console import Console

from fedtune.aggregation.encoding import decode
from fedtune.api import parse_resource
from fedtune.federation import protocol as p
from fedtune.federation.client import Client
from fedtune.federation.records import Ledger
from fedtune.local.identities import local_ledger
from fedtune.local.runner import LocalRun
from fedtune.storage.memory import MemoryStore
from fedtune.training.distributed import torchrun_argv
from fedtune.training.model import adapter_state
from tests.federation.conftest import tiny_resource, write_data
from tests.federation.parties import Parties

pytestmark = pytest.mark.slow


def resource(data: Path, gpus: int) -> dict[str, Any]:
    """Two clients, one round; alpha asks for `gpus` and accumulates two micro-batches per step."""
    doc = tiny_resource(
        data, training={"gradientAccumulation": 2, "batchSize": 4}, aggregation={"rounds": 1, "minClients": 2}
    )
    doc["spec"]["clients"] = doc["spec"]["clients"][:2]
    doc["spec"]["clients"][0]["resources"] = {"gpus": gpus}
    return doc


def one_process(data: Path) -> tuple[p.UpdateMarker, dict[str, torch.Tensor]]:
    """Alpha's round-0 update trained in this process, on the global a fresh run starts from."""
    spec = parse_resource(resource(data, 0)).spec
    parties = Parties(spec)
    store = MemoryStore("ddp-reference", "run")
    agg = parties.aggregator(store)
    gm = agg.publish_global(0, adapter_state(agg.model), {})
    client = Client(parties.client(store, "alpha"), spec, "alpha")
    client.train_round(client.prepare(gm, train=True))
    return committed(client.ledger, "alpha")


def committed(ledger: Ledger, client: str) -> tuple[p.UpdateMarker, dict[str, torch.Tensor]]:
    marker = ledger.update_marker(0, client)
    assert marker is not None
    return marker, decode(ledger.update_bytes(0, client, marker, marker.bytes))


def test_two_gloo_ranks_send_the_update_of_one_process(tmp_path: Path) -> None:
    write_data(tmp_path / "data")
    path = tmp_path / "gpus2.yaml"
    path.write_text(yaml.safe_dump(resource(tmp_path / "data", 2)))
    LocalRun(path, output=tmp_path / "runs", console=Console(file=io.StringIO())).run(live=False)
    folder = tmp_path / "runs" / "tiny"
    log = (folder / "logs" / "alpha.log").read_text()
    assert "rank 0 of 2 (gloo)" in log and "rank 1 of 2 (gloo)" in log  # relaunched under torchrun

    marker, update = committed(local_ledger(folder), "alpha")
    ref_marker, reference = one_process(tmp_path / "data")
    assert update.keys() == reference.keys() and marker.steps == ref_marker.steps == 4
    assert any(bool(v.abs().max() > 1e-4) for v in reference.values())  # it did train
    for k, v in reference.items():
        # Each rank scores half of every micro-batch; only float summation order differs.
        torch.testing.assert_close(update[k], v, rtol=1e-5, atol=1e-7)
    assert marker.metrics.train_loss == pytest.approx(ref_marker.metrics.train_loss, rel=1e-6)
    assert marker.metrics.eval_loss == pytest.approx(ref_marker.metrics.eval_loss, rel=1e-6)


def test_the_relaunch_runs_this_same_command_once_per_gpu() -> None:
    argv = torchrun_argv(4, ["client", "--name", "alpha"])
    assert argv[1:] == [
        "-m",
        "torch.distributed.run",
        "--nproc-per-node",
        "4",
        "--standalone",
        "-m",
        "fedtune",
        "client",
        "--name",
        "alpha",
    ]
