"""Serve settings derived from the maas config: per-stage deployment options, and the Serve config file for `serve deploy`.

Pure functions (no Ray import), so both start paths build the same app and unit tests check them."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

from cluster.config import DeploymentConfig, MaasConfig
from cluster.local import LOCAL_ENV

REPO_ROOT = Path(__file__).resolve().parent.parent


def serve_config_for(config: MaasConfig, config_path: Path | None = None, working_dir: str | None = None, versions: list[str] | None = None) -> dict[str, Any]:
    """A Serve config over the given maas config file: the front application (`deployments.app:app_builder`)
    and one application per served model version (`deployments.app:version_app_builder`).

    `versions` are the ones the live traffic plan needs (`TrafficPlan.deployed()`). Nodes import the
    installed project (the cluster set-up installs it); pass `working_dir` as a remote URI (e.g. a zip on
    object storage) or `local://` path to ship the code with the app instead.
    """
    rel = Path(config_path).resolve().relative_to(REPO_ROOT) if config_path else Path("cluster/configs/default.yaml")
    runtime_env: dict[str, Any] = {"env_vars": {k: LOCAL_ENV[k] for k in ("HF_HUB_OFFLINE", "TOKENIZERS_PARALLELISM", "VLLM_NO_USAGE_STATS", "RAY_SERVE_THROUGHPUT_OPTIMIZED")}}
    if working_dir:
        runtime_env["working_dir"] = working_dir
    version_apps = [
        {
            "name": f"{config.app_name}--{config.model.name}--{v}",  # deployments.app.version_app_name
            "route_prefix": None,
            "import_path": "deployments.app:version_app_builder",
            "runtime_env": copy.deepcopy(runtime_env),
            "args": {"config": str(rel), "version": v},
        }
        for v in versions or []
    ]
    front = {"name": config.app_name, "route_prefix": config.route_prefix, "import_path": "deployments.app:app_builder", "runtime_env": copy.deepcopy(runtime_env), "args": {"config": str(rel)}}
    return {"proxy_location": "EveryNode", "http_options": {"host": config.http.host, "port": config.http.port}, "applications": [*version_apps, front]}


def deployment_options(stage: DeploymentConfig, *, gpus: float = 0.0) -> dict[str, Any]:
    """Serve `.options(...)` for one stage from its config."""
    actor: dict[str, Any] = {"num_cpus": stage.num_cpus, "num_gpus": stage.num_gpus if stage.num_gpus is not None else gpus}
    if stage.resources:
        actor["resources"] = dict(stage.resources)
    if stage.memory_gib:
        actor["memory"] = int(stage.memory_gib * 2**30)
    if stage.env_vars:
        actor["runtime_env"] = {"env_vars": dict(stage.env_vars)}
    auto = stage.autoscaling
    return {
        "max_ongoing_requests": stage.max_ongoing_requests,
        "autoscaling_config": {
            "min_replicas": auto.min_replicas,
            "initial_replicas": auto.initial_replicas if auto.initial_replicas is not None else auto.min_replicas,
            "max_replicas": max(auto.max_replicas, auto.min_replicas),
            "target_ongoing_requests": auto.target_ongoing_requests,
            "upscale_delay_s": auto.upscale_delay_s,
            "downscale_delay_s": auto.downscale_delay_s,
        },
        "ray_actor_options": actor,
    }
