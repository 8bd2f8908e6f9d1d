"""Builds the Serve applications of one model from a MaasConfig.

* the **front** application (`config.app_name`, HTTP): ingress → tokenizer, shared by every version;
* one **version** application per served store version (`<app>--<model>--<version>`, no HTTP route):
  postprocessor → generator.

Canary, promote and rollback (`cluster.versions`) add and remove version
applications and rewrite the live traffic plan; the front application never
restarts for them.  `app_builder` / `version_app_builder` are the import paths
for `serve deploy` (see `cluster/serve_config.py`).
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


def version_app_name(app_name: str, model: str, version: str) -> str:
    return f"{app_name}--{model}--{version}"


def resolve_model(config: MaasConfig, version: str | None = None) -> ModelVersion:
    """A concrete store version (`latest` resolved once, so every stage serves the same one)."""
    return open_store(config.store_root()).resolve(config.model.name, version or config.model.version)


def build_version_app(config: MaasConfig, version: str) -> Application:
    """Postprocessor → generator for one store version."""
    model = resolve_model(config, version)
    stages = config.deployments
    path = str(model.path)
    billing = config.billing.model_dump(mode="json")
    if config.billing.enabled:
        config.billing.price_book.price_for(config.model.name, model.version)  # fail at deploy time, not per request
    drain = {"graceful_shutdown_timeout_s": config.model.drain_timeout_s}
    generator = Generator.options(**deployment_options(stages.generator, gpus=1.0 if config.engine.accelerator == "gpu" else 0.0), **drain).bind(
        path, config.engine.model_dump(), billing, config.model.name, model.version
    )
    return Postprocessor.options(**deployment_options(stages.postprocessor), **drain).bind(generator, path)


def build_app(config: MaasConfig, stable_version: str | None = None) -> Application:
    """Ingress → tokenizer; the tokenizer is the stable version's (versions of a model share it, see cluster.versions)."""
    model = resolve_model(config, stable_version)
    stages = config.deployments
    tokenizer = Tokenizer.options(**deployment_options(stages.tokenizer)).bind(str(model.path), config.engine.max_model_len)
    return Ingress.options(**deployment_options(stages.ingress)).bind(tokenizer, config.model_dump(mode="json"))


def app_builder(args: dict[str, Any]) -> Application:
    """`import_path: deployments.app:app_builder`, args `{config, overrides}`: the front application."""
    from cluster.versions import ensure_plan

    config = load_config(args.get("config"), args.get("overrides"))
    return build_app(config, ensure_plan(config, who="serve deploy").stable)


def version_app_builder(args: dict[str, Any]) -> Application:
    """`import_path: deployments.app:version_app_builder`, args `{config, overrides, version}`: one version."""
    return build_version_app(load_config(args.get("config"), args.get("overrides")), args["version"])
