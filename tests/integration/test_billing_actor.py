"""The real billing actor and ledger on a real Ray cluster (no model): idempotency, restarts, and global limits.

Two "ingress replicas" here are two Ray actors each holding the same
`BillingClient` an ingress replica holds, talking to the named billing actor.
"""

from __future__ import annotations

import asyncio
import time
from decimal import Decimal

import pytest
import ray

from billing import actor
from billing.actor import admin_client
from billing.admin import wait
from billing.pricing import cost
from billing.quota import period_of, window_of
from cluster import local
from common.config import AlertsConfig, BillingConfig, LeaseConfig, Plan, Price, PriceBook
from tests.integration.conftest import LEDGERS

pytestmark = [pytest.mark.integration, LEDGERS]

PRICE = Price(prompt_per_1m=Decimal("0.05"), completion_per_1m=Decimal("0.20"))


WEBHOOK_SECRET = "whsec-integration"


@pytest.fixture(scope="module")
def receiver(ledger_url):
    from tests.unit.test_alerts import Receiver

    r = Receiver()
    r.down = True  # down at first: the actor must retry
    yield r
    r.close()


@pytest.fixture(scope="module")
def config(ledger_url, receiver) -> BillingConfig:
    return BillingConfig(
        ledger_url=ledger_url,
        actor_name="billing-under-test",
        price_book=PriceBook(models={"m": {"prompt_per_1m": "0.05", "completion_per_1m": "0.20"}}),
        plans={
            "unlimited": Plan(),
            "rpm20": Plan(rpm=20),
            "tiny": Plan(monthly_budget=Decimal("0.001")),
        },
        default_plan="unlimited",
        lease=LeaseConfig(restart_grace_s=0.3),
        alerts=AlertsConfig(tenant_webhooks={"alerted": receiver.url}, backoff_s=0.5),
    )


@pytest.fixture(scope="module")
def billing(config):
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MAAS_WEBHOOK_SECRET", WEBHOOK_SECRET)  # the actor's process inherits it from the cluster
        local.start_ray(num_cpus=2, include_dashboard=False)
    try:
        handle = actor.get_or_create(config)
        wait(admin_client(handle).status())
        yield handle
    finally:
        local.stop()


@ray.remote(num_cpus=0.1)
class FakeIngress:
    """What an ingress replica does with billing, minus HTTP: authenticate, admit, settle, all through BillingClient."""

    def __init__(self, config: dict, holder: str):
        from billing.client import BillingClient

        self.config = BillingConfig.model_validate(config)
        self.client = BillingClient(self.config, actor.ActorTransport(actor.get(self.config)), holder)
        self.holder = holder

    async def start(self) -> None:
        await self.client.start()

    async def hammer(self, key: str, n: int, prompt: int, max_tokens: int, completion: int, stop_after_denials: int = 1000, pace_s: float = 0.0) -> dict:
        """Admit up to n requests concurrently-ish; settle each with `completion` tokens. Returns what happened."""
        principal = await self.client.authenticate(f"Bearer {key}")
        admitted, denied, denials_in_row = [], {}, 0
        for i in range(n):
            try:
                t = await self.client.admit(principal, f"{self.holder}-{i}-{time.time_ns()}", "m", "v1", "chat", PRICE, prompt, max_tokens)
            except Exception as exc:
                code = getattr(exc, "error_type", type(exc).__name__)
                denied[code] = denied.get(code, 0) + 1
                denials_in_row += 1
                if denials_in_row >= stop_after_denials:
                    break
                continue
            denials_in_row = 0
            admitted.append(window_of(time.time()))
            self.client.settle(t, prompt, completion, "ok")
            await asyncio.sleep(pace_s)
        return {"windows": admitted, "denied": denied}

    async def drain(self, timeout_s: float = 60) -> int:
        deadline = time.monotonic() + timeout_s
        while self.client.queued and time.monotonic() < deadline:
            await asyncio.sleep(0.1)
        return self.client.queued


