"""The named fine-tuning actor: `deployments.core.fine_tune_manager.FineTuneManager` on Ray, with Ray's Jobs API as its cluster.

Detached, restartable, on the head node, holding no CPU. Each job runs as a Ray job (the same
`python -m training.finetune --config ...` an operator's `ray job submit` runs), so the dashboard
shows it, its logs and its Ray Train workers. The job gets this actor's own code (its runtime
environment's `working_dir`, when the cluster ships one) and the allow-listed `MAAS_*` variables.
"""

from __future__ import annotations

import logging
import shlex
import sys
import threading
import time
from decimal import Decimal
from typing import Any

import ray

from common import envs
from common.actors import invoker
from common.config import MaasConfig, Plan
from common.logs import setup_logging
from deployments.core.fine_tune_manager import FineTuneManager

logger = logging.getLogger(__name__)


class RayJobCluster:
    """`JobCluster` over the Ray Jobs API of the cluster this process belongs to (its dashboard)."""

    def __init__(self) -> None:
        self._client: Any = None

    def _jobs(self) -> Any:
        if self._client is None:
            from ray.job_submission import JobSubmissionClient

            try:
                # This actor's own cluster, by its GCS address. With no address the client looks for "a local
                # cluster" in /tmp/ray/ray_current_cluster, which an earlier, stopped cluster on the machine can
                # have left behind: jobs then stayed queued while it waited on a dead GCS.
                self._client = JobSubmissionClient(ray.get_runtime_context().gcs_address)
            except Exception as exc:
                raise RuntimeError(f"the Ray Jobs API is not reachable; start the cluster with its dashboard ({exc})") from exc
        return self._client

    def free_cpus(self) -> float:
        return float(ray.available_resources().get("CPU", 0.0))

    def submit(self, job_id: str, config_path: str) -> str:
        runtime_env: dict[str, Any] = {"env_vars": {**envs.job_env(), "HF_HUB_OFFLINE": "1"}}
        working_dir = (ray.get_runtime_context().runtime_env or {}).get("working_dir")
        if working_dir:
            runtime_env["working_dir"] = working_dir
        entrypoint = " ".join(shlex.quote(a) for a in (sys.executable, "-m", "training.finetune", "--config", config_path))
        return self._jobs().submit_job(entrypoint=entrypoint, submission_id=f"{job_id}-{int(time.time())}", runtime_env=runtime_env, metadata={"maas_fine_tuning_job": job_id})

    def status(self, ray_job_id: str) -> tuple[str, str]:
        info = self._jobs().get_job_info(ray_job_id)
        return str(getattr(info.status, "value", info.status)), info.message or ""

    def stop(self, ray_job_id: str) -> None:
        self._jobs().stop_job(ray_job_id)


class SyncBilling:
    """`TrainingBilling` over the billing actor's typed admin client, from this actor's threads."""

    def __init__(self, admin: Any):
        self._admin = admin

    def _wait(self, call: Any) -> Any:
        from billing.admin import wait

        return wait(call, timeout_s=30)

    def hold(self, key: str, tenant: str, amount: Decimal, period: str, key_id: str = "") -> None:
        self._wait(self._admin.hold(key, tenant, amount, period, key_id))

    def release(self, key: str) -> None:
        self._wait(self._admin.release(key))

    def record_training(self, job_id: str, tenant: str, key_id: str, model: str, tokens: int, price_per_1m: Decimal, ts: float) -> bool:
        return self._wait(self._admin.record_training(job_id, tenant, key_id, model, tokens, price_per_1m, ts))

    def plan(self, tenant: str) -> Plan:
        return self._wait(self._admin.plan(tenant))


class FleetAdapters:
    """`AdapterServing` over the running Serve applications (`deployments.fleet.adapters_served`)."""

    def __init__(self, config: MaasConfig):
        self._config = config

    def adapters_served(self, model: str) -> bool:
        from deployments import fleet

        return fleet.adapters_served(self._config.for_model(model))


class FineTuneActor(FineTuneManager):
    """Every public method of `FineTuneManager` is a method of the actor; a thread runs `tick()`."""

    def __init__(self, config: dict):
        setup_logging("fine-tunes")
        cfg = MaasConfig.model_validate(config)
        billing = None
        if cfg.billing.enabled:
            from billing import actor

            billing = SyncBilling(actor.admin_client(actor.get_or_create(cfg.billing)))
        super().__init__(cfg, RayJobCluster(), billing, serving=FleetAdapters(cfg))
        threading.Thread(target=self._loop, name="fine-tune-queue", daemon=True).start()

    def _loop(self) -> None:
        while True:
            time.sleep(self._ft.poll_s)
            try:
                self.tick()
            except Exception:
                logger.exception("fine-tuning queue tick failed; retrying")


def get_or_create(config: MaasConfig) -> Any:
    return (
        ray.remote(FineTuneActor)
        .options(
            name=config.fine_tuning.actor_name,
            namespace=config.billing.namespace,
            lifetime="detached",
            get_if_exists=True,
            max_restarts=-1,
            max_concurrency=8,  # the API's calls beside the queue's thread (state is under the manager's lock)
            num_cpus=0,
            resources={"node:__internal_head__": 0.001},
        )
        .remote(config.model_dump(mode="json"))
    )


READS = ("get", "list", "events", "checkpoints")  # calls that may be sent again: they change nothing


def client(handle: Any, timeout_s: float = 60.0, restart_wait_s: float = 30.0) -> Any:
    """The ingress's `FineTuneBackend`: each manager call on the actor, awaited on the caller's loop.

    While the actor restarts, a read waits for it; a change (create, cancel) is a 503 (`common.actors.invoker`)."""
    from deployments.openai.fine_tuning import FineTuneBackend

    return FineTuneBackend(invoker(handle, "fine-tuning", READS, timeout_s, restart_wait_s))
