"""A client's private examples: JSONL streamed from storage, tokenised, split and batched.

Lines are read one at a time and only compact token arrays are kept, so a client's memory grows with
the tokens it trains on (at most maxExamples x maxLength), not with the size of its file.
"""

from __future__ import annotations

import json
import logging
import random
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from functools import partial
from typing import Any

import numpy as np
import numpy.typing as npt
import torch

from fedtune.api.spec import DataFormat, DataSpec
from fedtune.errors import FedtuneError
from fedtune.storage import ObjectNotFound, ObjectStore, StorageError, open_object

log = logging.getLogger("fedtune.data")

Tokens = npt.NDArray[np.int32]
# A record's ids and labels before truncation; labels None means the same as the ids.
Encoded = tuple[list[int], list[int] | None]
ROLES = ("system", "user", "assistant")
FIELDS = {DataFormat.TEXT: ("text",), DataFormat.PROMPT_RESPONSE: ("prompt", "response"), DataFormat.CHAT: ()}


@dataclass(slots=True)
class Example:
    """Token ids and labels (-100 where no loss is taken); for text both may be the same array."""

    input_ids: Tokens
    labels: Tokens


@dataclass(slots=True)
class Record:
    """One JSONL line's object, and `at` (field, file and line) to name it in errors."""

    fields: dict[str, Any]
    at: str


def read_jsonl(
    uri: str,
    data: DataSpec,
    where: str,
    endpoint: str | None = None,
    credentials: tuple[str, str] | None = None,
) -> Iterator[Record]:
    """The first data.max_examples records of a JSONL file, each checked against data.format, streamed.

    `where` names the spec field in errors (e.g. spec.clients[0].data.uri); `credentials` (access key,
    secret) are the client's data credentials when they differ from its storage identity.
    """
    store, key = open_object(uri, endpoint=endpoint, credentials=credentials)
    url = store.url(key)
    count = 0
    for n, line in enumerate(_lines(store, key, where), start=1):
        if not line.strip():
            continue
        if count == data.max_examples:
            log.info("%s: %s has more than maxExamples=%d examples; the rest is not read", where, url, count)
            return
        yield _record(line, data.format, f"{where}: {url} line {n}")
        count += 1
    if not count:
        raise FedtuneError(f"{where}: {url} has no examples")


def _lines(store: ObjectStore, key: str, where: str) -> Iterator[bytes]:
    try:
        yield from store.iter_lines(key)
    except ObjectNotFound:
        raise FedtuneError(f"{where}: data file {store.url(key)} not found") from None
    except StorageError as e:
        raise FedtuneError(f"{where}: {e}") from None


def _record(line: bytes, fmt: DataFormat, at: str) -> Record:
    try:
        rec = json.loads(line.decode("utf-8", errors="replace"))
    except json.JSONDecodeError as e:
        raise FedtuneError(f"{at}: invalid JSON ({e.msg})") from None
    if not isinstance(rec, dict):
        raise FedtuneError(f"{at}: expected a JSON object")
    for field in FIELDS[fmt]:
        if field not in rec:
            raise FedtuneError(f"{at}: no {field!r} field (format is {fmt})")
        if not isinstance(rec[field], str):
            raise FedtuneError(f"{at}: {field!r} must be a string")
    if fmt == DataFormat.CHAT:
        _check_messages(rec.get("messages"), at)
    return Record(rec, at)


def _check_messages(messages: Any, at: str) -> None:
    if not isinstance(messages, list) or not messages:
        raise FedtuneError(f"{at}: 'messages' must be a non-empty list (format is chat)")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or set(m) != {"role", "content"}:
            raise FedtuneError(f"{at}: messages[{i}] must be an object with exactly 'role' and 'content'")
        if m["role"] not in ROLES:
            raise FedtuneError(f"{at}: messages[{i}].role must be one of {', '.join(ROLES)}")
        if not isinstance(m["content"], str):
            raise FedtuneError(f"{at}: messages[{i}].content must be a string")
    if messages[0]["role"] == "assistant":
        raise FedtuneError(f"{at}: messages[0] is an assistant turn; a conversation opens with system or user")
    if not any(m["role"] == "assistant" for m in messages):
        raise FedtuneError(f"{at}: messages has no assistant turn, and loss is taken on assistant turns only")


def tokenize(
    records: Iterable[Record], data: DataSpec, tokenizer: Any, max_length: int | None, where: str
) -> list[Example]:
    """Examples truncated to max_length (None: whole, for packing); loss is taken on the text, the response
    or the assistant turns.

    Records are consumed one at a time, so only the kept token arrays stay in memory.
    """
    encode = _encoder(data, tokenizer, where)
    out = []
    for rec in records:
        ids, labels = encode(rec)
        kept = np.asarray(ids[:max_length], dtype=np.int32)
        out.append(Example(kept, kept if labels is None else np.asarray(labels[:max_length], dtype=np.int32)))
    return out


