"""The billing actor's logic (no Ray): aggregates, leases, keys and reports over one `Ledger`.

`BillingCore` holds the state the actor holds: per tenant and period the spend
(rebuilt from the ledger at start), the pending holds of aborted requests, every
replica's outstanding leases, and the per-minute rate counters.  Each decision
is delegated to the pure functions in `billing.quota`.
"""

from __future__ import annotations

import json
import logging
import time
from collections import defaultdict
from dataclasses import dataclass
from decimal import Decimal
from typing import Any, Callable, Protocol, Sequence

from billing.alerts import crossed, retry_at
from billing.keys import check_tenant, new_key
from billing.ledger import Ledger, SpendRow
from billing.pricing import cost, price_of
from billing.quota import ZERO, Ask, Grant, decide_grant, period_of, window_of
from billing.records import KeyRecord, SyncReply, SyncRequest, UsageEvent, key_subject, split_subject
from billing.reports import Tally, tally
from billing.witness import ENGINE, INGRESS, Witness
from common.config import BillingConfig, Plan
from common.errors import InsufficientQuotaError, InternalError, InvalidRequestError, NotFoundError, PermissionDeniedError

logger = logging.getLogger(__name__)


class BillingMetrics(Protocol):
    def on_usage(self, tenant: str, model: str, version: str, prompt_tokens: int, completion_tokens: int, amount: Decimal) -> None: ...

    def on_ingest(self, events: int, lag_s: float) -> None: ...

    def on_denied(self, tenant: str, reason: str) -> None: ...


class _NoMetrics:
    def on_usage(self, tenant: str, model: str, version: str, prompt_tokens: int, completion_tokens: int, amount: Decimal) -> None:
        pass

    def on_ingest(self, events: int, lag_s: float) -> None:
        pass

    def on_denied(self, tenant: str, reason: str) -> None:
        pass


@dataclass(frozen=True)
class Totals:
    tenant: str
    period: str
    requests: int
    prompt_tokens: int
    completion_tokens: int
    amount: Decimal


CONFIG_SETTING = "billing_config"
KEY_ATTEMPTS = 5  # fresh keys tried when a new key's id collides with a stored one
KEY_HOLD = "#key"  # a hold's key + this: the same hold against the asking API key's own budget


def check_key_policy(
    models: Sequence[str] | None = None, monthly_budget: Decimal | str | None = None, rpm: int | None = None, tpm: int | None = None, metadata: dict | str | None = None
) -> dict[str, Any]:
    """A key's policy fields, checked (400s naming the field) and normalised for `KeyRecord`."""
    budget = None if monthly_budget is None else Decimal(str(monthly_budget))
    if budget is not None and (not budget.is_finite() or not 0 <= budget <= 10**12 or len(str(budget)) > 40):
        raise InvalidRequestError("monthly_budget must be an amount between 0 and 10^12.", param="monthly_budget")
    for name, value in (("rpm", rpm), ("tpm", tpm)):
        if value is not None and (not isinstance(value, int) or not 1 <= value < 2**31):
            raise InvalidRequestError(f"{name} must be a whole number from 1 to 2^31 - 1.", param=name)
    if isinstance(metadata, str):
        try:
            metadata = json.loads(metadata) if metadata else {}
        except ValueError:
            raise InvalidRequestError("metadata must be a JSON object.", param="metadata") from None
    if metadata is not None and not isinstance(metadata, dict):
        raise InvalidRequestError("metadata must be a JSON object.", param="metadata")
    text = json.dumps(metadata, sort_keys=True) if metadata else ""
    if len(text) > 4096:
        raise InvalidRequestError("metadata may be at most 4096 characters of JSON.", param="metadata")
    if models is not None and (not all(isinstance(m, str) and 0 < len(m) <= 256 for m in models) or len(models) > 64):
        raise InvalidRequestError("models must be a list of up to 64 model names.", param="models")
    return {"models": tuple(dict.fromkeys(models or ())), "monthly_budget": budget, "rpm": rpm, "tpm": tpm, "metadata": text}


