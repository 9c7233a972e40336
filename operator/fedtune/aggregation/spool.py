"""Checked updates kept on the aggregator's local disk, read back one tensor at a time.

A rank- or distance-based strategy needs all K updates of a round together. Held in memory they cost
K times an update; spooled here, a strategy that works one tensor key at a time holds K tensors of one
key. The folder is private to the aggregator (mode 0700) and removed when the round closes; the
bytes in it were checked (digest, header, values) before they were written, and no other party can
change them, so they are not checked again.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator, Mapping
from pathlib import Path

import torch

from fedtune.aggregation.encoding import Entry, Layout, decode_entry
from fedtune.errors import FedtuneError
from fedtune.storage import StorageError


class SpooledDelta(Mapping[str, torch.Tensor]):
    """An update's tensors on local disk: each is read and decoded when indexed, and nothing is cached
    but int8 scales. The file is opened per read, so a round of many clients holds no descriptors."""

    def __init__(self, path: Path, layout: Layout) -> None:
        self.path, self.layout = path, layout
        self._scales: torch.Tensor | None = None

    def _read(self, entry: Entry) -> bytearray:
        buf = bytearray(entry.end - entry.start)
        fd = os.open(self.path, os.O_RDONLY)
        try:
            if os.preadv(fd, [buf], entry.start) != len(buf):
                raise FedtuneError(f"{self.path}: shorter than when it was spooled")
        finally:
            os.close(fd)
        return buf

    def __getitem__(self, key: str) -> torch.Tensor:
        entry = self.layout.tensors[key]
        if self.layout.scales is not None and self._scales is None:  # small: one float per row
            self._scales = decode_entry(self._read(self.layout.scales), 0, self.layout.scales, None)
        return decode_entry(self._read(entry), 0, entry, self.layout.scales_of(key, self._scales))

    def __iter__(self) -> Iterator[str]:
        return iter(self.layout.tensors)

    def __len__(self) -> int:
        return len(self.layout.tensors)


class Spool:
    """One round's spooled updates, in a private temporary folder removed by `close`."""

    def __init__(self) -> None:
        self._dir = tempfile.TemporaryDirectory(prefix="fedtune-spool-")

    def put(self, name: str, data: bytes, layout: Layout) -> SpooledDelta:
        """Write a checked update's bytes under `name` (once per name) and return its lazy tensors."""
        if name in ("", ".", "..") or Path(name).name != name:
            raise FedtuneError(f"spool: {name!r} is not a file name")
        path = Path(self._dir.name) / name
        # A full or failing local disk is the aggregator's trouble, retried, never the client's rejection.
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except OSError as e:
            raise StorageError(f"spool: cannot create {name}: {e}") from e
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
        except OSError as e:
            path.unlink(missing_ok=True)
            raise StorageError(f"spool: cannot write {name}: {e}") from e
        finally:
            os.close(fd)
        return SpooledDelta(path, layout)

    def close(self) -> None:
        self._dir.cleanup()
