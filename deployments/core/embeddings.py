"""Embeddings' logic, with no Ray: OpenAI's `input` shapes to token ids, the engine's vectors to OpenAI's response.

`/v1/embeddings` takes a string, a list of strings, a list of token ids or a list of such lists;
each becomes one engine request of the embedding model (vLLM's pooling runner: the model's own
pooling and normalization, read from its sentence-transformers configuration). Usage counts the
prompt tokens the engine embedded, special tokens included, as OpenAI's does.
"""

from __future__ import annotations

import base64
import struct
from dataclasses import dataclass
from typing import Any, Protocol, Sequence

from common.errors import ContextLengthExceededError, InvalidRequestError

MAX_INPUTS = 2048  # OpenAI's bound on the items of one request

EmbeddingInput = str | list[str] | list[int] | list[list[int]]


class TextTokenizer(Protocol):
    vocab_size: int

    def __call__(self, text: list[str], add_special_tokens: bool = ...) -> Any: ...


def items_of(value: EmbeddingInput) -> list[str | list[int]]:
    """The request's inputs, one per vector, or a 400 naming `input` (empty, mixed, or too many)."""
    if isinstance(value, str):
        items: list[str | list[int]] = [value]
    elif not value:
        raise InvalidRequestError("`input` must not be empty.", param="input")
    elif all(isinstance(v, int) and not isinstance(v, bool) for v in value):
        items = [list(value)]  # type: ignore[arg-type]
    elif all(isinstance(v, str) for v in value) or all(isinstance(v, list) and all(isinstance(t, int) and not isinstance(t, bool) for t in v) for v in value):
        items = list(value)  # type: ignore[arg-type]
    else:
        raise InvalidRequestError("`input` must be a string, a list of strings, a list of token ids, or a list of lists of token ids.", param="input")
    if len(items) > MAX_INPUTS:
        raise InvalidRequestError(f"At most {MAX_INPUTS} inputs are allowed in one request; got {len(items)}.", param="input")
    if any(len(item) == 0 for item in items):
        raise InvalidRequestError("An input is empty; every input needs at least one character or token.", param="input")
    return items


def token_bound(items: Sequence[str | list[int]]) -> int:
    """An upper bound on the tokens the inputs become, before tokenizing (what admission reserves): a WordPiece or
    BPE token covers at least one byte, and a text gains at most a few special tokens."""
    return sum(len(i) if isinstance(i, list) else len(i.encode()) + 4 for i in items)


def tokenize(items: Sequence[str | list[int]], tokenizer: TextTokenizer, max_model_len: int) -> list[list[int]]:
    """Each input's token ids (texts with the model's special tokens; token ids as given, checked), or a 400."""
    texts = [i for i in items if isinstance(i, str)]
    encoded = iter(tokenizer(texts, add_special_tokens=True)["input_ids"] if texts else [])
    out = []
    for i, item in enumerate(items):
        ids = list(next(encoded)) if isinstance(item, str) else item
        if not isinstance(item, str):
            bad = [t for t in ids if not 0 <= t < tokenizer.vocab_size]
            if bad:
                raise InvalidRequestError(f"Input {i} has token ids out of the vocabulary (0..{tokenizer.vocab_size - 1}): {bad[:5]}", param="input")
        if len(ids) > max_model_len:
            raise ContextLengthExceededError(
                f"This model's maximum context length is {max_model_len} tokens; input {i} has {len(ids)}. Shorten it or split it.", param="input"
            )
        out.append(ids)
    return out


def check_dimensions(dimensions: int | None, native: int) -> None:
    """`dimensions` is honoured only where the model gives it: its own size (the model was not trained to be cut)."""
    if dimensions is not None and dimensions != native:
        raise InvalidRequestError(f"This model gives {native}-dimensional embeddings only; `dimensions` {dimensions} is not supported.", param="dimensions")


def encode_vector(vector: Sequence[float], encoding_format: str) -> list[float] | str:
    """A vector as OpenAI sends it: floats, or base64 of little-endian float32."""
    if encoding_format == "base64":
        return base64.b64encode(struct.pack(f"<{len(vector)}f", *vector)).decode()
    return [float(x) for x in vector]


@dataclass(frozen=True)
class Embedded:
    """What the engine gave for one request: a vector per input, and the tokens it embedded."""

    vectors: list[list[float]]
    prompt_tokens: int


def response(model: str, embedded: Embedded, encoding_format: str) -> dict:
    """OpenAI's `/v1/embeddings` body."""
    return {
        "object": "list",
        "data": [{"object": "embedding", "index": i, "embedding": encode_vector(v, encoding_format)} for i, v in enumerate(embedded.vectors)],
        "model": model,
        "usage": {"prompt_tokens": embedded.prompt_tokens, "total_tokens": embedded.prompt_tokens},
    }
