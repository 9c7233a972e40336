"""Upload encodings: sizes, round-trip error bounds, the name in the header, the layout of a checked
update, and bad input."""

from __future__ import annotations

import json
import struct
from typing import Any

import pytest
import torch

from fedtune.aggregation.encoding import (
    ENCODINGS,
    decode,
    decode_checked,
    encode,
    encoding_of,
    load_state,
    read_layout,
    save_state,
)
from fedtune.api.spec import Encoding
from fedtune.errors import FedtuneError


def lora_like(seed: int = 0) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for layer in range(4):
        out[f"l{layer}.q.lora_A"] = torch.randn(16, 512, generator=gen) * 0.02
        out[f"l{layer}.q.lora_B"] = torch.randn(512, 16, generator=gen) * 1e-3
    return out


def test_every_spec_encoding_is_supported() -> None:
    assert set(ENCODINGS) == {e.value for e in Encoding}


@pytest.mark.parametrize("enc", ENCODINGS)
def test_round_trip_names_the_encoding_and_keeps_keys_and_shapes(enc: str) -> None:
    state = lora_like()
    data = encode(state, enc)
    assert encoding_of(data) == enc
    back = decode(data)
    assert back.keys() == state.keys()
    assert all(back[k].shape == state[k].shape and back[k].dtype == torch.float32 for k in state)


def test_fp32_is_exact() -> None:
    state = lora_like()
    back = decode(encode(state, "fp32"))
    assert all(torch.equal(back[k], state[k]) for k in state)


def test_sizes_bf16_halves_and_int8_quarters() -> None:
    state = lora_like()
    fp32 = len(encode(state, "fp32"))
    assert fp32 / len(encode(state, "bf16")) == pytest.approx(2.0, rel=0.01)
    assert fp32 / len(encode(state, "int8")) == pytest.approx(4.0, rel=0.02)
    # One float32 scale per row: lora_B (out × r) pays 4 bytes per r values.
    values = sum(v.numel() for v in state.values())
    rows = sum(v.shape[0] for v in state.values())
    assert len(encode(state, "int8-channel")) == pytest.approx(values + 4 * rows, rel=0.01)


def test_bf16_error_is_within_its_mantissa() -> None:
    state = lora_like()
    back = decode(encode(state, "bf16"))
    for k, v in state.items():
        assert ((back[k] - v).abs() <= v.abs() * 2.0**-8).all()


@pytest.mark.parametrize("enc", ["int8", "int8-channel"])
def test_int8_error_is_at_most_half_a_step(enc: str) -> None:
    state = lora_like()
    back = decode(encode(state, enc))
    for k, v in state.items():
        rows = v.abs().amax(dim=1, keepdim=True) if enc == "int8-channel" else v.abs().max()
        step = rows / 127
        assert ((back[k] - v).abs() <= step / 2 * (1 + 1e-5)).all()


def test_per_channel_scales_protect_small_rows() -> None:
    v = torch.tensor([[100.0, -50.0], [0.01, -0.02]])
    per_tensor = decode(encode({"w": v}, "int8"))["w"]
    per_channel = decode(encode({"w": v}, "int8-channel"))["w"]
    assert torch.equal(per_tensor[1], torch.zeros(2))  # the small row rounds away
    assert torch.allclose(per_channel[1], v[1], rtol=0.01)


def test_zero_scalar_and_empty_tensors_survive_int8() -> None:
    state = {"z": torch.zeros(3, 4), "s": torch.tensor(-2.5), "e": torch.zeros(0, 4)}
    for enc in ("int8", "int8-channel"):
        back = decode(encode(state, enc))
        assert torch.equal(back["z"], state["z"])
        assert back["s"].item() == pytest.approx(-2.5)
        assert back["e"].shape == (0, 4)


def test_unknown_encoding_and_reserved_key_are_refused() -> None:
    with pytest.raises(FedtuneError, match=r"spec\.aggregation\.encoding"):
        encode(lora_like(), "fp8")
    with pytest.raises(FedtuneError, match="reserved"):
        encode({"__scales__": torch.zeros(1)}, "fp32")
    with pytest.raises(FedtuneError, match="not a safetensors"):
        decode(b"xyz")


def test_state_round_trips_bit_for_bit_in_its_own_dtypes() -> None:
    state = {"w": torch.randn(3, 3).to(torch.bfloat16), "step": torch.tensor(7, dtype=torch.int64)}
    back = load_state(save_state(state))
    assert all(torch.equal(back[k], state[k]) and back[k].dtype == state[k].dtype for k in state)


@pytest.mark.parametrize("enc", ENCODINGS)
def test_a_checked_update_decodes_as_decode_does(enc: str) -> None:
    state = {**lora_like(), "z": torch.zeros(0, 4), "s": torch.tensor(1.5)}
    data = encode(state, enc)
    layout = read_layout(data, state, enc)
    checked, plain = decode_checked(data, layout), decode(data)
    assert list(checked) == list(state)  # in the reference's order
    assert all(torch.equal(checked[k], plain[k]) and checked[k].dtype == torch.float32 for k in state)


def test_fp32_tensors_of_a_checked_update_are_views_of_its_bytes() -> None:
    state = lora_like()
    data = encode(state)
    checked = decode_checked(data, read_layout(data, state, "fp32"))
    start = torch.frombuffer(data, dtype=torch.uint8).data_ptr()
    assert all(start <= v.data_ptr() < start + len(data) for v in checked.values())


def _with_offsets(data: bytes, key: str, offsets: list[Any]) -> bytes:
    """The same bytes with one header entry's data_offsets replaced (the header padded to its old length)."""
    (size,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + size])
    header[key]["data_offsets"] = offsets
    text = json.dumps(header, separators=(",", ":")).encode()
    assert len(text) <= size
    return data[:8] + text.ljust(size) + data[8 + size :]


@pytest.mark.parametrize(
    ("key", "offsets", "says"),
    [
        ("b", [0, 16], "the tensor before it ends at"),  # b overlaps a, and leaves a gap at the end
        ("a", [0, 12], "do not hold a tensor of shape"),
        ("a", [0.0, 16], "expected two integers"),
        ("a", [0, 16, 16], "expected two integers"),
    ],
)
def test_tensor_byte_ranges_must_tile_the_data_exactly(key: str, offsets: list[Any], says: str) -> None:
    state = {"a": torch.ones(4), "b": torch.ones(4)}
    data = encode(state)
    assert read_layout(data, state, "fp32").tensors["b"].end == len(data)
    with pytest.raises(FedtuneError, match=says):
        read_layout(_with_offsets(data, key, offsets), state, "fp32")


def test_bytes_beyond_the_last_tensor_are_refused() -> None:
    state = {"a": torch.ones(4)}
    with pytest.raises(FedtuneError, match="the tensors end at byte"):
        read_layout(encode(state) + bytes(4), state, "fp32")


def test_misaligned_values_are_copied_not_viewed() -> None:
    state = {"a": torch.arange(4, dtype=torch.float32)}
    data = encode(state)
    (size,) = struct.unpack("<Q", data[:8])
    shifted = struct.pack("<Q", size + 1) + data[8 : 8 + size] + b" " + data[8 + size :]  # one byte more header
    back = decode_checked(shifted, read_layout(shifted, state, "fp32"))
    assert torch.equal(back["a"], state["a"])
