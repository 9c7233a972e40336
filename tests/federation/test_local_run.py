"""`fedtune run` end to end: the loss falls, the adapter loads with peft, files a user expects exist."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest
import torch
from rich.console import Console

from fedtune.aggregation.encoding import load_state
from fedtune.api import load_resource
from fedtune.federation import protocol as p
from fedtune.local.runner import LocalRun
from fedtune.storage import open_store
from fedtune.training.model import build_base_model, build_model, load_adapter
from fedtune.training.tokenizer import build_tokenizer

pytestmark = pytest.mark.slow


def test_run_trains_and_writes_a_peft_adapter(tiny: Path, tmp_path: Path) -> None:
    out = tmp_path / "runs"
    final = LocalRun(tiny, output=out, console=Console(file=io.StringIO())).run(live=False)
    folder = out / "tiny"
    records = json.loads((folder / "metrics.json").read_text())
    assert [r["round"] for r in records] == [0, 1, 2, 3]
    assert all(r["bytes"] > 0 for r in records[:3])
    assert (folder / "loss.png").read_bytes()[:4] == b"\x89PNG"

    store = open_store(str(folder))
    before = p.read_record(store, p.summary(0), p.RoundSummary)
    assert before is not None
    for client, loss in final.client_eval_loss.items():
        assert loss < before.client_metrics[client].eval_loss, client

    # The final adapter loads with peft and reproduces the aggregator's global state exactly.
    from peft import PeftModel

    spec = load_resource(tiny).spec
    tok = build_tokenizer(spec)
    loaded = PeftModel.from_pretrained(build_base_model(spec, len(tok)), str(folder / "final")).eval()
    gm = p.read_record(store, p.global_marker(3), p.GlobalMarker)
    assert gm is not None and gm.final
    reference = build_model(spec, tok).eval()
    load_adapter(reference, load_state(store.get(p.global_data(3))))
    ids = torch.tensor([tok("the cat sat")["input_ids"]])
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, reference(ids).logits)
        untrained = build_model(spec, tok).eval()(ids).logits
    assert not torch.equal(untrained, reference(ids).logits)

    # Running the same spec again resumes a finished run: nothing committed is rewritten.
    markers = {k: store.get(k) for k in store.list("rounds") if k.endswith(".json")}
    LocalRun(tiny, output=out, console=Console(file=io.StringIO())).run(live=False)
    assert {k: store.get(k) for k in store.list("rounds") if k.endswith(".json")} == markers
