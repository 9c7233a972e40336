"""Every store honours the same contract: atomic put, create-if-absent, listing, clear errors."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from fedtune.storage import ObjectNotFound, ObjectStore, StorageError, open_object, open_store


@pytest.fixture(params=["file", "memory", "s3"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[ObjectStore]:
    if request.param == "file":
        yield open_store(f"file://{tmp_path}/root")
    elif request.param == "memory":
        yield open_store(f"memory://{tmp_path.name}/root")
    else:
        server = request.getfixturevalue("s3_server")
        bucket = request.getfixturevalue("s3_bucket")
        with pytest.MonkeyPatch.context() as mp:
            for k, v in server.env().items():
                mp.setenv(k, v)
            yield open_store(f"s3://{bucket}/root", endpoint=server.endpoint)


def test_put_get_list_delete(store: ObjectStore) -> None:
    store.put("a/b.bin", b"one")
    store.put("a/c/d.json", b"{}")
    store.put("z.txt", b"z")
    assert store.get("a/b.bin") == b"one"
    assert store.list("a") == ["a/b.bin", "a/c/d.json"]
    assert store.list() == ["a/b.bin", "a/c/d.json", "z.txt"]
    assert store.exists("a/b.bin") and not store.exists("a/none")
    store.put("a/b.bin", b"two")
    assert store.get("a/b.bin") == b"two"
    store.delete("a/b.bin")
    with pytest.raises(ObjectNotFound, match=r"a/b\.bin"):
        store.get("a/b.bin")
    assert store.get_or_none("a/b.bin") is None


def test_put_if_absent_creates_once(store: ObjectStore) -> None:
    assert store.put_if_absent("m.json", b"first")
    assert not store.put_if_absent("m.json", b"second")
    assert store.get("m.json") == b"first"


def test_child_sees_the_same_objects(store: ObjectStore) -> None:
    child = store.child("runs/r1")
    child.put("x", b"1")
    assert store.get("runs/r1/x") == b"1"
    assert child.list() == ["x"]
    assert child.url("x").endswith("/runs/r1/x")


def test_concurrent_create_if_absent_has_one_winner(store: ObjectStore) -> None:
    wins: list[bool] = []
    lock = threading.Lock()

    def race(i: int) -> None:
        won = store.put_if_absent("race.json", str(i).encode())
        with lock:
            wins.append(won)

    threads = [threading.Thread(target=race, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert wins.count(True) == 1
    assert store.get("race.json").decode() in {str(i) for i in range(8)}


def test_file_store_leaves_no_partial_files(tmp_path: Path) -> None:
    store = open_store(str(tmp_path))
    store.put("k", b"x" * 1000)
    store.put_if_absent("k2", b"y")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["k", "k2"]


def test_file_store_refuses_keys_outside_its_root(tmp_path: Path) -> None:
    with pytest.raises(StorageError, match="escapes"):
        open_store(str(tmp_path / "root")).get("../secret")


def test_unknown_scheme_is_named() -> None:
    with pytest.raises(StorageError, match="unsupported storage scheme 'ftp'"):
        open_store("ftp://host/x")


def test_open_object_splits_the_key(tmp_path: Path) -> None:
    (tmp_path / "d.jsonl").write_text("{}\n")
    store, key = open_object(f"file://{tmp_path}/d.jsonl")
    assert key == "d.jsonl" and store.get(key) == b"{}\n"
