"""Start and stop a local, loopback-only Ray cluster with the ray-maas app on it (used by `maas serve` and the tests)."""

from __future__ import annotations

import logging
import os
import time
import urllib.request
from pathlib import Path

from cluster.config import MaasConfig

logger = logging.getLogger(__name__)

# Loopback-only single node, no token auth prompt, no usage stats, offline model loading.
LOCAL_ENV = {
    "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
    "RAY_AUTH_MODE": "disabled",
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
    # Throughput mode's direct ingress drains ingress replicas for at least 30 s so outside load balancers
    # notice; a local cluster has none, and the wait made every stop take 30 s.
    "RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S": "2",
}


def start_ray(num_cpus: int | None = None, include_dashboard: bool = True, dashboard_port: int | None = None, metrics_export_port: int | None = None) -> str | None:
    """Start a new local Ray cluster owned by this process (never attaches to another); returns the dashboard URL."""
    os.environ.update({k: v for k, v in LOCAL_ENV.items() if k not in os.environ})
    import ray

    repo_root = str(Path(__file__).resolve().parent.parent)
    ctx = ray.init(
        address="local",
        num_cpus=num_cpus or os.cpu_count(),
        include_dashboard=include_dashboard,
        dashboard_host="127.0.0.1",
        dashboard_port=dashboard_port,
        runtime_env={"working_dir": repo_root, "excludes": [".venv", ".git", "bench/out"], "env_vars": dict(LOCAL_ENV)},
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
