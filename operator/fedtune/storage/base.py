"""One object-store interface over URLs; the round protocol needs nothing more than these verbs."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterator
from pathlib import Path

from fedtune.errors import FedtuneError

# Streaming reads hold one chunk and one line at a time; a longer line is refused, not buffered.
CHUNK_BYTES = 1 << 20
MAX_LINE_BYTES = 1 << 25


class StorageError(FedtuneError):
    """A storage operation failed for a reason retries will not fix."""


class ObjectNotFound(StorageError):
    """The key does not exist."""


class ObjectTooLarge(FedtuneError):
    """An object is larger than its reader allows: the writer's fault, not a storage failure."""


def join(*parts: str) -> str:
    """Join key parts with single slashes."""
    return "/".join(p.strip("/") for p in parts if p.strip("/"))


class ObjectStore(ABC):
    """Keys are slash-separated paths below the store's root URI."""

    def __init__(self, uri: str) -> None:
        self.uri = uri.rstrip("/")
        # Transient errors retried so far: whether this process lost storage for a while (stores that never
        # retry leave it at 0).
        self.retried = 0

    def url(self, key: str) -> str:
        """The full URL of a key, for messages and for handing to other processes."""
        return f"{self.uri}/{key.lstrip('/')}" if key else self.uri

    @abstractmethod
    def get(self, key: str) -> bytes:
        """The object's bytes; ObjectNotFound if absent."""

    @abstractmethod
    def put(self, key: str, data: bytes) -> None:
        """Write atomically: readers see the old object or the whole new one, never a part."""

    def put_file(self, key: str, path: Path) -> None:
        """put() of a local file's bytes; stores that can stream a large file override this, which reads it whole."""
        try:
            data = path.read_bytes()
        except OSError as e:
            raise StorageError(f"{path}: cannot read: {e.strerror}") from None
        self.put(key, data)

    @abstractmethod
    def put_if_absent(self, key: str, data: bytes) -> bool:
        """Create the object only if no object has the key; True if this call created it."""

    @abstractmethod
    def exists(self, key: str) -> bool:
        """Whether the key exists."""

    @abstractmethod
    def list(self, prefix: str = "") -> list[str]:
        """Keys below prefix (relative to the root), sorted."""

    @abstractmethod
    def delete(self, key: str) -> None:
        """Remove the key if present."""

    @abstractmethod
    def child(self, prefix: str) -> ObjectStore:
        """The same store rooted at prefix."""

    def get_at_most(self, key: str, limit: int) -> bytes:
        """The object's bytes if it has at most `limit` of them; ObjectTooLarge, having read no more, if not."""
        data = self.get(key)
        if len(data) > limit:
            raise ObjectTooLarge(f"{self.url(key)}: more than {limit} bytes")
        return data

    def size(self, key: str) -> int:
        """The object's size in bytes, without reading it; ObjectNotFound if absent."""
        return len(self.get(key))

    def chunks(self, key: str) -> Iterator[bytes]:
        """The object's bytes in pieces of at most CHUNK_BYTES; ObjectNotFound if absent.

        This default holds the whole object, which suits a store that keeps it in memory anyway; stores
        that can read part of an object override it.
        """
        data = self.get(key)
        for start in range(0, len(data), CHUNK_BYTES):
            yield data[start : start + CHUNK_BYTES]

    def iter_lines(self, key: str, max_line: int = MAX_LINE_BYTES) -> Iterator[bytes]:
        """The object's lines without their newline, in memory bounded by max_line, not by the object."""
        pending, n = b"", 1
        for chunk in self.chunks(key):
            *lines, pending = (pending + chunk).split(b"\n")
            yield from lines
            n += len(lines)
            if len(pending) > max_line:
                raise StorageError(f"{self.url(key)} line {n}: longer than {max_line} bytes")
        if pending:
            yield pending

    def check(self) -> None:
        """Raise a StorageError naming the URI if the store cannot be reached."""
        self.exists(".fedtune-probe")

    def get_or_none(self, key: str) -> bytes | None:
        try:
            return self.get(key)
        except ObjectNotFound:
            return None
