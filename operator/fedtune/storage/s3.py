"""s3:// stores on boto3: S3 and S3-compatible servers (MinIO, versitygw, Ceph)."""

from __future__ import annotations

import functools
import logging
import os
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import boto3
from boto3.exceptions import S3UploadFailedError
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError, NoCredentialsError
from tenacity import Retrying, retry_if_exception, stop_after_delay, wait_exponential_jitter

from fedtune.storage.base import CHUNK_BYTES, ObjectNotFound, ObjectStore, ObjectTooLarge, StorageError, join

T = TypeVar("T")

_TRANSIENT_CODES = {
    "500",
    "502",
    "503",
    "504",
    "SlowDown",
    "RequestTimeout",
    "InternalError",
    "ServiceUnavailable",
}
_MISSING_CODES = {"404", "NoSuchKey", "NotFound"}
# S3 answers a read of a missing key with 403 to a caller that may not list the bucket (a client, under
# the run's bucket policy), so for reads a denial may mean "absent": it is read so, with a warning once.
_DENIED_CODES = {"403", "AccessDenied"}
log = logging.getLogger("fedtune.storage")


def _code(exc: ClientError) -> str:
    return str(exc.response.get("Error", {}).get("Code"))


def _transient(exc: BaseException) -> bool:
    if isinstance(exc, ClientError):
        return str(exc.response.get("Error", {}).get("Code")) in _TRANSIENT_CODES
    return isinstance(exc, BotoCoreError) and not isinstance(exc, NoCredentialsError)


_session_lock = threading.Lock()


def _new_client(endpoint: str | None, region: str, credentials: tuple[str, str] | None) -> Any:
    """The S3 client for an endpoint and credentials, shared by every store that uses them."""
    token = None
    if credentials is None and os.environ.get("AWS_ACCESS_KEY_ID") and os.environ.get("AWS_SECRET_ACCESS_KEY"):
        # Read now, not from a session's credential chain, which caches what it first found.
        credentials = (os.environ["AWS_ACCESS_KEY_ID"], os.environ["AWS_SECRET_ACCESS_KEY"])
        token = os.environ.get("AWS_SESSION_TOKEN") or None  # temporary (STS) credentials need theirs
    return _shared_client(endpoint, region, credentials, token)


@functools.lru_cache(maxsize=64)
def _shared_client(endpoint: str | None, region: str, credentials: tuple[str, str] | None, token: str | None) -> Any:
    """One client per endpoint, region and credentials, from the process's one session: service models
    load once, and the operator's many runs on one bucket share a client and its connection pool (clients
    are thread-safe; sessions are not, hence the lock)."""
    key_id, secret = credentials or (None, None)
    with _session_lock:
        return _session().client(
            "s3",
            endpoint_url=endpoint,
            region_name=region,
            aws_access_key_id=key_id,
            aws_secret_access_key=secret,
            aws_session_token=token,
            config=Config(
                retries={"mode": "standard", "max_attempts": 2},
                connect_timeout=5,
                read_timeout=60,
                s3={"addressing_style": "path"},
            ),
        )


@functools.cache
def _session() -> boto3.session.Session:
    return boto3.session.Session()


def forget_clients() -> None:
    """Drop the shared session and clients, so the next store makes new ones: for code that swaps the
    transport underneath (an in-process S3 stand-in hooks only sessions made after it starts)."""
    _session.cache_clear()
    _shared_client.cache_clear()


