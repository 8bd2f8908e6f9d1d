"""`cluster.yaml` is a valid Ray cluster-launcher config, checked with Ray's own schema (no cloud access)."""

from __future__ import annotations

from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[2]


def test_cluster_yaml_passes_rays_validation():
    from ray.autoscaler._private.util import prepare_config, validate_config

    raw = yaml.safe_load((REPO / "cluster.yaml").read_text())
    config = prepare_config(raw)
    validate_config(config)
    assert config["head_node_type"] == "head"
    gpu = config["available_node_types"]["gpu_worker"]
    assert gpu["min_workers"] == 0 and gpu["max_workers"] >= 1


def test_cluster_yaml_installs_the_gpu_extra_and_deploys_the_serve_config():
    raw = yaml.safe_load((REPO / "cluster.yaml").read_text())
    assert any("[gpu]" in cmd for cmd in raw["setup_commands"])
    head = " ".join(raw["head_start_ray_commands"])
    assert "serve-config" in head and "serve deploy" in head and "cluster/configs/gpu.yaml" in head
    for cmds in (raw["head_start_ray_commands"], raw["worker_start_ray_commands"]):
        start = next(c for c in cmds if "ray start" in c)
        assert "RAY_SERVE_THROUGHPUT_OPTIMIZED=1" in start and "RAY_worker_niceness=0" in start
