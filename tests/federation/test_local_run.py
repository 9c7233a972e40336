"""`fedtune run` end to end: the loss falls, the adapter loads with peft, files a user expects exist."""

from __future__ import annotations

import io
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from rich.console import Console

from fedtune.aggregation.encoding import load_state
from fedtune.api import load_resource
from fedtune.federation import protocol as p
from fedtune.federation.records import Ledger
from fedtune.federation.run_config import RunConfig
from fedtune.federation.signing import client_party
from fedtune.local.identities import CONFIG, key_path, local_ledger
from fedtune.local.runner import LocalRun
from fedtune.training.model import build_base_model, build_model, load_adapter
from fedtune.training.tokenizer import build_tokenizer
from tests.federation.conftest import tiny_resource, write_data

pytestmark = pytest.mark.slow


def test_run_trains_and_writes_a_peft_adapter(tiny: Path, tmp_path: Path) -> None:
    out = tmp_path / "runs"
    final = LocalRun(tiny, output=out, console=Console(file=io.StringIO())).run(live=False)
    folder = out / "tiny"
    records = json.loads((folder / "metrics.json").read_text())
    assert [r["round"] for r in records] == [0, 1, 2, 3]
    assert all(r["bytes"] > 0 for r in records[:3])
    assert (folder / "loss.png").read_bytes()[:4] == b"\x89PNG"

    ledger = local_ledger(folder)
    store = ledger.store
    before = ledger.summary(0)
    assert before is not None
    for client, loss in final.client_eval_loss.items():
        assert loss < before.client_metrics[client].eval_loss, client

    # The final adapter loads with peft and reproduces the aggregator's global state exactly.
    from peft import PeftModel

    spec = load_resource(tiny).spec
    tok = build_tokenizer(spec)
    loaded = PeftModel.from_pretrained(build_base_model(spec, len(tok)), str(folder / p.FINAL)).eval()
    gm = ledger.global_marker(3)
    assert gm is not None and gm.final
    assert final.adapter_sha256 == p.sha256(store.get(p.FINAL_ADAPTER))
    reference = build_model(spec, tok).eval()
    load_adapter(reference, load_state(ledger.global_bytes(gm)))
    ids = torch.tensor([tok("the cat sat")["input_ids"]])
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, reference(ids).logits)
        untrained = build_model(spec, tok).eval()(ids).logits
    assert not torch.equal(untrained, reference(ids).logits)

    # Running the same spec again resumes a finished run: nothing committed is rewritten.
    def markers() -> dict[str, bytes]:
        keys = [k for k in store.list() if k.endswith(".json") and not k.startswith(p.LEASES)]
        return {k: store.get(k) for k in keys if not k.endswith("/ready.json")}

    before_resume = markers()
    LocalRun(tiny, output=out, console=Console(file=io.StringIO())).run(live=False)
    assert markers() == before_resume

    # `fedtune verify` checks every signature, digest and link, then names the first object that fails.
    ok = verify(folder)
    assert ok.returncode == 0 and f"final adapter sha256: {final.adapter_sha256}" in ok.stdout
    # A client that later re-signs another update in its own prefix cannot rewrite what was aggregated.
    config = RunConfig.load(folder / CONFIG)
    alpha = config.client_signer("alpha", key_path(folder, client_party("alpha")))
    marker = ledger.update_marker(1, "alpha")
    assert marker is not None
    other = b"another update"
    swapped = marker.model_copy(update={"sha256": p.sha256(other), "bytes": len(other)})
    store.put(p.update_data(1, "alpha", swapped.sha256), other)
    original = store.get(p.update_marker(1, "alpha"))
    store.put(p.update_marker(1, "alpha"), alpha.sign(p.update_marker(1, "alpha"), p.dumps(swapped)))
    bad = verify(folder)
    assert bad.returncode == 1 and "is not the update the round summary says was aggregated" in bad.stderr
    store.put(p.update_marker(1, "alpha"), original)
    victim = p.global_data(2, gm_sha(ledger, 2))
    store.put(victim, store.get(victim)[:-1] + b"\x00")
    bad = verify(folder)
    assert bad.returncode == 1
    assert bad.stderr.strip().startswith(f"error: {store.url(victim)}: sha256") and "does not match" in bad.stderr


def gm_sha(ledger: Ledger, r: int) -> str:
    gm = ledger.global_marker(r)
    assert gm is not None
    return gm.sha256


def verify(folder: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "fedtune", "verify", str(folder)], capture_output=True, text=True, timeout=60
    )


def test_run_over_a_real_s3_server(
    tmp_path: Path, s3_server: Any, s3_bucket: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`fedtune run` with its rounds in a bucket: the same protocol over HTTP."""
    monkeypatch.chdir(tmp_path)  # the run's local folder (keys, logs) is ./fedtune-runs/<name>
    for k, v in s3_server.env().items():
        monkeypatch.setenv(k, v)
    monkeypatch.delenv("AWS_ENDPOINT_URL", raising=False)
    monkeypatch.delenv("AWS_ENDPOINT_URL_S3", raising=False)
    write_data(tmp_path / "data")
    doc = tiny_resource(
        tmp_path / "data",
        aggregation={"rounds": 1},
        storage={"uri": f"s3://{s3_bucket}/runs", "endpoint": s3_server.endpoint},
    )
    spec = tmp_path / "s3.yaml"
    spec.write_text(yaml.safe_dump(doc))
    final = LocalRun(spec, console=Console(file=io.StringIO())).run(live=False)
    assert final.adapter == f"s3://{s3_bucket}/runs/tiny/coordinator/final"
    keys = {o["Key"] for o in s3_server.client().list_objects_v2(Bucket=s3_bucket)["Contents"]}
    assert {"runs/tiny/coordinator/spec.json", "runs/tiny/coordinator/final/adapter_model.safetensors"} <= keys
    # The private keys stay on this machine: nothing under config/ reaches the bucket.
    assert not any("/config/" in k or k.endswith(".pem") for k in keys)
    assert (tmp_path / "fedtune-runs" / "tiny" / "config" / "keys.json").exists()
