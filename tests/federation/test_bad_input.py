"""Bad input gives one line naming what is wrong; a bad update never reaches the global."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml

from fedtune.aggregation.encoding import encode
from fedtune.api import parse_resource
from fedtune.storage import open_store
from fedtune.training.model import adapter_state
from tests.federation.conftest import tiny_resource, write_data
from tests.federation.parties import Parties, submit_update


def fedtune_run(spec: dict[str, Any], tmp_path: Path, **env: str) -> subprocess.CompletedProcess[str]:
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(spec))
    return subprocess.run(
        [sys.executable, "-m", "fedtune", "run", str(path), "--output", str(tmp_path / "runs"), "--no-live"],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, **env},
    )


def one_line_error(out: subprocess.CompletedProcess[str]) -> str:
    assert out.returncode == 1, out.stdout + out.stderr
    assert "Traceback" not in out.stderr
    lines = [ln for ln in out.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1, out.stderr
    assert lines[0].startswith("error: ")
    return lines[0]


@pytest.fixture
def data(tmp_path: Path) -> Path:
    write_data(tmp_path / "data")
    return tmp_path / "data"


def test_invalid_spec(tmp_path: Path, data: Path) -> None:
    line = one_line_error(fedtune_run(tiny_resource(data, aggregation={"minClients": 7}), tmp_path))
    assert "spec.aggregation.minClients" in line


def test_missing_data_file(tmp_path: Path, data: Path) -> None:
    (data / "beta.jsonl").unlink()
    line = one_line_error(fedtune_run(tiny_resource(data), tmp_path))
    assert "spec.clients[1].data.uri" in line and "beta.jsonl not found" in line


def test_malformed_jsonl_line(tmp_path: Path, data: Path) -> None:
    with (data / "gamma.jsonl").open("a") as f:
        f.write('{"text": "ok"}\n{"text": unquoted}\n')
    line = one_line_error(fedtune_run(tiny_resource(data), tmp_path))
    assert "spec.clients[2].data.uri" in line and "line 42: invalid JSON" in line


def test_unreachable_storage(tmp_path: Path, data: Path) -> None:
    spec = tiny_resource(data, storage={"uri": "s3://bucket/runs", "endpoint": "http://127.0.0.1:9"})
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(spec))
    out = subprocess.run(
        [sys.executable, "-m", "fedtune", "run", str(path), "--no-live"],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=tmp_path,
        env={
            **os.environ,
            "FEDTUNE_STORAGE_RETRY_SECONDS": "1",
            "AWS_ACCESS_KEY_ID": "x",
            "AWS_SECRET_ACCESS_KEY": "y",
        },
    )
    line = one_line_error(out)
    assert "s3://bucket/runs/tiny" in line and "cannot reach the S3 server at http://127.0.0.1:9" in line


def test_tampered_or_broken_updates_are_rejected_and_never_averaged(data: Path) -> None:
    spec = parse_resource(tiny_resource(data, aggregation={"roundTimeoutSeconds": 60, "minClients": 1})).spec
    store = open_store("memory://tamper/run")
    parties = Parties(spec)
    agg = parties.aggregator(store)
    gm = agg.publish_global(0, adapter_state(agg.model), {})
    state, _ = agg.load_global(gm)
    keys = agg.trainable
    good = {k: torch.full_like(state[k], 0.01) for k in keys}

    def submit(client: str, delta: dict[str, torch.Tensor], tamper: bool = False) -> None:
        payload = encode(delta)
        submit_update(parties.client(store, client), gm, client, payload, stored=payload + (b"x" if tamper else b""))

    submit("alpha", good)
    submit("beta", good, tamper=True)
    submit("gamma", {k: v.clone().fill_(float("nan")) for k, v in good.items()})
    agg.close_round(gm)

    summary = agg.ledger.summary(0)
    assert summary is not None
    assert summary.participants == ["alpha"]
    reasons = {r.client: r.reason for r in summary.rejected}
    assert "does not match its marker" in reasons["beta"]
    assert "non-finite" in reasons["gamma"]
    nxt = agg.read_global_marker(1)
    new, _ = agg.load_global(nxt)
    for k in keys:
        torch.testing.assert_close(new[k], state[k] + 0.01, rtol=0, atol=1e-6)


def test_too_few_valid_updates_keep_the_global(data: Path) -> None:
    spec = parse_resource(tiny_resource(data, aggregation={"minClients": 2})).spec
    store = open_store("memory://few/run")
    parties = Parties(spec)
    agg = parties.aggregator(store)
    gm = agg.publish_global(0, adapter_state(agg.model), {})
    for client in gm.selected:
        submit_update(parties.client(store, client), gm, client, b"not safetensors")
    agg.close_round(gm)
    assert agg.read_global_marker(1).sha256 == gm.sha256
    summary = agg.ledger.summary(0)
    assert summary is not None and summary.participants == []
    # Too small to be an update of this adapter: refused on its size, before a byte of it is read.
    assert summary.rejected and all("an update of this adapter in fp32 has" in r.reason for r in summary.rejected)
    assert summary.failed == "0 valid updates, fewer than minClients=2"


@pytest.mark.parametrize(
    ("key", "says"),
    [
        (None, "client alpha's signing key: cannot read"),
        (b"-----BEGIN PRIVATE KEY-----\nnot a key\n", "client alpha's signing key: not a PEM private key"),
        ("beta", "keys.json: clients.alpha: ed25519:"),  # another party's key: does not match alpha's pin
    ],
)
def test_a_missing_malformed_or_mismatched_key_is_one_line(
    tmp_path: Path, data: Path, key: bytes | str | None, says: str
) -> None:
    from fedtune.api import load_resource
    from fedtune.federation.signing import client_party
    from fedtune.local.identities import CONFIG, key_path, local_config

    spec = tmp_path / "spec.yaml"
    spec.write_text(yaml.safe_dump(tiny_resource(data)))
    root = tmp_path / "root"
    local_config(root, load_resource(spec))
    key_file = tmp_path / "alpha.pem"
    if key == "beta":
        key_file = key_path(root, client_party("beta"))
    elif key is not None:
        key_file.write_bytes(key)  # type: ignore[arg-type]
    argv = ["client", "--name", "alpha", "--run-root", str(root), "--config", str(root / CONFIG)]
    out = subprocess.run(
        [sys.executable, "-m", "fedtune", *argv, "--signing-key", str(key_file)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    line = one_line_error(out).removeprefix("error: ")
    assert line.startswith(says), line
    if key == "beta":
        assert "does not match the private key in" in line
