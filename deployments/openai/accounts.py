"""The logic behind `/v1/usage` and `/admin/*`: a tenant's own usage, and the operators' keys, usage, invoices and audit.

It reaches the billing actor through the typed `billing.admin.BillingAdmin`; unit tests build
that client over an in-process core.
"""

from __future__ import annotations

import json

from typing import Any, Callable

from billing.admin import BillingAdmin
from billing.invoice import build_invoices, invoice_csv
from billing.quota import period_of
from billing.reports import usage_report
from common.errors import NotFoundError, PermissionDeniedError, RateLimitError


def key_view(record: Any) -> dict:
    """A key as operators see it: never its hash."""
    return {
        "key_id": record.key_id,
        "tenant": record.tenant,
        "role": record.role,
        "name": record.name,
        "created_at": record.created_at,
        "expires_at": record.expires_at,
        "revoked_at": record.revoked_at,
        "models": list(record.models) or None,
        "monthly_budget": None if record.monthly_budget is None else str(record.monthly_budget),
        "rpm": record.rpm,
        "tpm": record.tpm,
        "metadata": json.loads(record.metadata) if record.metadata else {},
    }


def _may_manage_keys(principal: Any) -> None:
    """Only a key without a policy of its own manages its tenant's keys: a restricted key must not mint an unrestricted one."""
    if getattr(principal, "models", ()) or getattr(principal, "limited", False):
        raise PermissionDeniedError("A key with its own model list or limits cannot manage keys; use an unrestricted key of the tenant.")


def lifetime_within(principal: Any, expires_in_s: float | None, now: float) -> float | None:
    """A new key's lifetime: never past its maker's expiry. A short-lived key's key expires with it when no lifetime
    is asked for, and asking for a later one is a 403 (never silently shortened)."""
    own = getattr(principal, "expires_at", None)
    if own is None:
        return expires_in_s
    left = own - now
    if expires_in_s is None:
        return left
    if expires_in_s > left:
        raise PermissionDeniedError(f"This API key expires in {left:.0f} s; a key it makes cannot outlive it.", param="expires_in_s", code="expiry_beyond_own")
    return expires_in_s


def _outlives(principal: Any, record: Any) -> bool:
    """Whether `record` would outlive `principal` (which then may not lift its limits)."""
    own = getattr(principal, "expires_at", None)
    return own is not None and (record.expires_at is None or record.expires_at > own)


class ReportLimiter:
    """A token bucket per tenant for `/v1/usage`: reports are read on their own threads, and also bounded per tenant."""

    def __init__(self, per_s: float, burst: int, clock: Callable[[], float]):
        self._per_s, self._burst, self._clock = per_s, burst, clock
        self._buckets: dict[str, tuple[float, float]] = {}  # tenant -> (tokens, at)

    def take(self, tenant: str) -> None:
        now = self._clock()
        tokens, at = self._buckets.get(tenant, (float(self._burst), now))
        tokens = min(float(self._burst), tokens + (now - at) * self._per_s)
        if tokens < 1:
            raise RateLimitError("Too many usage reports; retry shortly.", retry_after_s=(1 - tokens) / self._per_s)
        self._buckets[tenant] = (tokens - 1, now)


