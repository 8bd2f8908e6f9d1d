"""`cluster.yaml` is a valid Ray cluster-launcher config, checked with Ray's own schema (no cloud access)."""

from __future__ import annotations

import json

import yaml

from common.runtime import LOCAL_ENV, REPO_ROOT



def test_cluster_yaml_passes_rays_validation():
    from ray.autoscaler._private.util import prepare_config, validate_config

    raw = yaml.safe_load((REPO_ROOT / "cluster.yaml").read_text())
    config = prepare_config(raw)
    validate_config(config)
    assert config["head_node_type"] == "head"
    gpu = config["available_node_types"]["gpu_worker"]
    assert gpu["min_workers"] == 0 and gpu["max_workers"] >= 1


def test_cluster_yaml_installs_the_gpu_extra_and_deploys_the_serve_config():
    raw = yaml.safe_load((REPO_ROOT / "cluster.yaml").read_text())
    assert any("[gpu]" in cmd for cmd in raw["setup_commands"])
    head = " ".join(raw["head_start_ray_commands"])
    assert "serve-config" in head and "serve deploy" in head and "cluster/configs/gpu.yaml" in head
    for cmds in (raw["head_start_ray_commands"], raw["worker_start_ray_commands"]):
        start = next(c for c in cmds if "ray start" in c)
        assert "RAY_SERVE_THROUGHPUT_OPTIMIZED=1" in start and "RAY_worker_niceness=0" in start
        assert f"RAY_SERVE_METRICS_EXPORT_INTERVAL_MS={LOCAL_ENV['RAY_SERVE_METRICS_EXPORT_INTERVAL_MS']}" in start


# ---- the KubeRay RayService manifest -------------------------------------------------------------

def _generated():
    from common.config import load_config
    from cluster.kuberay import load_launcher, rayservice_for, render

    path = REPO_ROOT / "cluster/configs/gpu.yaml"
    return render(rayservice_for(load_config(path), path, load_launcher(REPO_ROOT / "cluster.yaml"), ["v1"]))


def test_shipped_rayservice_is_what_the_generator_writes():
    assert (REPO_ROOT / "cluster/rayservice.yaml").read_text() == _generated(), "regenerate: maas --config cluster/configs/gpu.yaml kuberay --versions v1 > cluster/rayservice.yaml"


def test_rayservice_serve_config_passes_serves_schema_and_its_imports_resolve():
    import importlib

    from ray.serve.schema import ServeDeploySchema

    manifest = yaml.safe_load((REPO_ROOT / "cluster/rayservice.yaml").read_text())
    assert manifest["apiVersion"] == "ray.io/v1" and manifest["kind"] == "RayService"
    schema = ServeDeploySchema.model_validate(yaml.safe_load(manifest["spec"]["serveConfigV2"]))
    names = [app.name for app in schema.applications]
    assert names == ["maas--SmolLM2-135M-Instruct--v1", "maas"]
    for app in schema.applications:
        module, attr = app.import_path.split(":")
        assert callable(getattr(importlib.import_module(module), attr))
        assert (REPO_ROOT / app.args["config"]).exists()


def test_rayservice_groups_mirror_the_launcher_node_types():
    import re

    manifest = yaml.safe_load((REPO_ROOT / "cluster/rayservice.yaml").read_text())
    launcher = yaml.safe_load((REPO_ROOT / "cluster.yaml").read_text())
    cluster = manifest["spec"]["rayClusterConfig"]
    head = cluster["headGroupSpec"]
    groups = {g["groupName"]: g for g in cluster["workerGroupSpecs"]}
    assert set(groups) == {"cpu-worker", "gpu-worker"}
    for spec in [head, *groups.values()]:
        assert all(isinstance(v, str) for v in spec["rayStartParams"].values())  # KubeRay's rule
        (container,) = spec["template"]["spec"]["containers"]
        assert re.fullmatch(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?", container["name"])
        env = {e["name"] for e in container["env"]}
        assert {"MAAS_MODEL_STORE", "MAAS_LEDGER_URL", "HF_HUB_OFFLINE"} <= env
    for name, node_type in launcher["available_node_types"].items():
        spec = head if name == launcher["head_node_type"] else groups[name.replace("_", "-")]
        resources = spec["rayStartParams"].get("resources")
        assert (resources and json.loads(resources.strip("'"))) == (node_type.get("resources") or None)
        if spec is not head:
            assert (spec["minReplicas"], spec["maxReplicas"]) == (node_type["min_workers"], node_type["max_workers"])
    gpu = groups["gpu-worker"]["template"]["spec"]["containers"][0]["resources"]["limits"]
    assert gpu["nvidia.com/gpu"] == "1" and "nvidia.com/gpu" not in head["template"]["spec"]["containers"][0]["resources"]["limits"]


def test_gpu_config_keeps_cpu_stages_off_gpu_nodes():
    """Generators need a GPU (only gpu_worker has one); the other stages need `cpu_node` (head and cpu_worker only)."""
    from common.config import load_config
    from deployments.app import deployment_options

    config = load_config(REPO_ROOT / "cluster/configs/gpu.yaml")
    launcher = yaml.safe_load((REPO_ROOT / "cluster.yaml").read_text())
    provides = {name: set((t.get("resources") or {})) for name, t in launcher["available_node_types"].items()}
    assert deployment_options(config.deployments.generator, gpus=1.0)["ray_actor_options"]["num_gpus"] == 1.0
    for stage in ("ingress", "tokenizer", "postprocessor"):
        needs = set(deployment_options(getattr(config.deployments, stage))["ray_actor_options"].get("resources", {}))
        assert needs == {"cpu_node"}
        assert [n for n, res in provides.items() if needs <= res] == ["head", "cpu_worker"]