KEY_POLICY_FIELDS = ("models", "monthly_budget", "rpm", "tpm", "metadata")  # what `check_key_policy` takes


class BillingCore:
    def __init__(self, config: BillingConfig, ledger: Ledger, metrics: BillingMetrics | None = None, clock: Callable[[], float] = time.time, restarted: bool = False):
        """`restarted`: this is a restart of the same actor, so the config it was last given (stored in the ledger)
        wins over `config`, which Ray replays from the first creation."""
        self.ledger = ledger
        stored = ledger.setting(CONFIG_SETTING) if restarted else None
        self.config = BillingConfig.model_validate_json(stored) if stored else config
        if stored:
            logger.info("billing config restored from the ledger after a restart")
        else:
            ledger.save_setting(CONFIG_SETTING, config.model_dump_json())
        self._metrics = metrics or _NoMetrics()
        self._clock = clock
        self._spent: dict[tuple[str, str], Decimal] = defaultdict(lambda: ZERO)
        self._pending: dict[str, tuple[str, str, Decimal, float, str]] = {}  # request id -> (tenant, period, held, ts, key id)
        self._keys_by_id: dict[str, KeyRecord] = {}  # keys with limits of their own (their lease subjects' plans)
        self._touched: set[tuple[str, str]] = set()  # (tenant, period) whose spend grew since the alerts were checked
        self._alerted: dict[tuple[str, str], set[str]] = {}  # (tenant, period) -> thresholds queued (a cache of the ledger's)
        self._claims: dict[str, dict[str, tuple[str, Decimal]]] = {}  # holder -> tenant -> (period, amount)
        self._holds: dict[str, tuple[str, str, Decimal]] = {}  # a fine-tuning job's reservation: key -> (tenant, period, amount)
        self._last_seen: dict[str, float] = {}
        self._windows: dict[tuple[str, int], list[int]] = {}
        self._last_maintenance = 0.0
        self.rebuild()

    # ---- state -------------------------------------------------------------------------------

    def rebuild(self) -> None:
        """Aggregates from the ledger: what a restarted actor does first."""
        self._spent.clear()
        for row in self.ledger.spend(by_key=True):
            self._spent[(row.tenant, row.period)] += row.amount
            self._spent[(key_subject(row.tenant, row.key_id), row.period)] += row.amount
        self._pending = {p.request_id: (p.tenant, p.period, p.held, p.ts, p.key_id) for p in self.ledger.pending()}
        self._keys_by_id = {k.key_id: k for k in self.ledger.keys() if k.limited}
        self._plans = self.ledger.tenant_plans()
        self._keys_seq = self.ledger.next_key_seq() - 1
        self._started = self._clock()
        logger.info("billing state rebuilt: %d tenant-periods, %d pending, %d keys", len(self._spent), len(self._pending), self._keys_seq)

    def configure(self, config: BillingConfig, who: str = "system") -> bool:
        """Adopt a new price book / plans (a redeploy); audited when they change."""
        changed = config.model_dump(mode="json") != self.config.model_dump(mode="json")
        if changed:
            self.ledger.audit(who, "billing.configure", "price_book,plans", config.model_dump_json(include={"price_book", "plans"}))
            self.ledger.save_setting(CONFIG_SETTING, config.model_dump_json())
        self.config = config
        return changed

    def spent(self, tenant: str, period: str) -> Decimal:
        return self._spent[(tenant, period)]

    def committed(self, subject: str, period: str) -> Decimal:
        """Spent + pending + leased for a tenant, or for one key of it (`<tenant>#<key id>`, a key with limits of its own)."""
        tenant, key_id = split_subject(subject)
        pending = sum((held for t, p, held, _, k in self._pending.values() if t == tenant and p == period and key_id in (None, k)), ZERO)
        claims = sum((amount for leases in self._claims.values() for t, (p, amount) in leases.items() if t == subject and p == period), ZERO)
        holds = sum((amount for t, p, amount in self._holds.values() if t == subject and p == period), ZERO)
        return self._spent[(subject, period)] + pending + claims + holds

    # ---- fine-tuning and batches: the worst case is held against the budget while it runs ----

    def hold(self, key: str, tenant: str, amount: Decimal, period: str, key_id: str = "") -> None:
        """Reserve `amount` of the tenant's budget under `key` (idempotent: the same key replaces its hold); 429 when it does not fit.

        `key_id`: the API key that asked; a key with limits of its own holds `amount` against its own budget too."""
        check_tenant(tenant)
        wanted = {key: (tenant, period, amount)}
        if key_id in self._keys_by_id:
            wanted[key + KEY_HOLD] = (key_subject(tenant, key_id), period, amount)
        if all(self._holds.get(k) == v for k, v in wanted.items()):  # re-asserted as it stands: it was admitted already
            return
        for hold_key, (subject, _, _) in wanted.items():
            budget = self.plan_of(subject).monthly_budget
            current = self._holds.get(hold_key)
            mine = current[2] if current is not None and current[1] == period else ZERO
            if budget is not None and amount > mine:  # a hold that shrinks always fits: it frees budget
                left = budget - (self.committed(subject, period) - mine)
                if amount > left:  # refused: the hold it has stays as it was
                    whose = "the API key's own budget" if subject != tenant else "the tenant's budget"
                    what = "batch" if key.startswith("batch_") else "fine-tuning job"
                    raise InsufficientQuotaError(f"This {what} may cost up to {amount} {self.config.price_book.currency}; {whose} has {max(left, ZERO)} left this month.")
        self._drop_holds(key)
        self._holds.update(wanted)

    def _drop_holds(self, key: str) -> None:
        self._holds.pop(key, None)
        self._holds.pop(key + KEY_HOLD, None)

    def release(self, key: str) -> None:
        self._drop_holds(key)

    def plan(self, tenant: str) -> Plan:
        """The tenant's plan (its limits on files, keys and queued jobs too)."""
        check_tenant(tenant)
        return self.plan_of(tenant)

    def record_training(self, job_id: str, tenant: str, key_id: str, model: str, tokens: int, price_per_1m: Decimal, ts: float) -> bool:
        """Bill a fine-tuning job's trained tokens once (the job id is the ledger's request id) and drop its hold; False if it was billed already."""
        fresh = not self.ledger.events([job_id])
        event = UsageEvent(job_id, ts, tenant, key_id, model, "training", "training", "ok", tokens, 0, str(price_per_1m), "0", "0", "fine-tunes")
        self._ingest([event], self._clock())
        self._drop_holds(job_id)
        return fresh

    def plan_of(self, subject: str) -> Plan:
        """The tenant's plan, or a key's own limits; a plan the config no longer has falls back to the default plan, never to no limits."""
        tenant, key_id = split_subject(subject)
        if key_id is not None:
            key = self._keys_by_id.get(key_id)
            if key is None or key.tenant != tenant:  # not a key with limits (any more): nothing to grant it
                return Plan(monthly_budget=ZERO, rpm=1, tpm=1)
            return Plan(monthly_budget=key.monthly_budget, rpm=key.rpm, tpm=key.tpm)
        name = self._plans.get(tenant, self.config.default_plan)
        plan = self.config.plans.get(name)
        if plan is None:
            logger.warning("tenant %s has plan %r, which the config does not define: applying the default plan %r", tenant, name, self.config.default_plan)
            plan = self.config.plans[self.config.default_plan]
        return plan

    # ---- the replicas' channel ---------------------------------------------------------------

    def sync(self, req: SyncRequest) -> SyncReply:
        """Durably record the replica's events, note its leases, answer its asks and send key changes."""
        now = self._clock()
        self._ingest(req.events, now)
        self._last_seen[req.holder] = now
        leases = {c.tenant: (c.period, c.amount) for c in req.claims}
        self._claims[req.holder] = leases
        grants = []
        for ask in req.asks:
            grant = self._grant(ask, now)
            if grant.budget:  # count what was just granted until the replica reports it in its next claim
                period, amount = leases.get(ask.tenant, (ask.period, ZERO))
                leases[ask.tenant] = (ask.period, (amount if period == ask.period else ZERO) + grant.budget)
            grants.append(grant)
        keys = self.ledger.keys(req.keys_since) if req.keys_since < self._keys_seq else []
        self._maintain(now)
        return SyncReply(len(req.events), grants, keys, self._keys_seq)

    def record(self, events: list[UsageEvent]) -> int:
        """Ingest events outside a replica's sync (tools, benchmarks)."""
        self._ingest(events, self._clock())
        return len(events)

    def engine_usage(self, events: list[UsageEvent]) -> int:
        """The generators' witness: what the engine produced for each request (see `billing.witness`)."""
        self._ingest(events, self._clock(), ENGINE)
        return len(events)

    def _ingest(self, events: list[UsageEvent], now: float, witness: Witness = INGRESS) -> None:
        if not events:
            return
        merged = self.ledger.record(events, witness)
        if merged:
            logger.info("ledger batch", extra={"events": len(merged), "witness": witness, "request_ids": [m.row.event.request_id for m in merged]})
        # Sum tokens per (tenant, period, model, version, prices) first: exact, and one Decimal and metric update per group.
        groups: dict[tuple, list[int]] = defaultdict(lambda: [0, 0, 0])
        periods: dict[int, str] = {}
        for m in merged:
            e = m.row.event
            day = int(e.ts // 86400)
            period = periods.get(day) or periods.setdefault(day, period_of(e.ts))
            if m.row.pending:  # billed its floor so far; the rest of its reservation stays held
                held = Decimal(e.reserved) - e.amount()
                self._pending[e.request_id] = (e.tenant, period, held, e.ts, e.key_id)
            else:
                self._pending.pop(e.request_id, None)
            g = groups[(e.tenant, e.key_id, period, e.model, e.version, e.prompt_price, e.completion_price, e.cached_price)]
            g[0] += m.prompt_delta
            g[1] += m.completion_delta
            g[2] += m.cached_delta
        for (tenant, key_id, period, model, version, pp, cp, cached_price), (prompt, completion, cached) in groups.items():
            if prompt or completion or cached:
                amount = cost(Decimal(pp), Decimal(cp), prompt, completion, cached, price_of(cached_price))
                self._add_spend(tenant, key_id, period, model, version, amount, prompt, completion)
        self._metrics.on_ingest(len(merged), max(0.0, now - min(e.ts for e in events)))

    def _add_spend(self, tenant: str, key_id: str, period: str, model: str, version: str, amount: Decimal, prompt: int, completion: int) -> None:
        self._spent[(tenant, period)] += amount
        self._touched.add((tenant, period))
        self._spent[(key_subject(tenant, key_id), period)] += amount  # what a key with limits of its own has spent
        self._metrics.on_usage(tenant, model, version, prompt, completion, amount)

    def _grant(self, ask: Ask, now: float) -> Grant:
        if now - self._started < self.config.lease.restart_grace_s:
            # Just (re)started: leases held by replicas are unknown until each has synced once.
            return Grant(ask.tenant, ask.period, ask.window, ZERO, 0, 0, "warming_up", self.config.lease.restart_grace_s, "Billing is starting.")
        window = self._windows.setdefault((ask.tenant, ask.window), [0, 0])
        grant = decide_grant(self.plan_of(ask.tenant), self.config.lease, ask, self.committed(ask.tenant, ask.period), (window[0], window[1]), now)
        window[0] += grant.requests or 0
        window[1] += grant.tokens or 0
        if grant.denied:
            self._metrics.on_denied(split_subject(ask.tenant)[0], grant.denied)
        return grant

    def _maintain(self, now: float) -> None:
        if now - self._last_maintenance < 1.0:
            return
        self._last_maintenance = now
        for holder, seen in list(self._last_seen.items()):
            if now - seen > self.config.lease.holder_ttl_s:
                logger.warning("replica %s silent for %.0fs: dropping its leases", holder, now - seen)
                self._last_seen.pop(holder)
                self._claims.pop(holder, None)
        current = window_of(now)
        for key in [k for k in self._windows if k[1] < current - 1]:
            del self._windows[key]
        stale = [rid for rid, (_, _, _, ts, _) in self._pending.items() if now - ts > self.config.pending_timeout_s]
        if stale:
            for row in self.ledger.close_pending(now - self.config.pending_timeout_s):
                self._pending.pop(row.event.request_id, None)
        self._check_alerts(now)

    # ---- budget alerts (billing.alerts) ------------------------------------------------------

    def _check_alerts(self, now: float) -> None:
        """Queue an alert for each budget threshold a tenant's spend crossed (once per tenant, period and threshold)."""
        touched, self._touched = self._touched, set()
        cfg = self.config.alerts
        for tenant, period in touched:
            url = cfg.url_for(tenant)
            if url is None:
                continue
            already = self._alerted.get((tenant, period))
            if already is None:
                already = self._alerted[(tenant, period)] = self.ledger.alert_thresholds(tenant, period)
            for alert in crossed(tenant, period, self._spent[(tenant, period)], self.plan_of(tenant).monthly_budget, cfg.thresholds, already, self.config.price_book.currency):
                already.add(alert.threshold)
                if self.ledger.queue_alert(tenant, period, alert.threshold, url, alert.body(now), now):
                    logger.info("budget alert queued", extra={"tenant": tenant, "period": period, "threshold": alert.threshold})

    def due_alerts(self, now: float) -> list[dict]:
        """Alerts waiting for a delivery attempt (the actor's delivery loop sends them)."""
        return self.ledger.due_alerts(now)

    def alert_result(self, alert_id: int, attempts: int, error: str | None, now: float, target: str = "") -> None:
        """Record one delivery attempt: sent (audited), retried later with backoff, or failed for good (audited)."""
        cfg = self.config.alerts
        if error is None:
            self.ledger.update_alert(alert_id, state="sent", attempts=attempts, sent_at=now, last_error="")
            self.ledger.audit("billing", "alert.sent", target, f"alert {alert_id} after {attempts} attempt(s)")
        elif attempts >= cfg.max_attempts:
            self.ledger.update_alert(alert_id, state="failed", attempts=attempts, last_error=error[:512])
            self.ledger.audit("billing", "alert.failed", target, f"alert {alert_id} gave up after {attempts} attempts: {error[:200]}")
        else:
            self.ledger.update_alert(alert_id, attempts=attempts, next_at=retry_at(now, attempts, cfg.backoff_s), last_error=error[:512])

    def alerts(self, tenant: str | None = None) -> list[dict]:
        return self.ledger.alerts(tenant)

    def deliver_alerts(self, now: float, send: Callable[[dict], str | None]) -> int:
        """Try every alert that is due once with `send` (None: delivered, else the error); returns how many were sent."""
        sent = 0
        for row in self.due_alerts(now):
            error = send(row)
            self.alert_result(row["id"], row["attempts"] + 1, error, now, f"{row['tenant']}@{row['period']}>={row['threshold']}")
            sent += error is None
        return sent

    # ---- administration ----------------------------------------------------------------------

    def create_key(
        self, tenant: str, plan: str | None = None, role: str = "tenant", expires_in_s: float | None = None, name: str = "", who: str = "cli", policy: dict | None = None
    ) -> tuple[str, KeyRecord]:
        """A new key; `policy`: its allowed `models`, its own `monthly_budget`, `rpm`, `tpm` (inside the tenant's plan) and `metadata`."""
        check_tenant(tenant)
        if role not in ("tenant", "admin"):
            raise InvalidRequestError(f"Unknown role `{role}`: use tenant or admin.", param="role")
        policy = check_key_policy(**(policy or {}))
        if role == "tenant":
            if plan is not None and plan not in self.config.plans:
                raise InvalidRequestError(f"Unknown plan `{plan}`. Plans: {', '.join(sorted(self.config.plans))}.", param="plan")
            if plan is not None or tenant not in self._plans:
                self.set_plan(tenant, plan or self.config.default_plan, who)
        if role == "tenant":
            self._check_key_room(tenant)
        # The key's seq is published (self._keys_seq) only once its row is committed, as revoke_key does: a sync that
        # read the new seq before the row existed would move its replica past the key for good.
        for _ in range(KEY_ATTEMPTS):  # a stored key is never overwritten: on an id collision, draw another key
            key, record = new_key(tenant, role, self._keys_seq + 1, expires_in_s=expires_in_s, name=name, now=self._clock(), **policy)
            if self.ledger.insert_key(record):
                self._keys_seq += 1
                break
            logger.warning("new key id %s collides with a stored key; drawing another", record.key_id)
        else:
            raise InternalError("Could not draw an unused key id; try again.")
        if record.limited:
            self._keys_by_id[record.key_id] = record
        limits = f" models={list(record.models)} budget={record.monthly_budget} rpm={record.rpm} tpm={record.tpm}" if record.models or record.limited else ""
        self.ledger.audit(who, "key.create", record.key_id, f"tenant={tenant} role={role} expires_at={record.expires_at}{limits}")
        return key, record

    def _check_key_room(self, tenant: str) -> None:
        """A tenant holds at most its plan's `max_keys` live keys (a 403 past it): key creation is bounded."""
        limit = self.plan_of(tenant).max_keys
        now = self._clock()
        if limit is not None and sum(k.tenant == tenant and k.valid_at(now) for k in self.ledger.keys()) >= limit:
            raise PermissionDeniedError(f"The tenant holds {limit} API keys, its plan's limit; revoke one first.", code="key_limit_reached")

    def revoke_key(self, key_id: str, who: str = "cli") -> KeyRecord:
        record = self.ledger.revoke_key(key_id, self._clock(), self._keys_seq + 1)
        if record is None:
            raise NotFoundError(f"No API key `{key_id}`.", param="key_id")
        self._keys_seq += 1
        self._keys_by_id.pop(key_id, None)
        self.ledger.audit(who, "key.revoke", key_id, f"tenant={record.tenant}")
        return record

    def update_key(self, key_id: str, changes: dict[str, Any], who: str = "cli", tenant: str | None = None) -> KeyRecord:
        """Change a key's name or own policy: each field in `changes` (`name`, `models`, `monthly_budget`, `rpm`, `tpm`,
        `metadata`) replaces the stored one, None or an empty list clearing it; the others stay.  Replicas take the new
        record at their next sync, as they take a revocation.  `tenant`: the key must be that tenant's (a tenant's own call)."""
        unknown = sorted(set(changes) - {"name", *KEY_POLICY_FIELDS})
        if unknown:
            raise InvalidRequestError(f"A key's {unknown[0]} cannot be changed; only its name, models, monthly_budget, rpm, tpm and metadata.", param=unknown[0])
        name = changes.get("name")
        if "name" in changes and (not isinstance(name, str) or len(name) > 128):
            raise InvalidRequestError("name must be a text of at most 128 characters.", param="name")
        checked = check_key_policy(**{k: v for k, v in changes.items() if k != "name"})
        values = {k: (name or "") if k == "name" else checked[k] for k in changes}
        current = self.ledger.key(key_id)
        if current is None or (tenant is not None and current.tenant != tenant):
            raise NotFoundError(f"No API key `{key_id}`" + (" in your tenant." if tenant is not None else "."), param="key_id")
        if current.revoked_at is not None:
            raise InvalidRequestError(f"The API key `{key_id}` is revoked; create a new one.", param="key_id", code="revoked_api_key")
        record = self.ledger.update_key(key_id, values, self._keys_seq + 1)
        if record is None:  # deleted under us: the ledger is the truth
            raise NotFoundError(f"No API key `{key_id}`.", param="key_id")
        self._keys_seq += 1  # published once the row is committed, as create_key and revoke_key do
        if record.limited:
            self._keys_by_id[key_id] = record
        else:
            self._keys_by_id.pop(key_id, None)
        shown = {k: list(v) if isinstance(v, tuple) else v for k, v in values.items()}
        self.ledger.audit(who, "key.update", key_id, f"tenant={record.tenant} " + " ".join(f"{k}={shown[k]}" for k in sorted(shown)))
        return record

    def account(self, tenant: str, period: str) -> dict:
        """A tenant's plan, its limits and what it has spent this period (what `/v1/account` and the console show)."""
        name = self._plans.get(tenant, self.config.default_plan)
        plan = self.plan_of(tenant)
        spent = self._spent[(tenant, period)]
        remaining = None if plan.monthly_budget is None else max(ZERO, plan.monthly_budget - self.committed(tenant, period))
        return {
            "tenant": tenant, "plan": name, "period": period, "currency": self.config.price_book.currency,
            "monthly_budget": None if plan.monthly_budget is None else str(plan.monthly_budget), "spent": str(spent),
            "remaining": None if remaining is None else str(remaining), "rpm": plan.rpm, "tpm": plan.tpm,
        }  # fmt: skip

    def tenants_overview(self, period: str) -> list[dict]:
        """Every tenant's account (plan, budget, limits) with its requests, tokens and spend this period from the ledger, top spenders first."""
        used = tally(self.ledger.spend(period), lambda r: r.tenant)
        out = []
        for tenant in sorted(set(self._plans) | {k.tenant for k in self.ledger.keys()} | set(used)):
            a = used.get(tenant, Tally())
            out.append({**self.account(tenant, period), "requests": a.requests, "prompt_tokens": a.prompt_tokens, "completion_tokens": a.completion_tokens, "spent": str(a.amount)})
        return sorted(out, key=lambda t: (-Decimal(t["spent"]), t["tenant"]))

    def list_keys(self, tenant: str | None = None) -> list[KeyRecord]:
        return [k for k in self.ledger.keys() if tenant is None or k.tenant == tenant]

    def set_plan(self, tenant: str, plan: str, who: str = "cli") -> None:
        check_tenant(tenant)
        if plan not in self.config.plans:
            raise InvalidRequestError(f"Unknown plan `{plan}`. Plans: {', '.join(sorted(self.config.plans))}.", param="plan")
        before = self._plans.get(tenant)
        self.ledger.upsert_tenant(tenant, plan)
        self._plans[tenant] = plan
        if before is not None and before != plan and self.ledger.touch_keys(tenant, self._keys_seq + 1):
            self._keys_seq += 1  # replicas learn the plan with the keys (its service tiers and fair-share weight)
        if before != plan:
            self.ledger.audit(who, "tenant.plan", tenant, f"{before} -> {plan}")

    def tenants(self) -> dict[str, str]:
        return dict(self._plans)

    # ---- reports -----------------------------------------------------------------------------

    def spend_rows(self, period: str | None = None, tenant: str | None = None, by_day: bool = False, by_user: bool = False) -> list[SpendRow]:
        return self.ledger.spend(period, tenant, by_day, by_user)

    def totals(self, period: str) -> list[Totals]:
        return [Totals(t, period, a.requests, a.prompt_tokens, a.completion_tokens, a.amount) for t, a in tally(self.ledger.spend(period), lambda r: r.tenant).items()]

    def events(self, request_ids: list[str] | None = None, tenant: str | None = None) -> list[UsageEvent]:
        return self.ledger.events(request_ids, tenant)

    def record_audit(self, who: str, action: str, target: str, detail: str = "") -> None:
        """An operator action taken outside billing (e.g. a model version canaried, promoted or rolled back)."""
        self.ledger.audit(who, action, target, detail)

    def audit_log(self, limit: int = 100, action: str | None = None, who: str | None = None, target: str | None = None, since: float | None = None) -> list[dict]:
        return self.ledger.audit_log(limit, action, who, target, since)

    def status(self) -> dict:
        return {
            "events": self.ledger.count(),
            "pending": len(self._pending),
            "holders": sorted(self._last_seen),
            "keys_seq": self._keys_seq,
            "tenants": len(self._plans),
            "plans": sorted(self.config.plans),
            "ledger": self.ledger.engine.url.render_as_string(hide_password=True),
        }
