"""Billing as plain logic (no Ray): pricing, plan limits, leases, keys, the ledger, the actor's core, the replica client, invoices."""

from __future__ import annotations

import asyncio
from decimal import Decimal

import pytest

from billing.client import BillingClient, EngineWitness
from billing.invoice import build_invoices, read_invoice_csv, write_invoice
from billing.keys import check_key, hash_key, key_id_of, new_key
from billing.ledger import Ledger
from billing.pricing import cost, quote, to_cents
from billing.quota import Ask, TenantLease, decide_grant, period_of, reserve, settle, shortfall, window_of
from billing.records import BillingContext, SyncRequest, UsageEvent
from billing.witness import ENGINE
from billing.service import BillingCore
from common.config import BillingConfig, LeaseConfig, Plan, Price, PriceBook
from common.errors import AuthenticationError, InsufficientQuotaError, InvalidRequestError, NotFoundError, PermissionDeniedError, RateLimitError

NOV = 1795000000.0  # 2026-11-19 UTC
PRICE = Price(prompt_per_1m=Decimal("0.50"), completion_per_1m=Decimal("1.50"))


def config(**plans: Plan) -> BillingConfig:
    return BillingConfig(
        price_book=PriceBook(models={"m": {"prompt_per_1m": "0.50", "completion_per_1m": "1.50", "versions": {"v2": {"prompt_per_1m": "1", "completion_per_1m": "2"}}}}),
        plans=plans or {"free": Plan(monthly_budget=Decimal("1"), rpm=10, tpm=10_000)},
        default_plan="free" if not plans or "free" in plans else next(iter(plans)),
        lease=LeaseConfig(restart_grace_s=0),
    )


class Clock:
    def __init__(self, t: float = NOV):
        self.t = t

    def __call__(self) -> float:
        return self.t


def event(rid: str, tenant: str = "acme", prompt: int = 10, completion: int | None = 5, ts: float = NOV, status: str = "ok", delivered: int | None = None) -> UsageEvent:
    return UsageEvent(rid, ts, tenant, "sk-maas-x", "m", "v1", "chat", status, prompt, completion, "0.50", "1.50", "0.001", "h1", delivered)


def engine(rid: str, produced: int, tenant: str = "acme", prompt: int = 10, finished: bool = False) -> UsageEvent:
    """The generator's report of a request (its witness)."""
    return BillingContext(tenant, "sk-maas-x", "m", "v1", "chat", "0.50", "1.50", "0.001", "h1").event(rid, NOV, "ok" if finished else "aborted", prompt, produced)


# ---- pricing and plan limits ------------------------------------------------------------------


def test_cost_is_exact_decimal_and_rounds_once_per_line():
    assert cost(Decimal("0.50"), Decimal("1.50"), 1, 1) == Decimal("0.000002")
    assert to_cents(Decimal("0.005")) == Decimal("0.01")
    q = quote(PRICE, prompt_tokens=100, max_tokens=50, n=2)
    assert q.worst_tokens == 200 and q.worst_cost == Decimal("0.0002")
    assert q.actual_cost(10) == Decimal("0.000065")


def test_price_book_version_override_and_unpriced_model():
    book = config().price_book
    assert book.price_for("m", "v1").prompt_per_1m == Decimal("0.50")
    assert book.price_for("m", "v2").completion_per_1m == Decimal("2")
    with pytest.raises(InvalidRequestError):
        book.price_for("other")


