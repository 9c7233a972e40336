"""A client may not list the bucket, so S3 answers its read of a missing key with 403: read as absent."""

from __future__ import annotations

import boto3
import pytest
from botocore.stub import Stubber

from fedtune.storage import ObjectNotFound, StorageError
from fedtune.storage.s3 import S3Store


def stubbed(*errors: tuple[str, str, int]) -> S3Store:
    client = boto3.client("s3", region_name="us-east-1", aws_access_key_id="a", aws_secret_access_key="b")
    stub = Stubber(client)
    for method, code, status in errors:
        stub.add_client_error(method, service_error_code=code, http_status_code=status)
    stub.activate()
    return S3Store("bucket", "run", client=client, retry_seconds=0)


def test_a_denied_read_is_a_missing_key_and_is_logged_once(caplog: pytest.LogCaptureFixture) -> None:
    store = stubbed(("head_object", "AccessDenied", 403), ("get_object", "AccessDenied", 403))
    assert store.exists("coordinator/rounds/000001/global.json") is False
    with pytest.raises(ObjectNotFound):
        store.get("coordinator/rounds/000001/global.json")
    assert sum("access denied, read as absent" in r.message for r in caplog.records) == 1


def test_a_denied_write_is_an_error() -> None:
    store = stubbed(("put_object", "AccessDenied", 403))
    with pytest.raises(StorageError, match="AccessDenied"):
        store.put("clients/beta/x.json", b"{}")