def _key(billing, tenant: str, plan: str) -> str:
    key, _ = wait(admin_client(billing).create_key(tenant, plan, "tenant", None, "", "tests"))
    return key


def _spent(billing, tenant: str) -> Decimal:
    return wait(admin_client(billing).spent(tenant, period_of(time.time())))


def test_duplicate_events_are_counted_once(billing, config):
    from billing.records import UsageEvent

    now = time.time()
    events = [UsageEvent(f"dup-{i}", now, "dup", "k", "m", "v1", "chat", "ok", 100, 10, "0.05", "0.20", "0", "t") for i in range(100)]
    assert ray.get(billing.record.remote(events)) == 100
    ray.get(billing.record.remote(events[:50] + events))  # resent, and resent twice in one batch
    rows = wait(admin_client(billing).spend_rows(period_of(now), "dup"))
    assert sum(r.requests for r in rows) == 100
    assert _spent(billing, "dup") == 100 * cost(Decimal("0.05"), Decimal("0.20"), 100, 10)


def test_a_restarted_actor_keeps_the_config_it_was_last_given(billing, config):
    # A redeploy changed the plans; Ray restarts an actor with its first constructor arguments, the older config.
    later = config.model_copy(update={"plans": {**config.plans, "added-later": Plan(rpm=5)}})
    assert ray.get(billing.configure.remote(later, "tests"))
    ray.kill(billing, no_restart=False)
    restarted = actor.get(config)
    status = _wait_status(restarted)
    assert status["restarted"] and "added-later" in status["plans"]
    assert ray.get(restarted.configure.remote(config, "tests"))  # put the module's config back for the next tests


