"""memory:// stores: named, process-wide dicts for tests and single-process runs."""

from __future__ import annotations

import threading

from fedtune.storage.base import ObjectNotFound, ObjectStore, join

_BUCKETS: dict[str, dict[str, bytes]] = {}
_LOCK = threading.Lock()


class MemoryStore(ObjectStore):
    """All MemoryStores of one name in a process share their objects."""

    def __init__(self, name: str, prefix: str = "") -> None:
        self.name, self.prefix = name, prefix.strip("/")
        super().__init__(f"memory://{join(name, self.prefix)}")
        with _LOCK:
            self._objects = _BUCKETS.setdefault(name, {})

    def _k(self, key: str) -> str:
        return join(self.prefix, key)

    def get(self, key: str) -> bytes:
        with _LOCK:
            try:
                return self._objects[self._k(key)]
            except KeyError:
                raise ObjectNotFound(f"{self.url(key)}: not found") from None

    def put(self, key: str, data: bytes) -> None:
        with _LOCK:
            self._objects[self._k(key)] = bytes(data)

    def put_if_absent(self, key: str, data: bytes) -> bool:
        with _LOCK:
            if self._k(key) in self._objects:
                return False
            self._objects[self._k(key)] = bytes(data)
            return True

    def exists(self, key: str) -> bool:
        with _LOCK:
            return self._k(key) in self._objects

    def list(self, prefix: str = "") -> list[str]:
        root = self._k(prefix)
        base = f"{self.prefix}/" if self.prefix else ""
        with _LOCK:
            keys = [k for k in self._objects if not root or k == root or k.startswith(root + "/")]
        return sorted(k.removeprefix(base) for k in keys)

    def delete(self, key: str) -> None:
        with _LOCK:
            self._objects.pop(self._k(key), None)

    def child(self, prefix: str) -> MemoryStore:
        return MemoryStore(self.name, join(self.prefix, prefix))
