"""file:// stores: a folder; atomic rename for put, hard links for create-if-absent."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

from fedtune.storage.base import CHUNK_BYTES, ObjectNotFound, ObjectStore, ObjectTooLarge, StorageError


class FileStore(ObjectStore):
    """A local folder as object store (the embedded default, and shared volumes)."""

    def __init__(self, root: Path) -> None:
        self.root = root.absolute()
        super().__init__(f"file://{self.root}")

    def _path(self, key: str) -> Path:
        p = (self.root / key.lstrip("/")).resolve() if key else self.root
        if p != self.root and self.root.resolve() not in p.parents:
            raise StorageError(f"{self.url(key)}: key escapes the store root")
        return p

    def _tmp(self, target: Path, data: bytes) -> Path:
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
            fd, name = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".part")
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
        except OSError as e:
            raise StorageError(f"{self.url(str(target.relative_to(self.root)))}: {e.strerror}") from None
        return Path(name)

    def get(self, key: str) -> bytes:
        try:
            return self._path(key).read_bytes()
        except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
            raise ObjectNotFound(f"{self.url(key)}: not found") from None
        except OSError as e:
            raise StorageError(f"{self.url(key)}: {e.strerror}") from None

    def chunks(self, key: str) -> Iterator[bytes]:
        try:
            with self._path(key).open("rb") as f:
                while chunk := f.read(CHUNK_BYTES):
                    yield chunk
        except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
            raise ObjectNotFound(f"{self.url(key)}: not found") from None
        except OSError as e:
            raise StorageError(f"{self.url(key)}: {e.strerror}") from None

    def get_at_most(self, key: str, limit: int) -> bytes:
        try:
            with self._path(key).open("rb") as f:
                data = f.read(limit + 1)
        except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
            raise ObjectNotFound(f"{self.url(key)}: not found") from None
        except OSError as e:
            raise StorageError(f"{self.url(key)}: {e.strerror}") from None
        if len(data) > limit:
            raise ObjectTooLarge(f"{self.url(key)}: more than {limit} bytes")
        return data

    def size(self, key: str) -> int:
        try:
            return self._path(key).stat().st_size
        except (FileNotFoundError, NotADirectoryError):
            raise ObjectNotFound(f"{self.url(key)}: not found") from None

    def put(self, key: str, data: bytes) -> None:
        target = self._path(key)
        os.replace(self._tmp(target, data), target)

    def put_if_absent(self, key: str, data: bytes) -> bool:
        target = self._path(key)
        tmp = self._tmp(target, data)
        try:
            os.link(tmp, target)
            return True
        except FileExistsError:
            return False
        finally:
            tmp.unlink(missing_ok=True)

    def exists(self, key: str) -> bool:
        return self._path(key).is_file()

    def list(self, prefix: str = "") -> list[str]:
        base = self._path(prefix)
        if not base.is_dir():
            return []
        keys = [
            str(p.relative_to(self._path(""))) for p in base.rglob("*") if p.is_file() and not p.name.endswith(".part")
        ]
        return sorted(keys)

    def delete(self, key: str) -> None:
        self._path(key).unlink(missing_ok=True)

    def child(self, prefix: str) -> FileStore:
        return FileStore(self._path(prefix))
