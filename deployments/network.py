"""Nothing of the serving graph listens beyond its node's own address.

Ray Serve 2.60 starts each replica's inter-replica gRPC server (the data plane of its throughput mode) on
`[::]:0`, every interface, with no authentication: anyone who can reach the machine could call the
Generator, Postprocessor, Tokenizer or Ingress directly, past keys, quotas and billing.  Peers reach a
replica at its node's IP (`RunningReplicaInfo.node_ip`), so binding that address instead changes nothing
for them.

`bind_replica_servers_to_node_ip` is a Ray worker-process setup hook: every replica's runtime environment
names it (`setup_hook_env()`, used by `deployments.app.deployment_options`), so it runs in the replica's
process before Serve starts the server there.  Ray turns a `worker_process_setup_hook` field into the
worker's hook only for job-level runtime environments (`ray.init`); for an actor the same is done by
setting the variable the default worker reads at start-up, which is what `setup_hook_env` returns.  It wraps the one function Serve binds with (which also honours
`RAY_USE_TLS`), replacing a wildcard host by the node's IP; other addresses pass through unchanged.
`tests/integration/test_serving.py` lists every listening socket of the cluster and fails on any that is
not loopback.

The front door (`http.proxy: haproxy`, `front_door_env`): Serve's HAProxy mode renders HAProxy's config
from a template that binds its stats and Prometheus frontends to every interface, with no host setting,
and answers its own 502/503/504 with a plain-text 500. The same hook, run in every worker of such a cluster
(HAProxy's manager actor included, which no deployment's runtime environment reaches), edits that template
before Serve first reads it: both frontends bind where the API does (`http.host`), and HAProxy's own errors
are the OpenAI envelope with their real status (and `Retry-After` where a retry helps).

The same hook shortens the GIL's switch interval in every replica (`common.envs.MAAS_GIL_SWITCH_INTERVAL_MS`):
gRPC's poller thread hands each message to the replica's event loop under the GIL, and a busy loop otherwise
keeps it waiting up to Python's 5 ms per hand-over.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import tempfile
from pathlib import Path

from ray._private.ray_constants import WORKER_PROCESS_SETUP_HOOK_ENV_VAR

from common.config import MaasConfig

logger = logging.getLogger(__name__)

SETUP_HOOK = f"{__name__}.bind_replica_servers_to_node_ip"
_WILDCARDS = ("[::]", "0.0.0.0", "", "[::0]")


def setup_hook_env() -> dict[str, str]:
    """The environment variable that makes a Ray worker run `bind_replica_servers_to_node_ip` at start-up."""
    return {WORKER_PROCESS_SETUP_HOOK_ENV_VAR: SETUP_HOOK}


def front_door_env(config: MaasConfig, cpus: int | None = None) -> dict[str, str]:
    """What a cluster's processes need in their environment, from its start, for `http.proxy` (Serve reads these
    when it is imported): HAProxy mode with a thread per core of the node (at most Serve's 4), and the setup hook
    in every worker so that HAProxy's manager renders our template too."""
    if config.http.proxy != "haproxy":
        return {"RAY_SERVE_ENABLE_HA_PROXY": "0"}
    threads = max(1, min(4, cpus or os.cpu_count() or 1))
    return {"RAY_SERVE_ENABLE_HA_PROXY": "1", "RAY_SERVE_HAPROXY_NBTHREAD": str(threads), **setup_hook_env()}


# HAProxy's own answers (no replica could give one), as OpenAI's envelope: (status, reason, code, message, Retry-After).
HAPROXY_ERRORS = (
    (502, "Bad Gateway", "bad_gateway", "The API replica serving this request stopped before it answered; retry the request.", "1"),
    (503, "Service Unavailable", "service_unavailable", "No API replica is available right now (starting or restarting); retry shortly.", "2"),
    (504, "Gateway Timeout", "gateway_timeout", "The API replica did not answer in time.", None),
)
_TEMPLATE_EDITS = (
    ("bind :{{ config.metrics_port }}", "bind {{ config.frontend_host }}:{{ config.metrics_port }}"),
    ("bind *:{{ config.stats_port }}", "bind {{ config.frontend_host }}:{{ config.stats_port }}"),
    *((f"errorfile {code} {{{{ config.error_file_path }}}}", f"errorfile {code} <errors>/{code}.http") for code, *_ in HAPROXY_ERRORS),
)


def error_files(folder: Path) -> Path:
    """HAProxy `errorfile`s (whole HTTP responses) for its own 502/503/504, each an OpenAI error envelope."""
    folder.mkdir(parents=True, exist_ok=True)
    for status, reason, code, message, retry_after in HAPROXY_ERRORS:
        body = json.dumps({"error": {"message": message, "type": "server_error", "param": None, "code": code}}, separators=(",", ":"))
        head = [f"HTTP/1.1 {status} {reason}", "Content-Type: application/json", f"Content-Length: {len(body.encode())}", "Cache-Control: no-cache", "Connection: close"]
        head += [f"Retry-After: {retry_after}"] if retry_after else []
        target = folder / f"{status}.http"
        staging = folder / f".{status}.http.{os.getpid()}"
        staging.write_text("\r\n".join(head) + "\r\n\r\n" + body)
        os.replace(staging, target)
    return folder


def edit_haproxy_template(template: str, errors: Path) -> str:
    """Serve's HAProxy template with its stats and Prometheus frontends bound where the API listens, and our error files.

    Raises ValueError when a line to edit is not there (Serve's template changed: fail loudly, never serve unbound)."""
    for old, new in _TEMPLATE_EDITS:
        if old not in template:
            raise ValueError(f"Serve's HAProxy template has no `{old}` to edit")
        template = template.replace(old, new.replace("<errors>", str(errors)))
    return template


def _use_our_haproxy_template() -> None:
    if os.environ.get("RAY_SERVE_ENABLE_HA_PROXY") != "1":
        return
    import ray.serve._private.haproxy_templates as templates

    if getattr(templates, "_maas_edited", False):
        return
    errors = error_files(Path(tempfile.gettempdir()) / f"ray-maas-haproxy-{os.getuid()}")
    templates.HAPROXY_CONFIG_TEMPLATE = edit_haproxy_template(templates.HAPROXY_CONFIG_TEMPLATE, errors)
    templates._maas_edited = True  # type: ignore[attr-defined]
    haproxy = sys.modules.get("ray.serve._private.haproxy")  # imported the name already: its copy too
    if haproxy is not None:
        haproxy.HAPROXY_CONFIG_TEMPLATE = templates.HAPROXY_CONFIG_TEMPLATE


def node_address(address: str, node_ip: str) -> str:
    """`address` with a wildcard host replaced by `node_ip` (IPv6 in brackets), otherwise unchanged."""
    host, _, port = address.rpartition(":")
    if host not in _WILDCARDS:
        return address
    return f"[{node_ip}]:{port}" if ":" in node_ip else f"{node_ip}:{port}"


def shorten_gil_switch_interval() -> None:
    """Let gRPC's poller thread hand messages to a busy event loop within `MAAS_GIL_SWITCH_INTERVAL_MS`, not 5 ms."""
    from common import envs

    if envs.MAAS_GIL_SWITCH_INTERVAL_MS > 0:
        sys.setswitchinterval(envs.MAAS_GIL_SWITCH_INTERVAL_MS / 1000)


def bind_replica_servers_to_node_ip() -> None:
    """Make Serve's gRPC servers in this process bind the node's IP rather than every interface (idempotent), in
    HAProxy mode render HAProxy's config from our edit of Serve's template, and shorten the GIL's switch interval
    (`MAAS_GIL_SWITCH_INTERVAL_MS`)."""
    import ray
    import ray._common.tls_utils as tls

    shorten_gil_switch_interval()
    _use_our_haproxy_template()

    original = tls.add_port_to_grpc_server
    if getattr(original, "_maas_node_bound", False):
        return
    node_ip = ray.util.get_node_ip_address()

    def add_port_on_node_ip(server, address):  # noqa: ANN001 - Ray's own signature
        return original(server, node_address(address, node_ip))

    add_port_on_node_ip._maas_node_bound = True  # type: ignore[attr-defined]
    tls.add_port_to_grpc_server = add_port_on_node_ip
    replica = sys.modules.get("ray.serve._private.replica")  # imported the name already: patch its copy too
    if replica is not None and getattr(replica, "add_port_to_grpc_server", None) is original:
        replica.add_port_to_grpc_server = add_port_on_node_ip
    logger.debug("Serve's gRPC servers in this process bind %s", node_ip)
