"""The SFT dataset: validate JSONL chats, render them with the model's chat template, mask all but assistant tokens.

Pure functions over a Hugging Face tokenizer (no Ray): the job reads and shards
the data with Ray Data and calls `encode_chat` per row; tests call it directly.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Sequence

from common.datasets import ROLES, DatasetError, read_chats, validate_chat

__all__ = ["ROLES", "DatasetError", "read_chats", "validate_chat", "IGNORE_INDEX", "encode_chat", "collate", "is_eval", "lr_at", "file_sha256"]

IGNORE_INDEX = -100  # label value the loss skips (PyTorch's cross-entropy ignore_index)


def file_sha256(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def is_eval(messages: Sequence[dict[str, str]], eval_fraction: float, seed: int) -> bool:
    """Whether an example is held out: a stable hash of its content and the seed, so any reader (and any order) agrees."""
    if eval_fraction <= 0:
        return False
    digest = hashlib.sha256(f"{seed}:{json.dumps(list(messages), sort_keys=True)}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64 < eval_fraction


@dataclass(frozen=True)
class Encoded:
    input_ids: list[int]
    labels: list[int]  # IGNORE_INDEX everywhere but the assistant's tokens


def encode_chat(tokenizer: Any, messages: Sequence[dict[str, str]], max_seq_len: int) -> Encoded | None:
    """Token ids of the chat as the serving tokenizer renders it, with labels only on assistant turns.

    Each turn's text is the difference between the template rendered up to it and up
    to the turn before (for an assistant turn, the prefix includes the generation
    prompt, so the `<|im_start|>assistant` header is not learned, only the reply and
    its end-of-turn token). Returns None when truncation leaves nothing to learn.
    """
    ids: list[int] = []
    labels: list[int] = []
    rendered = ""
    for i, message in enumerate(messages):
        if message["role"] == "assistant":
            prompt = tokenizer.apply_chat_template(list(messages[:i]), tokenize=False, add_generation_prompt=True)
            _append(tokenizer, prompt[len(rendered):], False, ids, labels)
            rendered = prompt
        full = tokenizer.apply_chat_template(list(messages[: i + 1]), tokenize=False)
        if not full.startswith(rendered):  # a template that rewrites earlier turns: fall back to the whole text
            raise ValueError("the chat template does not render turns incrementally")
        _append(tokenizer, full[len(rendered):], message["role"] == "assistant", ids, labels)
        rendered = full
    ids, labels = ids[:max_seq_len], labels[:max_seq_len]
    if all(label == IGNORE_INDEX for label in labels[1:]):
        return None
    return Encoded(ids, labels)


def _append(tokenizer: Any, text: str, learn: bool, ids: list[int], labels: list[int]) -> None:
    if not text:
        return
    piece = tokenizer(text, add_special_tokens=False)["input_ids"]
    ids.extend(piece)
    labels.extend(piece if learn else [IGNORE_INDEX] * len(piece))


def collate(rows: Iterable[Encoded | dict], pad_id: int) -> dict[str, list[list[int]]]:
    """Right-pad a batch: input ids, attention mask, and labels (IGNORE_INDEX on padding)."""
    rows = [r if isinstance(r, Encoded) else Encoded(list(r["input_ids"]), list(r["labels"])) for r in rows]
    width = max(len(r.input_ids) for r in rows)
    return {
        "input_ids": [r.input_ids + [pad_id] * (width - len(r.input_ids)) for r in rows],
        "attention_mask": [[1] * len(r.input_ids) + [0] * (width - len(r.input_ids)) for r in rows],
        "labels": [r.labels + [IGNORE_INDEX] * (width - len(r.labels)) for r in rows],
    }


def lr_at(step: int, max_steps: int, warmup_steps: int, peak: float) -> float:
    """Linear warm-up to `peak`, then linear decay to 10% of it at `max_steps` (step is 0-based)."""
    if warmup_steps and step < warmup_steps:
        return peak * (step + 1) / warmup_steps
    span = max(1, max_steps - warmup_steps)
    return peak * (1.0 - 0.9 * min(1.0, (step - warmup_steps) / span))