class S3Store(ObjectStore):
    """Transient failures (a restarting server, a dropped connection) are retried until a deadline."""

    def __init__(
        self,
        bucket: str,
        prefix: str = "",
        endpoint: str | None = None,
        region: str | None = None,
        retry_seconds: float | None = None,
        client: Any = None,
        credentials: tuple[str, str] | None = None,
    ) -> None:
        self.bucket, self.prefix = bucket, prefix.strip("/")
        super().__init__(f"s3://{join(bucket, self.prefix)}")
        self.endpoint = endpoint or os.environ.get("FEDTUNE_S3_ENDPOINT") or os.environ.get("AWS_ENDPOINT_URL")
        self.region = region or os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION") or "us-east-1"
        if retry_seconds is None:
            retry_seconds = float(os.environ.get("FEDTUNE_STORAGE_RETRY_SECONDS", "120"))
        self.retry_seconds = retry_seconds
        self._warned = False
        self._client = client or _new_client(self.endpoint, self.region, credentials)

    def _k(self, key: str) -> str:
        return join(self.prefix, key)

    def _absent(self, key: str, code: str) -> bool:
        """Whether an error code on a read means the key is absent."""
        if code in _MISSING_CODES:
            return True
        if code in _DENIED_CODES:
            if not self._warned:
                log.warning("%s: access denied, read as absent (if it exists, check the bucket policy)", self.url(key))
                self._warned = True
            return True
        return False

    def _read(self, key: str, fn: Callable[[], T]) -> T:
        try:
            return self._call(key, fn)
        except StorageError as e:
            if isinstance(e.__cause__, ClientError) and self._absent(key, _code(e.__cause__)):
                raise ObjectNotFound(f"{self.url(key)}: not found") from None
            raise

    def _count_retry(self, _state: object) -> None:
        self.retried += 1

    def _call(self, key: str, fn: Callable[[], T]) -> T:
        retrying = Retrying(
            retry=retry_if_exception(_transient),
            stop=stop_after_delay(self.retry_seconds),
            wait=wait_exponential_jitter(initial=0.2, max=5),
            before_sleep=self._count_retry,
            reraise=True,
        )
        try:
            return retrying(fn)
        except ClientError as e:
            err = e.response.get("Error", {})
            code = str(err.get("Code"))
            if code in _MISSING_CODES:
                raise ObjectNotFound(f"{self.url(key)}: not found") from None
            raise StorageError(f"{self.url(key)}: {code}: {err.get('Message') or e}") from e
        except NoCredentialsError:
            raise StorageError(
                f"{self.url(key)}: no S3 credentials (set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY)"
            ) from None
        except BotoCoreError as e:
            where = f" at {self.endpoint}" if self.endpoint else ""
            raise StorageError(f"{self.url(key)}: cannot reach the S3 server{where}: {e}") from None

    def get(self, key: str) -> bytes:
        def go() -> bytes:
            body: bytes = self._client.get_object(Bucket=self.bucket, Key=self._k(key))["Body"].read()
            return body

        return self._read(key, go)

    def chunks(self, key: str) -> Iterator[bytes]:
        """Opening the object is retried like any call; a stream that breaks later is an error, not resumed."""
        body = self._read(key, lambda: self._client.get_object(Bucket=self.bucket, Key=self._k(key))["Body"])
        try:
            yield from body.iter_chunks(CHUNK_BYTES)
        except BotoCoreError as e:
            raise StorageError(f"{self.url(key)}: read interrupted: {e}") from None
        finally:
            body.close()

    def get_at_most(self, key: str, limit: int) -> bytes:
        """A ranged GET: however large the object has become since any HEAD, no more than limit + 1 bytes."""

        def go() -> bytes:
            try:
                resp = self._client.get_object(Bucket=self.bucket, Key=self._k(key), Range=f"bytes=0-{limit}")
            except ClientError as e:
                if _code(e) == "InvalidRange":  # an empty object has no byte 0
                    return b""
                raise
            body: bytes = resp["Body"].read(limit + 1)
            return body

        data = self._read(key, go)
        if len(data) > limit:
            raise ObjectTooLarge(f"{self.url(key)}: more than {limit} bytes")
        return data

    def size(self, key: str) -> int:
        def go() -> int:
            return int(self._client.head_object(Bucket=self.bucket, Key=self._k(key))["ContentLength"])

        return self._read(key, go)

    def put(self, key: str, data: bytes) -> None:
        self._call(key, lambda: self._client.put_object(Bucket=self.bucket, Key=self._k(key), Body=data))

    def put_file(self, key: str, path: Path) -> None:
        """A managed transfer: parts of a large file stream from disk, past the 5 GB limit of one PUT."""
        if not path.is_file():
            raise StorageError(f"{path}: not a file")

        def go() -> None:
            try:
                self._client.upload_file(str(path), self.bucket, self._k(key))
            except S3UploadFailedError as e:
                # The transfer wraps the server's answer; unwrapped, it is retried or reported like any call's.
                if isinstance(e.__context__, ClientError):
                    raise e.__context__ from None
                raise StorageError(f"{self.url(key)}: {e}") from None

        self._call(key, go)

    def put_if_absent(self, key: str, data: bytes) -> bool:
        def go() -> bool:
            try:
                self._client.put_object(Bucket=self.bucket, Key=self._k(key), Body=data, IfNoneMatch="*")
                return True
            except ClientError as e:
                if str(e.response.get("Error", {}).get("Code")) in {"PreconditionFailed", "412"}:
                    return False
                raise

        return self._call(key, go)

    def exists(self, key: str) -> bool:
        def go() -> bool:
            try:
                self._client.head_object(Bucket=self.bucket, Key=self._k(key))
                return True
            except ClientError as e:
                if self._absent(key, _code(e)):
                    return False
                raise

        return self._call(key, go)

    def list(self, prefix: str = "") -> list[str]:
        root = self._k(prefix)
        base = f"{self.prefix}/" if self.prefix else ""

        def go() -> list[str]:
            keys: list[str] = []
            pages = self._client.get_paginator("list_objects_v2").paginate(
                Bucket=self.bucket, Prefix=f"{root}/" if root else ""
            )
            for page in pages:
                keys.extend(o["Key"].removeprefix(base) for o in page.get("Contents", []))
            return sorted(keys)

        return self._call(prefix, go)

    def delete(self, key: str) -> None:
        self._call(key, lambda: self._client.delete_object(Bucket=self.bucket, Key=self._k(key)))

    def child(self, prefix: str) -> S3Store:
        return S3Store(
            self.bucket,
            join(self.prefix, prefix),
            endpoint=self.endpoint,
            region=self.region,
            retry_seconds=self.retry_seconds,
            client=self._client,
        )

    def check(self) -> None:
        self._call("", lambda: self._client.head_bucket(Bucket=self.bucket))
