"""Serve config files (`serve deploy FILE`) generated from the maas config, so both start paths build the same app."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from cluster.config import MaasConfig
from cluster.local import LOCAL_ENV

REPO_ROOT = Path(__file__).resolve().parent.parent


def serve_config_for(config: MaasConfig, config_path: Path | None = None) -> dict[str, Any]:
    """A Serve config whose single application is `deployments.app:app_builder` over the given maas config file."""
    rel = Path(config_path).resolve().relative_to(REPO_ROOT) if config_path else Path("cluster/configs/default.yaml")
    return {
        "proxy_location": "EveryNode",
        "http_options": {"host": config.http.host, "port": config.http.port},
        "applications": [
            {
                "name": config.app_name,
                "route_prefix": config.route_prefix,
                "import_path": "deployments.app:app_builder",
                "runtime_env": {"working_dir": ".", "env_vars": {k: LOCAL_ENV[k] for k in ("HF_HUB_OFFLINE", "TOKENIZERS_PARALLELISM", "VLLM_NO_USAGE_STATS")}},
                "args": {"config": str(rel)},
            }
        ],
    }
