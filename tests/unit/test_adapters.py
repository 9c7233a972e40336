"""Every PEFT method on a tiny Llama: built alike by every party, trainable, and its state round-trips.

The aggregator's adapter, built over shape-only stand-ins of the base, must equal a client's bit for bit.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml

from fedtune.api import FederatedFineTuneSpec, parse_resource
from fedtune.errors import FedtuneError
from fedtune.training.adapter_only import build_adapter_only
from fedtune.training.model import adapter_state, build_model, load_adapter, seeded_model, trainable_keys
from fedtune.training.tokenizer import byte_tokenizer
from fedtune.training.trainer import Options, train

QUICKSTART = Path(__file__).resolve().parents[2] / "examples" / "quickstart.yaml"
METHODS = ["lora", "ffa-lora", "dora", "ia3", "prompt-tuning", "prefix-tuning"]
IA3 = {"targetModules": ["q_proj", "v_proj", "down_proj"], "feedforwardModules": ["down_proj"]}
TOKENIZER = byte_tokenizer()


def spec_of(method: str = "lora", model: dict[str, Any] | None = None, **peft: Any) -> FederatedFineTuneSpec:
    """The quickstart (a two-layer Llama built from a config) with the given method and fields."""
    doc: dict[str, Any] = yaml.safe_load(QUICKSTART.read_text())
    ia3 = IA3 if method == "ia3" else {}
    doc["spec"]["peft"] = {**doc["spec"]["peft"], "method": method, "numVirtualTokens": 4, **ia3, **peft}
    doc["spec"]["model"] = {**doc["spec"]["model"], **(model or {})}
    return parse_resource(doc).spec


def assert_same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k


@pytest.mark.parametrize("method", METHODS)
def test_each_method_builds_alike_trains_and_round_trips(method: str) -> None:
    spec = spec_of(method)
    model = build_model(spec, TOKENIZER)
    state = adapter_state(model)
    keys = trainable_keys(model)
    assert state and keys and set(keys) <= set(state)
    assert all(v.dtype == torch.float32 for v in state.values())
    assert_same(state, adapter_state(build_model(spec, TOKENIZER)))

    ids = torch.tensor([TOKENIZER("the cat sat")["input_ids"]])
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    trained = [p for p in model.parameters() if p.requires_grad]
    assert torch.isfinite(loss) and all(p.grad is not None for p in trained)
    assert any(p.grad.abs().sum() > 0 for p in trained if p.grad is not None)  # LoRA's A gets none while B = 0

    gen = torch.Generator().manual_seed(7)
    changed = {k: v + torch.randn(v.shape, generator=gen) for k, v in state.items()}
    load_adapter(model, changed)
    assert_same(adapter_state(model), changed)


@pytest.mark.parametrize("method", METHODS)
def test_each_method_trains_under_the_clients_loop(method: str) -> None:
    """The client's own loss (not the model's) must score the input's tokens even where a method adds virtual
    ones: prompt tuning's logits start with its virtual tokens."""
    model = build_model(spec_of(method), TOKENIZER)
    ids = torch.tensor([TOKENIZER("the cat sat on the mat")["input_ids"]] * 2)
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}
    before = adapter_state(model)
    done = train(model, [[batch]] * 2, Options(rate=lambda i: 1e-2))
    after = adapter_state(model)
    assert done.steps == 2 and math.isfinite(done.loss)
    assert any(not torch.equal(after[k], before[k]) for k in trainable_keys(model))


def test_ffa_lora_trains_and_sends_only_b() -> None:
    keys = trainable_keys(build_model(spec_of("ffa-lora"), TOKENIZER))
    assert keys and all("lora_B" in k for k in keys)


@pytest.mark.parametrize("method", METHODS)
def test_aggregator_adapter_equals_a_clients(method: str, tmp_path: Path) -> None:
    spec = spec_of(method)
    adapter_only = build_adapter_only(spec, len(TOKENIZER))
    client = build_model(spec, TOKENIZER)
    assert_same(adapter_state(adapter_only), adapter_state(client))
    assert trainable_keys(adapter_only) == trainable_keys(client)
    # Its saved adapter is byte for byte the one the full model saves.
    adapter_only.save_pretrained(tmp_path / "a")
    client.save_pretrained(tmp_path / "b")
    for name in ("adapter_model.safetensors", "adapter_config.json"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()


def test_dora_magnitude_of_a_pretrained_model_is_read_from_its_checkpoint(tmp_path: Path) -> None:
    seeded_model(spec_of(), len(TOKENIZER)).save_pretrained(tmp_path)
    spec = spec_of("dora", model={"config": None, "path": str(tmp_path)})
    assert_same(adapter_state(build_adapter_only(spec, len(TOKENIZER))), adapter_state(build_model(spec, TOKENIZER)))


def test_base_in_half_precision_keeps_the_adapter_in_float32() -> None:
    model = build_model(spec_of("dora", model={"dtype": "bfloat16"}), TOKENIZER)
    dtypes = {p.dtype for p in model.parameters() if p.requires_grad}
    assert dtypes == {torch.float32}
    assert model.get_base_model().model.embed_tokens.weight.dtype == torch.bfloat16


@pytest.mark.parametrize("method", ["lora", "ffa-lora", "dora", "ia3"])
def test_a_target_module_that_matches_nothing_is_named(method: str) -> None:
    spec = spec_of(method, targetModules=["q_proj", "qproj"], feedforwardModules=[])
    with pytest.raises(FedtuneError, match=r"^spec\.peft\.targetModules: .*'qproj'"):
        build_model(spec, TOKENIZER)
    with pytest.raises(FedtuneError, match=r"^spec\.peft\.targetModules: .*'qproj'"):
        build_adapter_only(spec, len(TOKENIZER))


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks what a machine without a GPU says")
def test_a_4_bit_base_without_a_gpu_is_refused() -> None:
    with pytest.raises(FedtuneError, match=r"^spec\.model\.quantization: nf4 needs a CUDA GPU"):
        build_model(spec_of(model={"quantization": "nf4"}), TOKENIZER)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks what a machine without a GPU says")
def test_attention_is_chosen_for_the_machine() -> None:
    with pytest.raises(FedtuneError, match=r"^spec\.model\.attention: flash_attention_2 needs a CUDA GPU"):
        build_model(spec_of(model={"attention": "flash_attention_2"}), TOKENIZER)
    for name, chosen in (("auto", "sdpa"), ("eager", "eager")):
        model = build_model(spec_of(model={"attention": name}), TOKENIZER)
        assert model.get_base_model().config._attn_implementation == chosen
