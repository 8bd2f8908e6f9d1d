"""The generator's queue (`deployments.core.scheduling`): tiers, fair share, age, room for owed tenants and batch work, with a fake clock."""

from __future__ import annotations

import asyncio

import pytest

from common.config import SchedulingConfig
from deployments.core.scheduling import DemandPeaks, FairShare, ScheduledEngine, SlotGate, allocate, score
from deployments.core.types import GenerationRequest


class Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


def run(coro):
    return asyncio.run(coro)


def test_fair_share_fades_and_compares_the_active_tenants_by_weight() -> None:
    clock = Clock()
    share = FairShare(half_life_s=10, clock=clock)
    share.charge("a", 800)
    share.charge("b", 100)
    ex = share.excesses({"a", "b"})
    assert ex["b"] == 0.0 and ex["a"] == pytest.approx(800 / 450 - 1)
    clock.t += 10
    assert share.usage("a") == pytest.approx(400)
    share.charge("b", 700, weight=2)  # weight 2: 700 tokens count as 350
    assert share.usage("b") == pytest.approx(50 + 350)
    assert share.excesses({"b", "c"})["c"] == 0.0 and share.excesses({"a"}) == {"a": 0.0}  # only tenants active now compare; alone, none is over


def test_score_orders_tiers_and_lets_age_overtake() -> None:
    cfg = SchedulingConfig()
    assert score(cfg, "priority", 0, 0) < score(cfg, "default", 0, 0) < score(cfg, "flex", 0, 0) < score(cfg, "batch", 0, 0)
    assert score(cfg, "default", 0, waited_s=6) < score(cfg, "priority", 0, 0)  # nothing starves
    assert score(cfg, "default", 0.8, 0) > score(cfg, "default", 0.0, 0)  # over its share: later
    assert score(SchedulingConfig(fair_share=False), "default", 0.8, 0) == score(cfg, "default", 0.0, 0)


def test_weighted_max_min_allocation_and_demand_peaks() -> None:
    assert allocate({"a": 48, "b": 6}, {}, 32) == {"a": 26.0, "b": 6.0}  # b wants less than half: all of it
    assert allocate({"a": 48, "b": 48}, {"a": 3, "b": 1}, 32) == {"a": 24.0, "b": 8.0}  # by weight
    assert allocate({"a": 4}, {}, 32) == {"a": 4.0}
    peaks = DemandPeaks(window_s=10)
    peaks.note("a", 6, 0.0)
    peaks.note("a", 2, 5.0)  # a wave of its requests ended: its peak stays
    assert peaks.peaks(9.0) == {"a": 6}
    assert peaks.peaks(12.0) == {"a": 2}


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
        clock.t += 11  # past the demand's memory (a third of the share's half-life), every waiter aging alike
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


@pytest.mark.parametrize("fair_share", [True, False])
def test_a_noisy_neighbour_leaves_room_for_what_the_other_tenant_is_owed(fair_share: bool) -> None:
    async def scenario() -> list:
        clock = Clock()
        gate = SlotGate(8, SchedulingConfig(reserved_fraction=0, fair_share=fair_share), clock)
        b = [await gate.acquire("default", "b") for _ in range(2)]  # b wants 2 of 8: its allocation is 2
        a = [await gate.acquire("default", "a") for _ in range(6)]
        blocked = asyncio.ensure_future(gate.acquire("default", "a"))
        await asyncio.sleep(0)
        seen: list = [blocked.done()]  # full
        gate.release(b.pop())  # b's request ends; its next one comes a moment later
        await asyncio.sleep(0)
        seen.append(blocked.done())  # with fair share, a is beyond its allocation (6): the free sequence is b's
        nxt = asyncio.ensure_future(gate.acquire("default", "b"))
        await asyncio.sleep(0)
        seen.append(nxt.done())  # b finds it at once, or waits behind a
        for adm in [*a, *b]:
            gate.release(adm)
        await asyncio.sleep(0)
        for t in (blocked, nxt):
            gate.release(t.result())
        return seen

    # Fair share off: one pool for every tenant, so a takes the sequence b's request freed and b waits.
    assert run(scenario()) == ([False, False, True] if fair_share else [False, True, False])


def test_batch_leaves_room_for_live_requests_and_shrinks_while_they_run() -> None:
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
        # Live gone: batch may grow again, leaving free the reserve and what the live tenant was owed lately (1).
        seen.append(gate.stats().running["batch"])
        for t in queued:
            gate.release(t.result())
        return seen

    assert run(scenario()) == [7, 2, 4]


def test_a_flex_request_waits_behind_live_demand_until_it_has_waited_out_its_delay() -> None:
    async def scenario() -> list[bool]:
        clock = Clock()
        gate = SlotGate(2, SchedulingConfig(reserved_fraction=0), clock)
        live = [await gate.acquire("default", "t") for _ in range(2)]
        flex = asyncio.ensure_future(gate.acquire("flex", "t"))
        gate.release(live.pop())  # the live stream's next request comes a moment later: its room is kept
        await asyncio.sleep(0)
        seen = [flex.done()]
        clock.t += 31  # flex has waited out its 30 s
        gate.release(live.pop())
        await asyncio.sleep(0)
        seen.append(flex.done())
        gate.release(flex.result())
        return seen

    assert run(scenario()) == [False, True]


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


def test_tokens_count_toward_a_share_only_beside_another_tenant() -> None:
    async def scenario() -> tuple[float, float]:
        gate = SlotGate(8, SchedulingConfig(), Clock())
        alone = await gate.acquire("default", "a", prompt_tokens=100)
        gate.release(alone, 50)
        before = gate.share.usage("a")
        b = await gate.acquire("default", "b", prompt_tokens=10)
        beside = await gate.acquire("default", "a", prompt_tokens=100)
        gate.release(beside, 50)
        gate.release(b)
        return before, gate.share.usage("a")

    assert run(scenario()) == (0.0, pytest.approx(150))


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
    assert priorities == [0, 30_000] and used == 0 and waiting == {}  # alone on the engine: its tokens count toward no share
