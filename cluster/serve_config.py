"""The Serve config file for `serve deploy`, derived from the maas config.

A pure function (no Ray import), so `maas serve-config`, `maas kuberay` and the unit tests build the same file."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

from common.config import MaasConfig
from common.runtime import LOCAL_ENV, REPO_ROOT
from deployments.core.traffic import version_app_name


def serve_config_for(
    config: MaasConfig, config_path: Path | None = None, working_dir: str | None = None, versions: list[str] | None = None, others: dict[str, list[str]] | None = None
) -> dict[str, Any]:
    """A Serve config over the given maas config file: the front application (`cluster.entrypoints:app_builder`)
    and one application per served model version (`cluster.entrypoints:version_app_builder`).

    `versions` are the ones the chat model's live traffic plan needs (`TrafficPlan.deployed()`), `others` the
    same for each model served beside it (`models:`); a model `others` does not name serves its configured
    version (`latest`: its first, v1). Nodes import the
    installed project (the cluster set-up installs it); pass `working_dir` as a remote URI (e.g. a zip on
    object storage) or `local://` path to ship the code with the app instead.
    """
    rel = Path(config_path).resolve().relative_to(REPO_ROOT) if config_path else Path("cluster/configs/default.yaml")
    runtime_env: dict[str, Any] = {"env_vars": {k: LOCAL_ENV[k] for k in ("HF_HUB_OFFLINE", "TOKENIZERS_PARALLELISM", "VLLM_NO_USAGE_STATS", "RAY_SERVE_THROUGHPUT_OPTIMIZED")}}
    if working_dir:
        runtime_env["working_dir"] = working_dir
    served = {config.model.name: versions or []}
    for m in config.models:
        served[m.name] = (others or {}).get(m.name) or [m.version if m.version != "latest" else "v1"]
    version_apps = [
        {
            "name": version_app_name(config.app_name, model, v),
            "route_prefix": None,
            "import_path": "cluster.entrypoints:version_app_builder",
            "runtime_env": copy.deepcopy(runtime_env),
            "args": {"config": str(rel), "version": v, **({"model": model} if model != config.model.name else {})},
        }
        for model, vs in served.items()
        for v in vs
    ]
    front = {"name": config.app_name, "route_prefix": config.route_prefix, "import_path": "cluster.entrypoints:app_builder", "runtime_env": copy.deepcopy(runtime_env), "args": {"config": str(rel)}}
    return {"proxy_location": "EveryNode", "http_options": {"host": config.http.host, "port": config.http.port}, "applications": [*version_apps, front]}

