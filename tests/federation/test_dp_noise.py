"""DP noise that nobody can subtract: not from the spec, not from the seed, not from the globals."""

from __future__ import annotations

from pathlib import Path

import torch

from fedtune.aggregation.encoding import encode
from fedtune.api import parse_resource
from fedtune.privacy import clip
from fedtune.storage import open_store
from fedtune.training.model import adapter_state
from tests.federation.conftest import tiny_resource, write_data
from tests.federation.parties import Parties, submit_update

PRIVACY = {"enabled": True, "clipNorm": 0.5, "noiseMultiplier": 1.0}


def one_round(data: Path, store_name: str) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Round 0 of a DP run with one participant, whose update the test knows; (its clipped update, the
    change of the global)."""
    doc = tiny_resource(data, privacy=PRIVACY, aggregation={"minClients": 1, "clientsPerRound": 1}, seed=7)
    spec = parse_resource(doc).spec
    store = open_store(f"memory://{store_name}/run")
    parties = Parties(spec)
    agg = parties.aggregator(store)
    gm = agg.publish_global(0, adapter_state(agg.model), {})
    state, _ = agg.load_global(gm)
    (client,) = gm.selected
    delta = {k: torch.full_like(state[k], 0.05) for k in agg.trainable}
    submit_update(parties.client(store, client), gm, client, encode(delta))
    agg.close_round(gm)
    new, _ = agg.load_global(agg.read_global_marker(1))
    norm = float(torch.sqrt(sum((v.double() ** 2).sum() for v in delta.values())))
    clipped = clip(delta, norm, PRIVACY["clipNorm"])
    return clipped, {k: new[k] - state[k] for k in agg.trainable}


def test_same_spec_and_seed_give_different_noise_and_the_update_stays_hidden(tmp_path: Path) -> None:
    write_data(tmp_path)
    clipped, change_a = one_round(tmp_path, "dp-a")
    _, change_b = one_round(tmp_path, "dp-b")
    # Same spec, same seed, same update: the released globals differ, so nothing in the spec or the seed
    # determines the noise.
    assert any(not torch.equal(change_a[k], change_b[k]) for k in change_a)
    # What the global reveals about the one participant is its clipped update plus Gaussian noise of
    # std z·C per coordinate; the difference of two runs is noise alone, of std √2·z·C.
    residual = torch.cat([(change_a[k] - clipped[k]).flatten() for k in change_a])
    expected = PRIVACY["noiseMultiplier"] * PRIVACY["clipNorm"]
    assert abs(float(residual.std()) / expected - 1) < 0.1
    assert float(residual.abs().mean()) > 10 * float(torch.cat([v.flatten() for v in clipped.values()]).abs().mean())