def test_grant_respects_budget_rpm_and_tpm():
    plan = Plan(monthly_budget=Decimal("1.00"), rpm=10, tpm=1000)
    lease = LeaseConfig(budget_fraction=0.1, rate_fraction=0.2)
    ask = Ask("acme", "2026-11", 1, budget=Decimal("0.01"), requests=1, tokens=100)
    g = decide_grant(plan, lease, ask, committed=Decimal("0"), window_used=(0, 0), now=NOV)
    assert (g.budget, g.requests, g.tokens, g.denied) == (Decimal("0.100"), 2, 200, None)
    # The chunk never exceeds what is left.
    g = decide_grant(plan, lease, ask, committed=Decimal("0.95"), window_used=(9, 900), now=NOV)
    assert (g.budget, g.requests, g.tokens) == (Decimal("0.05"), 1, 100)
    g = decide_grant(plan, lease, ask, committed=Decimal("0.995"), window_used=(0, 0), now=NOV)
    assert g.denied == "insufficient_quota" and g.budget == 0
    g = decide_grant(plan, lease, ask, committed=Decimal("0"), window_used=(10, 0), now=NOV)
    assert g.denied == "requests" and g.requests == 0 and 0 < g.retry_after_s <= 60
    g = decide_grant(plan, lease, Ask("acme", "2026-11", 1, tokens=5000), committed=Decimal("0"), window_used=(0, 0), now=NOV)
    assert g.denied == "tokens" and "too large" in g.message


def test_unlimited_plan_grants_none():
    g = decide_grant(Plan(), LeaseConfig(), Ask("a", "2026-11", 1, Decimal("5"), 1, 10**9), Decimal("1e9"), (10**9, 10**9), NOV)
    assert (g.budget, g.requests, g.tokens, g.denied) == (None, None, None, None)


def test_lease_reserve_settle_returns_unused_part():
    lease = TenantLease()
    lease.roll(period_of(NOV), window_of(NOV))
    q = quote(PRICE, 100, 100)
    assert shortfall(lease, "acme", q) == Ask("acme", "2026-11", window_of(NOV), q.worst_cost, 1, 200)
    lease.budget, lease.requests, lease.tokens = Decimal("0.001"), 2, 1000
    assert shortfall(lease, "acme", q) is None
    r = reserve(lease, "acme", q)
    assert lease.budget == Decimal("0.001") - q.worst_cost and lease.in_flight == q.worst_cost and lease.requests == 1 and lease.tokens == 800
    assert settle(lease, r, completion_tokens=10) == q.actual_cost(10)
    assert lease.in_flight == 0 and lease.budget == Decimal("0.001") - q.actual_cost(10) and lease.tokens == 890
    # An abort: usage unknown, nothing comes back until the engine's count is billed.
    r = reserve(lease, "acme", q)
    assert settle(lease, r, None) is None and lease.in_flight == 0


def test_new_minute_voids_rate_lease_new_month_voids_budget():
    lease = TenantLease()
    lease.roll("2026-11", 5)
    lease.budget, lease.requests = Decimal(1), 3
    lease.roll("2026-11", 6)
    assert lease.budget == 1 and lease.requests == 0
    lease.roll("2026-12", 6)
    assert lease.budget == 0


# ---- keys ------------------------------------------------------------------------------------


def test_keys_are_random_hashed_and_checked():
    key, rec = new_key("acme", "tenant", 1, expires_in_s=10, now=NOV)
    other, _ = new_key("acme", "tenant", 2)
    assert key != other and key.startswith("sk-maas-") and rec.key_id == key_id_of(key) and key not in repr(rec)
    assert rec.key_hash == hash_key(key)
    table = {rec.key_hash: rec}
    assert check_key(table, f"Bearer {key}", NOV + 1).tenant == "acme"
    for header in (None, "", "Basic abc", f"Bearer {other}"):
        with pytest.raises(AuthenticationError):
            check_key(table, header, NOV)
    with pytest.raises(AuthenticationError, match="expired"):
        check_key(table, f"Bearer {key}", NOV + 11)


# ---- the ledger and the actor's core ---------------------------------------------------------


@pytest.fixture
def ledger(tmp_path):
    ledger = Ledger(f"sqlite:///{tmp_path}/ledger.db")
    yield ledger
    ledger.close()


