"""What a fine-tuning run tells the platform while it runs: a folder of append-only JSON lines every node can reach.

The training job (rank 0) writes; the fine-tuning API and the job manager read. One format, one
module, on the ground floor because both layers use it:

- `events.jsonl`: `{"type": "step"|"eval"|"message", "created_at", ...}` per line (a step has
  `step`, `max_steps`, `loss`, `lr`, `tokens` and the running `trained_tokens`);
- `checkpoints.jsonl`: `{"step", "path", "metrics", "created_at"}` per checkpoint written;
- `result.json`: the run's end (`status`, `trained_tokens`, the published model, metrics).

Lines are appended whole with one write each, so a reader sees complete lines; one torn last line
(a job killed mid-write) is skipped.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

EVENTS = "events.jsonl"
CHECKPOINTS = "checkpoints.jsonl"
RESULT = "result.json"


def _append(path: Path, record: dict) -> None:
    line = (json.dumps(record, sort_keys=True) + "\n").encode()
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, line)
    finally:
        os.close(fd)


def _lines(path: Path) -> list[dict]:
    try:
        text = path.read_text()
    except FileNotFoundError:
        return []
    out = []
    for line in text.splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:  # a torn last line
            continue
    return out


class RunReport:
    def __init__(self, folder: str | Path):
        self.folder = Path(folder).expanduser()

    def _ready(self) -> Path:
        self.folder.mkdir(parents=True, exist_ok=True)
        return self.folder

    def event(self, kind: str, now: float | None = None, **fields: Any) -> None:
        _append(self._ready() / EVENTS, {"type": kind, "created_at": now if now is not None else time.time(), **fields})

    def checkpoint(self, step: int, path: str, metrics: dict, now: float | None = None) -> None:
        _append(self._ready() / CHECKPOINTS, {"step": step, "path": path, "metrics": metrics, "created_at": now if now is not None else time.time()})

    def finish(self, **fields: Any) -> None:
        tmp = self._ready() / f".{RESULT}.tmp"
        tmp.write_text(json.dumps({"finished_at": time.time(), **fields}, sort_keys=True))
        os.replace(tmp, self.folder / RESULT)

    def events(self) -> list[dict]:
        return _lines(self.folder / EVENTS)

    def checkpoints(self) -> list[dict]:
        return _lines(self.folder / CHECKPOINTS)

    def result(self) -> dict | None:
        try:
            return json.loads((self.folder / RESULT).read_text())
        except (FileNotFoundError, json.JSONDecodeError):
            return None

    def trained_tokens(self) -> int:
        """Tokens trained so far: the result's count once there is one, else the last step's running count."""
        result = self.result()
        if result is not None and "trained_tokens" in result:
            return int(result["trained_tokens"])
        steps = [e for e in self.events() if e.get("type") == "step"]
        return int(steps[-1].get("trained_tokens", 0)) if steps else 0
