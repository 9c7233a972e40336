"""Client data: a template language with nothing to abuse, chat conversations, JSONL streamed from storage."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import tracemalloc
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml

from fedtune.api import SpecError, parse_resource
from fedtune.api.crd import crd
from fedtune.api.spec import DataSpec
from fedtune.errors import FedtuneError
from fedtune.storage import ObjectStore, StorageError, open_store
from fedtune.training import data as d
from fedtune.training.tokenizer import build_tokenizer

REPO = Path(__file__).resolve().parents[2]
MiB = 1 << 20


def resource(**data: Any) -> dict[str, Any]:
    spec = {
        "model": {"config": {"modelType": "llama", "hidden_size": 16}},
        "tokenizer": {"builtin": "bytes"},
        "clients": [{"name": "a", "data": {"uri": "a.jsonl", **data}}, {"name": "b", "data": {"uri": "b.jsonl"}}],
    }
    return {"apiVersion": "fedtune.io/v1alpha1", "kind": "FederatedFineTune", "metadata": {"name": "t"}, "spec": spec}


@pytest.fixture(scope="module")
def tok() -> Any:
    return build_tokenizer(parse_resource(resource()).spec)


def write(path: Path, lines: list[Any]) -> str:
    path.write_text("".join((ln if isinstance(ln, str) else json.dumps(ln)) + "\n" for ln in lines))
    return str(path)


def load(uri: str, tok: Any, max_length: int = 4096, **data: Any) -> list[d.Example]:
    spec = DataSpec(uri=uri, **data)
    return d.tokenize(
        d.read_jsonl(uri, spec, "spec.clients[0].data.uri"), spec, tok, max_length, "spec.clients[0].data"
    )


def read_error(uri: str, **data: Any) -> str:
    with pytest.raises(FedtuneError) as e:
        list(d.read_jsonl(uri, DataSpec(uri=uri, **data), "spec.clients[0].data.uri"))
    return str(e.value)


def trained(tok: Any, ex: d.Example) -> str:
    """The text loss is taken on."""
    return str(tok.decode([int(t) for t in ex.labels if t != -100]))


# --- the template language ---------------------------------------------------------------------------------

BAD_TEMPLATES = [
    ("{prompt:>20000000}\n{response}", "unknown placeholder {prompt:>20000000}; only {prompt} and {response}"),
    ("{foo}\n{prompt}\n{response}", "unknown placeholder {foo}; only {prompt} and {response} are allowed"),
    ("{prompt!r}\n{response}", "unknown placeholder {prompt!r}"),
    ("{0}\n{prompt}\n{response}", "unknown placeholder {0}"),
    ("{prompt.x}\n{response}", "unknown placeholder {prompt.x}"),
    ("{prompt[0]}\n{response}", "unknown placeholder {prompt[0]}"),
    ("Q: {prompt}", "needs {prompt} and then {response}, once each (found: {prompt})"),
    ("{prompt}{response}{response}", "once each (found: {prompt}, {response}, {response})"),
    ("{response}\n{prompt}", "{response} must come after {prompt}"),
    ("{prompt} {\n{response}", "unknown placeholder {\\n"),
    ("{prompt}\n{response} {", "unbalanced { at character 21; write {{ for a literal brace"),
    ("{prompt} } {response}", "unbalanced } at character 10; write }} for a literal brace"),
]
GOOD_TEMPLATES = [
    ("Q: {prompt}\nA: {response}", "Q: 2+2?\nA: ", "4"),
    ('{{"q": "{prompt}"}} => {response} {{json}}', '{"q": "2+2?"} => ', "4 {json}"),
    ("{{{prompt}}}\n{response}}}", "{2+2?}\n", "4}"),
]


@pytest.mark.parametrize(("template", "message"), BAD_TEMPLATES)
def test_bad_templates_are_refused_naming_the_field(template: str, message: str) -> None:
    with pytest.raises(SpecError) as e:
        parse_resource(resource(format="prompt-response", template=template))
    [problem] = e.value.problems
    assert problem.startswith("spec.clients[0].data.template: ") and message in problem, problem


@pytest.mark.parametrize(("template", "prompt_part", "response_part"), GOOD_TEMPLATES)
def test_templates_render_exactly_with_loss_on_the_response(
    tmp_path: Path, tok: Any, template: str, prompt_part: str, response_part: str
) -> None:
    uri = write(tmp_path / "pr.jsonl", [{"prompt": "2+2?", "response": "4"}])
    [ex] = load(uri, tok, format="prompt-response", template=template)
    assert tok.decode(ex.input_ids.tolist()) == prompt_part + response_part + "</s>"
    assert trained(tok, ex) == response_part + "</s>"
    assert ex.input_ids.dtype == np.int32 and ex.labels.dtype == np.int32


def test_the_crd_pattern_accepts_what_the_spec_accepts() -> None:
    """The API server checks the same language with a regular expression."""
    data = crd()["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]["properties"]["clients"]
    pattern = data["items"]["properties"]["data"]["properties"]["template"]["pattern"]
    for template, _ in BAD_TEMPLATES:
        assert not re.search(pattern, template), template
    for template, *_ in [*GOOD_TEMPLATES, ("{prompt}\n{response}",)]:
        assert re.search(pattern, template), template


def test_fedtune_validate_names_the_bad_template(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump(resource(format="prompt-response", template="{prompt:>20000000}{response}")))
    out = subprocess.run(
        [sys.executable, "-m", "fedtune", "validate", str(bad)], capture_output=True, text=True, cwd=REPO
    )
    assert out.returncode == 1 and "Traceback" not in out.stderr
    assert out.stderr.strip() == (
        f"{bad}: spec.clients[0].data.template: unknown placeholder {{prompt:>20000000}}; "
        "only {prompt} and {response} are allowed"
    )


# --- formats and their errors ------------------------------------------------------------------------------


def test_text_format_takes_loss_on_everything(tmp_path: Path, tok: Any) -> None:
    uri = write(tmp_path / "t.jsonl", [{"text": "héllo"}, "", {"text": "x" * 100}])
    short, long = load(uri, tok, max_length=16)
    assert tok.decode(short.input_ids.tolist()) == "héllo</s>" and trained(tok, short) == "héllo</s>"
    assert len(long.input_ids) == 16 and len(long.labels) == 16


CHAT = {
    "messages": [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "hello"},
        {"role": "user", "content": "2+2?"},
        {"role": "assistant", "content": "4"},
    ]
}


def test_chat_takes_loss_on_assistant_turns_only(tmp_path: Path, tok: Any) -> None:
    [ex] = load(write(tmp_path / "c.jsonl", [CHAT]), tok, format="chat")
    text = tok.decode(ex.input_ids.tolist())
    assert text == "<|system|>\nbe brief\n<|user|>\nhi\n<|assistant|>\nhello</s><|user|>\n2+2?\n<|assistant|>\n4</s>"
    assert text == tok.apply_chat_template(CHAT["messages"], tokenize=False)
    labelled = [tok.decode([int(t)]) if t != -100 else "_" for t in ex.labels]
    assert re.sub("_+", "|", "".join(labelled)) == "|hello</s>|4</s>"


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ({"messages": "hi"}, "'messages' must be a non-empty list (format is chat)"),
        ({"text": "hi"}, "'messages' must be a non-empty list (format is chat)"),
        ({"messages": [{"role": "bot", "content": "x"}]}, "messages[0].role must be one of system, user, assistant"),
        ({"messages": [{"role": "user"}]}, "messages[0] must be an object with exactly 'role' and 'content'"),
        (
            {"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": 3}]},
            "messages[1].content must be a string",
        ),
        (
            {"messages": [{"role": "user", "content": "a"}]},
            "messages has no assistant turn, and loss is taken on assistant turns only",
        ),
        (
            {"messages": [{"role": "assistant", "content": "a"}]},
            "messages[0] is an assistant turn; a conversation opens with system or user",
        ),
    ],
)
def test_malformed_chat_lines_name_url_line_and_field(tmp_path: Path, line: Any, message: str) -> None:
    uri = write(tmp_path / "c.jsonl", [CHAT, "", line])
    assert read_error(uri, format="chat") == f"spec.clients[0].data.uri: file://{uri} line 3: {message}"


def test_chat_needs_a_chat_template(tmp_path: Path) -> None:
    tok = build_tokenizer(parse_resource(resource()).spec)
    tok.chat_template = None
    with pytest.raises(FedtuneError, match=r"^spec\.clients\[0\]\.data\.format: the tokenizer has no chat template"):
        load(write(tmp_path / "c.jsonl", [CHAT]), tok, format="chat")


def test_a_chat_template_that_fails_names_the_line(tmp_path: Path) -> None:
    tok = build_tokenizer(parse_resource(resource()).spec)
    tok.chat_template = "{{ raise_exception('this model takes no system turn') }}"
    uri = write(tmp_path / "c.jsonl", [CHAT])
    with pytest.raises(FedtuneError) as e:
        load(uri, tok, format="chat")
    assert str(e.value) == (
        f"spec.clients[0].data.uri: file://{uri} line 1: the chat template cannot render it: "
        "this model takes no system turn"
    )


@pytest.mark.parametrize(
    ("lines", "fmt", "message"),
    [
        (['{"text": "ok"}', "{broken"], "text", "line 2: invalid JSON (Expecting property name"),
        (["[1]"], "text", "line 1: expected a JSON object"),
        ([{"text": 3}], "text", "line 1: 'text' must be a string"),
        ([{"prompt": "p"}], "prompt-response", "line 1: no 'response' field (format is prompt-response)"),
        ([{"prompt": "p", "response": None}], "prompt-response", "line 1: 'response' must be a string"),
    ],
)
def test_bad_lines_are_named(tmp_path: Path, lines: list[Any], fmt: str, message: str) -> None:
    uri = write(tmp_path / "x.jsonl", lines)
    assert read_error(uri, format=fmt).startswith(f"spec.clients[0].data.uri: file://{uri} {message}")


def test_missing_and_empty_files(tmp_path: Path) -> None:
    assert read_error(str(tmp_path / "none.jsonl")) == (
        f"spec.clients[0].data.uri: data file file://{tmp_path}/none.jsonl not found"
    )
    empty = write(tmp_path / "empty.jsonl", ["", "  "])
    assert read_error(empty) == f"spec.clients[0].data.uri: file://{empty} has no examples"


# --- streaming ---------------------------------------------------------------------------------------------


@pytest.fixture(params=["file", "memory", "s3"])
def store(request: pytest.FixtureRequest, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[ObjectStore]:
    """Each kind of store, reading in 7-byte chunks so lines straddle them."""
    for module in ("base", "local_fs", "s3"):
        monkeypatch.setattr(f"fedtune.storage.{module}.CHUNK_BYTES", 7)
    if request.param != "s3":
        yield open_store(f"file://{tmp_path}" if request.param == "file" else f"memory://{tmp_path.name}")
        return
    from moto import mock_aws

    from fedtune.storage import s3

    for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        monkeypatch.setenv(key, "test")
    # Stores share one session and one client per endpoint and credentials: made before the mock, they would
    # go out to the network (moto hooks sessions made after it is imported); made under it, they must not
    # outlive it.
    s3.forget_clients()
    with mock_aws():
        store = open_store("s3://bucket/data")
        store._client.create_bucket(Bucket="bucket")  # type: ignore[attr-defined]
        yield store
    s3.forget_clients()


def test_lines_stream_across_chunks(store: ObjectStore) -> None:
    store.put("x.jsonl", b'{"a": 1}\r\n\nthe second line, longer than a chunk\nlast without newline')
    assert list(store.iter_lines("x.jsonl")) == [
        b'{"a": 1}\r',
        b"",
        b"the second line, longer than a chunk",
        b"last without newline",
    ]
    assert list(store.iter_lines("x.jsonl", max_line=40)) == list(store.iter_lines("x.jsonl"))


def test_a_line_longer_than_the_limit_is_refused(store: ObjectStore) -> None:
    store.put("x.jsonl", b"short\n" + b"y" * 100 + b"\n")
    with pytest.raises(StorageError, match=r"x\.jsonl line 2: longer than 30 bytes"):
        list(store.iter_lines("x.jsonl", max_line=30))


def test_records_stream_from_every_store(store: ObjectStore) -> None:
    store.put("d.jsonl", b"\n".join(json.dumps({"text": f"line {i}"}).encode() for i in range(50)))
    uri = store.url("d.jsonl")
    records = list(d.read_jsonl(uri, DataSpec(uri=uri), "spec.clients[0].data.uri"))
    assert [r.fields["text"] for r in records] == [f"line {i}" for i in range(50)]


def text_jsonl(size: int, line_bytes: int = 4096) -> bytes:
    """About size bytes of {"text": ...} lines, each about line_bytes long."""
    line = (json.dumps({"text": ("federated " * line_bytes)[: line_bytes - 13]}) + "\n").encode()
    return line * max(1, size // len(line))


def peak_while_loading(store: ObjectStore, key: str, tok: Any, max_length: int, **data: Any) -> tuple[int, int]:
    """(peak bytes allocated while reading and tokenising, bytes of the kept token arrays)."""
    uri = store.url(key)
    load(write_warmup(store), tok)  # imports and tokenizer caches are not the data's
    tracemalloc.start()
    try:
        examples = load(uri, tok, max_length, **data)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    kept = sum(e.input_ids.nbytes + (0 if e.labels is e.input_ids else e.labels.nbytes) for e in examples)
    return peak, kept


def write_warmup(store: ObjectStore) -> str:
    store.put("warmup.jsonl", b'{"text": "warm up"}\n')
    return store.url("warmup.jsonl")


@pytest.mark.parametrize("kind", ["file", "memory"])
def test_a_10_mib_file_costs_its_tokens_not_its_text(tmp_path: Path, tok: Any, kind: str) -> None:
    store = open_store(f"file://{tmp_path}" if kind == "file" else f"memory://mem-{tmp_path.name}")
    store.put("big.jsonl", text_jsonl(10 * MiB))
    peak, kept = peak_while_loading(store, "big.jsonl", tok, max_length=64)
    assert kept == 2560 * 64 * 4
    # One chunk and its lines, one line's tokens and ~200 bytes of bookkeeping per example: not the file.
    assert peak < 2 * kept + 4 * MiB, (peak, kept)
    assert peak < 10 * MiB / 2, peak


def test_max_examples_bounds_memory_and_reading(tmp_path: Path, tok: Any) -> None:
    store = open_store(f"file://{tmp_path}")
    store.put("small.jsonl", text_jsonl(2 * MiB) + b"{not json, and never read}\n")
    store.put("big.jsonl", text_jsonl(20 * MiB) + b"{not json, and never read}\n")
    small, _ = peak_while_loading(store, "small.jsonl", tok, max_length=64, max_examples=100)
    big, kept = peak_while_loading(store, "big.jsonl", tok, max_length=64, max_examples=100)
    assert kept == 100 * 64 * 4
    assert big < small + MiB / 4, (small, big)


def test_max_examples_is_in_the_spec() -> None:
    spec = parse_resource(resource(maxExamples=5)).spec
    assert spec.clients[0].data.max_examples == 5 and spec.clients[1].data.max_examples == 100_000
    with pytest.raises(SpecError, match=r"spec\.clients\[0\]\.data\.maxExamples"):
        parse_resource(resource(maxExamples=0))


def test_examples_past_the_cap_are_not_read(tmp_path: Path, tok: Any) -> None:
    uri = write(tmp_path / "x.jsonl", [{"text": "a"}, "", {"text": "b"}, "{never parsed"])
    assert [tok.decode(e.input_ids.tolist()) for e in load(uri, tok, max_examples=2)] == ["a</s>", "b</s>"]