def test_ledger_is_idempotent_on_request_id(ledger):
    fresh = ledger.record([event("a"), event("b"), event("a")])
    assert [m.row.event.request_id for m in fresh] == ["a", "b"]
    fresh = ledger.record([event("a"), event("c")])
    assert [m.row.event.request_id for m in fresh] == ["c"]
    assert ledger.count() == 3
    (row,) = ledger.spend("2026-11")
    assert (row.requests, row.prompt_tokens, row.completion_tokens) == (3, 30, 15)


def test_engine_count_completes_an_aborted_row_in_either_order(ledger):
    ledger.record([event("early", completion=None, status="aborted", delivered=3)])
    (m,) = ledger.record([engine("early", 7)], ENGINE)
    assert (m.new, m.completion_delta, m.row.event.status) == (False, 4, "aborted")  # billed the floor 3, then the engine's 7
    (m,) = ledger.record([engine("late", 4)], ENGINE)
    assert m.new and m.completion_delta == 4 and not m.row.pending  # the engine spoke first: billed at once
    (m,) = ledger.record([event("late", completion=None, status="aborted", delivered=2)])
    assert (m.new, m.prompt_delta, m.completion_delta) == (False, 0, 0)
    assert ledger.record([engine("late", 4)], ENGINE) == [] and ledger.record([event("late", completion=None, status="aborted")]) == []
    assert {e.request_id: (e.completion_tokens, e.delivered_tokens) for e in ledger.events()} == {"early": (7, 3), "late": (4, 2)}


def test_core_rebuilds_spend_from_the_ledger_after_a_restart(tmp_path):
    url = f"sqlite:///{tmp_path}/l.db"
    core = BillingCore(config(), Ledger(url), clock=Clock())
    core.sync(SyncRequest("h1", [event("a"), event("b", completion=None, status="aborted")]))
    before = core.spent("acme", "2026-11")
    assert before == cost(Decimal("0.5"), Decimal("1.5"), 20, 5)
    restarted = BillingCore(config(), Ledger(url), clock=Clock())
    assert restarted.spent("acme", "2026-11") == before
    assert restarted.committed("acme", "2026-11") == before + Decimal("0.001") - cost(Decimal("0.5"), 0, 10, 0)
    restarted.engine_usage([engine("b", 100)])
    assert restarted.spent("acme", "2026-11") == before + cost(0, Decimal("1.5"), 0, 100)
    assert restarted.committed("acme", "2026-11") == restarted.spent("acme", "2026-11")


def test_core_closes_pending_rows_that_never_get_a_count(ledger):
    clock = Clock()
    core = BillingCore(config(), ledger, clock=clock)
    core.sync(SyncRequest("h1", [event("x", completion=None, status="aborted")]))
    clock.t += 120
    core.sync(SyncRequest("h1"))
    (row,) = ledger.events()
    assert row.completion_tokens == 0 and row.status == "aborted_unmetered"
    assert core.committed("acme", "2026-11") == core.spent("acme", "2026-11")


def test_core_key_lifecycle_and_audit(ledger):
    core = BillingCore(config(free=Plan(), pro=Plan(rpm=5)), ledger, clock=Clock())
    key, rec = core.create_key("acme", plan="pro")
    assert core.tenants() == {"acme": "pro"} and core.plan_of("acme").rpm == 5
    reply = core.sync(SyncRequest("h1", keys_since=0))
    assert [k.key_id for k in reply.keys] == [rec.key_id] and reply.keys_seq == 1
    core.revoke_key(rec.key_id)
    reply = core.sync(SyncRequest("h1", keys_since=1))
    assert reply.keys[0].revoked_at is not None
    with pytest.raises(InvalidRequestError):
        core.create_key("acme", plan="gold")
    assert [a["action"] for a in ledger.audit_log()] == ["key.revoke", "key.create", "tenant.plan"]
    assert all(key not in str(a) for a in ledger.audit_log())


