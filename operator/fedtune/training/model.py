"""The base model and its PEFT adapter, and moving adapter weights in and out of it."""

from __future__ import annotations

from typing import Any

import torch

from fedtune.api.spec import FederatedFineTuneSpec, PeftMethod
from fedtune.errors import FedtuneError
from fedtune.training.sources import resolve_model

State = dict[str, torch.Tensor]

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def base_dtype(name: str) -> torch.dtype:
    """spec.model.dtype as a torch dtype: auto is bfloat16 on a GPU that supports it, else float32."""
    if name == "auto":
        return torch.bfloat16 if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else torch.float32
    return _DTYPES[name]


def device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def build_base_model(spec: FederatedFineTuneSpec, vocab_size: int) -> Any:
    """A pretrained causal LM, or one built from spec.model.config with weights seeded by spec.model.seed."""
    from transformers import AutoConfig, AutoModelForCausalLM

    m = spec.model
    dtype = base_dtype(m.dtype)
    source = resolve_model(spec)
    if source is not None:
        try:
            return AutoModelForCausalLM.from_pretrained(source.location, dtype=dtype, **source.kwargs())
        except (OSError, ValueError) as e:
            raise FedtuneError(f"spec.model: cannot load {source.location!r}: {str(e).splitlines()[0]}") from None
    cfg = dict(m.config or {})
    model_type = cfg.pop("modelType", cfg.pop("model_type", "llama"))
    cfg.setdefault("vocab_size", vocab_size)
    try:
        config = AutoConfig.for_model(model_type, **cfg)
    except (KeyError, ValueError, TypeError) as e:
        raise FedtuneError(f"spec.model.config: {e}") from None
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(m.seed)
        model = AutoModelForCausalLM.from_config(config)  # type: ignore[no-untyped-call]
    return model.to(dtype)


def attach_adapter(base: Any, spec: FederatedFineTuneSpec) -> Any:
    """Wrap the base model in a LoRA adapter whose initial A is seeded by the run (same for all)."""
    from peft import LoraConfig, get_peft_model

    p = spec.peft
    config = LoraConfig(
        r=p.r,
        lora_alpha=p.alpha,
        lora_dropout=p.dropout,
        target_modules=list(p.target_modules),
        task_type="CAUSAL_LM",
    )
    if spec.model.name is not None:
        config.base_model_name_or_path = spec.model.name
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(spec.seed + 1)
            model = get_peft_model(base, config)
    except ValueError as e:
        raise FedtuneError(f"spec.peft.targetModules: {str(e).splitlines()[0]}") from None
    if p.method == PeftMethod.FFA_LORA:
        for name, param in model.named_parameters():
            if "lora_A" in name:
                param.requires_grad_(False)
    return model


def adapter_state(model: Any) -> State:
    """All adapter weights, keyed as peft saves them (the global adapter)."""
    from peft import get_peft_model_state_dict

    return {k: v.detach().clone().cpu() for k, v in get_peft_model_state_dict(model).items()}


def trainable_keys(model: Any) -> list[str]:
    """Keys of the adapter weights that clients train and send (all of LoRA, only B under FFA-LoRA)."""
    names = {n for n, p in model.named_parameters() if p.requires_grad}
    return sorted(k for k in adapter_state(model) if any(n.startswith(_param_prefix(k)) for n in names))


def _param_prefix(key: str) -> str:
    # peft saves "…q_proj.lora_A.weight"; the live parameter is "…q_proj.lora_A.default.weight".
    return key.rsplit(".", 1)[0]


def load_adapter(model: Any, state: State) -> None:
    """Set the adapter weights from a state (as adapter_state returns it)."""
    from peft import set_peft_model_state_dict

    result = set_peft_model_state_dict(model, state)
    unexpected = getattr(result, "unexpected_keys", [])
    if unexpected:
        raise FedtuneError(f"adapter state has keys the model lacks: {unexpected[0]}")


def build_model(spec: FederatedFineTuneSpec, tokenizer: Any) -> Any:
    """Base model plus adapter, on the run's device."""
    return attach_adapter(build_base_model(spec, len(tokenizer)), spec).to(device())
