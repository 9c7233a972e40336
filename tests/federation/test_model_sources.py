"""A pretrained base model from a folder or from an object store: runs load exactly the saved weights and
tokenizer with the hub switched off, and a tampered, re-pinned or unreachable model is one clear error."""

from __future__ import annotations

import hashlib
import io
import json
import os
import random
import shutil
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from botocore.exceptions import ClientError
from rich.console import Console

from fedtune.api import parse_resource
from fedtune.api.spec import DataSpec
from fedtune.errors import FedtuneError
from fedtune.federation.policy import bucket_policy
from fedtune.local.runner import LocalRun, resolve_paths
from fedtune.storage import open_store
from fedtune.training import model_store
from fedtune.training.adapter_only import build_adapter_only
from fedtune.training.data import Record, tokenize
from fedtune.training.model import adapter_state, build_base_model
from fedtune.training.sources import resolve_model
from fedtune.training.tokenizer import BYTE_CHAT_TEMPLATE, build_tokenizer, byte_tokenizer
from tests.cluster.harness.s3 import S3Server
from tests.federation.conftest import tiny_resource, write_data

pytestmark = pytest.mark.slow
# The tiny federation's model, as a transformers config.
TINY = {k: v for k, v in tiny_resource(Path())["spec"]["model"]["config"].items() if k != "modelType"}


def save_tiny_model(folder: Path) -> dict[str, torch.Tensor]:
    """A one-layer Llama and the byte tokenizer saved with save_pretrained; returns the saved weights."""
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = byte_tokenizer()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(7)
        model = LlamaForCausalLM(LlamaConfig(vocab_size=len(tok), **TINY))
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return {k: v.clone() for k, v in model.state_dict().items()}


@pytest.fixture(scope="module")
def saved(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, torch.Tensor]]:
    folder = tmp_path_factory.mktemp("tiny-llama")
    return folder, save_tiny_model(folder)


@pytest.fixture(autouse=True)
def offline(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """No hub for any process of these tests; a cache of the test's own; no model volume."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("FEDTUNE_MODEL_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("FEDTUNE_MODEL_ROOT", raising=False)
    monkeypatch.setenv("FEDTUNE_STORAGE_RETRY_SECONDS", "2")
    return tmp_path / "cache"


def with_model(data_dir: Path, model: dict[str, Any], **spec: Any) -> dict[str, Any]:
    """The tiny federation with this model, its tokenizer the model's own."""
    doc = tiny_resource(data_dir, **spec)
    doc["spec"]["model"] = model
    del doc["spec"]["tokenizer"]
    return doc


def short_run(tmp_path: Path, model: dict[str, Any], **spec: Any) -> Path:
    """The tiny federation with this model, for one round of two steps."""
    write_data(tmp_path / "data")
    doc = with_model(
        tmp_path / "data", model, training={"localSteps": 2}, aggregation={"rounds": 1, "minClients": 2}, **spec
    )
    doc["spec"]["clients"] = doc["spec"]["clients"][:2]
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(doc))
    return path


def run_to_success(spec: Path, tmp_path: Path) -> None:
    final = LocalRun(spec, output=tmp_path / "runs", console=Console(file=io.StringIO())).run(live=False)
    assert final.failed is None and final.rounds == 1


def spec_of(path: Path) -> Any:
    return parse_resource(yaml.safe_load(path.read_text())).spec


def assert_same_weights(spec: Any, saved: dict[str, torch.Tensor]) -> None:
    loaded = build_base_model(spec, 0).state_dict()
    assert loaded.keys() == saved.keys()
    assert all(torch.equal(loaded[k], saved[k]) for k in saved)