def test_a_keys_policy_changes_in_place_and_replicas_sync_it(ledger):
    core = BillingCore(config(free=Plan()), ledger, clock=Clock())
    key, rec = core.create_key("acme", name="ci", policy={"rpm": 3, "models": ["m"], "metadata": {"team": "a"}})
    assert core.plan_of(rec.subject).rpm == 3
    changed = core.update_key(rec.key_id, {"rpm": 7, "models": None}, who="ops")
    assert (changed.rpm, changed.models, changed.name, changed.metadata, changed.key_hash) == (7, (), "ci", '{"team": "a"}', rec.key_hash)  # the rest stays
    assert core.plan_of(rec.subject).rpm == 7 and ledger.key(rec.key_id) == changed
    reply = core.sync(SyncRequest("h1", keys_since=rec.seq))
    assert [(k.key_id, k.rpm) for k in reply.keys] == [(rec.key_id, 7)] and reply.keys_seq == rec.seq + 1
    core.update_key(rec.key_id, {"rpm": None, "metadata": None})  # no limits of its own left: nothing to lease to it
    assert not ledger.key(rec.key_id).limited and core.plan_of(rec.subject).monthly_budget == 0
    audit = ledger.audit_log(action="key.update")
    assert audit[-1]["who"] == "ops" and "models=[]" in audit[-1]["detail"] and "rpm=7" in audit[-1]["detail"]
    for changes, param in (({"rpm": 0}, "rpm"), ({"tenant": "globex"}, "tenant"), ({"name": "x" * 129}, "name"), ({"monthly_budget": "-1"}, "monthly_budget")):
        with pytest.raises(InvalidRequestError) as err:
            core.update_key(rec.key_id, changes)
        assert err.value.param == param
    with pytest.raises(NotFoundError):
        core.update_key(rec.key_id, {"rpm": 1}, tenant="globex")  # another tenant's key is not found, as a missing one
    core.revoke_key(rec.key_id)
    with pytest.raises(InvalidRequestError, match="revoked"):
        core.update_key(rec.key_id, {"rpm": 1})
    assert key not in str(ledger.audit_log())


def test_grants_from_two_replicas_never_exceed_the_budget(ledger):
    from billing.records import Claim

    core = BillingCore(config(free=Plan(monthly_budget=Decimal("0.01"))), ledger, clock=Clock())
    held = {"h0": Decimal(0), "h1": Decimal(0)}
    for i in range(50):
        holder = f"h{i % 2}"
        claims = [Claim("acme", "2026-11", held[holder])] if held[holder] else []
        reply = core.sync(SyncRequest(holder, claims=claims, asks=[Ask("acme", "2026-11", window_of(NOV), budget=Decimal("0.0007"))]))
        held[holder] += reply.grants[0].budget or 0  # as a replica applies its grants
    assert sum(held.values()) <= Decimal("0.01") and core.committed("acme", "2026-11") <= Decimal("0.01")
    assert sum(held.values()) >= Decimal("0.0093")  # and nearly all of it is usable


# ---- the replica's client, wired in-process to the core ---------------------------------------


class InProcess:
    """The Transport interface straight into a BillingCore; `down` simulates an actor restart."""

    def __init__(self, core: BillingCore):
        self.core = core
        self.down = False
        self.calls = 0

    async def sync(self, req):
        self.calls += 1
        if self.down:
            raise ConnectionError("actor restarting")
        return self.core.sync(req)


