"""DP in a real local run: epsilon in every round summary, the adaptive clip norm carried in the server
state, and the run ending with a reason before targetEpsilon would be exceeded."""

from __future__ import annotations

import io
from pathlib import Path

import pytest
import yaml
from rich.console import Console

from fedtune.aggregation.encoding import load_state
from fedtune.api import SpecError, load_resource
from fedtune.local.identities import local_ledger
from fedtune.local.runner import LocalRun
from fedtune.privacy import CLIP_NORM, epsilon
from tests.federation.conftest import tiny_resource, write_data

pytestmark = pytest.mark.slow

PRIVACY = {"enabled": True, "clipNorm": 0.5, "adaptiveClipping": True, "noiseMultiplier": 3.0, "delta": 1e-5}


def spec_file(tmp_path: Path, **overrides: object) -> Path:
    write_data(tmp_path / "data")
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(tiny_resource(tmp_path / "data", **overrides)))
    return path


def test_dp_run_reports_epsilon_and_stops_before_the_target(tmp_path: Path) -> None:
    # All 3 clients every round (q = 1), z = 3: epsilon is 1.39, 2.03, 2.54 after rounds 1, 2, 3.
    target = (epsilon(3.0, 1.0, 2, 1e-5) + epsilon(3.0, 1.0, 3, 1e-5)) / 2
    path = spec_file(tmp_path, privacy={**PRIVACY, "targetEpsilon": target}, aggregation={"rounds": 5, "minClients": 3})
    out = tmp_path / "runs"
    final = LocalRun(path, output=out, console=Console(file=io.StringIO())).run(live=False)
    ledger = local_ledger(out / "tiny")

    assert final.rounds == 2
    assert final.stopped_early is not None
    assert final.stopped_early.startswith("privacy.targetEpsilon: round 2 would raise client alpha's epsilon to 2.54")
    for r in range(2):
        s = ledger.summary(r)
        assert s is not None and s.epsilon == epsilon(3.0, 1.0, r + 1, 1e-5)
        assert s.client_epsilon == dict.fromkeys(("alpha", "beta", "gamma"), s.epsilon)
        assert s.epsilon <= target
        # Released under DP: only noised outputs and what each client spent, no client's own norm or loss.
        assert (s.client_metrics, s.update_norms, s.train_loss, s.eval_loss) == ({}, {}, None, None)
    assert final.client_eval_loss == {} and final.eval_loss is None
    gm = ledger.global_marker(1)
    assert gm is not None and gm.server_state_sha256
    clip = float(load_state(ledger.server_state_bytes(gm) or b"")[CLIP_NORM])
    assert clip > 0 and clip != PRIVACY["clipNorm"]


def test_dp_with_a_robust_strategy_is_refused(tmp_path: Path) -> None:
    path = spec_file(tmp_path, privacy=PRIVACY, aggregation={"strategy": "fedmedian"})
    with pytest.raises(SpecError, match=r"spec\.privacy\.enabled: .* fedmedian"):
        load_resource(path)
