"""The base model each client adapts: its config, precision, attention, 4-bit loading and device."""

from __future__ import annotations

import importlib.util
import tempfile
from typing import Any

import torch

from fedtune.api.spec import FederatedFineTuneSpec
from fedtune.errors import FedtuneError
from fedtune.training.adapters import State, adapter_state, attach_adapter, load_adapter, trainable_keys
from fedtune.training.sources import resolve_model

__all__ = [
    "State",
    "adapter_state",
    "attach_adapter",
    "attention",
    "base_dtype",
    "build_base_model",
    "build_model",
    "device",
    "load_adapter",
    "model_config",
    "seeded_model",
    "trainable_keys",
]

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def base_dtype(name: str) -> torch.dtype:
    """spec.model.dtype as a torch dtype: auto is bfloat16 on a GPU that supports it, else float32."""
    if name == "auto":
        return torch.bfloat16 if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else torch.float32
    return _DTYPES[name]


def device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _installed(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


def attention(name: str, dtype: torch.dtype) -> str:
    """spec.model.attention as transformers' attn_implementation: auto is flash_attention_2 where it can run
    (flash-attn installed, a half-precision base, an Ampere or newer GPU)."""
    cuda = torch.cuda.is_available()
    if name == "auto":
        flash = (
            cuda
            and _installed("flash_attn")
            and dtype in (torch.bfloat16, torch.float16)
            and torch.cuda.get_device_capability()[0] >= 8
        )
        return "flash_attention_2" if flash else "sdpa"
    if name == "flash_attention_2" and not (cuda and _installed("flash_attn")):
        missing = "a CUDA GPU" if not cuda else "the flash-attn package"
        raise FedtuneError(f"spec.model.attention: flash_attention_2 needs {missing}, which this machine lacks")
    return name


def _quantization(spec: FederatedFineTuneSpec) -> dict[str, Any]:
    """from_pretrained's arguments for spec.model.quantization (nf4: QLoRA's 4-bit base, on this GPU)."""
    if spec.model.quantization is None:
        return {}
    if not torch.cuda.is_available():
        raise FedtuneError("spec.model.quantization: nf4 needs a CUDA GPU, which this machine lacks")
    if not _installed("bitsandbytes"):
        raise FedtuneError("spec.model.quantization: nf4 needs the bitsandbytes package, which is not installed")
    from transformers import BitsAndBytesConfig

    config = BitsAndBytesConfig(  # type: ignore[no-untyped-call]
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_compute_dtype=torch.bfloat16,
        bnb_4bit_use_double_quant=True,
    )
    return {"quantization_config": config, "device_map": {"": torch.cuda.current_device()}}


def model_config(spec: FederatedFineTuneSpec, vocab_size: int) -> Any:
    """The transformers config of the base model: the pretrained one's, or one built from spec.model.config."""
    from transformers import AutoConfig

    source = resolve_model(spec, weights=False)
    if source is not None:
        try:
            return AutoConfig.from_pretrained(source.location, **source.kwargs())
        except (OSError, ValueError) as e:
            raise FedtuneError(f"spec.model: cannot load {source.location!r}: {str(e).splitlines()[0]}") from None
    cfg = dict(spec.model.config or {})
    model_type = cfg.pop("modelType", cfg.pop("model_type", "llama"))
    cfg.setdefault("vocab_size", vocab_size)
    try:
        return AutoConfig.for_model(model_type, **cfg)
    except (KeyError, ValueError, TypeError) as e:
        raise FedtuneError(f"spec.model.config: {e}") from None


def seeded_model(spec: FederatedFineTuneSpec, vocab_size: int, **kwargs: Any) -> Any:
    """The model built from spec.model.config, with weights drawn from spec.model.seed (float32, CPU)."""
    from transformers import AutoModelForCausalLM

    config = model_config(spec, vocab_size)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(spec.model.seed)
        return AutoModelForCausalLM.from_config(config, **kwargs)  # type: ignore[no-untyped-call]


def _pretrained(location: str, **kwargs: Any) -> Any:
    from transformers import AutoModelForCausalLM

    try:
        return AutoModelForCausalLM.from_pretrained(location, **kwargs)
    except (OSError, ValueError) as e:
        raise FedtuneError(f"spec.model: cannot load {location!r}: {str(e).splitlines()[0]}") from None


def build_base_model(spec: FederatedFineTuneSpec, vocab_size: int) -> Any:
    """A pretrained causal LM, or one built from spec.model.config with weights seeded by spec.model.seed.

    Its weights are in spec.model.dtype, or in 4 bits on the GPU under spec.model.quantization.
    """
    m = spec.model
    dtype = base_dtype(m.dtype)
    kwargs: dict[str, Any] = {
        "dtype": dtype,
        "attn_implementation": attention(m.attention, dtype),
        **_quantization(spec),
    }
    source = resolve_model(spec)
    if source is not None:
        return _pretrained(source.location, **source.kwargs(), **kwargs)
    if "quantization_config" not in kwargs:
        return seeded_model(spec, vocab_size, attn_implementation=kwargs["attn_implementation"]).to(dtype)
    # bitsandbytes quantizes while loading, so a built model is saved first and loaded back in 4 bits.
    with tempfile.TemporaryDirectory() as folder:
        seeded_model(spec, vocab_size).save_pretrained(folder)
        return _pretrained(folder, **kwargs)


def build_model(spec: FederatedFineTuneSpec, tokenizer: Any) -> Any:
    """Base model plus adapter, on the run's device; a 4-bit base is prepared for training first."""
    base = build_base_model(spec, len(tokenizer))
    if spec.model.quantization is None:
        return attach_adapter(base, spec).to(device())
    from peft import prepare_model_for_kbit_training

    checkpointing = spec.training.gradient_checkpointing
    base = prepare_model_for_kbit_training(base, use_gradient_checkpointing=checkpointing)  # type: ignore[no-untyped-call]
    return attach_adapter(base, spec)  # already on the GPU, where bitsandbytes loaded it