async def test_client_admits_from_lease_and_bills_once_even_across_an_outage(ledger):
    clock = Clock()
    cfg = config(free=Plan(monthly_budget=Decimal("1"), rpm=100, tpm=100_000))
    core = BillingCore(cfg, ledger, clock=clock)
    key, rec = core.create_key("acme")
    transport = InProcess(core)
    client = BillingClient(cfg, transport, "h1", clock=clock)
    await client.start()
    principal = await client.authenticate(f"Bearer {key}")
    calls = transport.calls
    tickets = [await client.admit(principal, f"r{i}", "m", "v1", "chat", PRICE, 20, 30) for i in range(5)]
    assert transport.calls - calls == 1  # one lease served all five
    transport.down = True
    for t in tickets:
        client.settle(t, 20, 10, "ok")
    assert await client._sync() is None and client.queued == 5
    transport.down = False
    await client._sync()
    await client._sync()
    assert client.queued == 0 and ledger.count() == 5
    assert core.spent("acme", "2026-11") == 5 * PRICE.prompt_per_1m * 20 / 1_000_000 + 5 * PRICE.completion_per_1m * 10 / 1_000_000
    await client.close()


async def test_client_denials_become_openai_errors(ledger):
    clock = Clock()
    cfg = config(tiny=Plan(monthly_budget=Decimal("0.00001")), slow=Plan(rpm=1), admin=Plan())
    core = BillingCore(cfg, ledger, clock=clock)
    k1, _ = core.create_key("poor", plan="tiny")
    k2, _ = core.create_key("slow", plan="slow")
    k3, _ = core.create_key("ops", role="admin")
    client = BillingClient(cfg, InProcess(core), "h1", clock=clock)
    await client.start()
    with pytest.raises(InsufficientQuotaError):
        await client.admit(await client.authenticate(f"Bearer {k1}"), "r1", "m", "v1", "chat", PRICE, 100, 100)
    slow = await client.authenticate(f"Bearer {k2}")
    await client.admit(slow, "r2", "m", "v1", "chat", PRICE, 1, 1)
    with pytest.raises(RateLimitError) as info:
        await client.admit(slow, "r3", "m", "v1", "chat", PRICE, 1, 1)
    assert info.value.status_code == 429 and "Retry-After" in info.value.headers and info.value.error_type == "requests"
    with pytest.raises(PermissionDeniedError):
        await client.require_admin(f"Bearer {k1}")
    assert (await client.require_admin(f"Bearer {k3}")).role == "admin"
    await client.close()


def test_rate_state_is_the_lease_plus_what_the_actor_has_not_leased():
    from billing.quota import rate_state

    lease = TenantLease()
    now = NOV // 60 * 60 + 15  # 45 s left in the minute
    assert rate_state(lease, now).headers() == {}  # nothing known yet: no limits claimed
    lease.roll(period_of(now), window_of(now))
    ask = Ask("acme", period_of(now), window_of(now), Decimal(0), 1, 100)
    grant = decide_grant(Plan(rpm=10, tpm=1000), LeaseConfig(rate_fraction=0.2), ask, Decimal(0), (3, 50), now)
    lease.apply(grant)
    assert (grant.requests, grant.requests_left, grant.tokens, grant.tokens_left) == (2, 5, 200, 750)
    reserve(lease, "acme", quote(PRICE, 10, 40), slot=True)
    h = rate_state(lease, now).headers()
    assert (h["x-ratelimit-limit-requests"], h["x-ratelimit-remaining-requests"], h["x-ratelimit-reset-requests"]) == ("10", "6", "45s")
    assert (h["x-ratelimit-limit-tokens"], h["x-ratelimit-remaining-tokens"]) == ("1000", str(750 + 200 - 50))
    later = rate_state(lease, now + 60).headers()  # a new minute: the whole limit, until the next grant says otherwise
    assert later["x-ratelimit-remaining-requests"] == "10" and later["x-ratelimit-reset-tokens"] == "45s"
    assert rate_state(TenantLease(rpm=None, tpm=5), now).headers().keys() == {"x-ratelimit-limit-tokens", "x-ratelimit-remaining-tokens", "x-ratelimit-reset-tokens"}


