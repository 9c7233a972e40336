"""s3:// against a real S3-compatible server: restarts are ridden out, unreachable servers named."""

from __future__ import annotations

import threading
from typing import Any

import pytest

from fedtune.storage import StorageError
from fedtune.storage.s3 import S3Store


@pytest.fixture
def s3_env(s3_server: Any, monkeypatch: pytest.MonkeyPatch) -> Any:
    for k, v in s3_server.env().items():
        monkeypatch.setenv(k, v)
    return s3_server


def test_a_write_during_a_server_restart_is_retried_until_it_lands(s3_env: Any, s3_bucket: str) -> None:
    store = S3Store(s3_bucket, "r", endpoint=s3_env.endpoint, retry_seconds=60)
    store.put("before", b"1")
    s3_env.stop()
    result: list[bool] = []
    writer = threading.Thread(target=lambda: result.append(store.put_if_absent("during", b"2")))
    writer.start()
    s3_env.start()
    writer.join(timeout=90)
    assert result == [True]
    assert store.get("before") == b"1" and store.get("during") == b"2"


def test_unreachable_server_gives_one_clear_error(s3_env: Any) -> None:
    store = S3Store("bucket", endpoint="http://127.0.0.1:9", retry_seconds=1)
    with pytest.raises(StorageError, match=r"cannot reach the S3 server at http://127.0.0.1:9"):
        store.check()


def test_missing_bucket_is_named(s3_env: Any) -> None:
    store = S3Store("no-such-bucket-here", endpoint=s3_env.endpoint, retry_seconds=5)
    with pytest.raises(StorageError, match="no-such-bucket-here"):
        store.put("k", b"v")