def test_a_run_loads_a_model_folder_relative_to_its_spec(
    saved: tuple[Path, dict[str, torch.Tensor]], tmp_path: Path
) -> None:
    folder, weights = saved
    (tmp_path / "models").mkdir()
    (tmp_path / "models" / "tiny").symlink_to(folder)
    spec_file = short_run(tmp_path, {"path": "models/tiny"})
    run_to_success(spec_file, tmp_path)

    # The run reads the folder by its absolute path, and it holds exactly the saved weights and tokenizer.
    run_spec = resolve_paths(spec_of(spec_file), spec_file.parent)
    assert run_spec.model.path == str((tmp_path / "models" / "tiny").resolve())
    assert_same_weights(run_spec, weights)
    tok = build_tokenizer(run_spec)
    assert len(tok) == len(byte_tokenizer()) and tok.chat_template == BYTE_CHAT_TEMPLATE
    # Chat data renders with the saved tokenizer's own template; loss on the assistant's turn only.
    chat = Record({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}, "t")
    (example,) = tokenize([chat], DataSpec(uri="x", format="chat"), tok, 64, "spec.clients[0].data")
    taught = tok.decode([int(i) for i, label in zip(example.input_ids, example.labels, strict=True) if label >= 0])
    assert taught == "yo" + tok.eos_token