async def test_a_keys_own_limits_hold_inside_the_tenants_across_replicas(ledger):
    clock = Clock()
    cfg = config(free=Plan(monthly_budget=Decimal("1"), rpm=100))
    core = BillingCore(cfg, ledger, clock=clock)
    limited, rec = core.create_key("acme", policy={"rpm": 3, "monthly_budget": "0.5", "models": ["m"], "metadata": {"team": "search"}})
    other, _ = core.create_key("acme")
    assert rec.limited and rec.models == ("m",) and rec.metadata == '{"team": "search"}'
    assert [k for k in ledger.keys() if k.key_id == rec.key_id][0].rpm == 3  # stored
    replicas = [BillingClient(cfg, InProcess(core), f"h{i}", clock=clock) for i in range(2)]
    for c in replicas:
        await c.start()
    admitted, refused = 0, []
    for i in range(8):  # alternating replicas: the key's 3 requests a minute hold across both
        c = replicas[i % 2]
        try:
            t = await c.admit(await c.authenticate(f"Bearer {limited}"), f"r{i}", "m", "v1", "chat", PRICE, 10, 10)
            c.settle(t, 10, 5, "ok")
            admitted += 1
        except RateLimitError as exc:
            refused.append(exc)
    assert admitted == 3 and refused and "This API key's own limit" in refused[0].message
    c = replicas[0]  # the tenant's other key is not held by it
    for i in range(5):
        c.settle(await c.admit(await c.authenticate(f"Bearer {other}"), f"o{i}", "m", "v1", "chat", PRICE, 10, 10), 10, 5, "ok")
    with pytest.raises(InvalidRequestError):
        core.create_key("acme", policy={"rpm": 0})
    with pytest.raises(InvalidRequestError):
        core.create_key("acme", policy={"metadata": "[1]"})
    for c in replicas:
        await c.close()


async def test_a_keys_own_budget_is_spent_before_the_tenants(ledger):
    clock = Clock()
    cfg = config(free=Plan(monthly_budget=Decimal("1")))
    core = BillingCore(cfg, ledger, clock=clock)
    key, rec = core.create_key("acme", policy={"monthly_budget": "0.00003"})  # a few requests' worth
    client = BillingClient(cfg, InProcess(core), "h1", clock=clock)
    await client.start()
    who = await client.authenticate(f"Bearer {key}")
    with pytest.raises(InsufficientQuotaError, match="This API key's own limit"):
        for i in range(50):
            client.settle(await client.admit(who, f"b{i}", "m", "v1", "chat", PRICE, 10, 10), 10, 10, "ok")
    await client._sync()
    assert core.spent("acme", "2026-11") <= Decimal("0.00003") and core.committed(rec.subject, "2026-11") <= Decimal("0.00003")
    await client.close()


async def test_revocation_reaches_the_client_on_its_next_sync(ledger):
    core = BillingCore(config(), ledger, clock=Clock())
    key, rec = core.create_key("acme")
    client = BillingClient(config(), InProcess(core), "h1", clock=Clock())
    await client.start()
    await client.authenticate(f"Bearer {key}")
    core.revoke_key(rec.key_id)
    await client._sync()
    with pytest.raises(AuthenticationError, match="revoked"):
        await client.authenticate(f"Bearer {key}")
    await client.close()


async def test_an_idle_replica_syncs_seldom_and_refreshes_its_keys_before_the_next_request(ledger):
    # Idle syncs were most of an idle server's billing CPU; the first request after a quiet spell must still not
    # trust a key table older than a revocation.
    cfg = config().model_copy(update={"flush_interval_s": 0.02, "idle_sync_interval_s": 0.5, "idle_after_s": 0.1})
    core = BillingCore(cfg, ledger, clock=Clock())
    key, rec = core.create_key("acme")
    transport = InProcess(core)
    client = BillingClient(cfg, transport, "h1")
    await client.start()
    await client.authenticate(f"Bearer {key}")
    await asyncio.sleep(0.3)  # quiet: after 0.1 s the loop slows to one sync per 0.5 s
    before = transport.calls
    await asyncio.sleep(0.4)
    assert transport.calls - before <= 2, "an idle replica keeps syncing at the busy rate"
    core.revoke_key(rec.key_id)
    with pytest.raises(AuthenticationError, match="revoked"):
        await client.authenticate(f"Bearer {key}")  # refreshed first, not trusted from the last idle sync
    await client.close()


