"""The aggregator builds the adapter of a 1B-shaped Llama in memory on the order of the adapter, not the model."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

# In a fresh process (so nothing earlier inflates it): everything imported first, then the peak resident
# set reset (Linux's clear_refs) and read again after the adapter is built.
MEASURE = """
import json, sys
import torch
from fedtune.api import parse_resource
from fedtune.training.adapter_only import build_adapter_only

def status(key):
    return int(next(l for l in open("/proc/self/status") if l.startswith(key + ":")).split()[1]) * 1024

spec = parse_resource(json.loads(sys.argv[1])).spec
with torch.device("meta"):
    build_adapter_only(spec, 0)  # warms every lazy import on the way, allocating nothing
open("/proc/self/clear_refs", "w").write("5")
before = status("VmRSS")
model = build_adapter_only(spec, 0)
growth = status("VmHWM") - before
adapter = sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)  # LoRA: all trained
base = sum(p.numel() * 4 for p in model.parameters() if not p.requires_grad)  # the stand-ins' shapes
print(json.dumps({"growth": growth, "adapter": adapter, "base_fp32": base}))
"""

LLAMA_1B = {
    "modelType": "llama",
    "hidden_size": 2048,
    "intermediate_size": 8192,
    "num_hidden_layers": 16,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "vocab_size": 128256,
}


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="needs Linux's peak-RSS reset")
def test_aggregator_builds_the_adapter_of_a_1b_model_in_memory_of_its_size() -> None:
    resource = {
        "apiVersion": "fedtune.io/v1alpha1",
        "kind": "FederatedFineTune",
        "metadata": {"name": "memory"},
        "spec": {
            "model": {"config": LLAMA_1B},
            "tokenizer": {"builtin": "bytes"},
            "peft": {"r": 16, "alpha": 32, "targetModules": ["q_proj", "k_proj", "v_proj", "o_proj"]},
            "clients": [{"name": "a", "data": {"uri": "file:///a.jsonl"}}],
        },
    }
    out = subprocess.run(
        [sys.executable, "-c", MEASURE, json.dumps(resource)], capture_output=True, text=True, check=True, timeout=300
    )
    m = json.loads(out.stdout.splitlines()[-1])
    # LoRA r16 on q, k, v, o of 16 layers: 16 · 16 · (4096 + 2560 + 2560 + 4096) floats.
    assert m["adapter"] == 16 * 16 * (4096 + 2560 + 2560 + 4096) * 4
    assert m["base_fp32"] > 100 * m["adapter"]  # building the base, as clients do, could not pass
    assert m["growth"] <= 3 * m["adapter"], m
