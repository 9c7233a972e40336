"""How client updates travel: safetensors bytes, with the encoding named in the file's metadata.

- fp32: as trained.
- bf16: half the bytes; 8 bits of mantissa (relative error ≤ 2⁻⁹ per value).
- int8: one float32 scale per tensor, values rounded to the nearest of 255 levels in [−max, max].
- int8-channel: one scale per row (first dimension), so one large row does not coarsen the others.

The int8 scales of all tensors travel as one float32 tensor `__scales__`, in sorted key order, which
keeps the header small. Rounding is to nearest, so decoding is deterministic.
"""

from __future__ import annotations

import json
import struct

import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from fedtune.aggregation.base import State
from fedtune.errors import FedtuneError
from fedtune.tensors import single_threaded

ENCODINGS = ("fp32", "bf16", "int8", "int8-channel")
SCALES = "__scales__"
INT8_MAX = 127.0


def _rows(t: torch.Tensor, per_channel: bool) -> int:
    """How many scales a tensor gets: one per row (first dimension) or one in all."""
    return t.shape[0] if per_channel and t.dim() >= 2 and t.shape[0] > 0 else 1


def _quantize(state: State, per_channel: bool) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    scales: list[torch.Tensor] = []
    for k in sorted(state):
        t = state[k].detach().to(torch.float32).cpu()
        flat = t.reshape(_rows(t, per_channel), -1)
        peak = flat.abs().amax(dim=1) if flat.shape[1] else torch.zeros(flat.shape[0])
        scale = peak / INT8_MAX
        q = torch.round(flat / torch.where(scale > 0, scale, 1.0)[:, None]).clamp_(-INT8_MAX, INT8_MAX)
        out[k] = q.to(torch.int8).reshape(t.shape)
        scales.append(scale)
    out[SCALES] = torch.cat(scales) if scales else torch.zeros(0)
    return out


def _dequantize(tensors: dict[str, torch.Tensor], per_channel: bool) -> State:
    scales = tensors.pop(SCALES, torch.zeros(0)).to(torch.float32)
    out: State = {}
    at = 0
    for k in sorted(tensors):
        q = tensors[k]
        n = _rows(q, per_channel)
        if at + n > scales.numel():
            raise FedtuneError(f"update: {SCALES} too short for {k}")
        out[k] = (q.reshape(n, -1).to(torch.float32) * scales[at : at + n, None]).reshape(q.shape)
        at += n
    return out


@single_threaded()
def encode(state: State, encoding: str = "fp32") -> bytes:
    """Serialise an update in the named encoding."""
    if encoding not in ENCODINGS:
        raise FedtuneError(f"spec.aggregation.encoding: unsupported encoding {encoding!r}")
    if SCALES in state:
        raise FedtuneError(f"update: key {SCALES!r} is reserved")
    if encoding.startswith("int8"):
        tensors = _quantize(state, per_channel=encoding == "int8-channel")
    else:
        dtype = torch.bfloat16 if encoding == "bf16" else torch.float32
        tensors = {k: v.detach().to(dtype).contiguous().cpu() for k, v in state.items()}
    return st_save(tensors, metadata={"encoding": encoding})


def encoding_of(data: bytes) -> str:
    """The encoding named in the safetensors header (fp32 for files written without one)."""
    if len(data) < 8:
        raise FedtuneError("update: not a safetensors file (too short)")
    (size,) = struct.unpack("<Q", data[:8])
    try:
        header = json.loads(data[8 : 8 + size])
    except ValueError:
        raise FedtuneError("update: not a safetensors file (bad header)") from None
    enc = str(header.get("__metadata__", {}).get("encoding", "fp32"))
    if enc not in ENCODINGS:
        raise FedtuneError(f"update: unknown encoding {enc!r}")
    return enc


@single_threaded()
def decode(data: bytes) -> State:
    """Float32 tensors back from any encoding `encode` writes."""
    enc = encoding_of(data)
    tensors = dict(st_load(data))
    if enc.startswith("int8"):
        return _dequantize(tensors, per_channel=enc == "int8-channel")
    return {k: v.to(torch.float32) for k, v in tensors.items()}


def save_state(state: State) -> bytes:
    """A global adapter or server state as safetensors, in its own dtypes."""
    return st_save({k: v.detach().contiguous().cpu() for k, v in state.items()})


def load_state(data: bytes) -> State:
    """The tensors `save_state` wrote, bit for bit."""
    return dict(st_load(data))
