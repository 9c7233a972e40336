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
import math
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


_DTYPES = {"fp32": "F32", "bf16": "BF16", "int8": "I8", "int8-channel": "I8"}
_ITEMSIZE = {"F32": 4, "BF16": 2, "I8": 1}
# Room for the JSON header: its fixed part, and per tensor its name, dtype, shape and offsets.
_HEADER_FIXED, _HEADER_PER_TENSOR = 1024, 512


def expected_layout(reference: State, encoding: str) -> dict[str, tuple[str, tuple[int, ...]]]:
    """Name -> (safetensors dtype, shape) of every tensor an honest update of `reference` carries."""
    dtype = _DTYPES[encoding]
    layout = {k: (dtype, tuple(v.shape)) for k, v in reference.items()}
    if encoding.startswith("int8"):
        rows = sum(_rows(v, encoding == "int8-channel") for v in reference.values())
        layout[SCALES] = ("F32", (rows,))
    return layout


def size_bounds(reference: State, encoding: str) -> tuple[int, int]:
    """The smallest and largest byte size an honest update can have, known before reading it."""
    layout = expected_layout(reference, encoding)
    data = sum(_ITEMSIZE[dt] * math.prod(shape) for dt, shape in layout.values())
    return data + 8, data + 8 + _HEADER_FIXED + _HEADER_PER_TENSOR * len(layout)


def check_header(data: bytes, reference: State, encoding: str) -> str | None:
    """Why the safetensors header is not that of an honest update (keys, dtypes, shapes), or None.

    Read before any tensor is decoded, so a hostile file costs no more than its header.
    """
    if len(data) < 8:
        return "not a safetensors file (too short)"
    (size,) = struct.unpack("<Q", data[:8])
    if size > len(data) - 8:
        return f"header claims {size} bytes, the object has {len(data) - 8} after its length"
    want = expected_layout(reference, encoding)
    if size > _HEADER_FIXED + _HEADER_PER_TENSOR * len(want):
        return f"header of {size} bytes, more than an update of {len(want)} tensors needs"
    try:
        header = json.loads(data[8 : 8 + size])
    except (ValueError, RecursionError):
        return "not a safetensors file (bad header)"
    if not isinstance(header, dict):
        return "not a safetensors file (bad header)"
    meta = header.pop("__metadata__", None) or {}
    got_encoding = meta.get("encoding", "fp32") if isinstance(meta, dict) else None
    if got_encoding != encoding:
        return f"encoding {got_encoding!r}, the run uses {encoding!r}"
    missing, extra = sorted(set(want) - set(header)), sorted(set(header) - set(want))
    if missing:
        return f"missing key {missing[0]}" + (f" and {len(missing) - 1} more" if len(missing) > 1 else "")
    if extra:
        return f"unexpected key {extra[0]}"
    for k, (dtype, shape) in want.items():
        entry = header[k]
        if not isinstance(entry, dict):
            return f"{k}: not a tensor entry"
        got = entry.get("dtype")
        if got != dtype:
            return f"{k}: dtype {str(got)[:16]}, expected {dtype}"
        dims = entry.get("shape")
        if not isinstance(dims, list) or [d for d in dims if type(d) is not int] or tuple(dims) != shape:
            return f"{k}: shape {str(dims)[:64]}, expected {shape}"
    return None


def save_state(state: State) -> bytes:
    """A global adapter or server state as safetensors, in its own dtypes."""
    return st_save({k: v.detach().contiguous().cpu() for k, v in state.items()})


def load_state(data: bytes) -> State:
    """The tensors `save_state` wrote, bit for bit."""
    return dict(st_load(data))
