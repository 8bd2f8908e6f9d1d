"""A KubeRay `RayService` manifest generated from the same settings as `cluster.yaml` and the Serve config.

`rayservice_for(config, config_path, launcher, versions)` is pure: its `serveConfigV2` is
`serve_config_for(...)` (what `maas serve-config` prints), and its head and worker groups mirror the
cluster launcher's node types: their custom resources (`cpu_node`, `accelerator_node`), worker
min/max counts, and CPUs/memory/GPUs of the instance types.  `maas kuberay` prints it;
`cluster/rayservice.yaml` is the shipped copy, and a test checks it equals a fresh generation.

Every pod mounts the model store (a ReadWriteMany volume claim, `maas-models`) at the same path, and
reads the ledger URL from an optional secret (`maas-ledger`, key `url`): without it the ledger is SQLite
on the head pod, lost with the pod.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import yaml

from cluster.serve_config import serve_config_for
from common.config import MaasConfig
from common.runtime import LOCAL_ENV, REPO_ROOT
from deployments.network import front_door_env

# vCPUs, memory (GiB) and GPUs of the instance types cluster.yaml may name (the Kubernetes requests mirror them,
# less headroom for the kubelet).
INSTANCE_SHAPES: dict[str, tuple[int, int, int]] = {
    "m6i.large": (2, 8, 0),
    "m6i.xlarge": (4, 16, 0),
    "m6i.2xlarge": (8, 32, 0),
    "m6i.4xlarge": (16, 64, 0),
    "g5.xlarge": (4, 16, 1),
    "g5.2xlarge": (8, 32, 1),
    "g5.12xlarge": (48, 192, 4),
    "p4d.24xlarge": (96, 1152, 8),
}
MODEL_STORE_MOUNT = "/mnt/maas-models"
RAY_AUTH_SECRET = "maas-ray-auth"  # kubectl create secret generic maas-ray-auth --from-literal=token=$(openssl rand -hex 32)
IMAGE = "ghcr.io/ray-maas/ray-maas:latest"  # built from cluster/Dockerfile (the project with the `gpu` extra)


def load_launcher(path: Path = REPO_ROOT / "cluster.yaml") -> dict[str, Any]:
    return yaml.safe_load(path.read_text())


def _container(name: str, node_type: dict[str, Any], env: list[dict[str, Any]], ports: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    instance = node_type["node_config"]["InstanceType"]
    cpus, mem, gpus = INSTANCE_SHAPES[instance]
    limits: dict[str, Any] = {"cpu": str(cpus), "memory": f"{mem}Gi"}
    if gpus:
        limits["nvidia.com/gpu"] = str(gpus)
    requests = {"cpu": str(max(cpus - 1, 1)), "memory": f"{int(mem * 0.85)}Gi", **({"nvidia.com/gpu": str(gpus)} if gpus else {})}
    container: dict[str, Any] = {
        "name": name,
        "image": IMAGE,
        "env": env,
        "resources": {"limits": limits, "requests": requests},
        "volumeMounts": [{"name": "models", "mountPath": MODEL_STORE_MOUNT}],
        # Let Serve drain streams before the pod goes (model.drain_timeout_s).
        "lifecycle": {"preStop": {"exec": {"command": ["/bin/sh", "-c", "ray stop --grace-period 60"]}}},
    }
    if ports:
        container["ports"] = ports
    return container


def _pod(container: dict[str, Any], grace_s: int, gpu: bool) -> dict[str, Any]:
    spec: dict[str, Any] = {
        "containers": [container],
        "volumes": [{"name": "models", "persistentVolumeClaim": {"claimName": "maas-models"}}],
        "terminationGracePeriodSeconds": grace_s,
    }
    if gpu:
        spec["tolerations"] = [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]
    return {"spec": spec}


def _start_params(node_type: dict[str, Any], **extra: str) -> dict[str, str]:
    params = dict(extra)
    if node_type.get("resources"):
        # KubeRay wants every rayStartParams value as a string; `resources` is ray start's JSON, quoted.
        params["resources"] = "'" + json.dumps(node_type["resources"], separators=(",", ":")) + "'"
    return params


def rayservice_for(config: MaasConfig, config_path: Path | None, launcher: dict[str, Any], versions: list[str], name: str = "ray-maas") -> dict[str, Any]:
    """The RayService resource (a dict ready for `yaml.safe_dump`)."""
    serve = serve_config_for(config, config_path, None, versions)
    serve["http_options"] = {"host": "0.0.0.0", "port": config.http.port}  # reached through the Kubernetes service
    env = [
        {"name": "MAAS_MODEL_STORE", "value": MODEL_STORE_MOUNT},
        {"name": "HF_HUB_OFFLINE", "value": "1"},
        {"name": "RAY_SERVE_THROUGHPUT_OPTIMIZED", "value": "1"},
        {"name": "RAY_worker_niceness", "value": "0"},
        {"name": "RAY_SERVE_METRICS_EXPORT_INTERVAL_MS", "value": LOCAL_ENV["RAY_SERVE_METRICS_EXPORT_INTERVAL_MS"]},  # idle cost (bench/RESULTS.md)
        {"name": "MAAS_LEDGER_URL", "valueFrom": {"secretKeyRef": {"name": "maas-ledger", "key": "url", "optional": True}}},
        # Ray's token auth on every Ray port, Serve's inter-replica servers included (docs/operations.md, Security).
        {"name": "RAY_AUTH_MODE", "value": "token"},
        {"name": "RAY_AUTH_TOKEN", "valueFrom": {"secretKeyRef": {"name": RAY_AUTH_SECRET, "key": "token"}}},
        # The front door (`http.proxy`): HAProxy mode and the setup hook in every worker (docs/operations.md); Serve's 4 threads.
        *({"name": k, "value": v} for k, v in sorted(front_door_env(config, cpus=4).items())),
    ]
    types = launcher["available_node_types"]
    head_type = types[launcher["head_node_type"]]
    grace = int(config.model.drain_timeout_s) + 30
    head = {
        "rayStartParams": _start_params(head_type, **{"dashboard-host": "0.0.0.0", "metrics-export-port": "8080", "num-gpus": "0"}),
        "template": _pod(
            _container(
                "ray-head",
                head_type,
                env,
                [
                    {"containerPort": 6379, "name": "gcs"},
                    {"containerPort": 8265, "name": "dashboard"},
                    {"containerPort": 8080, "name": "metrics"},
                    {"containerPort": config.http.port, "name": "serve"},
                ],
            ),
            grace,
            gpu=False,
        ),
    }
    workers = []
    for group, node_type in types.items():
        if group == launcher["head_node_type"]:
            continue
        gpus = INSTANCE_SHAPES[node_type["node_config"]["InstanceType"]][2]
        workers.append(
            {
                "groupName": group.replace("_", "-"),
                "replicas": node_type.get("min_workers", 0),
                "minReplicas": node_type.get("min_workers", 0),
                "maxReplicas": node_type["max_workers"],
                "rayStartParams": _start_params(node_type),
                "template": _pod(_container("ray-worker", node_type, env, [{"containerPort": 8080, "name": "metrics"}]), grace, gpu=gpus > 0),
            }
        )
    return {
        "apiVersion": "ray.io/v1",
        "kind": "RayService",
        "metadata": {"name": name, "labels": {"app.kubernetes.io/name": "ray-maas"}},
        "spec": {
            "serveConfigV2": yaml.safe_dump(serve, sort_keys=False),
            "rayClusterConfig": {
                "rayVersion": _ray_version(),
                "enableInTreeAutoscaling": True,
                "autoscalerOptions": {"idleTimeoutSeconds": int(launcher.get("idle_timeout_minutes", 10)) * 60},
                "headGroupSpec": head,
                "workerGroupSpecs": workers,
            },
        },
    }


def _ray_version() -> str:
    from importlib.metadata import version

    return version("ray")


class _Dumper(yaml.SafeDumper):
    """Block scalars for multi-line strings (serveConfigV2 stays readable YAML), and no anchors."""

    def ignore_aliases(self, data: Any) -> bool:
        return True


_Dumper.add_representer(str, lambda d, s: d.represent_scalar("tag:yaml.org,2002:str", s, style="|" if "\n" in s else None))


def render(manifest: dict[str, Any]) -> str:
    header = (
        "# ray-maas on Kubernetes (KubeRay >= 1.1): kubectl apply -f cluster/rayservice.yaml\n"
        "# Generated by `maas --config cluster/configs/gpu.yaml kuberay` from cluster.yaml and the Serve config; do not edit by hand.\n"
        "# Needs: a ReadWriteMany PVC `maas-models` (the model store), the image from cluster/Dockerfile, and optionally\n"
        "# a secret `maas-ledger` with key `url` (a PostgreSQL URL) so the ledger outlives the head pod.\n"
    )
    return header + yaml.dump(manifest, Dumper=_Dumper, sort_keys=False)
