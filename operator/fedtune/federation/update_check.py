"""The checks an update's object passes before use, one update per call so that a pool can run them ahead.

Cheapest first: its size from a HEAD against the sizes an honest update can have, then a ranged read
of at most the largest of them, its sha256 against its marker, its header (keys, dtypes, shapes and
byte ranges), and only then its values (finite, within the norm bound). The checks of the marker
itself (lineage, weight) are the aggregator's, which holds the spec.
"""

from __future__ import annotations

from dataclasses import dataclass

from fedtune.aggregation import State
from fedtune.aggregation.encoding import Layout, decode_checked, read_layout, size_bounds
from fedtune.aggregation.spool import Spool, SpooledDelta
from fedtune.aggregation.validation import validate
from fedtune.errors import FedtuneError
from fedtune.federation import protocol as p
from fedtune.federation.protocol import IntegrityError
from fedtune.storage import ObjectNotFound, ObjectStore, ObjectTooLarge


class Rejected(FedtuneError):
    """An update that is the client's fault: recorded with this reason and never averaged in."""


@dataclass(frozen=True)
class Rules:
    """What every update of a round must be."""

    reference: State  # the trainable tensors of the global, which an update changes, in their shapes
    encoding: str
    max_norm: float | None
    reveal: bool = True  # whether a reason may state the update's own norm (not under DP)


@dataclass(frozen=True)
class Checked:
    """What checking an update's values yields: its L2 norm, and its bytes on local disk where asked."""

    norm: float
    spooled: SpooledDelta | None


def read(store: ObjectStore, key: str, sha256: str, rules: Rules) -> tuple[bytes, Layout]:
    """The object's bytes, at most the largest honest size of them, matching `sha256`, and their layout.

    Rejected if the object is missing, too large, altered, or not laid out as an honest update.
    """
    _, high = size_bounds(rules.reference, rules.encoding)
    try:
        data = p.check_digest(store.url(key), store.get_at_most(key, high), sha256)
    except (IntegrityError, ObjectNotFound, ObjectTooLarge) as e:  # it may have changed since the HEAD
        raise Rejected(str(e)) from None
    try:
        return data, read_layout(data, rules.reference, rules.encoding)
    except FedtuneError as e:
        raise Rejected(str(e)) from None


def check(store: ObjectStore, key: str, sha256: str, rules: Rules, spool: Spool | None, name: str) -> Checked:
    """Every check of the update at `key`; Rejected with the reason it is the client's fault, StorageError
    if it is not. With a spool, the checked bytes are written to it under `name`."""
    low, high = size_bounds(rules.reference, rules.encoding)
    try:
        size = store.size(key)
    except ObjectNotFound:
        raise Rejected(f"{key}: named by its marker, not in storage") from None
    if not low <= size <= high:
        raise Rejected(f"{size} bytes, an update of this adapter in {rules.encoding} has {low}..{high}")
    data, layout = read(store, key, sha256, rules)
    try:
        delta = decode_checked(data, layout)
    except Exception as e:  # any undecodable payload is the client's fault, never the aggregator's
        raise Rejected(f"undecodable update: {e}") from None
    reason, norm = validate(delta, rules.reference, rules.max_norm, rules.reveal)
    if reason:
        raise Rejected(reason)
    return Checked(norm, None if spool is None else spool.put(name, data, layout))


def load(store: ObjectStore, key: str, sha256: str, rules: Rules) -> State:
    """An update that passed `check`, read again: its digest proves the bytes are the ones checked, so
    they are only decoded (fp32 without a copy), not validated again. Rejected if the object changed."""
    data, layout = read(store, key, sha256, rules)
    return decode_checked(data, layout)
