"""The chat dataset format fine-tuning reads: JSONL, one `{"messages": [{role, content}, ...]}` per line.

On the ground floor because two layers check it: the ingress validates an upload (`POST /v1/files`)
before storing it, and the training job validates what it reads. Errors name the line.
"""

from __future__ import annotations

import io
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, Iterable, Iterator

ROLES = ("system", "user", "assistant")


class DatasetError(ValueError):
    """A dataset line that is not a valid chat example, with where it is."""

    def __init__(self, path: str, line: int, reason: str):
        super().__init__(f"{path}:{line}: {reason}")
        self.path, self.line, self.reason = path, line, reason


def validate_chat(obj: Any) -> list[dict[str, str]]:
    """The example's messages, or a ValueError saying what is wrong with it."""
    if not isinstance(obj, dict) or not isinstance(obj.get("messages"), list) or not obj["messages"]:
        raise ValueError('expected {"messages": [{"role": ..., "content": ...}, ...]}')
    messages = []
    for i, m in enumerate(obj["messages"]):
        if not isinstance(m, dict) or m.get("role") not in ROLES or not isinstance(m.get("content"), str):
            raise ValueError(f"message {i}: needs a role in {ROLES} and a string content")
        messages.append({"role": m["role"], "content": m["content"]})
    if not any(m["role"] == "assistant" for m in messages):
        raise ValueError("no assistant message to learn from")
    return messages


def iter_chats(lines: Iterable[str], name: str) -> Iterator[list[dict[str, str]]]:
    """Every example of JSONL `lines` (text lines), validated, one at a time; raises DatasetError naming the first bad line."""
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            yield validate_chat(json.loads(line))
        except (json.JSONDecodeError, ValueError) as exc:
            raise DatasetError(name, n, str(exc)) from None
        except RecursionError:  # `[[[[...` deeper than the parser goes: not a chat example, and never a 500
            raise DatasetError(name, n, "the JSON is nested too deeply") from None


def parse_chats(lines: Iterable[str], name: str) -> list[list[dict[str, str]]]:
    """Every example of JSONL `lines` (text lines), validated; raises DatasetError naming the first bad line."""
    chats = list(iter_chats(lines, name))
    if not chats:
        raise DatasetError(name, 0, "the dataset is empty")
    return chats


def read_chats(path: Path) -> list[list[dict[str, str]]]:
    """Every example of a JSONL file, validated; raises DatasetError naming the first bad line."""
    with open(path, encoding="utf-8") as fh:
        return parse_chats(fh, str(path))


@dataclass(frozen=True)
class DatasetStats:
    examples: int
    messages: int
    characters: int  # of every message's content
    content_bytes: int = 0  # the same in UTF-8 bytes: a byte-level BPE makes at most one token per byte, so with the template's tokens a bound on training tokens


def check_upload(data: bytes | BinaryIO, name: str) -> DatasetStats:
    """An uploaded dataset checked whole, read line by line (bytes, or a binary file from where it stands, never
    held whole): UTF-8, and every line a chat example (DatasetError otherwise)."""
    source = io.BytesIO(data) if isinstance(data, bytes) else data

    def lines() -> Iterator[str]:
        for n, raw in enumerate(source, 1):
            try:
                yield raw.decode("utf-8")
            except UnicodeDecodeError:
                raise DatasetError(name, n, "not UTF-8 text") from None

    examples = messages = characters = content_bytes = 0
    for chat in iter_chats(lines(), name):
        examples += 1
        messages += len(chat)
        characters += sum(len(m["content"]) for m in chat)
        content_bytes += sum(len(m["content"].encode("utf-8")) for m in chat)
    if not examples:
        raise DatasetError(name, 0, "the dataset is empty")
    return DatasetStats(examples, messages, characters, content_bytes)
