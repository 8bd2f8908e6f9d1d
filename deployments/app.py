"""Turns a MaasConfig into the Serve applications of one model; nothing else.

* the **front** application (`config.app_name`, HTTP): ingress → tokenizer, shared by every version;
* one **version** application per served store version (`version_app_name(...)`, no HTTP route):
  postprocessor → generator, built by `deployments.version_app`.

Which versions run is the version lifecycle (`deployments.fleet`); the `serve deploy` entry
points that keep the live traffic plan are operations (`cluster.versions`, `cluster.entrypoints`).
"""

from __future__ import annotations

from ray.serve import Application

from common.config import MaasConfig
from deployments.ingress import Ingress
from deployments.tokenizer import Tokenizer
from deployments.version_app import build_version_app, deployment_options, resolve_model

__all__ = ["build_app", "build_version_app", "deployment_options", "resolve_model"]


def build_app(config: MaasConfig, stable_version: str | None = None) -> Application:
    """Ingress → tokenizer; the tokenizer is the stable version's (versions of a model share it, see deployments.fleet)."""
    model = resolve_model(config, stable_version)
    stages = config.deployments
    tokenizer = Tokenizer.options(**deployment_options(stages.tokenizer)).bind(str(model.path), config.engine.max_model_len)
    return Ingress.options(**deployment_options(stages.ingress)).bind(tokenizer, config.model_dump(mode="json"))
