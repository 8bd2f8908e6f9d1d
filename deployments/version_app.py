"""The version application of one store version of a model: its generator (behind a postprocessor with
`deployments.inline_postprocess: false`; no HTTP route), or for an embedding model its one embedding stage.

Kept apart from the front application (`deployments.app`) so the version lifecycle
(`deployments.fleet`), which the ingress itself drives for the console, imports no ingress.

Behind Serve's HAProxy mode (`http.proxy: haproxy`, the default) every application's ingress deployment must
use Serve's own router, and generator and postprocessor both carry the pinned one (their carriers must
reach one replica); so each version application gets `VersionRoot`, a router-free ingress that holds
nothing and that nothing calls (the ingress reaches the generator, or the postprocessor, by its deployment's name). It is
there under Serve's Python proxy too, so that an application's shape never depends on which front door
a process's environment names.
"""

from __future__ import annotations

from typing import Any

from ray import serve
from ray.serve import Application

from common.config import DeploymentConfig, MaasConfig
from common.errors import NotFoundError
from common.model_store import ModelVersion, open_store
from deployments.core.adapters import adapters_wanted
from deployments.embedder import EmbeddingModel
from deployments.generator import Generator
from deployments.network import setup_hook_env
from deployments.postprocessor import Postprocessor
from deployments.routing import PINNED_ROUTER

SHUTDOWN_POLL_S = 0.5


@serve.deployment(num_replicas=1, ray_actor_options={"num_cpus": 0, "runtime_env": {"env_vars": setup_hook_env()}})
class VersionRoot:
    """A version application's router-free ingress, as Serve's HAProxy mode requires of an application's ingress."""

    def __init__(self, stage: Any):
        self._stage = stage  # bound so that Serve deploys the version's stages under this root

    async def __call__(self, request: Any = None) -> Any:
        """Nothing routes here; under HAProxy its replica still listens on a direct port (loopback): a 404 in the envelope."""
        from starlette.responses import JSONResponse

        error = NotFoundError("Not found: a model version's internal application answers nothing.")
        return JSONResponse(error.to_envelope(), status_code=error.status_code)


def deployment_options(stage: DeploymentConfig, *, gpus: float = 0.0) -> dict[str, Any]:
    """Serve `.options(...)` for one stage from its config."""
    actor: dict[str, Any] = {"num_cpus": stage.num_cpus, "num_gpus": stage.num_gpus if stage.num_gpus is not None else gpus}
    if stage.resources:
        actor["resources"] = dict(stage.resources)
    if stage.memory_gib:
        actor["memory"] = int(stage.memory_gib * 2**30)
    # Every replica binds its inter-replica server to its node's IP, not every interface (deployments.network).
    actor["runtime_env"] = {"env_vars": {**setup_hook_env(), **stage.env_vars}}
    auto = stage.autoscaling
    return {
        "max_ongoing_requests": stage.max_ongoing_requests,
        # A stopping replica checks for requests still running every half second, not Serve's 2 s: each stage
        # of a retired version (or a shut-down app, stopped stage after stage) is gone that much sooner once drained.
        "graceful_shutdown_wait_loop_s": SHUTDOWN_POLL_S,
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


def resolve_model(config: MaasConfig, version: str | None = None) -> ModelVersion:
    """A concrete store version (`latest` resolved once, so every stage serves the same one)."""
    return open_store(config.store_root()).resolve(config.model.name, version or config.model.version)


def build_version_app(config: MaasConfig, version: str) -> Application:
    """The generator (postprocessor → generator with `deployments.inline_postprocess: false`) of one store version."""
    model = resolve_model(config, version)
    stages = config.deployments
    path = str(model.path)
    billing = config.billing.model_dump(mode="json")
    if config.billing.enabled:
        config.billing.price_book.price_for(config.model.name, model.version)  # fail at deploy time, not per request
    drain = {"graceful_shutdown_timeout_s": config.model.drain_timeout_s}
    gpus = 1.0 if config.engine.accelerator == "gpu" else 0.0
    if config.model.task == "embed":  # one stage: the embedding engine tokenizes and answers whole (no carriers)
        engine_config = config.engine.model_copy(update={"enable_lora": False})
        embedder = EmbeddingModel.options(**deployment_options(stages.generator, gpus=gpus), **drain).bind(path, engine_config.model_dump(), billing, config.model.name, model.version)
        return VersionRoot.bind(embedder)
    # Both stream back through carriers that must reach one replica (deployments.core.relay).
    relay = {"request_router_config": {"request_router_class": PINNED_ROUTER}}
    engine = config.engine.model_copy(update={"enable_lora": adapters_wanted(config.engine.enable_lora, str(config.store_root()), config.model.name)})
    generator = Generator.options(**deployment_options(stages.generator, gpus=gpus), **drain, **relay).bind(
        path, engine.model_dump(), billing, config.model.name, model.version
    )
    if stages.inline_postprocess:  # the ingress detokenizes and shapes responses itself
        return VersionRoot.bind(generator)  # in both front-door modes: the app's shape never depends on this process's env
    postprocessor = Postprocessor.options(**deployment_options(stages.postprocessor), **drain, **relay).bind(generator, path)
    return VersionRoot.bind(postprocessor)
