"""Every environment variable ray-maas reads, typed, in one place (all start with ``MAAS_``).

Read them as attributes of this module (``from common import envs; envs.MAAS_PORT``);
each access reads the environment afresh, so tests and child processes see changes.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Callable

from common.paths import REPO_ROOT


def _path(name: str, default: Path) -> Callable[[], Path]:
    return lambda: Path(os.environ.get(name) or default).expanduser()


def _optional_path(name: str) -> Callable[[], Path | None]:
    return lambda: Path(os.environ[name]).expanduser() if os.environ.get(name) else None


environment_variables: dict[str, Callable[[], Any]] = {
    # YAML config file; the shipped default when unset.
    "MAAS_CONFIG": _path("MAAS_CONFIG", REPO_ROOT / "cluster" / "configs" / "default.yaml"),
    # Root of the model store; overrides `model_store.root` in the config when set.
    "MAAS_MODEL_STORE": _optional_path("MAAS_MODEL_STORE"),
    # HTTP host/port the API listens on; override the config's `http` section when set.
    "MAAS_HOST": lambda: os.environ.get("MAAS_HOST") or None,
    "MAAS_PORT": lambda: int(os.environ["MAAS_PORT"]) if os.environ.get("MAAS_PORT") else None,
    # SQLAlchemy URL of the billing ledger; overrides `billing.ledger_url` when set.
    "MAAS_LEDGER_URL": lambda: os.environ.get("MAAS_LEDGER_URL") or None,
    # API key the `maas` CLI and tests use against the HTTP API (never logged).
    "MAAS_API_KEY": lambda: os.environ.get("MAAS_API_KEY") or None,
    # Where fine-tuning runs write checkpoints; overrides `checkpoint.storage_path` in training configs.
    "MAAS_TRAIN_STORAGE": lambda: os.environ.get("MAAS_TRAIN_STORAGE") or None,
    # Also write the JSON log lines of replicas and the billing actor to stderr (they always go to Ray's log folder).
    "MAAS_LOG_STDERR": lambda: os.environ.get("MAAS_LOG_STDERR", "0").lower() in ("1", "true", "yes"),
    # Where `maas up` keeps the state of the cluster it started (and that head's log).
    "MAAS_STATE_DIR": _path("MAAS_STATE_DIR", Path("~/.cache/ray-maas")),
    # Shared secret that signs budget-alert webhooks (HMAC-SHA256); alerts are not sent without it.
    "MAAS_WEBHOOK_SECRET": lambda: os.environ.get("MAAS_WEBHOOK_SECRET") or None,
    # Log level for ray-maas loggers.
    "MAAS_LOG_LEVEL": lambda: os.environ.get("MAAS_LOG_LEVEL", "INFO").upper(),
    # How long a thread of a replica process may hold Python's GIL while another waits for it, in ms (Python's own
    # default is 5). gRPC's poller thread must take the GIL to hand each message it receives to the replica's event
    # loop; while that loop is busy (batch work beside live traffic), 5 ms per hand-over was most of what a live request
    # lost on its way into the generator (bench/RESULTS.md, issue 27). 0 keeps Python's default.
    "MAAS_GIL_SWITCH_INTERVAL_MS": lambda: float(os.environ.get("MAAS_GIL_SWITCH_INTERVAL_MS") or 0.5),
}


# The only MAAS_* variables a Ray job (fine-tuning) receives from the submitting shell: what the job needs to
# find the store and write its checkpoints and logs. Never the ledger URL (it may hold a password) or an API key:
# a job's runtime environment is visible in the dashboard.
JOB_ENV_VARS = ("MAAS_CONFIG", "MAAS_MODEL_STORE", "MAAS_TRAIN_STORAGE", "MAAS_LOG_LEVEL", "MAAS_LOG_STDERR")


def job_env(environ: dict[str, str] | None = None) -> dict[str, str]:
    """The allow-listed variables (JOB_ENV_VARS) that are set, for a job's runtime environment."""
    environ = os.environ if environ is None else environ
    return {k: environ[k] for k in JOB_ENV_VARS if environ.get(k)}


def __getattr__(name: str) -> Any:
    if name in environment_variables:
        return environment_variables[name]()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return list(environment_variables)
