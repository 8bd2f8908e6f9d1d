"""`maas up` / `down` / `status`: a local Ray head that outlives the command, and what runs on it.

`up` starts `ray start --head --block` as its own process group on loopback, remembers it in a state
file (`<MAAS_STATE_DIR>/up.json`), deploys the app and returns; `down` shuts Serve down (streams
drain), stops that head with SIGTERM (Ray's own shutdown of every process it started) and then
SIGKILLs whatever of that Ray session is still alive, so nothing is left behind.  Nothing here ever
touches a Ray cluster it did not start: no `ray stop`.

`find_cluster()` tells the CLI where the running cluster is (RAY_ADDRESS, the state file, or what Ray's
own discovery finds: a live local GCS, or the last `ray start`'s address) and checks within a second that its GCS answers, instead of Ray's minute-long
connection timeout on a stale address.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from common import envs
from common.runtime import LOCAL_ENV, free_port, port_open

logger = logging.getLogger(__name__)


class ClusterError(Exception):
    """A clear, user-facing reason why a cluster command cannot go on."""


@dataclass
class UpState:
    pid: int  # the `ray start --block` process; its process group holds the Ray processes
    gcs_address: str
    dashboard_url: str
    metrics_url: str
    api_url: str
    session_dir: str
    log_path: str
    config_path: str | None
    started_at: float


def state_path() -> Path:
    return envs.MAAS_STATE_DIR / "up.json"


def load_state() -> UpState | None:
    try:
        return UpState(**json.loads(state_path().read_text()))
    except FileNotFoundError:
        return None


def save_state(state: UpState) -> None:
    path = state_path()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(asdict(state), indent=2))
    tmp.replace(path)


def clear_state() -> None:
    state_path().unlink(missing_ok=True)


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _local_cluster() -> str:
    """What `ray.init(address="auto")` would join: a live local GCS process (a `maas serve` or `ray start` cluster),
    else the last `ray start`'s address in /tmp/ray/ray_current_cluster."""
    from ray._private.services import get_ray_address_from_environment

    try:
        return get_ray_address_from_environment("auto", None)
    except ConnectionError as exc:
        raise ClusterError("Ray is not running: start a local cluster with `maas up` (or `maas serve`), or set RAY_ADDRESS.") from exc


def find_cluster() -> str:
    """The GCS address of the running cluster, checked to answer; a ClusterError saying what to do otherwise."""
    if os.environ.get("RAY_ADDRESS"):
        address, source = os.environ["RAY_ADDRESS"], "RAY_ADDRESS"
        if "://" in address:  # ray:// client or a dashboard URL: let Ray handle it
            return address
    elif (state := load_state()) is not None and pid_alive(state.pid):
        address, source = state.gcs_address, f"the cluster `maas up` started ({state_path()})"
    else:
        address, source = _local_cluster(), "the local Ray cluster Ray's own discovery found"
    if not port_open(address):
        raise ClusterError(f"No Ray cluster answers at {address} (from {source}); it has stopped. Start one with `maas up`, or set RAY_ADDRESS.")
    return address


def forget_current_cluster(gcs_address: str, address_file: Path | None = None) -> bool:
    """Remove Ray's "current cluster" file where it still names `gcs_address`, as `ray stop` does; whether it did.

    `ray start` writes it, and Ray's clients with no address (`ray job submit`, `JobSubmissionClient()`,
    `ray.init()`) look there first: one naming a stopped cluster sends them to a dead GCS."""
    if address_file is None:
        from ray._common.utils import get_ray_address_file

        address_file = Path(get_ray_address_file(None))
    try:
        if address_file.read_text().strip() != gcs_address:
            return False  # another cluster's now: not ours to remove
        address_file.unlink()
        return True
    except OSError:
        return False


def _session_processes(session_name: str, group: int) -> list:
    import psutil

    found = []
    for proc in psutil.process_iter(["pid", "cmdline"]):
        try:
            if proc.pid == os.getpid():
                continue
            in_group = os.getpgid(proc.pid) == group
            cmd = " ".join(proc.info["cmdline"] or [])
            if in_group or (session_name and session_name in cmd):
                found.append(proc)
        except (ProcessLookupError, PermissionError, psutil.Error):
            continue
    return found


def start_head(num_cpus: int | None, dashboard_port: int, metrics_port: int, log_path: Path, timeout_s: float = 120) -> tuple[int, str]:
    """`ray start --head --block` on 127.0.0.1 in a new process group; returns (pid, GCS address) once the GCS answers."""
    port = free_port()
    address = f"127.0.0.1:{port}"
    cmd = [
        str(Path(sys.executable).with_name("ray")),
        "start", "--head", "--block",
        "--node-ip-address=127.0.0.1", f"--port={port}",
        "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard_port}",
        f"--metrics-export-port={metrics_port}",
        f"--num-cpus={num_cpus or os.cpu_count()}",
        "--disable-usage-stats",
    ]  # fmt: skip
    # Ray drains a node for up to 30 s on SIGTERM; `maas down` has already drained Serve by then.
    env = {**LOCAL_ENV, **os.environ, "RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S": os.environ.get("RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S", "5")}
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "ab") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env, start_new_session=True)
    deadline = time.monotonic() + timeout_s
    while not port_open(address, 0.5):
        if proc.poll() is not None:
            raise ClusterError(f"`ray start` exited with code {proc.returncode}; see {log_path}.")
        if time.monotonic() > deadline:
            stop_head(proc.pid, "")
            raise ClusterError(f"The Ray head did not come up within {timeout_s:.0f}s; see {log_path}.")
        time.sleep(0.3)
    return proc.pid, address


def stop_head(pid: int, session_name: str, grace_s: float = 30) -> list[int]:
    """SIGTERM the head's `ray start` (Ray stops what it started), wait, then SIGKILL this session's stragglers.

    Returns the pids that had to be killed."""
    try:
        group = os.getpgid(pid)
    except ProcessLookupError:
        group = pid
    if pid_alive(pid):
        os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + grace_s
    while time.monotonic() < deadline:
        if not pid_alive(pid) and not _session_processes(session_name, group):
            return []
        time.sleep(0.5)
    killed = []
    for proc in _session_processes(session_name, group):
        try:
            proc.kill()
            killed.append(proc.pid)
        except Exception:
            pass
    return killed
