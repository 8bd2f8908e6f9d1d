"""Runtime basics every process of a local cluster shares: the repo root, the loopback environment, ports.

`LOCAL_ENV` is what a local, loopback-only cluster needs in its environment before Ray is imported;
`use_local_env()` applies it (variables already set win), and Ray ships it to every worker through
the runtime environment `start_ray` builds.
"""

from __future__ import annotations

import os
import secrets
import socket
import sys
from pathlib import Path

from common import envs
from common.paths import REPO_ROOT  # noqa: F401 - re-exported: most modules take it from here


# What never travels with the code (`working_dir` excludes).
RUNTIME_EXCLUDES = [".venv", ".git", "bench/out"]

# Loopback-only single node, Ray's token authentication (the token: `local_auth_token()`), no usage stats,
# offline model loading.
LOCAL_ENV = {
    "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
    # Every client of the cluster (the dashboard's job API, its pages, the GCS) must show the token: on a shared
    # machine any local user could otherwise submit a job and run code as the service (docs/operations.md).
    "RAY_AUTH_MODE": "token",
    "RAY_USAGE_STATS_ENABLED": "0",
    "HF_HUB_OFFLINE": "1",
    "TOKENIZERS_PARALLELISM": "false",
    "VLLM_NO_USAGE_STATS": "1",
    # Serve's high-throughput mode (gRPC data plane between replicas, user code on the replica's loop):
    # measured here c=1 9.6 -> 12.7 output tok/s and c=16 48 -> 61 tok/s (bench/RESULTS.md).
    "RAY_SERVE_THROUGHPUT_OPTIMIZED": "1",
    # Ray starts workers at nice 15; on a serving node the engine and the request path must not
    # yield the CPU to every other process (a load generator, the OS), as a plain vLLM server does not.
    "RAY_worker_niceness": "0",
    # Serve's controller wakes 10x/s by default; each wake-up can stall the engine's OpenMP threads on a
    # small node (idle controller CPU measured 6.2% -> 2.3% of a core at 0.5 s).
    "RAY_SERVE_CONTROL_LOOP_INTERVAL_S": "0.5",
    # Every replica and every handle's router hands its cached request metrics to Ray's metrics agent 10x/s by
    # default; Prometheus scrapes every 10 s, so once a second loses nothing (idle CPU: bench/RESULTS.md).
    "RAY_SERVE_METRICS_EXPORT_INTERVAL_MS": "1000",
    # Throughput mode's direct ingress drains ingress replicas for at least 30 s so outside load balancers
    # notice; a local cluster has none, and the wait made every stop take 30 s.
    "RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S": "2",
}


def use_local_env() -> None:
    """Put LOCAL_ENV into this process's environment (what is already set wins); call before importing Ray.

    This interpreter's folder also goes first on PATH, as activating its virtual environment would: a
    cluster started from here runs a Ray job's entrypoint (`ray job submit -- python -m training.finetune`)
    with the `python` that has Ray and the project installed, not whichever one the shell found first."""
    os.environ.update({k: v for k, v in LOCAL_ENV.items() if k not in os.environ})
    if os.environ["RAY_AUTH_MODE"] == "token" and not os.environ.get("RAY_AUTH_TOKEN") and not os.environ.get("RAY_AUTH_TOKEN_PATH"):
        os.environ["RAY_AUTH_TOKEN_PATH"] = str(local_auth_token())
    os.environ["PATH"] = with_interpreter_first(os.environ.get("PATH", ""))


AUTH_TOKEN_FILE = "ray-auth-token"


def local_auth_token() -> Path:
    """The file holding the token local clusters require (`<MAAS_STATE_DIR>/ray-auth-token`, readable by this user
    alone), made once with 256 random bits as `ray get-auth-token --generate` makes one."""
    path = envs.MAAS_STATE_DIR / AUTH_TOKEN_FILE
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        staging = path.with_name(f".{AUTH_TOKEN_FILE}.{os.getpid()}")
        fd = os.open(staging, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as fh:
            fh.write(secrets.token_hex(32))
        try:
            os.link(staging, path)  # never replaces a token another process made meanwhile
        except FileExistsError:
            pass
        finally:
            os.unlink(staging)
    return path


def with_interpreter_first(path: str) -> str:
    """`path` (a PATH value) with the running interpreter's folder first: added, or moved up from further down."""
    here = os.path.dirname(sys.executable)
    entries = [p for p in path.split(os.pathsep) if p]
    return path if entries[:1] == [here] else os.pathsep.join([here, *(p for p in entries if p != here)])


def repo_path(path: str | Path) -> Path:
    """`path` itself when absolute, else anchored at the repo root."""
    path = Path(path).expanduser()
    return path if path.is_absolute() else REPO_ROOT / path


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port nothing listens on right now."""
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def port_open(address: str, timeout_s: float = 1.0) -> bool:
    """Whether something accepts connections at `host:port`."""
    host, _, port = address.rpartition(":")
    try:
        with socket.create_connection((host or "127.0.0.1", int(port)), timeout=timeout_s):
            return True
    except (OSError, ValueError):
        return False
