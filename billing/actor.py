"""The billing actor: a named, detached Ray actor that is a `BillingCore`, and how replicas and tools reach it.

It restarts on failure (`max_restarts=-1`) and rebuilds its aggregates from the
ledger; callers resend what was not acknowledged.  It is pinned to the head node
because the embedded SQLite ledger is a file there.  Replicas talk to it through
`ActorTransport` (their batched sync); administration and reports through the typed
`billing.admin.BillingAdmin` that `admin_client` builds.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from typing import Any

import ray

from billing.admin import BillingAdmin
from billing.alerts import post, tenant_secret
from billing.ledger import Ledger, SpendRow
from billing.metrics import RayBillingMetrics
from billing.records import SyncReply, SyncRequest, UsageEvent
from billing.service import BillingCore, Totals
from common import envs
from common.actors import invoker
from common.config import BillingConfig
from common.logs import setup_logging


logger = logging.getLogger(__name__)

# Reports read the ledger on threads of their own, beside the default group that runs the replicas' syncs and
# every write one at a time: a flood of usage reports cannot stall admission (a sync waits for nothing of theirs).
REPORTS = "reports"
REPORT_THREADS = 2


class BillingActor(BillingCore):
    """Every public method of `BillingCore` is a method of the actor; the read-only reports run in `REPORTS`."""

    def __init__(self, config: BillingConfig):
        setup_logging("billing")
        restarted = ray.get_runtime_context().was_current_actor_reconstructed
        super().__init__(config, Ledger(config.resolved_ledger_url()), RayBillingMetrics(), restarted=restarted)
        threading.Thread(target=self._deliver_alerts_forever, name="budget-alerts", daemon=True).start()

    def _deliver_alerts_forever(self, interval_s: float = 0.5) -> None:
        """Budget alerts leave from here, beside the replicas' syncs (a slow receiver never holds admission up)."""
        warned = False
        while True:
            time.sleep(interval_s)
            secret = envs.MAAS_WEBHOOK_SECRET
            if secret is None:
                if not warned and (self.config.alerts.webhook_url or self.config.alerts.tenant_webhooks):
                    logger.warning("budget alerts are configured but MAAS_WEBHOOK_SECRET is not set: none is sent until it is")
                    warned = True
                continue
            timeout = self.config.alerts.timeout_s
            try:
                self.deliver_alerts(time.time(), lambda row: post(row["url"], row["body"], tenant_secret(secret, row["tenant"]), row["id"], time.time(), timeout))
            except Exception:
                logger.exception("budget alert delivery failed; retrying")

    def status(self) -> dict:
        return {**super().status(), "restarted": ray.get_runtime_context().was_current_actor_reconstructed}

    @ray.method(concurrency_group=REPORTS)
    def spend_rows(self, period: str | None = None, tenant: str | None = None, by_day: bool = False, by_user: bool = False) -> list[SpendRow]:
        return super().spend_rows(period, tenant, by_day, by_user)

    @ray.method(concurrency_group=REPORTS)
    def totals(self, period: str) -> list[Totals]:
        return super().totals(period)

    @ray.method(concurrency_group=REPORTS)
    def events(self, request_ids: list[str] | None = None, tenant: str | None = None) -> list[UsageEvent]:
        return super().events(request_ids, tenant)

    @ray.method(concurrency_group=REPORTS)
    def alerts(self, tenant: str | None = None) -> list[dict]:
        return super().alerts(tenant)

    @ray.method(concurrency_group=REPORTS)
    def audit_log(self, limit: int = 100, action: str | None = None, who: str | None = None, target: str | None = None, since: float | None = None) -> list[dict]:
        return super().audit_log(limit, action, who, target, since)


def get_or_create(config: BillingConfig) -> Any:
    """The billing actor's handle, creating it (detached, restartable, on the head node) if it does not exist."""
    return (
        ray.remote(concurrency_groups={REPORTS: REPORT_THREADS})(BillingActor)
        .options(
            name=config.actor_name,
            namespace=config.namespace,
            lifetime="detached",
            get_if_exists=True,
            max_restarts=-1,
            max_task_retries=0,  # callers resend themselves; the ledger is idempotent
            num_cpus=0,
            resources={"node:__internal_head__": 0.001},
        )
        .remote(config)
    )


def get(config: BillingConfig) -> Any:
    return ray.get_actor(config.actor_name, namespace=config.namespace)


# Administration calls that change nothing, or that are idempotent by their arguments: sent again while the actor restarts.
ADMIN_READS = (
    "alerts", "account", "list_keys", "tenants", "tenants_overview", "plan", "spend_rows", "spent", "totals", "events", "status",
    "audit_log", "set_plan", "release", "record_training",
)


def admin_client(handle: Any, timeout_s: float = 60.0) -> BillingAdmin:
    """The typed administration client over the actor's handle; each call is bounded by `timeout_s`.

    While the actor restarts, a read waits for it; a change that may or may not have happened is a 503."""
    return BillingAdmin(invoker(handle, "billing", ADMIN_READS, timeout_s))


class ActorTransport:
    """`billing.client.Transport` over the actor handle.

    A call to a restarting actor waits until it is back; the timeout bounds that, and
    whatever was not acknowledged is simply sent again (the ledger is idempotent).
    """

    def __init__(self, handle: Any, timeout_s: float = 10.0):
        self._h = handle
        self._timeout_s = timeout_s

    async def sync(self, req: SyncRequest) -> SyncReply:
        return await asyncio.wait_for(asyncio.wrap_future(self._h.sync.remote(req).future()), self._timeout_s)
