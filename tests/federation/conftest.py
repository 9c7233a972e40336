"""A tiny federation (a one-layer Llama, three small silos) that trains in seconds on a CPU."""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

import pytest
import yaml

TOPICS = {
    "alpha": "the cat sat on the mat and purred",
    "beta": "stocks rose three percent at the close",
    "gamma": "the server returned error five hundred",
}


def write_data(folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for name, phrase in TOPICS.items():
        rng = random.Random(name)
        lines = [json.dumps({"text": f"{phrase} {rng.randint(0, 99)}"}) for _ in range(40)]
        (folder / f"{name}.jsonl").write_text("\n".join(lines) + "\n")


def tiny_resource(data_dir: Path, **overrides: Any) -> dict[str, Any]:
    spec: dict[str, Any] = {
        "model": {
            "config": {
                "modelType": "llama",
                "hidden_size": 32,
                "intermediate_size": 64,
                "num_hidden_layers": 1,
                "num_attention_heads": 2,
                "num_key_value_heads": 2,
                "max_position_embeddings": 64,
            }
        },
        "tokenizer": {"builtin": "bytes"},
        "peft": {"r": 4, "alpha": 8, "targetModules": ["q_proj", "v_proj"]},
        "training": {"localSteps": 4, "batchSize": 8, "learningRate": 0.02, "maxLength": 48},
        "aggregation": {"rounds": 3, "minClients": 2, "roundTimeoutSeconds": 120},
        "clients": [{"name": n, "data": {"uri": str(data_dir / f"{n}.jsonl")}} for n in TOPICS],
    }
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(spec.get(key), dict):
            spec[key] = {**spec[key], **value}
        else:
            spec[key] = value
    return {
        "apiVersion": "fedtune.io/v1alpha1",
        "kind": "FederatedFineTune",
        "metadata": {"name": "tiny"},
        "spec": spec,
    }


@pytest.fixture
def tiny(tmp_path: Path) -> Path:
    """A spec file for the tiny federation, its data beside it."""
    write_data(tmp_path / "data")
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(tiny_resource(tmp_path / "data")))
    return path
