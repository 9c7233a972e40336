"""A model folder in an object store: pushed with a manifest of digests, fetched verified into a cache.

The manifest is written last, so a reader never sees a half-pushed model. Its sha256 names the model:
spec.model.sha256 pins it, and it names the cache folder, which appears (by rename) only once every
file in it matched the manifest. The store is not trusted for integrity; the digests are.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from fedtune.errors import FedtuneError
from fedtune.storage import ObjectNotFound, ObjectStore, ObjectTooLarge, StorageError

MANIFEST = "fedtune-model.json"
# Room for thousands of file entries; a larger "manifest" is not one.
MAX_MANIFEST_BYTES = 1 << 20
_HEX = frozenset("0123456789abcdef")
log = logging.getLogger("fedtune.model")

URI_FIELD = "spec.model.uri"
PIN_FIELD = "spec.model.sha256"


@dataclass(frozen=True)
class Entry:
    sha256: str
    bytes: int


def file_digest(path: Path) -> str:
    with path.open("rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def _model_files(folder: Path) -> Iterable[tuple[str, Path]]:
    """(name in the store, local file) of every file to push; hidden files (tool caches) are not the model's."""
    for path in sorted(folder.rglob("*")):
        name = path.relative_to(folder).as_posix()
        if path.is_file() and name != MANIFEST and not any(part.startswith(".") for part in name.split("/")):
            yield name, path


def push(folder: Path, store: ObjectStore) -> str:
    """Upload every file of a save_pretrained folder, then the manifest; returns the manifest's sha256."""
    if not (folder / "config.json").is_file():
        raise FedtuneError(f"{folder}: no config.json: not a folder saved with save_pretrained")
    entries: dict[str, dict[str, str | int]] = {}
    for name, path in _model_files(folder):
        try:
            entries[name] = {"sha256": file_digest(path), "bytes": path.stat().st_size}
        except OSError as e:
            raise FedtuneError(f"{path}: cannot read: {e.strerror}") from None
        store.put_file(name, path)
    manifest = json.dumps({"files": entries}, indent=1, sort_keys=True).encode()
    store.put(MANIFEST, manifest)
    return hashlib.sha256(manifest).hexdigest()


def _safe_name(name: object) -> bool:
    """A relative path that stays inside the folder it is written to."""
    if not isinstance(name, str) or not name or "\\" in name or "\0" in name or name == MANIFEST:
        return False
    path = PurePosixPath(name)
    return not path.is_absolute() and all(part not in ("", ".", "..") for part in name.split("/"))


def parse_manifest(data: bytes, where: str) -> dict[str, Entry]:
    """The manifest's files; a FedtuneError naming `where` for anything else, so a writer of the prefix
    cannot make a reader write outside its cache folder."""
    try:
        doc = json.loads(data)
        files = doc["files"]
        if not isinstance(files, dict) or not files:
            raise ValueError("no files")
        out: dict[str, Entry] = {}
        for name, entry in files.items():
            if not _safe_name(name):
                raise ValueError(f"file name {str(name)[:80]!r} is not a relative path inside the folder")
            digest, size = entry["sha256"], entry["bytes"]
            if not (isinstance(digest, str) and len(digest) == 64 and set(digest) <= _HEX):
                raise ValueError(f"{name}: sha256 is not 64 hex digits")
            if not (isinstance(size, int) and not isinstance(size, bool) and size >= 0):
                raise ValueError(f"{name}: bytes is not a size")
            out[name] = Entry(digest, size)
    except (ValueError, KeyError, TypeError) as e:
        raise FedtuneError(f"{URI_FIELD}: {where} is not a model manifest of `fedtune model push`: {e}") from None
    return out


def read_manifest(store: ObjectStore, pin: str | None) -> tuple[bytes, str]:
    """The manifest's bytes and sha256, checked against the pin."""
    url = store.url(MANIFEST)
    try:
        data = store.get_at_most(MANIFEST, MAX_MANIFEST_BYTES)
    except ObjectNotFound:
        raise FedtuneError(f"{URI_FIELD}: {url} not found: push the model there with `fedtune model push`") from None
    except ObjectTooLarge:
        raise FedtuneError(f"{URI_FIELD}: {url} is larger than {MAX_MANIFEST_BYTES} bytes: not a manifest") from None
    except StorageError as e:
        raise FedtuneError(f"{URI_FIELD}: {e}") from None
    digest = hashlib.sha256(data).hexdigest()
    if pin is not None and digest != pin:
        raise FedtuneError(
            f"{PIN_FIELD}: the manifest at {url} has sha256 {digest}, not the pinned {pin} "
            "(the model at the prefix was pushed again or replaced)"
        )
    return data, digest


