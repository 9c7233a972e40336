"""pytest fixtures for tests that need the real S3 server or the whole test cluster.

Load with ``pytest_plugins = ["tests.cluster.fixtures"]``. Fixtures:

- ``s3_server`` (session): a running ``S3Server``; ``.endpoint``, ``.access_key``, ``.secret_key``,
  ``.region``, ``.client()`` (boto3), ``.stop()``, ``.start()``, ``.restart()``, ``.env()``.
- ``s3_bucket`` (function): the name of a fresh, empty bucket on ``s3_server``.
- ``cluster`` (session): a running ``Cluster`` (control plane, GPU node pools, node agent, S3);
  ``.kubeconfig``, ``.core()``, ``.batch()``, ``.kubectl(...)``, fault injection
  (``kill_pod``, ``make_node_not_ready``, ``delete_node``, ``stop_s3`` ...).
- ``namespace`` (function): a fresh namespace holding the ``fedtune-s3`` Secret, deleted afterwards.
"""

from __future__ import annotations

import os
import secrets
from collections.abc import Iterator

import pytest

from .harness import build
from .harness.cluster import Cluster
from .harness.procs import wait_for
from .harness.s3 import S3Server


def _require_binaries(*names: str) -> None:
    missing = [n for n, path in build.binaries().items() if n in names and not path.is_file()]
    if missing:
        message = f"cluster binaries not built ({', '.join(missing)}): run `make cluster-deps`"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[S3Server]:
    """A real S3 server on loopback for the whole session; a test that stops it must start it again."""
    _require_binaries("versitygw")
    server = S3Server(tmp_path_factory.mktemp("s3")).start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def s3_bucket(s3_server: S3Server) -> str:
    """A new empty bucket on the session's S3 server."""
    if not s3_server.running:
        s3_server.start()
    return s3_server.create_bucket("t-" + secrets.token_hex(6))


@pytest.fixture(scope="session")
def cluster(tmp_path_factory: pytest.TempPathFactory, s3_server: S3Server) -> Iterator[Cluster]:
    """The test cluster, started once per session from cached binaries and stopped at the end."""
    _require_binaries(*build.binaries())
    c = Cluster(tmp_path_factory.mktemp("cluster"), s3=s3_server).start()
    try:
        yield c
    finally:
        c.stop()


@pytest.fixture
def namespace(cluster: Cluster, request: pytest.FixtureRequest) -> Iterator[str]:
    """A namespace of its own for one test, with the fedtune-s3 Secret; deleted after the test."""
    if cluster.s3 is not None and not cluster.s3.running:
        cluster.s3.start()
    stem = "".join(ch if ch.isalnum() else "-" for ch in request.node.name.lower())[:40].strip("-")
    name = f"{stem}-{secrets.token_hex(3)}"
    core = cluster.core()
    core.create_namespace({"metadata": {"name": name}})
    cluster.put_s3_secret(name)
    wait_for(
        lambda: core.read_namespaced_service_account("default", name),
        30,
        f"service account default in {name}",
    )
    try:
        yield name
    finally:
        core.delete_namespace(name)
