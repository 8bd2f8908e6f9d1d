"""`serve deploy` entry points: the import paths a Serve config file names (see `cluster.serve_config`).

The front application's builder first creates or updates the live traffic plan from the config (an
operations step), then builds ingress → tokenizer over the plan's stable version; each version
application is built as it is named.
"""

from __future__ import annotations

from typing import Any

from ray.serve import Application

from cluster.versions import ensure_plan
from common.config import load_config
from deployments.app import build_app, build_version_app


def app_builder(args: dict[str, Any]) -> Application:
    """`import_path: cluster.entrypoints:app_builder`, args `{config, overrides}`: the front application (the plans of
    the models served beside the chat model are made too: the ingress follows them)."""
    config = load_config(args.get("config"), args.get("overrides"))
    stables = {view.model.name: ensure_plan(view, who="serve deploy").stable for view in config.served()[1:]}
    return build_app(config, ensure_plan(config, who="serve deploy").stable, stables)


def version_app_builder(args: dict[str, Any]) -> Application:
    """`import_path: cluster.entrypoints:version_app_builder`, args `{config, overrides, version, model}`: one version
    (`model`: a model served beside the chat model; the chat model's when absent)."""
    config = load_config(args.get("config"), args.get("overrides"))
    return build_version_app(config.for_model(args.get("model") or config.model.name), args["version"])
