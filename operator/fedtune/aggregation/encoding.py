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
import warnings
from dataclasses import dataclass
from typing import NamedTuple

import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from fedtune.aggregation.base import State
from fedtune.errors import FedtuneError
from fedtune.tensors import single_threaded

ENCODINGS = ("fp32", "bf16", "int8", "int8-channel")
SCALES = "__scales__"
INT8_MAX = 127.0


def _rows(shape: tuple[int, ...], per_channel: bool) -> int:
    """How many scales a tensor gets: one per row (first dimension) or one in all."""
    return shape[0] if per_channel and len(shape) >= 2 and shape[0] > 0 else 1


def _scale_ranges(shapes: dict[str, tuple[int, ...]], per_channel: bool) -> dict[str, tuple[int, int]]:
    """Each tensor's (first index, count) in `__scales__`, which lists them in sorted key order."""
    ranges: dict[str, tuple[int, int]] = {}
    at = 0
    for k in sorted(shapes):
        n = _rows(shapes[k], per_channel)
        ranges[k] = (at, n)
        at += n
    return ranges


def _quantize(state: State, per_channel: bool) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    scales: list[torch.Tensor] = []
    for k in sorted(state):
        t = state[k].detach().to(torch.float32).cpu()
        flat = t.reshape(_rows(tuple(t.shape), per_channel), -1)
        peak = flat.abs().amax(dim=1) if flat.shape[1] else torch.zeros(flat.shape[0])
        scale = peak / INT8_MAX
        q = torch.round(flat / torch.where(scale > 0, scale, 1.0)[:, None]).clamp_(-INT8_MAX, INT8_MAX)
        out[k] = q.to(torch.int8).reshape(t.shape)
        scales.append(scale)
    out[SCALES] = torch.cat(scales) if scales else torch.zeros(0)
    return out


