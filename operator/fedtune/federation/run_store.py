"""Helpers both loops share: the run's spec in storage, and polling with a deadline."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from typing import TypeVar

from fedtune.api import FederatedFineTuneSpec
from fedtune.api.loading import SpecError
from fedtune.errors import FedtuneError
from fedtune.federation import protocol
from fedtune.storage import ObjectStore

T = TypeVar("T")


def spec_bytes(spec: FederatedFineTuneSpec) -> bytes:
    return json.dumps(spec.model_dump(mode="json", by_alias=True), indent=2, sort_keys=True).encode()


def publish_spec(store: ObjectStore, spec: FederatedFineTuneSpec) -> None:
    """Write spec.json once; a run root that already holds a different spec is refused."""
    data = spec_bytes(spec)
    if store.put_if_absent(protocol.SPEC, data):
        return
    existing = read_spec(store)
    if spec_bytes(existing) != data:
        raise FedtuneError(
            f"{store.url(protocol.SPEC)}: this run root already holds a different spec; "
            "use another run name or start fresh"
        )


def read_spec(store: ObjectStore) -> FederatedFineTuneSpec:
    from pydantic import ValidationError

    from fedtune.api.loading import format_errors

    raw = store.get(protocol.SPEC)
    try:
        return FederatedFineTuneSpec.model_validate_json(raw)
    except ValidationError as e:
        raise SpecError(store.url(protocol.SPEC), format_errors(e)) from None


def poll(check: Callable[[], T | None], timeout: float | None = None, what: str = "condition") -> T:
    """Call check until it returns something other than None, backing off from 50 ms to 1 s."""
    start = time.monotonic()
    interval = 0.05
    while True:
        got = check()
        if got is not None:
            return got
        if timeout is not None and time.monotonic() - start > timeout:
            raise FedtuneError(f"timed out after {timeout:g}s waiting for {what}")
        time.sleep(interval)
        interval = min(interval * 1.5, 1.0)


def wait_for_spec(store: ObjectStore, timeout: float | None = None) -> FederatedFineTuneSpec:
    poll(lambda: True if store.exists(protocol.SPEC) else None, timeout, f"{store.url(protocol.SPEC)}")
    return read_spec(store)
