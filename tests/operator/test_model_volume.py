"""A pretrained model on a volume: the operator mounts it read-only into every pod, which load it offline."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.federation.test_model_sources import save_tiny_model
from tests.operator.conftest import Operator, Runs, tiny_run

pytestmark = [pytest.mark.cluster, pytest.mark.slow]


def test_a_model_on_a_host_path_volume_runs_to_success(
    operator: Operator, runs: Runs, tiny_data: str, tmp_path: Path
) -> None:
    save_tiny_model(tmp_path / "models" / "tiny")
    operator.start()
    doc = tiny_run("fromvolume", training={"localSteps": 2}, aggregation={"rounds": 1})
    doc["spec"]["model"] = {"path": "tiny", "volume": {"hostPath": {"path": str(tmp_path / "models")}}}
    del doc["spec"]["tokenizer"]  # the tokenizer saved with the model
    runs.create(doc)
    done = runs.wait_state("fromvolume", "Succeeded", timeout=400)["status"]
    assert done["progress"] == "1/1"

    pods = operator.cluster.core().list_namespaced_pod(operator.namespace, label_selector="fedtune.io/run=fromvolume")
    for pod in pods.items:
        env = {e.name: e.value for e in pod.spec.containers[0].env}
        assert env["FEDTUNE_MODEL_ROOT"] == "/var/fedtune/model" and env["HF_HUB_OFFLINE"] == "1"
        mount = next(m for m in pod.spec.containers[0].volume_mounts if m.name == "model")
        assert mount.read_only is True
