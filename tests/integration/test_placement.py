"""Placement on a real two-node Ray cluster on this machine: generators where the accelerator is, the rest on CPU nodes.

The head (127.0.0.2) offers `cpu_node`, as cluster.yaml's head and cpu_worker do; the worker
(127.0.0.3) offers `accelerator_node`, standing in for a GPU node (the GPU config asks for
`num_gpus`, which this machine has none of). The config pins stages with those resources, the
app is deployed as `maas serve`/`maas up` deploy it, and each replica's node is read back from
Ray's state API.
"""

from __future__ import annotations

import pytest

from billing.actor import admin_client
from billing.admin import wait
from cluster import local
from common.config import deep_merge, load_config
from common.model_store import ensure_default_embedding_model, ensure_default_model, open_store
from common.runtime import free_port

HEAD_IP, WORKER_IP = "127.0.0.2", "127.0.0.3"
CPU = {"resources": {"cpu_node": 0.01}}


@pytest.fixture(scope="module")
def two_nodes(config):
    import ray
    from ray.cluster_utils import Cluster

    from deployments.network import front_door_env

    with pytest.MonkeyPatch.context() as mp:
        for k, v in {**local.LOCAL_ENV, **front_door_env(config, cpus=1)}.items():  # the default front door (HAProxy) on both nodes
            mp.setenv(k, v)
        cluster = Cluster(initialize_head=True, head_node_args={"node_ip_address": HEAD_IP, "num_cpus": 1, "resources": {"cpu_node": 100}, "include_dashboard": True, "dashboard_host": HEAD_IP, "dashboard_port": free_port()})
        try:
            cluster.add_node(node_ip_address=WORKER_IP, num_cpus=1, resources={"accelerator_node": 1})
            cluster.wait_for_nodes()
            ray.init(address=cluster.address, _node_ip_address=HEAD_IP, namespace="maas")
            yield cluster
        finally:
            try:
                from ray import serve

                if ray.is_initialized():
                    serve.shutdown()
            finally:
                ray.shutdown()
                cluster.shutdown()  # only the two nodes this module started


@pytest.fixture(scope="module")
def config(ledger_url):
    overrides = {
        # The API on 127.0.0.1, not the head's 127.0.0.2: HAProxy reaches an ingress replica on its own node at
        # localhost, and the replica binds its direct port at the HTTP host (Serve's haproxy.py, replica.py).
        "http": {"host": "127.0.0.1", "port": free_port()},
        "billing": {"ledger_url": ledger_url},
        "deployments": {"ingress": CPU, "tokenizer": CPU, "postprocessor": CPU, "generator": {"resources": {"accelerator_node": 0.01}}},
    }
    cfg = load_config(overrides=deep_merge({}, overrides))
    ensure_default_model(open_store(cfg.store_root()), cfg.model.name)
    ensure_default_embedding_model(open_store(cfg.store_root()))
    return cfg


@pytest.fixture(scope="module")
def base_url(two_nodes, config):
    from ray import serve

    # One proxy, on the head: both nodes share this machine's ports.
    serve.start(proxy_location="HeadOnly", http_options={"host": config.http.host, "port": config.http.port})
    return local.deploy(config)


def _placement() -> dict[str, set[str]]:
    """Actor class → IPs of the nodes its live instances run on."""
    import ray
    from ray.util.state import list_actors  # through the head's dashboard

    ips = {n["NodeID"]: n["NodeManagerAddress"] for n in ray.nodes() if n["Alive"]}
    where: dict[str, set[str]] = {}
    for a in list_actors(filters=[("state", "=", "ALIVE")], limit=1000):
        name = a.class_name.rsplit(":", 1)[-1]  # ServeReplica:<app>:<Deployment>
        where.setdefault(name, set()).add(ips[a.node_id])
    return where


def test_generators_on_the_accelerator_node_everything_else_on_cpu_nodes(base_url):
    where = _placement()
    assert where["Generator"] == {WORKER_IP}, where
    for stage in ("Ingress", "Tokenizer", "BillingActor"):  # the ingress writes responses itself, from the worker's generator
        assert where[stage] == {HEAD_IP}, (stage, where)


def test_a_request_crosses_both_nodes(base_url, api_key_two_nodes):
    from openai import OpenAI

    client = OpenAI(base_url=base_url, api_key=api_key_two_nodes, max_retries=0, timeout=120)
    reply = client.chat.completions.create(model="SmolLM2-135M-Instruct", messages=[{"role": "user", "content": "Hello!"}], max_tokens=8)
    assert reply.choices[0].message.content and reply.usage.completion_tokens > 0


@pytest.fixture(scope="module")
def api_key_two_nodes(base_url, config):

    from billing import actor

    key, _ = wait(admin_client(actor.get(config.billing)).create_key("placement", "enterprise", "tenant", None, "tests", "tests"))
    return key
