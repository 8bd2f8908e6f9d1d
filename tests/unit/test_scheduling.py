"""The generator's queue (`deployments.core.scheduling`): tiers, fair share, age, the reserve and batch work, with a fake clock."""

from __future__ import annotations

import asyncio

import pytest

from common.config import SchedulingConfig
from deployments.core.scheduling import FairShare, Limits, ScheduledEngine, SlotGate, fits, score
from deployments.core.types import GenerationRequest


class Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


def run(coro):
    return asyncio.run(coro)


def test_fair_share_fades_and_compares_tenants_by_weight() -> None:
    clock = Clock()
    share = FairShare(half_life_s=10, clock=clock)
    share.charge("a", 800)
    share.charge("b", 100)
    ex = share.excesses()
    assert ex["b"] == 0.0 and ex["a"] == pytest.approx(800 / 450 - 1)
    clock.t += 10
    assert share.usage("a") == pytest.approx(400)
    share.charge("b", 700, weight=2)  # weight 2: 700 tokens count as 350
    assert share.usage("b") == pytest.approx(50 + 350)
    assert share.excesses({"c"})["c"] == 0.0  # a tenant waiting with no use yet is counted in the mean, under it


def test_score_orders_tiers_and_lets_age_overtake() -> None:
    cfg = SchedulingConfig()
    assert score(cfg, "priority", 0, 0) < score(cfg, "default", 0, 0) < score(cfg, "flex", 0, 0) < score(cfg, "batch", 0, 0)
    assert score(cfg, "default", 0, waited_s=6) < score(cfg, "priority", 0, 0)  # nothing starves
    assert score(cfg, "default", 0.8, 0) > score(cfg, "default", 0.0, 0)  # over its share: later
    assert score(SchedulingConfig(fair_share=False), "default", 0.8, 0) == score(cfg, "default", 0.0, 0)


def test_limits_reserve_and_background() -> None:
    lim = Limits.of(32, SchedulingConfig(reserved_fraction=0.125, background_busy_fraction=0.25))
    assert (lim.reserved, lim.background_busy) == (4, 8)
    assert fits(lim, 28, 0, True, 1, "default", owed=True)
    assert not fits(lim, 28, 0, True, 1, "default", owed=False)  # over its share: not into the reserve
    assert not fits(lim, 28, 0, True, 1, "flex", owed=True)
    assert not fits(lim, 10, 8, True, 1, "batch", owed=True)  # batch shrinks while live requests run
    assert fits(lim, 10, 8, False, 1, "batch", owed=True)
    assert fits(lim, 0, 0, False, 40, "batch", owed=True)  # larger than the engine: runs alone


async def _gate_scenario(clock: Clock, cfg: SchedulingConfig, capacity: int, held: list[tuple[str, str]], arrivals: list[tuple[str, str, float]]) -> list[str]:
    """Fill the gate with `held` (tier, tenant), queue `arrivals` (tier, tenant, seconds later), free the held ones one
    by one and return the order the queued ones entered in."""
    gate = SlotGate(capacity, cfg, clock)
    holding = [await gate.acquire(tier, tenant) for tier, tenant in held]
    order: list[str] = []

    async def wait(name: str, tier: str, tenant: str) -> None:
        adm = await gate.acquire(tier, tenant)
        order.append(name)
        holding.append(adm)

    tasks = []
    for i, (tier, tenant, later) in enumerate(arrivals):
        clock.t += later
        tasks.append(asyncio.ensure_future(wait(f"{i}:{tier}:{tenant}", tier, tenant)))
        await asyncio.sleep(0)
    while holding and len(order) < len(arrivals):
        gate.release(holding.pop(0))
        await asyncio.sleep(0)
    await asyncio.gather(*tasks)
    return order


def test_tiers_enter_in_order_and_age_overtakes() -> None:
    clock = Clock()
    cfg = SchedulingConfig(reserved_fraction=0, fair_share=False)
    order = run(_gate_scenario(clock, cfg, 2, [("default", "x"), ("default", "x")], [("flex", "t", 0), ("default", "t", 0), ("priority", "t", 0)]))
    assert order == ["2:priority:t", "1:default:t", "0:flex:t"]
    clock = Clock()
    order = run(_gate_scenario(clock, cfg, 1, [("default", "x")], [("default", "t", 0), ("priority", "t", 6.0)]))
    assert order == ["0:default:t", "1:priority:t"]  # it waited 6 s, more than the 5 s head start of priority