def test_a_missing_or_unsaved_model_folder_names_spec_model_path(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    doc = with_model(tmp_path, {"path": str(tmp_path / "none")})
    with pytest.raises(FedtuneError, match=r"^spec\.model\.path: .*/none: no such folder$"):
        resolve_model(parse_resource(doc).spec)
    (tmp_path / "empty").mkdir()
    doc["spec"]["model"]["path"] = str(tmp_path / "empty")
    with pytest.raises(FedtuneError, match=r"^spec\.model\.path: .*/empty: no config\.json"):
        resolve_model(parse_resource(doc).spec)
    # In a pod the path is inside the mounted model volume.
    monkeypatch.setenv("FEDTUNE_MODEL_ROOT", str(tmp_path))
    doc["spec"]["model"]["path"] = "/missing"
    with pytest.raises(FedtuneError, match=r"^spec\.model\.path: /missing: no such folder in the model volume"):
        resolve_model(parse_resource(doc).spec)


def push(folder: Path, uri: str, server: S3Server) -> str:
    """`fedtune model push`, as a user runs it; returns the digest it prints."""
    out = subprocess.run(
        [sys.executable, "-m", "fedtune", "model", "push", str(folder), uri, "--endpoint", server.endpoint],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr
    return out.stdout.strip()


@pytest.fixture
def s3_env(s3_server: S3Server, monkeypatch: pytest.MonkeyPatch) -> S3Server:
    for k, v in s3_server.env().items():
        monkeypatch.setenv(k, v)
    return s3_server


def uri_spec(uri: str, server: S3Server, sha256: str | None = None, endpoint: str | None = None) -> Any:
    model = {"uri": uri, "sha256": sha256 or "0" * 64}
    return parse_resource(with_model(Path("/unused"), model, storage={"endpoint": endpoint or server.endpoint})).spec


def test_a_pushed_model_runs_from_s3_pinned_and_is_downloaded_once(
    saved: tuple[Path, dict[str, torch.Tensor]], s3_env: S3Server, s3_bucket: str, tmp_path: Path, offline: Path
) -> None:
    folder, weights = saved
    uri = f"s3://{s3_bucket}/models/tiny"
    digest = push(folder, uri, s3_env)
    s3 = s3_env.client()
    manifest = s3.get_object(Bucket=s3_bucket, Key=f"models/tiny/{model_store.MANIFEST}")["Body"].read()
    assert hashlib.sha256(manifest).hexdigest() == digest
    files = json.loads(manifest)["files"]
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= set(files)
    assert files["model.safetensors"]["bytes"] == (folder / "model.safetensors").stat().st_size

    spec_file = short_run(tmp_path, {"uri": uri, "sha256": digest}, storage={"endpoint": s3_env.endpoint})
    run_to_success(spec_file, tmp_path)
    # One verified copy, and the config and tokenizer alone (the aggregator's); no partial folder left.
    assert sorted(p.name for p in offline.iterdir()) == [digest, f"{digest}-config"]
    assert not any(name.endswith(".safetensors") for name in os.listdir(offline / f"{digest}-config"))
    spec = spec_of(spec_file)
    assert_same_weights(spec, weights)
    assert build_tokenizer(spec).chat_template == BYTE_CHAT_TEMPLATE

    # A complete cached copy is used as it is: only the manifest is read again.
    for name in files:
        s3.delete_object(Bucket=s3_bucket, Key=f"models/tiny/{name}")
    source = resolve_model(spec)
    assert source is not None and source.location == str(offline / digest) and source.local_files_only


def test_the_aggregator_downloads_no_weights(
    saved: tuple[Path, dict[str, torch.Tensor]], s3_env: S3Server, s3_bucket: str, offline: Path
) -> None:
    """It builds the adapter from the config alone: a model's gigabytes of weights stay in the bucket."""
    folder, _ = saved
    uri = f"s3://{s3_bucket}/models/tiny"
    digest = push(folder, uri, s3_env)
    spec = uri_spec(uri, s3_env, digest)
    model = build_adapter_only(spec, len(build_tokenizer(spec)))
    assert adapter_state(model)
    assert os.listdir(offline) == [f"{digest}-config"]
    assert "model.safetensors" not in os.listdir(offline / f"{digest}-config")


def test_every_party_reads_the_model_under_the_runs_bucket_policy(
    saved: tuple[Path, dict[str, torch.Tensor]], s3_env: S3Server, s3_bucket: str, tmp_path: Path
) -> None:
    folder, _ = saved
    # A file past the multipart threshold: pushed in parts, verified whole.
    shutil.copytree(folder, tmp_path / "big")
    (tmp_path / "big" / "extra.bin").write_bytes(random.Random(0).randbytes(9 << 20))
    uri = f"s3://{s3_bucket}/models/tiny"
    digest = push(tmp_path / "big", uri, s3_env)
    aggregator, client = (s3_env.add_account(f"{s3_bucket}-{party}") for party in ("aggregator", "alpha"))
    policy = bucket_policy(f"s3://{s3_bucket}/runs/tiny", aggregator[0], {"alpha": client[0]}, uri)
    s3_env.put_policy(s3_bucket, policy)
    as_client = open_store(uri, endpoint=s3_env.endpoint, credentials=client)
    fetched = model_store.fetch(as_client, tmp_path / "alpha-cache", digest)
    assert fetched == tmp_path / "alpha-cache" / digest
    assert (fetched / "extra.bin").read_bytes() == (tmp_path / "big" / "extra.bin").read_bytes()
    with pytest.raises(ClientError, match="AccessDenied"):
        s3_env.client(*client).list_objects_v2(Bucket=s3_bucket, Prefix="models/")


def test_a_copy_planted_in_a_shared_cache_is_never_loaded(
    saved: tuple[Path, dict[str, torch.Tensor]],
    s3_env: S3Server,
    s3_bucket: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Whoever else mounts the cache may write it: a cached copy is checked against the pinned manifest
    on every load, and one that does not match (a link elsewhere, a changed file) is replaced."""
    folder, _ = saved
    uri = f"s3://{s3_bucket}/models/tiny"
    digest = push(folder, uri, s3_env)
    store, cache = open_store(uri, endpoint=s3_env.endpoint), tmp_path / "cache"
    genuine = (folder / "config.json").read_bytes()
    planted = tmp_path / "planted"
    shutil.copytree(folder, planted)
    (planted / "config.json").write_text("{}")
    cache.mkdir()
    (cache / digest).symlink_to(planted)
    fetched = model_store.fetch(store, cache, digest)
    assert not fetched.is_symlink() and (fetched / "config.json").read_bytes() == genuine
    assert (planted / "config.json").read_text() == "{}"  # the link was replaced, not followed
    (fetched / "config.json").write_text("{}")
    monkeypatch.setattr(model_store, "_checked", set())  # as a new process: it has checked nothing yet
    fetched = model_store.fetch(store, cache, digest)
    assert (fetched / "config.json").read_bytes() == genuine
    assert sorted(p.name for p in cache.iterdir()) == [digest]


def test_a_tampered_file_leaves_no_cached_copy(
    saved: tuple[Path, dict[str, torch.Tensor]], s3_env: S3Server, s3_bucket: str, offline: Path
) -> None:
    folder, _ = saved
    uri = f"s3://{s3_bucket}/models/tiny"
    digest = push(folder, uri, s3_env)
    s3 = s3_env.client()
    config = json.loads((folder / "config.json").read_text())
    s3.put_object(Bucket=s3_bucket, Key="models/tiny/config.json", Body=json.dumps({**config, "num_hidden_layers": 9}))
    with pytest.raises(FedtuneError) as e:
        resolve_model(uri_spec(uri, s3_env, digest))
    assert str(e.value).startswith(f"spec.model.uri: {uri}/config.json does not match the manifest (")
    assert str(e.value).endswith("): it was changed after the push")
    assert list(offline.iterdir()) == []


def test_a_replaced_manifest_fails_the_pin(
    saved: tuple[Path, dict[str, torch.Tensor]], s3_env: S3Server, s3_bucket: str, offline: Path
) -> None:
    folder, _ = saved
    uri = f"s3://{s3_bucket}/models/tiny"
    pinned = push(folder, uri, s3_env)
    (extra := offline.parent / "other").mkdir()
    for f in folder.iterdir():
        (extra / f.name).write_bytes(f.read_bytes())
    (extra / "README.md").write_text("another model")
    repushed = push(extra, uri, s3_env)
    with pytest.raises(FedtuneError) as e:
        resolve_model(uri_spec(uri, s3_env, pinned))
    assert str(e.value) == (
        f"spec.model.sha256: the manifest at {uri}/{model_store.MANIFEST} has sha256 {repushed}, not the pinned "
        f"{pinned} (the model at the prefix was pushed again or replaced)"
    )
    assert not offline.exists()


def test_a_missing_model_or_unreachable_store_names_spec_model_uri(s3_env: S3Server, s3_bucket: str) -> None:
    uri = f"s3://{s3_bucket}/models/none"
    with pytest.raises(FedtuneError, match=rf"^spec\.model\.uri: {uri}/fedtune-model\.json not found: push"):
        resolve_model(uri_spec(uri, s3_env))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        closed = f"http://127.0.0.1:{s.getsockname()[1]}"
    with pytest.raises(
        FedtuneError, match=rf"^spec\.model\.uri: {uri}/fedtune-model\.json: cannot reach the S3 server at {closed}"
    ):
        resolve_model(uri_spec(uri, s3_env, endpoint=closed))


def test_fedtune_model_push_refuses_a_folder_without_a_saved_model(tmp_path: Path) -> None:
    out = subprocess.run(
        [sys.executable, "-m", "fedtune", "model", "push", str(tmp_path), f"file://{tmp_path}/store"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 1
    assert out.stderr.strip() == f"error: {tmp_path}: no config.json: not a folder saved with save_pretrained"


def test_a_manifest_cannot_write_outside_the_cache(saved: tuple[Path, dict[str, torch.Tensor]], tmp_path: Path) -> None:
    folder, _ = saved
    store = open_store(f"file://{tmp_path}/store")
    digest = model_store.push(folder, store)
    assert model_store.fetch(store, tmp_path / "cache", digest) == tmp_path / "cache" / digest
    # Whoever can write the prefix can write a manifest; a name leaving the folder is refused unpinned too.
    doc = json.loads(store.get(model_store.MANIFEST))
    doc["files"]["../../escaped"] = doc["files"].pop("config.json")
    store.put(model_store.MANIFEST, json.dumps(doc).encode())
    with pytest.raises(FedtuneError, match=r"^spec\.model\.uri: .* file name '\.\./\.\./escaped' is not a relative"):
        model_store.fetch(store, tmp_path / "cache")
    assert not (tmp_path / "escaped").exists()
