"""Turns a MaasConfig into the Serve applications of one model; nothing else.

* the **front** application (`config.app_name`, HTTP): ingress → a tokenizer per chat model, shared by every version;
* one **version** application per served store version (`version_app_name(...)`, no HTTP route):
  its generator (behind a postprocessor with `deployments.inline_postprocess: false`), built by `deployments.version_app`.

Which versions run is the version lifecycle (`deployments.fleet`); the `serve deploy` entry
points that keep the live traffic plan are operations (`cluster.versions`, `cluster.entrypoints`).
"""

from __future__ import annotations

from typing import Any

from ray.serve import Application

from common.config import MaasConfig
from deployments.ingress import Ingress
from deployments.tokenizer import Tokenizer
from deployments.version_app import build_version_app, deployment_options, resolve_model

__all__ = ["build_app", "build_version_app", "deployment_options", "resolve_model"]


def build_app(config: MaasConfig, stable_version: str | None = None, stables: dict[str, str] | None = None) -> Application:
    """Ingress → a tokenizer per chat model; each is its stable version's (versions of a model share it, see
    deployments.fleet). `stables`: the stable versions of the chat models served beside the main one, by name."""
    stages = config.deployments

    def tokenizer(view: MaasConfig, version: str | None, name: str = "Tokenizer") -> Any:
        path = str(resolve_model(view, version).path)
        return Tokenizer.options(name=name, **deployment_options(stages.tokenizer)).bind(path, view.engine.max_model_len)

    others = {m.name: tokenizer(config.for_model(m.name), (stables or {}).get(m.name), f"Tokenizer--{m.name}") for m in config.models if m.task == "chat"}
    return Ingress.options(**deployment_options(stages.ingress)).bind(tokenizer(config, stable_version), config.model_dump(mode="json"), others)
