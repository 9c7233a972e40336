"""How client updates travel: safetensors bytes, with the encoding named in the file's metadata."""

from __future__ import annotations

import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from fedtune.aggregation.base import State
from fedtune.errors import FedtuneError

ENCODINGS = ("fp32",)


def encode(state: State, encoding: str = "fp32") -> bytes:
    """Serialise an update in the named encoding."""
    if encoding != "fp32":
        raise FedtuneError(f"spec.aggregation.encoding: unsupported encoding {encoding!r}")
    tensors = {k: v.detach().to(torch.float32).contiguous().cpu() for k, v in state.items()}
    return st_save(tensors, metadata={"encoding": encoding})


def decode(data: bytes) -> State:
    """Float32 tensors back from any encoding `encode` writes."""
    return {k: v.to(torch.float32) for k, v in st_load(data).items()}


def save_state(state: State) -> bytes:
    """A global adapter or server state as safetensors, in its own dtypes."""
    return st_save({k: v.detach().contiguous().cpu() for k, v in state.items()})


def load_state(data: bytes) -> State:
    return dict(st_load(data))