def truncate(examples: list[Example], max_length: int) -> list[Example]:
    """Each example cut to max_length tokens."""
    return [Example(e.input_ids[:max_length], e.labels[:max_length]) for e in examples]


def _encoder(data: DataSpec, tokenizer: Any, where: str) -> Callable[[Record], Encoded]:
    """The per-record encoding for data.format, with what it needs resolved once, not per line."""
    if data.format == DataFormat.TEXT:
        return partial(_text, tokenizer=tokenizer)
    if data.format == DataFormat.PROMPT_RESPONSE:
        return partial(_prompt_response, parts=data.template_parts(), tokenizer=tokenizer)
    if not getattr(tokenizer, "chat_template", None):
        raise FedtuneError(f"{where}.format: the tokenizer has no chat template; use format prompt-response")
    return partial(_chat, tokenizer=tokenizer)


def _ids(tokenizer: Any, text: str) -> list[int]:
    ids: list[int] = tokenizer(text, add_special_tokens=False)["input_ids"]
    return ids


def _text(rec: Record, tokenizer: Any) -> Encoded:
    return [*_ids(tokenizer, rec.fields["text"]), tokenizer.eos_token_id], None


def _prompt_response(rec: Record, parts: tuple[str, str, str], tokenizer: Any) -> Encoded:
    before, between, after = parts
    head = before + rec.fields["prompt"] + between
    ids = [*_ids(tokenizer, head + rec.fields["response"] + after), tokenizer.eos_token_id]
    n_prompt = len(_ids(tokenizer, head))
    return ids, [-100] * n_prompt + ids[n_prompt:]


def _chat(rec: Record, tokenizer: Any) -> Encoded:
    """Each turn is the text the chat template adds for it; loss on assistant turns, their header excluded."""
    messages = rec.fields["messages"]
    stops: list[tuple[str, bool]] = []
    for i, m in enumerate(messages):
        if m["role"] == "assistant":
            stops.append((_render(tokenizer, messages[:i], rec.at, header=True), False))
        stops.append((_render(tokenizer, messages[: i + 1], rec.at), m["role"] == "assistant"))
    ids: list[int] = []
    labels: list[int] = []
    done = ""
    for text, loss in stops:
        if not text.startswith(done):
            raise FedtuneError(f"{rec.at}: the chat template does not render the conversation turn by turn")
        piece = _ids(tokenizer, text[len(done) :])
        ids += piece
        labels += piece if loss else [-100] * len(piece)
        done = text
    return ids, labels


def _render(tokenizer: Any, messages: list[Any], at: str, header: bool = False) -> str:
    try:
        text: str = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=header)
    except Exception as e:  # a template may raise anything; the line is what the user can fix
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise FedtuneError(f"{at}: the chat template cannot render it: {first}") from None
    return text


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
        ids[row, :n] = torch.from_numpy(e.input_ids)
        labels[row, :n] = torch.from_numpy(e.labels)
        mask[row, :n] = 1
    return {"input_ids": ids, "labels": labels, "attention_mask": mask}


def pack(examples: list[Example], block: int) -> list[Example]:
    """The examples' tokens end to end (each text already ends with eos) cut into `block`-token pieces.

    Every token is kept: only the last piece may be shorter. Loss is on every token, as for plain text.
    """
    if not examples:
        return []
    stream = np.concatenate([e.input_ids for e in examples])
    return [Example(piece, piece) for piece in np.split(stream, range(block, len(stream), block))]


def train_batches(
    examples: list[Example],
    batch_size: int,
    steps: int,
    seed: str,
    pad_id: int,
    accumulation: int = 1,
    shard: tuple[int, int] = (0, 1),
) -> Iterator[list[dict[str, torch.Tensor]]]:
    """`steps` optimizer steps of `accumulation` micro-batches, drawn epoch by epoch in an order seeded by
    (run, client, round); rank `shard[0]` of `shard[1]` gets its slice of every micro-batch.

    The draw does not depend on how a step is cut, so k micro-batches of b see what one batch of k·b does.
    """
    rank, world = shard
    rng = random.Random(seed)
    order: list[int] = []
    per_rank = batch_size // world
    for _ in range(steps):
        micro = []
        for _ in range(accumulation):
            while len(order) < batch_size:
                more = list(range(len(examples)))
                rng.shuffle(more)
                order.extend(more)
            picked, order = order[:batch_size], order[batch_size:]
            mine = picked[rank * per_rank : (rank + 1) * per_rank]
            micro.append(collate([examples[i] for i in mine], pad_id))
        yield micro


def eval_batches(
    examples: list[Example], batch_size: int, limit: int, pad_id: int
) -> Iterator[dict[str, torch.Tensor]]:
    """The first `limit` batches of the eval split, in a fixed order."""
    for start in range(0, min(len(examples), batch_size * limit), batch_size):
        yield collate(examples[start : start + batch_size], pad_id)
