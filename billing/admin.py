"""The billing actor's administration and reports as one typed client: keys, plans, usage rows, totals, events, audit.

Every caller uses it: the ingress's `/admin/*` and `/v1/usage` routes, the `maas` CLI, version
changes (their audit entries), benchmarks and tests.  It reaches a `BillingCore` through one
`invoke(method, *args)` that returns an awaitable: over the actor's handle
(`billing.actor.admin_client`) or in-process (`BillingAdmin.in_process`, unit tests).  No Ray here.

Async code awaits the methods; synchronous code (the CLI, tools) wraps one call in `wait(...)`.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
from decimal import Decimal
from typing import TYPE_CHECKING, Any, Awaitable, Callable, TypeVar

from billing.ledger import SpendRow
from billing.records import KeyRecord, UsageEvent

if TYPE_CHECKING:
    from billing.service import BillingCore, Totals
    from common.config import Plan

T = TypeVar("T")
Invoke = Callable[..., Awaitable[Any]]


class BillingAdmin:
    def __init__(self, invoke: Invoke):
        self._invoke = invoke

    @classmethod
    def in_process(cls, core: "BillingCore") -> "BillingAdmin":
        """Over a core in this process (unit tests, tools without a cluster)."""

        async def invoke(method: str, *args: Any) -> Any:
            return getattr(core, method)(*args)

        return cls(invoke)

    # ---- keys and tenants --------------------------------------------------------------------

    async def create_key(
        self, tenant: str, plan: str | None = None, role: str = "tenant", expires_in_s: float | None = None, name: str = "", who: str = "cli", policy: dict | None = None
    ) -> tuple[str, KeyRecord]:
        """A new key, shown only in this reply, and its stored record; `policy`: models, monthly_budget, rpm, tpm, metadata."""
        return await self._invoke("create_key", tenant, plan, role, expires_in_s, name, who, policy)

    async def revoke_key(self, key_id: str, who: str = "cli") -> KeyRecord:
        return await self._invoke("revoke_key", key_id, who)

    async def update_key(self, key_id: str, changes: dict, who: str = "cli", tenant: str | None = None) -> KeyRecord:
        """Change a key's name or own policy (the fields in `changes`; None clears one); `tenant`: it must be that tenant's."""
        return await self._invoke("update_key", key_id, changes, who, tenant)

    async def alerts(self, tenant: str | None = None) -> list[dict]:
        """Budget alerts queued, sent or given up on (billing.alerts)."""
        return await self._invoke("alerts", tenant)

    async def account(self, tenant: str, period: str) -> dict:
        return await self._invoke("account", tenant, period)

    async def list_keys(self, tenant: str | None = None) -> list[KeyRecord]:
        return await self._invoke("list_keys", tenant)

    async def set_plan(self, tenant: str, plan: str, who: str = "cli") -> None:
        await self._invoke("set_plan", tenant, plan, who)

    async def tenants(self) -> dict[str, str]:
        """Tenant -> plan name."""
        return await self._invoke("tenants")

    async def tenants_overview(self, period: str) -> list[dict]:
        """Every tenant's plan, limits, requests, tokens and spend in `period`, top spenders first."""
        return await self._invoke("tenants_overview", period)

    # ---- fine-tuning ---------------------------------------------------------------------------

    async def hold(self, key: str, tenant: str, amount: Decimal, period: str, key_id: str = "") -> None:
        """Reserve a fine-tuning job's worst-case cost against the tenant's budget, and the asking key's own (429 `insufficient_quota` when it does not fit)."""
        await self._invoke("hold", key, tenant, amount, period, key_id)

    async def release(self, key: str) -> None:
        await self._invoke("release", key)

    async def plan(self, tenant: str) -> "Plan":
        """The tenant's plan: its limits on files, keys and queued fine-tuning jobs besides budget and rates."""
        return await self._invoke("plan", tenant)

    async def record_training(self, job_id: str, tenant: str, key_id: str, model: str, tokens: int, price_per_1m: Decimal, ts: float) -> bool:
        """Bill a job's trained tokens exactly once (by job id) and release its hold."""
        return await self._invoke("record_training", job_id, tenant, key_id, model, tokens, price_per_1m, ts)

    # ---- reports -----------------------------------------------------------------------------

    async def spend_rows(self, period: str | None = None, tenant: str | None = None, by_day: bool = False, by_user: bool = False) -> list[SpendRow]:
        return await self._invoke("spend_rows", period, tenant, by_day, by_user)

    async def spent(self, tenant: str, period: str) -> Decimal:
        return await self._invoke("spent", tenant, period)

    async def totals(self, period: str) -> list["Totals"]:
        return await self._invoke("totals", period)

    async def events(self, request_ids: list[str] | None = None, tenant: str | None = None) -> list[UsageEvent]:
        return await self._invoke("events", request_ids, tenant)

    async def status(self) -> dict:
        return await self._invoke("status")

    # ---- audit -------------------------------------------------------------------------------

    async def record_audit(self, who: str, action: str, target: str, detail: str = "") -> None:
        """An operator action taken outside billing (e.g. a model version canaried, promoted or rolled back)."""
        await self._invoke("record_audit", who, action, target, detail)

    async def audit_log(self, limit: int = 100, action: str | None = None, who: str | None = None, target: str | None = None, since: float | None = None) -> list[dict]:
        """Newest first; `action` is a prefix (`model.`, `key.`), `who` and `target` exact, `since` a Unix time."""
        return await self._invoke("audit_log", limit, action, who, target, since)


def wait(call: Awaitable[T], timeout_s: float = 60.0) -> T:
    """Run one awaitable to its end from synchronous code (the CLI, tools); bounded by `timeout_s`."""

    async def bounded() -> T:
        return await asyncio.wait_for(call, timeout_s)

    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(bounded())
    with concurrent.futures.ThreadPoolExecutor(1) as pool:  # called from inside a running loop: run beside it
        return pool.submit(asyncio.run, bounded()).result()
