"""A client's private examples: JSONL read through storage, tokenised, split and batched."""

from __future__ import annotations

import json
import random
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch

from fedtune.api.spec import DataFormat, DataSpec
from fedtune.errors import FedtuneError
from fedtune.storage import open_object


@dataclass
class Example:
    input_ids: list[int]
    labels: list[int]


def read_jsonl(
    uri: str, where: str, endpoint: str | None = None, credentials: tuple[str, str] | None = None
) -> list[dict[str, Any]]:
    """Records of a JSONL file; `where` names the spec field in errors (e.g. spec.clients[0].data.uri).

    `credentials` (access key, secret) are the client's data credentials when they differ from its
    storage identity.
    """
    store, key = open_object(uri, endpoint=endpoint, credentials=credentials)
    raw = store.get_or_none(key)
    if raw is None:
        raise FedtuneError(f"{where}: data file {store.url(key)} not found")
    records = []
    for n, line in enumerate(raw.decode("utf-8", errors="replace").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            raise FedtuneError(f"{where}: {store.url(key)} line {n}: invalid JSON ({e.msg})") from None
        if not isinstance(rec, dict):
            raise FedtuneError(f"{where}: {store.url(key)} line {n}: expected a JSON object")
        records.append((n, rec))
    if not records:
        raise FedtuneError(f"{where}: {store.url(key)} has no examples")
    return [_checked(rec, n, store.url(key), where) for n, rec in records]


def _checked(rec: dict[str, Any], n: int, url: str, where: str) -> dict[str, Any]:
    for field in ("text", "prompt", "response"):
        if field in rec and not isinstance(rec[field], str):
            raise FedtuneError(f"{where}: {url} line {n}: {field!r} must be a string")
    return rec


def tokenize(
    records: list[dict[str, Any]], data: DataSpec, tokenizer: Any, max_length: int, where: str
) -> list[Example]:
    """Token ids and labels; prompt tokens get label -100 so loss is on the response only."""
    out = []
    eos = tokenizer.eos_token_id
    for i, rec in enumerate(records):
        if data.format == DataFormat.TEXT:
            if "text" not in rec:
                raise FedtuneError(f"{where}: record {i + 1} has no 'text' field (format is text)")
            ids = tokenizer(rec["text"], add_special_tokens=False)["input_ids"] + [eos]
            labels = list(ids)
        else:
            if "prompt" not in rec or "response" not in rec:
                raise FedtuneError(f"{where}: record {i + 1} needs 'prompt' and 'response' (format is prompt-response)")
            full = data.template.format(prompt=rec["prompt"], response=rec["response"])
            head = data.template.format(prompt=rec["prompt"], response="")
            ids = tokenizer(full, add_special_tokens=False)["input_ids"] + [eos]
            n_prompt = len(tokenizer(head, add_special_tokens=False)["input_ids"])
            labels = [-100] * n_prompt + ids[n_prompt:]
        out.append(Example(ids[:max_length], labels[:max_length]))
    return out


def split(examples: list[Example], eval_fraction: float, seed: int) -> tuple[list[Example], list[Example]]:
    """A seeded train/eval split; both sides keep at least one example."""
    order = list(range(len(examples)))
    random.Random(seed).shuffle(order)
    n_eval = min(max(1, round(len(examples) * eval_fraction)), len(examples) - 1) if len(examples) > 1 else 0
    ev = [examples[i] for i in order[:n_eval]]
    tr = [examples[i] for i in order[n_eval:]]
    return tr, (ev or tr)


def collate(batch: list[Example], pad_id: int) -> dict[str, torch.Tensor]:
    width = max(len(e.input_ids) for e in batch)
    ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    labels = torch.full((len(batch), width), -100, dtype=torch.long)
    mask = torch.zeros((len(batch), width), dtype=torch.long)
    for row, e in enumerate(batch):
        n = len(e.input_ids)
        ids[row, :n] = torch.tensor(e.input_ids)
        labels[row, :n] = torch.tensor(e.labels)
        mask[row, :n] = 1
    return {"input_ids": ids, "labels": labels, "attention_mask": mask}


def train_batches(
    examples: list[Example], batch_size: int, steps: int, seed: str, pad_id: int
) -> Iterator[dict[str, torch.Tensor]]:
    """`steps` batches drawn epoch by epoch in an order seeded by (run, client, round)."""
    rng = random.Random(seed)
    order: list[int] = []
    for _ in range(steps):
        if len(order) < batch_size:
            more = list(range(len(examples)))
            rng.shuffle(more)
            order.extend(more)
        picked, order = order[:batch_size], order[batch_size:]
        yield collate([examples[i] for i in picked], pad_id)


def eval_batches(
    examples: list[Example], batch_size: int, limit: int, pad_id: int
) -> Iterator[dict[str, torch.Tensor]]:
    """The first `limit` batches of the eval split, in a fixed order."""
    for start in range(0, min(len(examples), batch_size * limit), batch_size):
        yield collate(examples[start : start + batch_size], pad_id)
