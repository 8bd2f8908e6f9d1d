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
"""

from __future__ import annotations

import logging
import sys

from ray._private.ray_constants import WORKER_PROCESS_SETUP_HOOK_ENV_VAR

logger = logging.getLogger(__name__)

SETUP_HOOK = f"{__name__}.bind_replica_servers_to_node_ip"
_WILDCARDS = ("[::]", "0.0.0.0", "", "[::0]")


def setup_hook_env() -> dict[str, str]:
    """The environment variable that makes a Ray worker run `bind_replica_servers_to_node_ip` at start-up."""
    return {WORKER_PROCESS_SETUP_HOOK_ENV_VAR: SETUP_HOOK}


def node_address(address: str, node_ip: str) -> str:
    """`address` with a wildcard host replaced by `node_ip` (IPv6 in brackets), otherwise unchanged."""
    host, _, port = address.rpartition(":")
    if host not in _WILDCARDS:
        return address
    return f"[{node_ip}]:{port}" if ":" in node_ip else f"{node_ip}:{port}"


def bind_replica_servers_to_node_ip() -> None:
    """Make Serve's gRPC servers in this process bind the node's IP rather than every interface (idempotent)."""
    import ray
    import ray._common.tls_utils as tls

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