def _dequantize(q: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """int8 values times the float32 scale of their row (or of the whole tensor)."""
    return (q.reshape(scales.numel(), -1).to(torch.float32) * scales[:, None]).reshape(q.shape)


def _dequantize_all(tensors: dict[str, torch.Tensor], per_channel: bool) -> State:
    scales = tensors.pop(SCALES, torch.zeros(0)).to(torch.float32)
    out: State = {}
    for k, (at, n) in _scale_ranges({k: tuple(v.shape) for k, v in tensors.items()}, per_channel).items():
        if at + n > scales.numel():
            raise FedtuneError(f"update: {SCALES} too short for {k}")
        out[k] = _dequantize(tensors[k], scales[at : at + n])
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
        return _dequantize_all(tensors, per_channel=enc == "int8-channel")
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
        rows = sum(_rows(tuple(v.shape), encoding == "int8-channel") for v in reference.values())
        layout[SCALES] = ("F32", (rows,))
    return layout


def size_bounds(reference: State, encoding: str) -> tuple[int, int]:
    """The smallest and largest byte size an honest update can have, known before reading it."""
    layout = expected_layout(reference, encoding)
    data = sum(_ITEMSIZE[dt] * math.prod(shape) for dt, shape in layout.values())
    return data + 8, data + 8 + _HEADER_FIXED + _HEADER_PER_TENSOR * len(layout)


class Entry(NamedTuple):
    """One tensor of a checked update: its safetensors dtype and shape, and its bytes' range in the file."""

    dtype: str
    shape: tuple[int, ...]
    start: int
    end: int


@dataclass(frozen=True)
class Layout:
    """Where each tensor of a checked update lies in its bytes, so that tensors decode one at a time."""

    tensors: dict[str, Entry]  # in the reference's key order
    scales: Entry | None  # int8: the `__scales__` tensor
    scale_ranges: dict[str, tuple[int, int]]  # int8: each tensor's (first index, count) in it

    def scales_of(self, key: str, scales: torch.Tensor | None) -> torch.Tensor | None:
        """The slice of the decoded `__scales__` that belongs to `key` (None where not int8)."""
        if scales is None:
            return None
        at, n = self.scale_ranges[key]
        return scales[at : at + n]


def read_layout(data: bytes, reference: State, encoding: str) -> Layout:
    """The layout of the update in `data`, if its safetensors header is that of an honest update of
    `reference` (keys, dtypes, shapes, and byte ranges that tile the data exactly); FedtuneError with
    the reason if not.

    Read before any tensor is decoded, so a hostile file costs no more than its header.
    """
    if len(data) < 8:
        raise FedtuneError("not a safetensors file (too short)")
    (size,) = struct.unpack("<Q", data[:8])
    if size > len(data) - 8:
        raise FedtuneError(f"header claims {size} bytes, the object has {len(data) - 8} after its length")
    want = expected_layout(reference, encoding)
    if size > _HEADER_FIXED + _HEADER_PER_TENSOR * len(want):
        raise FedtuneError(f"header of {size} bytes, more than an update of {len(want)} tensors needs")
    try:
        header = json.loads(data[8 : 8 + size])
    except (ValueError, RecursionError):
        raise FedtuneError("not a safetensors file (bad header)") from None
    if not isinstance(header, dict):
        raise FedtuneError("not a safetensors file (bad header)")
    meta = header.pop("__metadata__", None) or {}
    got_encoding = meta.get("encoding", "fp32") if isinstance(meta, dict) else None
    if got_encoding != encoding:
        raise FedtuneError(f"encoding {got_encoding!r}, the run uses {encoding!r}")
    missing, extra = sorted(set(want) - set(header)), sorted(set(header) - set(want))
    if missing:
        raise FedtuneError(f"missing key {missing[0]}" + (f" and {len(missing) - 1} more" if len(missing) > 1 else ""))
    if extra:
        raise FedtuneError(f"unexpected key {extra[0]}")
    entries = {k: _entry(k, header[k], dtype, shape, 8 + size) for k, (dtype, shape) in want.items()}
    at = 8 + size
    for k, e in sorted(entries.items(), key=lambda kv: (kv[1].start, kv[1].end)):
        if e.start != at:
            raise FedtuneError(f"{k}: data at byte {e.start}, the tensor before it ends at {at}")
        at = e.end
    if at != len(data):
        raise FedtuneError(f"the tensors end at byte {at}, the object has {len(data)}")
    per_channel = encoding == "int8-channel"
    quantized = encoding.startswith("int8")
    return Layout(
        tensors={k: e for k, e in entries.items() if k != SCALES},
        scales=entries[SCALES] if quantized else None,
        scale_ranges=_scale_ranges({k: tuple(v.shape) for k, v in reference.items()}, per_channel) if quantized else {},
    )


def _entry(key: str, entry: object, dtype: str, shape: tuple[int, ...], data_start: int) -> Entry:
    """One header entry, checked against the dtype and shape an honest update has there."""
    if not isinstance(entry, dict):
        raise FedtuneError(f"{key}: not a tensor entry")
    got = entry.get("dtype")
    if got != dtype:
        raise FedtuneError(f"{key}: dtype {str(got)[:16]}, expected {dtype}")
    dims = entry.get("shape")
    if not isinstance(dims, list) or [d for d in dims if type(d) is not int] or tuple(dims) != shape:
        raise FedtuneError(f"{key}: shape {str(dims)[:64]}, expected {shape}")
    offsets = entry.get("data_offsets")
    if not isinstance(offsets, list) or len(offsets) != 2 or [o for o in offsets if type(o) is not int]:
        raise FedtuneError(f"{key}: data_offsets {str(offsets)[:64]}, expected two integers")
    begin, end = offsets
    if end - begin != _ITEMSIZE[dtype] * math.prod(shape):
        raise FedtuneError(f"{key}: data_offsets {begin}..{end} do not hold a tensor of shape {shape}")
    return Entry(dtype, shape, data_start + begin, data_start + end)


_TORCH_DTYPES = {"F32": torch.float32, "BF16": torch.bfloat16, "I8": torch.int8}

# fp32 tensors of a checked update are views of its immutable bytes, only ever read. torch warns once
# per process that such a view is not writable; that one warning is drawn here, silenced.
with warnings.catch_warnings():
    warnings.simplefilter("ignore", UserWarning)
    torch.frombuffer(bytes(4), dtype=torch.float32)


def decode_entry(buf: bytes | bytearray, offset: int, entry: Entry, scales: torch.Tensor | None) -> torch.Tensor:
    """The float32 tensor whose bytes start at `offset` in `buf`: for fp32 a view of them (no copy) where
    they are aligned; int8 values are multiplied by `scales`, their slice of `__scales__`."""
    count = math.prod(entry.shape)
    if count == 0:
        return torch.zeros(entry.shape)
    width = _ITEMSIZE[entry.dtype]
    if offset % width:  # a view's values must be aligned: copy just this tensor's bytes
        buf, offset = bytearray(memoryview(buf)[offset : offset + count * width]), 0
    t = torch.frombuffer(buf, dtype=_TORCH_DTYPES[entry.dtype], count=count, offset=offset).reshape(entry.shape)
    return t.to(torch.float32) if scales is None else _dequantize(t, scales)


@single_threaded()
def decode_checked(data: bytes, layout: Layout) -> State:
    """Float32 tensors of an update whose `layout` was read from `data`; fp32 ones are views of its bytes.

    The views are only read: `data` is immutable, and nothing may write through them.
    """
    scales = None if layout.scales is None else decode_entry(data, layout.scales.start, layout.scales, None)
    return {k: decode_entry(data, e.start, e, layout.scales_of(k, scales)) for k, e in layout.tensors.items()}


def save_state(state: State) -> bytes:
    """A global adapter or server state as safetensors, in its own dtypes."""
    return st_save({k: v.detach().contiguous().cpu() for k, v in state.items()})


def load_state(data: bytes) -> State:
    """The tensors `save_state` wrote, bit for bit."""
    return dict(st_load(data))