async def test_engine_witness_resends_until_acknowledged():
    sent, fail = [], [True]

    async def send(batch):
        if fail[0]:
            raise ConnectionError("down")
        sent.extend(batch)

    reporter = EngineWitness(send, flush_interval_s=60, clock=Clock())
    reporter.report("unbilled", None, 10, 5, True)  # billing off for it: nothing to report
    reporter.report("r1", BillingContext("acme", "k", "m", "v1", "chat", "0.5", "1.5", "0.001", "h1"), 10, 5, False)
    assert not await reporter.flush() and len(reporter) == 1
    fail[0] = False
    assert await reporter.flush() and len(reporter) == 0
    assert [(c.request_id, c.status, c.prompt_tokens, c.completion_tokens, c.tenant) for c in sent] == [("r1", "aborted", 10, 5, "acme")]
    reporter._task.cancel()
    await asyncio.sleep(0)


# ---- invoices ----------------------------------------------------------------------------------


def test_invoice_lines_reconcile_to_the_cent(ledger, tmp_path):
    events = [event(f"a{i}", prompt=1234, completion=567) for i in range(3)]
    events += [event("b", tenant="beta", prompt=10, completion=0)]
    events += [event("c", prompt=1_000_000, completion=1_000_000)._replace(version="v2", prompt_price="1", completion_price="2")]
    events += [event("dec", ts=NOV - 40 * 86400)]  # October: not on November's invoice
    ledger.record(events)
    invoices = build_invoices(ledger.spend("2026-11"), "2026-11")
    acme = next(i for i in invoices if i.tenant == "acme")
    lines = acme.lines.set_index("version")
    assert lines.loc["v1", "prompt_tokens"] == 3702 and lines.loc["v1", "completion_tokens"] == 1701
    # By hand: 3702 × 0.50/1M + 1701 × 1.50/1M = 0.0044025 → 0.00; 1M × 1 + 1M × 2 per 1M = 3.00.
    assert lines.loc["v1", "amount"] == Decimal("0.00") and lines.loc["v2", "amount"] == Decimal("3.00")
    assert acme.total == Decimal("3.00")
    path = write_invoice(acme, tmp_path / "acme.csv")
    back, total = read_invoice_csv(path)
    assert total == Decimal("3.00") and list(back["amount"]) == [Decimal("0.00"), Decimal("3.00")]
    pq_path = write_invoice(acme, tmp_path / "acme.parquet", "parquet")
    import pandas as pd

    assert pd.read_parquet(pq_path)["amount"].tolist() == [Decimal("0.00"), Decimal("3.00")]
    assert build_invoices(ledger.spend("2026-11"), "2026-11", tenant="nobody")[0].total == Decimal("0.00")


def test_price_book_and_plan_changes_are_audited(ledger):
    base = config(free=Plan(), pro=Plan(rpm=5))
    core = BillingCore(base, ledger, clock=Clock())
    assert core.configure(base, "deploy") is False  # a redeploy with nothing changed writes nothing
    changed = base.model_copy(update={"plans": {**base.plans, "pro": Plan(rpm=10)}})
    assert core.configure(changed, "cli:ops") is True
    (entry,) = [a for a in ledger.audit_log() if a["action"] == "billing.configure"]
    assert entry["who"] == "cli:ops" and entry["target"] == "price_book,plans" and '"rpm":10' in entry["detail"]
    assert core.plan_of("nobody").rpm is None and core.config.plans["pro"].rpm == 10


