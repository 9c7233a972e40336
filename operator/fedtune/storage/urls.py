"""Turning a URL into a store: the only place that knows the schemes."""

from __future__ import annotations

from pathlib import Path
from urllib.parse import urlparse

from fedtune.api.spec import STORAGE_SCHEMES as SCHEMES
from fedtune.storage.base import ObjectStore, StorageError
from fedtune.storage.local_fs import FileStore
from fedtune.storage.memory import MemoryStore


def open_store(
    uri: str,
    *,
    endpoint: str | None = None,
    region: str | None = None,
    base_dir: Path | None = None,
    credentials: tuple[str, str] | None = None,
    retry_seconds: float | None = None,
) -> ObjectStore:
    """A store rooted at uri. Plain and relative paths are local folders (relative to base_dir).

    `credentials` (access key, secret) override the environment, for the operator reading a Secret;
    `retry_seconds` bounds how long transient S3 errors are retried.
    """
    parsed = urlparse(uri)
    scheme = parsed.scheme or "file"
    if scheme == "file":
        raw = uri[len("file://") :] if uri.startswith("file://") else uri
        path = Path(raw).expanduser()
        if not path.is_absolute():
            path = (base_dir or Path.cwd()) / path
        return FileStore(path)
    if scheme == "memory":
        return MemoryStore(parsed.netloc, parsed.path)
    if scheme == "s3":
        if not parsed.netloc:
            raise StorageError(f"{uri}: an s3:// URL needs a bucket (s3://bucket/prefix)")
        from fedtune.storage.s3 import S3Store

        return S3Store(
            parsed.netloc,
            parsed.path,
            endpoint=endpoint,
            region=region,
            credentials=credentials,
            retry_seconds=retry_seconds,
        )
    raise StorageError(f"{uri}: unsupported storage scheme {scheme!r} (supported: {', '.join(SCHEMES)})")


def open_object(
    uri: str,
    *,
    endpoint: str | None = None,
    region: str | None = None,
    base_dir: Path | None = None,
    credentials: tuple[str, str] | None = None,
) -> tuple[ObjectStore, str]:
    """The store holding one object, and the object's key in it."""
    head, _, name = uri.rstrip("/").rpartition("/")
    if not name or head.endswith(":/") or head.endswith(":"):
        head, name = uri, ""
    if not name:
        raise StorageError(f"{uri}: not an object URL")
    if not head:
        head = "."
    return open_store(head, endpoint=endpoint, region=region, base_dir=base_dir, credentials=credentials), name
