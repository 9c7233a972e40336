"""Tokenizers: pretrained ones the transformers way, or a byte-level one built locally (no download)."""

from __future__ import annotations

from typing import Any

from fedtune.api.spec import FederatedFineTuneSpec
from fedtune.errors import FedtuneError
from fedtune.training.sources import resolve_model

BYTE_SPECIALS = ("<pad>", "<s>", "</s>")
# `<|role|>`, a newline and the content, turn after turn; an assistant turn ends with eos, so a model
# learns to stop, and the others with a newline. (transformers renders with trim_blocks, which would
# eat a newline written right after a block tag.)
BYTE_CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}"
    "{{ eos_token if m['role'] == 'assistant' else '\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)


def byte_tokenizer() -> Any:
    """Each UTF-8 byte is one token, plus pad/bos/eos: the same for everyone, with nothing to fetch.

    Its chat template is a plain one, so `format: chat` needs no pretrained tokenizer either.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {tok: i for i, tok in enumerate(BYTE_SPECIALS)}
    vocab.update({ch: i + len(BYTE_SPECIALS) for i, ch in enumerate(sorted(alphabet))})
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(  # type: ignore[no-untyped-call]
        tokenizer_object=tok,
        pad_token="<pad>",
        bos_token="<s>",
        eos_token="</s>",
        chat_template=BYTE_CHAT_TEMPLATE,
    )


def build_tokenizer(spec: FederatedFineTuneSpec) -> Any:
    """The run's tokenizer; a pad token is always set so batches can be padded."""
    source = resolve_model(spec, weights=False)
    if spec.tokenizer.builtin == "bytes" or (spec.tokenizer.name is None and source is None):
        return byte_tokenizer()
    from transformers import AutoTokenizer

    name = spec.tokenizer.name or (source.location if source else None)
    kwargs = source.kwargs() if source is not None and spec.tokenizer.name is None else {}
    try:
        tok = AutoTokenizer.from_pretrained(name, **kwargs)
    except (OSError, ValueError) as e:
        raise FedtuneError(f"spec.tokenizer: cannot load tokenizer {name!r}: {str(e).splitlines()[0]}") from None
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok
