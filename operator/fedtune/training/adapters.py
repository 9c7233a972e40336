"""The PEFT adapter of each method, and moving its weights in and out of a model.

Every party builds the adapter with the run's seed, so all start from the same weights; from then on
the global adapter (all of `adapter_state`) is what every party loads.
"""

from __future__ import annotations

from typing import Any

import torch

from fedtune.api.spec import FederatedFineTuneSpec, PeftMethod
from fedtune.errors import FedtuneError

State = dict[str, torch.Tensor]

# Methods that put weights on spec.peft.targetModules (prompt and prefix tuning add virtual tokens instead).
TARGETED = frozenset({PeftMethod.LORA, PeftMethod.FFA_LORA, PeftMethod.DORA, PeftMethod.IA3})


def peft_config(spec: FederatedFineTuneSpec) -> Any:
    """The peft config of spec.peft.method."""
    from peft import IA3Config, LoraConfig, PrefixTuningConfig, PromptTuningConfig

    p = spec.peft
    config: Any
    if p.method == PeftMethod.IA3:
        config = IA3Config(
            target_modules=list(p.target_modules),
            feedforward_modules=list(p.feedforward_modules),
            task_type="CAUSAL_LM",
        )
    elif p.method == PeftMethod.PROMPT_TUNING:
        config = PromptTuningConfig(num_virtual_tokens=p.num_virtual_tokens, task_type="CAUSAL_LM")
    elif p.method == PeftMethod.PREFIX_TUNING:
        config = PrefixTuningConfig(num_virtual_tokens=p.num_virtual_tokens, task_type="CAUSAL_LM")
    else:  # the LoRA family: FFA-LoRA freezes A after it is built, DoRA adds a learned magnitude
        config = LoraConfig(
            r=p.r,
            lora_alpha=p.alpha,
            lora_dropout=p.dropout,
            target_modules=list(p.target_modules),
            use_dora=p.method == PeftMethod.DORA,
            task_type="CAUSAL_LM",
        )
    if spec.model.name is not None:
        config.base_model_name_or_path = spec.model.name
    return config


def check_targets(base: Any, spec: FederatedFineTuneSpec) -> None:
    """Refuse a target module name that matches no module (peft only refuses when none matches)."""
    if spec.peft.method not in TARGETED:
        return
    names = [n for n, _ in base.named_modules()]
    for target in spec.peft.target_modules:
        if not any(n == target or n.endswith(f".{target}") for n in names):
            raise FedtuneError(f"spec.peft.targetModules: no module of the model is named {target!r}")


def attach_adapter(base: Any, spec: FederatedFineTuneSpec) -> Any:
    """Wrap the base model in the spec's adapter, its initial weights seeded by the run (same for all).

    Adapter weights are float32 whatever the base's dtype (peft's autocast_adapter_dtype, on by default).
    """
    from peft import get_peft_model

    check_targets(base, spec)
    method = spec.peft.method
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(spec.seed + 1)
            model = get_peft_model(base, peft_config(spec))
    except ValueError as e:
        field = "targetModules" if method in TARGETED else "method"
        raise FedtuneError(f"spec.peft.{field}: {str(e).splitlines()[0]}") from None
    if method == PeftMethod.FFA_LORA:
        for name, param in model.named_parameters():
            if "lora_A" in name:
                param.requires_grad_(False)
    return model


def adapter_state(model: Any) -> State:
    """All adapter weights, keyed as peft saves them (the global adapter)."""
    from peft import get_peft_model_state_dict

    return {k: v.detach().clone().cpu() for k, v in get_peft_model_state_dict(model).items()}


def trainable_keys(model: Any) -> list[str]:
    """Keys of the adapter weights that clients train and send (all but A under FFA-LoRA)."""
    from peft import get_peft_model_state_dict

    saved = get_peft_model_state_dict(model)
    if model.active_peft_config.is_prompt_learning:
        return sorted(saved)  # the virtual tokens' embeddings, computed from the one trained table
    # peft saves the live parameters under other names, so they are matched by the memory they share.
    live = {p.data_ptr() for p in model.parameters() if p.requires_grad}
    return sorted(k for k, v in saved.items() if v.data_ptr() in live)


def load_adapter(model: Any, state: State) -> None:
    """Set the adapter weights from a state (as adapter_state returns it)."""
    from peft import get_peft_model_state_dict, set_peft_model_state_dict

    unexpected = sorted(set(state) - set(get_peft_model_state_dict(model)))
    if unexpected:
        raise FedtuneError(f"adapter state has keys the model lacks: {unexpected[0]}")
    set_peft_model_state_dict(model, state)
