"""Every kind of unsound update is rejected with a reason, and sound ones pass."""

from __future__ import annotations

import torch

from fedtune.aggregation.validation import update_norm, validate_update

GLOBAL = {"a.lora_A": torch.zeros(2, 3), "a.lora_B": torch.zeros(3, 2)}


def good() -> dict[str, torch.Tensor]:
    return {"a.lora_A": torch.full((2, 3), 0.5), "a.lora_B": torch.full((3, 2), -0.5)}


def test_a_sound_update_passes() -> None:
    assert validate_update(good(), GLOBAL, max_norm=10.0) is None
    assert validate_update(good(), GLOBAL, max_norm=None) is None


def test_nan_and_inf_are_rejected() -> None:
    for bad in (float("nan"), float("inf")):
        d = good()
        d["a.lora_B"][1, 1] = bad
        assert "non-finite" in (validate_update(d, GLOBAL, None) or "")


def test_large_finite_values_are_not_mistaken_for_inf() -> None:
    d = good()
    d["a.lora_A"][0, 0] = 3e38  # its square overflows float32, not the float64 the check sums in
    assert validate_update(d, GLOBAL, None) is None
    assert "exceeds" in (validate_update(d, GLOBAL, max_norm=1e30) or "")


def test_wrong_shape_is_rejected() -> None:
    d = good()
    d["a.lora_A"] = torch.zeros(3, 2)
    assert "shape (3, 2), expected (2, 3)" in (validate_update(d, GLOBAL, None) or "")


def test_missing_and_unexpected_keys_are_rejected() -> None:
    d = good()
    del d["a.lora_B"]
    assert validate_update(d, GLOBAL, None) == "missing key a.lora_B"
    d = good()
    d["b.lora_A"] = torch.zeros(1)
    assert validate_update(d, GLOBAL, None) == "unexpected key b.lora_A"


def test_wrong_dtype_is_rejected() -> None:
    d = good()
    d["a.lora_A"] = torch.zeros(2, 3, dtype=torch.int64)
    assert "dtype torch.int64" in (validate_update(d, GLOBAL, None) or "")
    d["a.lora_A"] = torch.zeros(2, 3, dtype=torch.float16)
    assert "dtype torch.float16" in (validate_update(d, GLOBAL, None) or "")


def test_norm_bound() -> None:
    norm = update_norm(good())
    assert abs(norm - (12 * 0.25) ** 0.5) < 1e-12
    assert validate_update(good(), GLOBAL, max_norm=norm) is None
    assert "exceeds the bound" in (validate_update(good(), GLOBAL, max_norm=norm * 0.99) or "")