def _wait_status(handle, timeout_s: float = 60) -> dict:
    """The status of the restarted actor: `ray.kill` returns before the actor dies, so the first answer may be the old one's."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            status = ray.get(handle.status.remote(), timeout=10)
            if status["restarted"] or time.monotonic() > deadline:
                return status
        except ray.exceptions.RayActorError:
            if time.monotonic() > deadline:
                raise
        time.sleep(0.2)


def test_killing_the_actor_mid_stream_loses_and_doubles_nothing(billing, config):
    key = _key(billing, "killme", "unlimited")
    ingress = FakeIngress.remote(config.model_dump(mode="json"), "kill-h1")
    ray.get(ingress.start.remote())
    first = ingress.hammer.remote(key, 3000, 20, 10, 7, pace_s=0.001)  # a few seconds of traffic
    time.sleep(0.3)
    ray.kill(billing, no_restart=False)  # the actor restarts and rebuilds from the ledger
    assert ray.wait([first], timeout=0)[0] == [], "the stream of events ended before the kill"
    first = ray.get(first)
    # While the actor restarts, a request that needs it is refused with a 503 (fail closed) and never runs:
    # only what was admitted is billed, so count that rather than what was attempted.
    assert set(first["denied"]) <= {"service_unavailable"}, first["denied"]
    second = ray.get(ingress.hammer.remote(key, 500, 20, 10, 7))
    assert ray.get(ingress.drain.remote()) == 0
    restarted = actor.get(config)
    assert ray.get(restarted.status.remote())["restarted"]
    rows = wait(admin_client(restarted).spend_rows(period_of(time.time()), "killme"))
    sent = len(first["windows"]) + len(second["windows"])
    assert sum(r.requests for r in rows) == sent and sum(r.completion_tokens for r in rows) == 7 * sent
    assert _spent(restarted, "killme") == sent * cost(Decimal("0.05"), Decimal("0.20"), 20, 7)


def test_two_replicas_cannot_exceed_rpm(billing, config):
    key = _key(billing, "rpm-tenant", "rpm20")
    replicas = [FakeIngress.remote(config.model_dump(mode="json"), f"rpm-h{i}") for i in range(2)]
    ray.get([r.start.remote() for r in replicas])
    results = ray.get([r.hammer.remote(key, 60, 5, 5, 5) for r in replicas])
    per_window: dict[int, int] = {}
    for res in results:
        for w in res["windows"]:
            per_window[w] = per_window.get(w, 0) + 1
        assert set(res["denied"]) <= {"requests"}
    assert all(n <= 20 for n in per_window.values()), per_window  # never more than the limit, let alone one lease
    assert sum(per_window.values()) >= 20  # and the limit is actually usable
    assert sum(sum(r["denied"].values()) for r in results) >= 120 - 20 * len(per_window)


def test_two_replicas_cannot_overspend_the_budget(billing, config):
    key = _key(billing, "tiny-tenant", "tiny")
    replicas = [FakeIngress.remote(config.model_dump(mode="json"), f"tiny-h{i}") for i in range(2)]
    ray.get([r.start.remote() for r in replicas])
    # worst case 100×0.05 + 200×0.20 per 1M = 0.000045; actual 100×0.05 + 50×0.20 = 0.000015
    results = ray.get([r.hammer.remote(key, 400, 100, 200, 50, stop_after_denials=20) for r in replicas])
    assert all(set(r["denied"]) <= {"insufficient_quota"} for r in results)
    assert ray.get([r.drain.remote() for r in replicas]) == [0, 0]
    deadline = time.monotonic() + 30
    admitted = sum(len(r["windows"]) for r in results)
    while sum(rr.requests for rr in wait(admin_client(billing).spend_rows(period_of(time.time()), "tiny-tenant"))) < admitted:
        assert time.monotonic() < deadline
        time.sleep(0.1)
    spent = _spent(billing, "tiny-tenant")
    worst = cost(Decimal("0.05"), Decimal("0.20"), 100, 200)
    assert spent <= Decimal("0.001") + worst
    assert spent >= Decimal("0.001") - 2 * Decimal("0.001") * Decimal(str(config.lease.budget_fraction)) - 2 * worst  # nearly all of it usable


def test_budget_alerts_fire_once_per_threshold_signed_and_retried_until_the_receiver_is_up(billing, config, receiver):
    import json

    from billing.alerts import SIGNATURE_HEADER, tenant_secret, verify

    key = _key(billing, "alerted", "tiny")  # budget 0.001
    ingress = FakeIngress.remote(config.model_dump(mode="json"), "alert-h1")
    ray.get(ingress.start.remote())
    # 1,000 + 1,000 tokens at 0.05 / 0.20 per 1M: 0.00025 a request, so 4 requests spend the whole budget
    ray.get(ingress.hammer.remote(key, 6, 1000, 1000, 1000, stop_after_denials=1))
    assert ray.get(ingress.drain.remote()) == 0
    deadline = time.monotonic() + 30
    while len(wait(admin_client(billing).alerts("alerted"))) < 3 or not any(a["attempts"] >= 2 for a in wait(admin_client(billing).alerts("alerted"))):
        assert time.monotonic() < deadline, wait(admin_client(billing).alerts("alerted"))
        time.sleep(0.2)
    assert receiver.got == []  # down so far: tried and retried, nothing delivered
    receiver.down = False
    while len(receiver.got) < 3:
        assert time.monotonic() < deadline + 30
        time.sleep(0.2)
    time.sleep(2)  # nothing more comes: one alert per threshold
    assert sorted(json.loads(body)["threshold"] for _, body in receiver.got) == [0.5, 0.8, 1.0]
    secret = tenant_secret(WEBHOOK_SECRET, "alerted")  # each tenant's alerts are signed with its own secret
    assert all(verify(secret, headers[SIGNATURE_HEADER], body, time.time()) for headers, body in receiver.got)
    assert not any(verify(WEBHOOK_SECRET, headers[SIGNATURE_HEADER], body, time.time()) for headers, body in receiver.got)
    assert sorted(json.loads(body)["id"] for _, body in receiver.got) == sorted(int(h["X-Maas-Alert-Id"]) for h, _ in receiver.got)
    assert {a["state"] for a in wait(admin_client(billing).alerts("alerted"))} == {"sent"}
    assert sum(1 for a in wait(admin_client(billing).audit_log(200)) if a["action"] == "alert.sent") >= 3
