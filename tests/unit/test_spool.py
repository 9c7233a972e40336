"""The spool: checked updates on private local disk, read back one tensor at a time."""

from __future__ import annotations

import stat
from pathlib import Path

import pytest
import torch

from fedtune.aggregation.encoding import ENCODINGS, decode, encode, read_layout
from fedtune.aggregation.spool import Spool
from fedtune.errors import FedtuneError
from fedtune.storage import StorageError


def state(seed: int) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return {"l0.lora_B": torch.randn(32, 4, generator=gen), "l0.lora_A": torch.randn(4, 32, generator=gen)}


@pytest.mark.parametrize("enc", ENCODINGS)
def test_spooled_tensors_are_the_decoded_ones(enc: str) -> None:
    ref = state(0)
    data = encode(ref, enc)
    spool = Spool()
    try:
        delta = spool.put("alpha", data, read_layout(data, ref, enc))
        plain = decode(data)
        assert list(delta) == list(ref) and len(delta) == 2
        for k in ref:
            got = delta[k]
            assert torch.equal(got, plain[k]) and got.dtype == torch.float32
            got.add_(1.0)  # a spooled tensor is the strategy's own: writing it changes nothing spooled
        assert all(torch.equal(delta[k], plain[k]) for k in ref)
        with pytest.raises(KeyError):
            delta["__scales__"]
    finally:
        spool.close()


def test_the_folder_is_private_and_gone_after_close() -> None:
    ref = state(1)
    data = encode(ref)
    spool = Spool()
    delta = spool.put("alpha", data, read_layout(data, ref, "fp32"))
    folder = Path(delta.path).parent
    assert stat.S_IMODE(folder.stat().st_mode) == 0o700
    assert stat.S_IMODE(Path(delta.path).stat().st_mode) == 0o600
    assert Path(delta.path).read_bytes() == data
    spool.close()
    assert not folder.exists()


@pytest.mark.parametrize("name", ["", ".", "..", "a/b", "../alpha"])
def test_a_name_that_is_not_a_file_name_is_refused(name: str) -> None:
    ref = state(2)
    data = encode(ref)
    spool = Spool()
    try:
        with pytest.raises(FedtuneError, match="not a file name"):
            spool.put(name, data, read_layout(data, ref, "fp32"))
    finally:
        spool.close()


def test_a_failing_local_disk_is_a_storage_error_and_leaves_no_partial_file(monkeypatch: pytest.MonkeyPatch) -> None:
    ref = state(3)
    data = encode(ref)
    spool = Spool()

    def full(_fd: int, _data: object) -> int:
        raise OSError(28, "No space left on device")

    try:
        with monkeypatch.context() as m:
            m.setattr("fedtune.aggregation.spool.os.write", full)
            with pytest.raises(StorageError, match="No space left"):
                spool.put("alpha", data, read_layout(data, ref, "fp32"))
        assert list(Path(spool._dir.name).iterdir()) == []
        delta = spool.put("alpha", data, read_layout(data, ref, "fp32"))  # retried once the disk has room
        assert torch.equal(delta["l0.lora_A"], ref["l0.lora_A"])
    finally:
        spool.close()
