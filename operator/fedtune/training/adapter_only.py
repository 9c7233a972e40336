"""The adapter without its base model, for the aggregator, which only ever handles adapter weights.

The base model is built on the meta device and each of its tensors replaced by a shape-only stand-in
(one element, broadcast to the tensor's shape): peft sees a CPU model of the right shapes and dtype, so
it builds the adapter on the CPU and draws its initial weights from the run's seed in the same order as a
client's `build_model` does; the base's weights are never allocated.

DoRA's magnitude is the norm of each targeted base weight, so it is set from those weights alone, one
at a time: read from the checkpoint's safetensors files, or, for a model built from spec.model.config,
whose weights exist only as the seeded draw of the whole model, taken from that model built once on CPU.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from fedtune.api.spec import FederatedFineTuneSpec, PeftMethod
from fedtune.errors import FedtuneError
from fedtune.training.adapters import attach_adapter
from fedtune.training.model import base_dtype, model_config, seeded_model
from fedtune.training.sources import resolve_model


def build_adapter_only(spec: FederatedFineTuneSpec, vocab_size: int) -> Any:
    """The peft model of the run with its adapter on CPU, initialised exactly as a client's, over stand-ins."""
    from transformers import AutoModelForCausalLM

    config = model_config(spec, vocab_size)
    with torch.device("meta"):
        base = AutoModelForCausalLM.from_config(config)  # type: ignore[no-untyped-call]
    _stand_in(base, base_dtype(spec.model.dtype))
    model = attach_adapter(base, spec)
    if spec.peft.method == PeftMethod.DORA:
        _init_magnitudes(model, spec, vocab_size)
    return model


def _stand_in(model: torch.nn.Module, dtype: torch.dtype) -> None:
    """Replace every meta tensor by a one-element CPU tensor broadcast to its shape (floats in dtype)."""
    for module in model.modules():
        for name, param in module._parameters.items():
            if param is not None:
                module._parameters[name] = torch.nn.Parameter(_shape_only(param, dtype), requires_grad=False)
        for name, buffer in module._buffers.items():
            if buffer is not None:
                module._buffers[name] = _shape_only(buffer, dtype)


def _shape_only(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return torch.zeros((), dtype=dtype if t.is_floating_point() else t.dtype).expand(t.shape)


def _init_magnitudes(model: Any, spec: FederatedFineTuneSpec, vocab_size: int) -> None:
    """Set each DoRA magnitude from its base weight, as peft does when it attaches DoRA to a real base."""
    from peft.tuners.lora import LoraLayer

    layers = {n: m for n, m in model.get_base_model().named_modules() if isinstance(m, LoraLayer)}
    weights = _base_weights(spec, vocab_size, [f"{n}.weight" for n in layers])
    for name, layer in layers.items():
        base: Any = layer.get_base_layer()
        stand_in = base.weight
        base.weight = torch.nn.Parameter(weights(f"{name}.weight").to(stand_in.dtype), requires_grad=False)
        for adapter in layer.active_adapters:
            # The call peft makes while attaching DoRA; float32, as A and B are, whatever the base's dtype.
            layer.lora_variant[adapter].init(layer, adapter_name=adapter)
        base.weight = stand_in


def _base_weights(spec: FederatedFineTuneSpec, vocab_size: int, keys: list[str]) -> Callable[[str], torch.Tensor]:
    """A function from a base weight's key to the tensor, read one at a time where the checkpoint allows."""
    source = resolve_model(spec)
    if source is None:
        built = dict(seeded_model(spec, vocab_size).named_parameters())
        return lambda key: built[key].detach()
    from safetensors import safe_open

    where = {}
    for file in _checkpoint_files(source.location, source.kwargs()):
        with safe_open(str(file), framework="pt") as f:
            where.update(dict.fromkeys(f.keys(), file))
    missing = [k for k in keys if k not in where]
    if missing:
        raise FedtuneError(f"spec.peft.method: dora needs the base weight {missing[0]}, which the checkpoint lacks")

    def read(key: str) -> torch.Tensor:
        with safe_open(str(where[key]), framework="pt") as f:
            tensor: torch.Tensor = f.get_tensor(key)
            return tensor

    return read


def _checkpoint_files(location: str, kwargs: dict[str, Any]) -> list[Path]:
    """The model's safetensors files: in its folder, or fetched from the hub (weights only, no base built)."""
    folder = Path(location)
    if not folder.is_dir():
        from huggingface_hub import snapshot_download

        try:
            folder = Path(snapshot_download(location, allow_patterns=["*.safetensors"], **kwargs))
        except (OSError, ValueError) as e:
            raise FedtuneError(f"spec.model: cannot load {location!r}: {str(e).splitlines()[0]}") from None
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise FedtuneError(f"spec.peft.method: dora needs the base weights, and {location!r} has no safetensors")
    return files