def test_noisy_neighbour_gets_no_reserve_and_goes_behind() -> None:
    async def scenario() -> tuple[list[str], int]:
        clock = Clock()
        gate = SlotGate(8, SchedulingConfig(reserved_fraction=0.25), clock)
        gate.share.charge("a", 8000)
        gate.share.charge("b", 100)
        a = [await gate.acquire("default", "a") for _ in range(6)]  # 8 - 2 reserved
        blocked = asyncio.ensure_future(gate.acquire("default", "a"))
        await asyncio.sleep(0)
        assert not blocked.done()  # a is over its share: the reserve is not for it
        b = await asyncio.wait_for(gate.acquire("default", "b"), 1)  # b is owed: a reserved sequence at once
        assert gate.stats().running == {"default": 7}
        gate.release(b)
        # One sequence frees: b's next request, arriving later, still goes before a's waiting one.
        late_b = asyncio.ensure_future(gate.acquire("default", "b"))
        await asyncio.sleep(0)
        gate.release(a.pop())
        await asyncio.sleep(0)
        first = "b" if late_b.done() else "a"
        blocked.cancel()
        await asyncio.sleep(0)
        return [first], gate.stats().waiting.get("default", 0)

    first, waiting = run(scenario())
    assert first == ["b"] and waiting == 0


def test_batch_gives_way_to_live_requests() -> None:
    async def scenario() -> list[int]:
        clock = Clock()
        gate = SlotGate(8, SchedulingConfig(reserved_fraction=0.125, background_busy_fraction=0.25), clock)
        seen = []
        batch = [await gate.acquire("batch", "batcher") for _ in range(7)]  # alone: all but the reserve
        seen.append(gate.stats().running["batch"])
        live = await gate.acquire("default", "live")
        queued = [asyncio.ensure_future(gate.acquire("batch", "batcher")) for _ in range(3)]
        for adm in batch[:6]:
            gate.release(adm)
        await asyncio.sleep(0)
        seen.append(gate.stats().running["batch"])  # while a live request runs: 2 of 8 at most
        gate.release(live)
        await asyncio.sleep(0)
        seen.append(gate.stats().running["batch"])  # alone again: the queued ones enter
        for t in queued:
            gate.release(t.result())
        return seen

    assert run(scenario()) == [7, 2, 4]


def test_a_cancelled_waiter_leaves_the_queue() -> None:
    async def scenario() -> dict:
        gate = SlotGate(1, SchedulingConfig(reserved_fraction=0), Clock())
        held = await gate.acquire("default", "t")
        waiter = asyncio.ensure_future(gate.acquire("default", "t"))
        await asyncio.sleep(0)
        waiter.cancel()
        await asyncio.sleep(0)
        gate.release(held)
        nxt = await asyncio.wait_for(gate.acquire("default", "t"), 1)
        gate.release(nxt)
        return {"waiting": gate.stats().waiting, "running": gate.stats().running}

    assert run(scenario()) == {"waiting": {}, "running": {}}


class FakeEngine:
    """The generator logic's interface: two tokens per request, recording the priority it was given."""

    def __init__(self) -> None:
        self.priorities: list[int] = []

    def start(self) -> None:
        pass

    @property
    def ready(self) -> bool:
        return True

    async def generate(self, req: GenerationRequest, priority: int = 0):
        self.priorities.append(priority)
        yield [(0, [1], None)]
        yield [(0, [2], "length")]

    def stats(self):
        from deployments.core.generator import EngineStats

        return EngineStats(True, 0, 0, 0, 0, [], 0.0, {})

    def shutdown(self) -> None:
        pass


def test_scheduled_engine_ranks_and_counts_tokens() -> None:
    async def scenario() -> tuple[list[int], float, dict]:
        fake = FakeEngine()
        clock = Clock()
        engine = ScheduledEngine(fake, 4, SchedulingConfig(), clock)
        for tier in ("priority", "flex"):
            req = GenerationRequest("r-" + tier, "m", "chat", [5, 6, 7], 2, 0, service_tier=tier)
            assert [d async for d in engine.generate(req)][-1][0][2] == "length"
        return fake.priorities, engine.gate.share.usage(""), engine.stats().waiting

    priorities, used, waiting = run(scenario())
    assert priorities == [0, 30_000] and used == pytest.approx(10) and waiting == {}
