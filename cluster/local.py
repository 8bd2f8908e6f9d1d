"""Start and stop a local, loopback-only Ray cluster with the ray-maas app on it (used by `maas serve` and the tests)."""

from __future__ import annotations

import contextlib
import logging
import os
import time
import urllib.request
from typing import Iterator

from common.config import MaasConfig, load_config
from common.runtime import LOCAL_ENV, REPO_ROOT, RUNTIME_EXCLUDES, use_local_env

logger = logging.getLogger(__name__)


def start_ray(
    num_cpus: int | None = None, include_dashboard: bool = True, dashboard_port: int | None = None, metrics_export_port: int | None = None, config: MaasConfig | None = None
) -> str | None:
    """Start a new local Ray cluster owned by this process (never attaches to another); returns the dashboard URL.

    `config` (default: MAAS_CONFIG's): its front door (`http.proxy`) goes into the environment of the cluster's
    processes (`front_door_env`; the raylet hands it to every worker), and only theirs: this process's environment
    is as it was once they have started, so a later cluster started from here gets its own."""
    use_local_env()
    from deployments.network import front_door_env

    with scoped_env(front_door_env(config or load_config(), num_cpus)):
        return _init(num_cpus, include_dashboard, dashboard_port, metrics_export_port)


@contextlib.contextmanager
def scoped_env(env: dict[str, str]) -> Iterator[None]:
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _init(num_cpus: int | None, include_dashboard: bool, dashboard_port: int | None, metrics_export_port: int | None) -> str | None:
    import ray

    ctx = ray.init(
        address="local",
        num_cpus=num_cpus or os.cpu_count(),
        include_dashboard=include_dashboard,
        dashboard_host="127.0.0.1",
        dashboard_port=dashboard_port,
        runtime_env={"working_dir": str(REPO_ROOT), "excludes": RUNTIME_EXCLUDES, "env_vars": dict(LOCAL_ENV)},
        logging_level=logging.WARNING,
        log_to_driver=True,
        _metrics_export_port=metrics_export_port,
    )
    url = getattr(ctx, "dashboard_url", None)
    return f"http://{url}" if url else None


def deploy(config: MaasConfig, blocking_timeout_s: float = 600, who: str = "maas serve") -> str:
    """Start Serve's HTTP proxy on the configured host/port, run the app, wait until it answers; returns the API base URL."""
    from ray import serve

    from cluster.versions import deploy_all

    serve.start(http_options={"host": config.http.host, "port": config.http.port})
    deploy_all(config, who=who, timeout_s=blocking_timeout_s)
    base = f"http://{config.http.host}:{config.http.port}"
    wait_healthy(base, blocking_timeout_s)
    return f"{base}/v1"


def wait_healthy(base_url: str, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            with urllib.request.urlopen(f"{base_url}/healthz", timeout=5) as resp:
                if resp.status == 200:
                    return
        except Exception as exc:  # 503 while the engine loads, or not routed yet
            last = exc
        if time.monotonic() > deadline:
            raise TimeoutError(f"{base_url}/healthz did not answer 200 within {timeout_s}s: {last}")
        time.sleep(0.5)


def stop() -> None:
    """Shut down Serve and the Ray cluster this process started."""
    import ray
    from ray import serve

    try:
        serve.shutdown()
    finally:
        ray.shutdown()
