"""bench/gpu.py end to end on a tiny config, so the GPU benchmark keeps working between GPU runs."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from bench import gpu


def rows(text: str) -> dict[str, list[str]]:
    """The main table's rows for the tiny shape, by measure."""
    out = {}
    for line in text.splitlines():
        cells = [c.strip() for c in line.strip("|").split("|")]
        if len(cells) == 6 and cells[0] == "tiny":
            out[cells[1]] = cells[2:]
    return out


def test_cpu_smoke_measures_every_row(tmp_path: Path) -> None:
    out = tmp_path / "gpu.md"
    gpu.main(["--cpu-smoke", "--steps", "2", "--warmup", "1", "--out", str(out)])
    table = rows(out.read_text())
    assert set(table) == {"tokens/s", gpu.MFU_ROW, "peak memory", gpu.OVERHEAD_ROW}
    plain, ours, ratio, target = table["tokens/s"]
    assert float(plain) > 0 and float(ours) > 0
    assert re.fullmatch(r"\d+\.\d\d×", ratio) and target.startswith("≥ 0.97×: ")
    overhead = table[gpu.OVERHEAD_ROW][1]
    assert re.fullmatch(r"\d+\.\d\d% of \d+\.\d\d s", overhead), overhead
    assert table[gpu.OVERHEAD_ROW][3].startswith("≤ 2%: ")


def test_flops_rule_on_the_8b_shape() -> None:
    # Llama-3-8B: 8,030,261,248 parameters less the embedding lookup (525,336,576) and the norms (266,240).
    n_base = gpu.base_matmul_params(gpu.SHAPES["Llama-3-8B"])
    assert n_base == 7_504_658_432
    assert gpu.flops_per_token(n_base, 1000) == 4 * n_base + 6000


def test_peak_flops_by_name_and_override(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(gpu.PEAK_ENV, raising=False)
    assert gpu.peak_flops("NVIDIA H100 80GB HBM3") == 989e12
    assert gpu.peak_flops("NVIDIA H100 PCIe") == 756e12
    assert gpu.peak_flops("NVIDIA A100-SXM4-80GB") == 312e12
    assert gpu.peak_flops("Some GPU") is None
    monkeypatch.setenv(gpu.PEAK_ENV, "100")
    assert gpu.peak_flops("Some GPU") == 100e12
