"""The chat dataset format fine-tuning reads: JSONL, one `{"messages": [{role, content}, ...]}` per line.

On the ground floor because two layers check it: the ingress validates an upload (`POST /v1/files`)
before storing it, and the training job validates what it reads. Errors name the line.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

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


def parse_chats(lines: Any, name: str) -> list[list[dict[str, str]]]:
    """Every example of JSONL `lines` (text lines), validated; raises DatasetError naming the first bad line."""
    chats = []
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            chats.append(validate_chat(json.loads(line)))
        except (json.JSONDecodeError, ValueError) as exc:
            raise DatasetError(name, n, str(exc)) from None
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
    characters: int  # of every message's content: with the template's tokens per message, a bound on training tokens


def check_upload(data: bytes, name: str) -> DatasetStats:
    """An uploaded dataset checked whole: UTF-8, and every line a chat example (DatasetError otherwise)."""
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data[: exc.start].count(b"\n") + 1
        raise DatasetError(name, line, "not UTF-8 text") from None
    chats = parse_chats(text.splitlines(), name)
    return DatasetStats(len(chats), sum(len(chat) for chat in chats), sum(len(m["content"]) for chat in chats for m in chat))
