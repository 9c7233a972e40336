"""The example on the test cluster: Jobs on two GPU pools, status as it runs, a peft-loadable result."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import torch

from fedtune.api import parse_resource
from fedtune.federation import protocol
from tests.cluster.harness.cluster import QUICKSTART_CLIENTS, Cluster
from tests.operator.conftest import Operator, Runs, quickstart, run_store

pytestmark = [pytest.mark.cluster, pytest.mark.slow]


def test_quickstart_runs_to_success(operator: Operator, runs: Runs, example_data: str, tmp_path: Path) -> None:
    cluster: Cluster = operator.cluster
    ns = operator.namespace
    operator.start()
    cluster.add_parties(ns, "quickstart", QUICKSTART_CLIENTS)  # one S3 account per party, the policy applied
    doc = quickstart()
    created = runs.create(doc)
    name = created["metadata"]["name"]

    running = runs.wait_state(name, "Running", timeout=60)
    table = cluster.kubectl("get", "fft", "-n", ns).stdout
    header = table.splitlines()[0].split()
    assert header == ["NAME", "STATE", "ROUND", "CLIENTS", "GPUS", "STRATEGY", "AGE"], table
    assert running["status"]["gpus"] == 3

    pods = cluster.core().list_namespaced_pod(ns, label_selector="fedtune.io/run=quickstart").items
    nodes = {p.metadata.labels.get("fedtune.io/client", "aggregator"): p.spec.node_name for p in pods}
    assert nodes["clinic"].startswith("gpu-a100") and nodes["bank"].startswith("gpu-a100")
    assert nodes["devops"].startswith("gpu-h100") and nodes["aggregator"].startswith("cpu")
    for p in pods:
        sc = p.spec.containers[0].security_context
        assert sc.allow_privilege_escalation is False and sc.capabilities.drop == ["ALL"]
        assert p.spec.security_context.run_as_non_root is True

    # Status follows a round within 10 s of its commit, then the run succeeds.
    store = run_store(cluster, running["status"])
    deadline = time.monotonic() + 300
    while not store.exists(protocol.global_marker(1)):
        assert time.monotonic() < deadline, "round 0 never closed"
        time.sleep(0.1)
    committed_at = time.monotonic()
    runs.wait(name, lambda s: s.get("completedRounds", 0) >= 1 and "lastRound" in s, 10, "round 1 in status")
    assert time.monotonic() - committed_at <= 10
    done = runs.wait_state(name, "Succeeded", timeout=400)
    status = done["status"]
    assert status["progress"] == "3/3"
    assert status["adapterURI"].startswith("s3://fedtune/runs/")
    reasons = {c["type"]: (c["status"], c["reason"]) for c in status["conditions"]}
    assert reasons["Succeeded"] == ("True", "RunSucceeded")
    assert status["observedGeneration"] == done["metadata"]["generation"]
    assert "AWS_SECRET_ACCESS_KEY" not in str(status)

    # The final adapter in the bucket loads with peft.
    assert cluster.s3 is not None
    s3 = cluster.s3.client()
    prefix = status["adapterURI"].removeprefix("s3://fedtune/")
    out = tmp_path / "adapter"
    out.mkdir()
    for f in ("adapter_model.safetensors", "adapter_config.json"):
        s3.download_file("fedtune", f"{prefix}/{f}", str(out / f))
    from peft import PeftModel

    from fedtune.training.model import build_base_model
    from fedtune.training.tokenizer import build_tokenizer

    spec = parse_resource({**doc, "metadata": {"name": name}}).spec
    tok = build_tokenizer(spec)
    model = PeftModel.from_pretrained(build_base_model(spec, len(tok)), str(out)).eval()
    ids = torch.tensor([tok("Patient presents with fever")["input_ids"]])
    with torch.no_grad():
        assert torch.isfinite(model(ids).logits).all()

    events = cluster.kubectl("get", "events", "-n", ns, "--field-selector", f"involvedObject.name={name}").stdout
    assert "RunSucceeded" in events
