"""Structured JSON logs for every ray-maas process, carrying the request id, with key material scrubbed.

Each Serve replica and the billing actor call `configure(stage, logs_dir)` at start-up: records of
the project's loggers (`common`, `deployments`, `billing`, `cluster`, `training`) become one JSON object per
line in `<logs_dir>/maas/<stage>-<pid>.jsonl` (Ray's session log folder, so they sit beside Serve's
own logs and show in the dashboard's log viewer), and on stderr when `MAAS_LOG_STDERR` is set.

Every line has `ts`, `level`, `stage`, `logger`, `msg`, and `request_id` when one is known: passed
as `extra={"request_id": ...}`, or set for a whole task with `request_scope(request_id)`.  Other
`extra` fields listed in `FIELDS` (tenant, model, version, tokens, timings) are kept as JSON values;
`trace` is a request's wall-clock marks in one stage (epoch seconds; `bench/trace.py` lines them up).

API keys never reach a log line: `redact` replaces the secret part of anything that looks like a
ray-maas key or a bearer token before the line is written, whichever logger produced it.

Ray is imported only inside `setup_logging`, which finds the session's log folder from within a worker.
"""

from __future__ import annotations

import contextlib
import json
import logging
import logging.handlers
import os
import re
import sys
import time
import traceback
from contextvars import ContextVar
from pathlib import Path
from typing import Any, Iterator

PROJECT_LOGGERS = ("common", "deployments", "billing", "cluster", "training")

# `extra=` fields that become top-level JSON fields.
FIELDS = (
    "request_id", "tenant", "model", "version", "kind", "stream", "status", "prompt_tokens", "completion_tokens",
    "finish_reason", "ttft_s", "duration_s", "queue_s", "events", "request_ids", "action", "who", "target", "trace",
)

_request_id: ContextVar[str | None] = ContextVar("maas_request_id", default=None)

# `sk-maas-<8 id chars>-<secret>` keeps its visible id; any `Bearer <token>` loses the token.
_KEY = re.compile(r"(sk-maas-[A-Za-z0-9]{8})-[A-Za-z0-9_\-]+")
_BEARER = re.compile(r"(?i)(bearer\s+)[^\s\"',}]+")


def redact(text: str) -> str:
    """`text` with every key secret and bearer token replaced by `***` (the key id stays, for support)."""
    if "sk-" not in text and "earer" not in text:  # the common case: nothing to scan for
        return text
    return _BEARER.sub(r"\1***", _KEY.sub(r"\1-***", text))


@contextlib.contextmanager
def request_scope(request_id: str) -> Iterator[None]:
    """Every record logged in this context (this asyncio task) carries `request_id`."""
    token = _request_id.set(request_id)
    try:
        yield
    finally:
        _request_id.reset(token)


class JsonFormatter(logging.Formatter):
    """One JSON object per record, redacted."""

    def __init__(self, stage: str):
        super().__init__()
        self.stage = stage

    def format(self, record: logging.LogRecord) -> str:
        out: dict = {
            "ts": round(record.created, 6),
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname,
            "stage": self.stage,
            "logger": record.name,
            "msg": record.getMessage(),
        }
        rid = getattr(record, "request_id", None) or _request_id.get()
        if rid:
            out["request_id"] = rid
        for name in FIELDS[1:]:
            value = getattr(record, name, None)
            if value is not None:
                out[name] = value
        if record.exc_info:
            out["exc"] = traceback_text(record.exc_info)
        return redact(json.dumps(out, default=str, separators=(",", ":")))


def traceback_text(exc_info: Any) -> str:
    """One readable traceback string (chained causes included) from an exception or an `exc_info` tuple."""
    exc = exc_info if isinstance(exc_info, BaseException) else exc_info[1] if isinstance(exc_info, tuple) else None
    if exc is None:
        return ""
    return "".join(traceback.format_exception(type(exc), exc, exc.__traceback__)).rstrip("\n")


def log_path(logs_dir: str | Path, stage: str) -> Path:
    return Path(logs_dir) / "maas" / f"{stage}-{os.getpid()}.jsonl"


def configure(stage: str, logs_dir: str | Path | None, level: str = "INFO", to_stderr: bool = False) -> Path | None:
    """Send the project's loggers to `<logs_dir>/maas/<stage>-<pid>.jsonl` (and stderr) as JSON lines.

    Idempotent per process: a second call replaces the handlers of the first.
    """
    formatter = JsonFormatter(stage)
    handlers: list[logging.Handler] = []
    path = None
    if logs_dir:
        path = log_path(logs_dir, stage)
        path.parent.mkdir(parents=True, exist_ok=True)
        handlers.append(logging.handlers.RotatingFileHandler(path, maxBytes=512 * 2**20, backupCount=3))
    if to_stderr or not handlers:
        handlers.append(logging.StreamHandler(sys.__stderr__))  # the real stderr: Serve may have replaced sys.stderr
    for handler in handlers:
        handler.setFormatter(formatter)
    for name in PROJECT_LOGGERS:
        lg = logging.getLogger(name)
        for old in [h for h in lg.handlers if getattr(h, "_maas", False)]:
            lg.removeHandler(old)
            old.close()
        for handler in handlers:
            handler._maas = True  # type: ignore[attr-defined]
            lg.addHandler(handler)
        lg.setLevel(level)
        lg.propagate = False
    return path


def setup_logging(stage: str) -> Path | None:
    """`configure` for a Ray worker (Serve replica, actor): JSON lines into this Ray session's log folder."""
    from common import envs

    logs_dir = None
    try:
        import ray

        node = ray._private.worker._global_node  # no public accessor for the session's log folder
        logs_dir = node.get_logs_dir_path() if node is not None else None
    except Exception:  # not inside Ray: stderr only
        pass
    return configure(stage, logs_dir, envs.MAAS_LOG_LEVEL, envs.MAAS_LOG_STDERR)