# Files that hold weights: a party that needs only the config and the tokenizer (the aggregator) skips them.
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf", ".h5", ".msgpack")
# Cached copies this process has checked: loading one model reads its folder several times (config,
# tokenizer, weights), and a multi-GB model is hashed once, not each time.
_checked: set[Path] = set()


def fetch(store: ObjectStore, cache_root: Path, pin: str | None = None, weights: bool = True) -> Path:
    """The verified local copy of the model at store (without its weight files unless `weights`): from
    the cache, or downloaded into it.

    Racing processes each download into their own temporary folder; the first rename wins and the
    others use its copy.
    """
    data, digest = read_manifest(store, pin)
    files = parse_manifest(data, store.url(MANIFEST))
    if not weights:
        files = {name: entry for name, entry in files.items() if not name.endswith(WEIGHT_SUFFIXES)}
    final = cache_root / (digest if weights else f"{digest}-config")
    if final in _checked:
        return final
    if final.is_dir() or final.is_symlink():
        problem = cached_problem(final, files)
        if problem is None:
            _checked.add(final)
            return final
        # The cache may be shared with other pods: a copy that does not match is never loaded, only replaced.
        log.warning("%s: the cached copy %s %s: downloading it again", URI_FIELD, final, problem)
        _discard(final, cache_root)
    try:
        cache_root.mkdir(parents=True, exist_ok=True)
        partial = Path(tempfile.mkdtemp(dir=cache_root, prefix=f".{digest[:16]}-", suffix=".partial"))
    except OSError as e:
        raise FedtuneError(f"{URI_FIELD}: cannot write the model cache {cache_root}: {e.strerror}") from None
    try:
        for name, entry in files.items():
            _download(store, name, entry, partial / name)
        (partial / MANIFEST).write_bytes(data)
        try:
            partial.rename(final)
        except OSError:
            if not final.is_dir():
                raise
    except OSError as e:
        raise FedtuneError(f"{URI_FIELD}: cannot write the model cache {cache_root}: {e.strerror}") from None
    finally:
        shutil.rmtree(partial, ignore_errors=True)
    _checked.add(final)
    return final


def cached_problem(folder: Path, files: dict[str, Entry]) -> str | None:
    """What is wrong with a cached copy (a link, a missing or changed file), or None: checked on every load,
    since whoever else mounts the cache could have written it."""
    if folder.is_symlink():
        return "is a symbolic link"
    for name, entry in files.items():
        path = folder / name
        if any(part.is_symlink() for part in (path, *path.parents) if folder in part.parents or part == path):
            return f"has a symbolic link at {name}"
        try:
            size = path.stat().st_size
        except OSError:
            return f"lacks {name}"
        if size != entry.bytes or _file_sha256(path) != entry.sha256:
            return f"has a changed {name}"
    return None


def _file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def _discard(final: Path, cache_root: Path) -> None:
    """Move a bad cached copy aside (a rename, so no reader sees it half removed), then remove it."""
    aside = Path(tempfile.mkdtemp(dir=cache_root, prefix=".discarded-"))
    try:
        final.rename(aside / "copy")
    except OSError as e:
        raise FedtuneError(f"spec.model.cache: cannot replace the bad cached copy {final}: {e.strerror}") from None
    finally:
        shutil.rmtree(aside, ignore_errors=True)


def _download(store: ObjectStore, name: str, entry: Entry, dest: Path) -> None:
    """Stream one object to dest, never holding more of it than the manifest says it has."""
    url = store.url(name)
    dest.parent.mkdir(parents=True, exist_ok=True)
    h, size = hashlib.sha256(), 0
    try:
        with dest.open("wb") as out:
            for chunk in store.chunks(name):
                size += len(chunk)
                if size > entry.bytes:
                    break
                h.update(chunk)
                out.write(chunk)
            out.flush()
            os.fsync(out.fileno())  # on disk before the rename makes it the cached copy
    except ObjectNotFound:
        raise FedtuneError(f"{URI_FIELD}: {url}, named in the manifest, not found") from None
    except StorageError as e:
        raise FedtuneError(f"{URI_FIELD}: {e}") from None
    if size != entry.bytes:
        got = f"more than {entry.bytes}" if size > entry.bytes else str(size)
        wrong = f"{got} bytes, the manifest says {entry.bytes}"
    elif h.hexdigest() != entry.sha256:
        wrong = f"sha256 {h.hexdigest()}, the manifest says {entry.sha256}"
    else:
        return
    raise FedtuneError(f"{URI_FIELD}: {url} does not match the manifest ({wrong}): it was changed after the push")