class AccountsService:
    def __init__(self, admin: BillingAdmin, currency: str, clock: Callable[[], float], reports_per_s: float = 1.0, reports_burst: int = 10):
        self._admin = admin
        self._currency = currency
        self._clock = clock
        self._limiter = ReportLimiter(reports_per_s, reports_burst, clock)

    def _period(self, period: str | None) -> str:
        return period or period_of(self._clock())

    async def tenant_usage(self, principal: Any, period: str | None, tenant: str | None, by_user: bool = False) -> dict:
        """A tenant's own usage; asking for anyone else's is refused."""
        if tenant is not None and tenant != principal.tenant and principal.role != "admin":
            raise PermissionDeniedError("A key can read only its own tenant's usage.", param="tenant")
        self._limiter.take(principal.tenant)
        return await self.usage(self._period(period), tenant or principal.tenant, by_user)

    async def usage(self, period: str | None, tenant: str | None, by_user: bool = False) -> dict:
        period = self._period(period)
        rows = await self._admin.spend_rows(period, tenant, by_day=True, by_user=by_user)
        return usage_report(rows, period, self._currency, tenant, by_user)

    async def invoice(self, period: str | None, tenant: str | None) -> str:
        period = self._period(period)
        invoices = build_invoices(await self._admin.spend_rows(period, tenant), period, self._currency, tenant)
        return "".join(invoice_csv(inv, header=i == 0) for i, inv in enumerate(invoices))

    async def create_key(self, who: Any, tenant: str, plan: str | None, role: str, expires_in_s: float | None, name: str, policy: dict | None = None) -> dict:
        """A key made with an admin key `who` (its record), which it may not outlive."""
        expires_in_s = lifetime_within(who, expires_in_s, self._clock())
        key, record = await self._admin.create_key(tenant, plan, role, expires_in_s, name, who.key_id, policy)
        return {**key_view(record), "key": key}

    async def list_keys(self, tenant: str | None) -> dict:
        return {"object": "list", "data": [key_view(k) for k in await self._admin.list_keys(tenant)]}

    # ---- a tenant's own account and keys (`/v1/account`, `/v1/keys`) ----------------------------

    async def account(self, principal: Any) -> dict:
        self._limiter.take(principal.tenant)
        account = await self._admin.account(principal.tenant, self._period(None))
        return {**account, "key": {"key_id": principal.key_id, "name": principal.name, "role": principal.role}}

    async def own_keys(self, principal: Any) -> dict:
        self._limiter.take(principal.tenant)
        return {"object": "list", "data": [key_view(k) for k in await self._admin.list_keys(principal.tenant)]}

    async def create_own_key(self, principal: Any, name: str, expires_in_s: float | None, policy: dict) -> dict:
        """A new key of the caller's tenant (never an admin key, never a plan change)."""
        _may_manage_keys(principal)
        expires_in_s = lifetime_within(principal, expires_in_s, self._clock())
        key, record = await self._admin.create_key(principal.tenant, None, "tenant", expires_in_s, name, principal.key_id, policy)
        return {**key_view(record), "key": key}

    async def revoke_own_key(self, principal: Any, key_id: str) -> dict:
        _may_manage_keys(principal)
        if not any(k.key_id == key_id for k in await self._admin.list_keys(principal.tenant)):
            raise NotFoundError(f"No API key `{key_id}` in your tenant.", param="key_id")
        return key_view(await self._admin.revoke_key(key_id, principal.key_id))

    async def update_own_key(self, principal: Any, key_id: str, changes: dict) -> dict:
        """A key of the caller's tenant with a new name or policy (a key with a policy of its own may not do this, nor
        a key that expires change one that outlives it: that would lend its rights past its own expiry)."""
        _may_manage_keys(principal)
        target = next((k for k in await self._admin.list_keys(principal.tenant) if k.key_id == key_id), None)
        if target is not None and _outlives(principal, target):
            raise PermissionDeniedError("This API key expires before that key does, so it cannot change it.", param="key_id", code="expiry_beyond_own")
        return key_view(await self._admin.update_key(key_id, changes, principal.key_id, principal.tenant))

    async def update_key(self, who: str, key_id: str, changes: dict) -> dict:
        return key_view(await self._admin.update_key(key_id, changes, who))

    async def revoke_key(self, who: str, key_id: str) -> dict:
        return key_view(await self._admin.revoke_key(key_id, who))

    async def alerts(self, tenant: str | None) -> dict:
        """Budget alerts and their deliveries (never the webhook's signature or secret)."""
        keep = ("id", "tenant", "period", "threshold", "state", "attempts", "created_at", "sent_at", "last_error")
        return {"object": "list", "data": [{k: a[k] for k in keep} for a in await self._admin.alerts(tenant)]}

    async def audit(self, limit: int, action: str | None = None, who: str | None = None, target: str | None = None, since: float | None = None) -> dict:
        return {"object": "list", "data": await self._admin.audit_log(limit, action, who, target, since)}

    async def tenants(self, period: str | None) -> dict:
        """Every tenant with its plan, budget, limits and this period's usage from the ledger, top spenders first."""
        period = self._period(period)
        return {"object": "list", "period": period, "currency": self._currency, "data": await self._admin.tenants_overview(period)}