def test_cached_prompt_tokens_have_a_price_of_their_own_resolved_by_the_book():
    from billing.pricing import cost

    book = PriceBook(
        models={"m": {"prompt_per_1m": "1", "completion_per_1m": "2", "cached_prompt_per_1m": "0.1", "versions": {"v2": {"prompt_per_1m": "4", "completion_per_1m": "4"}}},
                "n": {"prompt_per_1m": "3", "completion_per_1m": "3", "fine_tuned": {"prompt_per_1m": "6", "completion_per_1m": "6"}}},
        cached_prompt_fraction="0.25",
    )  # fmt: skip
    assert book.price_for("m").cached_prompt_per_1m == Decimal("0.1")  # its own
    assert book.price_for("m", "v2").cached_prompt_per_1m == Decimal("1")  # a version's price: the book's fraction of its prompt price
    assert book.fine_tuned_price("n").cached_prompt_per_1m == Decimal("1.5") and book.price_for("n").cached_prompt_per_1m == Decimal("0.75")
    # 100 prompt tokens of which 60 cached, 10 completion: exact, and no cached tokens is the old formula.
    assert cost(Decimal(1), Decimal(2), 100, 10, 60, Decimal("0.1")) == (Decimal(40) + Decimal(6) + Decimal(20)) / 1_000_000
    assert cost(Decimal(1), Decimal(2), 100, 10) == cost(Decimal(1), Decimal(2), 100, 10, 0, Decimal("0.1")) == Decimal(120) / 1_000_000


def test_a_request_runs_at_its_plans_tier_and_that_tiers_multiple_of_the_price():
    from billing.pricing import TierChoice, choose_tier
    from common.errors import PermissionDeniedError

    plan = Plan(service_tiers=["default", "flex"], share_weight=2)
    assert choose_tier(plan, None) == choose_tier(plan, "auto") == TierChoice("default", 2)
    assert choose_tier(plan, "flex").tier == "flex"
    with pytest.raises(PermissionDeniedError) as err:
        choose_tier(plan, "priority")
    assert (err.value.code, err.value.param) == ("service_tier_not_allowed", "service_tier")
    with pytest.raises(ValueError):
        Plan(service_tiers=["flex"])  # its default tier must be one it offers
    book = config().price_book
    base = book.price_for("m")
    flex, fast, batch = (book.for_tier(base, t) for t in ("flex", "priority", "batch"))
    assert (flex.prompt_per_1m, flex.completion_per_1m, flex.cached_prompt_per_1m) == (Decimal("0.25"), Decimal("0.75"), Decimal("0.125"))
    assert (fast.prompt_per_1m, batch.completion_per_1m) == (Decimal("1"), Decimal("0.75"))
    assert book.for_tier(base, "default") is base


def test_a_hold_that_no_longer_fits_keeps_the_one_it_had_and_a_shrinking_hold_always_fits(ledger):
    core = BillingCore(config(free=Plan(monthly_budget=Decimal("1"))), ledger, clock=Clock())
    core.hold("batch_a", "acme", Decimal("0.5"), "2026-11")
    core.hold("batch_b", "acme", Decimal("0.4"), "2026-11")
    core.hold("batch_a", "acme", Decimal("0.6"), "2026-11")  # 1 - (0.9 - 0.5) = 0.6 left for it: fits
    with pytest.raises(InsufficientQuotaError, match="batch may cost up to 0.7"):
        core.hold("batch_a", "acme", Decimal("0.7"), "2026-11")
    assert core.committed("acme", "2026-11") == Decimal("1.0")  # its 0.6 stands: refused, not dropped
    core.hold("batch_b", "acme", Decimal("0.1"), "2026-11")  # as its lines take over their parts
    assert core.committed("acme", "2026-11") == Decimal("0.7")
    core.release("batch_a")
    assert core.committed("acme", "2026-11") == Decimal("0.1")
