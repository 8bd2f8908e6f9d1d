"""Builds the Serve application (ingress → tokenizer → generator → postprocessor) from one MaasConfig.

`build_app(config)` is what the CLI and tests run; `app_builder(args)` is the
import path for `serve deploy` / `serve run` (see `cluster/serve_config.yaml`).
"""

from __future__ import annotations

from typing import Any

from ray.serve import Application

from cluster.config import MaasConfig, load_config
from cluster.model_store import ModelVersion, open_store
from cluster.serve_config import deployment_options
from deployments.generator import Generator
from deployments.ingress import Ingress
from deployments.postprocessor import Postprocessor
from deployments.tokenizer import Tokenizer


def resolve_model(config: MaasConfig) -> ModelVersion:
    """Pin `latest` to a concrete version once, so every stage serves the same one."""
    return open_store(config.store_root()).resolve(config.model.name, config.model.version)


def build_app(config: MaasConfig) -> Application:
    model = resolve_model(config)
    stages = config.deployments
    path = str(model.path)
    billing = config.billing.model_dump(mode="json")
    if config.billing.enabled:
        config.billing.price_book.price_for(config.model.name, model.version)  # fail at deploy time, not per request
    generator = Generator.options(**deployment_options(stages.generator, gpus=1.0 if config.engine.accelerator == "gpu" else 0.0)).bind(
        path, config.engine.model_dump(), billing
    )
    tokenizer = Tokenizer.options(**deployment_options(stages.tokenizer)).bind(path, config.engine.max_model_len)
    postprocessor = Postprocessor.options(**deployment_options(stages.postprocessor)).bind(generator, path)
    return Ingress.options(**deployment_options(stages.ingress)).bind(tokenizer, postprocessor, generator, config.model.name, model.version, billing)


def app_builder(args: dict[str, Any]) -> Application:
    """Entry point for Serve config files: `import_path: deployments.app:app_builder`, args `{config, overrides}`."""
    return build_app(load_config(args.get("config"), args.get("overrides")))
