"""Which waiting request enters the engine next: its service tier, its tenant's share, and its age.

vLLM batches at most `max_num_seqs` sequences and never preempts a running one for a newcomer that
merely ranks higher, so a queue in front of the engine decides who runs: a request waits in the
generator's `SlotGate` until it may take a sequence, then enters the engine (run with vLLM's priority
policy, and given the same rank there, so that memory pressure preempts the lowest-ranked first).

**Order.** One number per waiting request, lowest first:

    score = tier_wait_s[tier] + share_wait_s × min(excess, max_share_excess) − seconds waited

- Tier: `priority` starts at 0, `default` at 5 s, `flex` at 30 s, `batch` at 600 s (`tier_wait_s`): a
  request goes ahead of every request of a slower tier that has waited less than the gap, and behind
  those that have waited longer. So a tier only delays, never starves, the ones below.
- Fair share over time: each tenant's tokens through this engine (prompt and completion) are counted
  with an exponential fade (`share_half_life_s`) per unit of its plan's `share_weight`, but only while
  another tenant is waiting or running beside it (a tenant alone takes nothing from anyone and banks no
  debt for when others come). Its `excess` is that figure over the mean of the tenants waiting or
  running now, minus one (0 at or below the mean): a tenant sending eight times another's load has an
  excess of 0.78 and waits 7.8 s more (`share_wait_s` 10), so the lighter tenant goes first, as with a
  virtual token counter.
- Age: every second waited takes a second off, so every request ends up first in time.

**Room.** Since a request that waits for a sequence waits for a running one to finish (a whole
completion), who may take a free sequence matters as much as the order:

- Live requests (`priority`, `default`) share the sequences by weighted max-min fairness over each
  tenant's live demand (what it runs and waits for, its peak over the last third of
  `share_half_life_s`, since closed-loop clients end their requests in waves a completion apart). A
  live request within its tenant's allocation may take any free sequence; beyond it, it must leave
  free what the other tenants are owed and do not hold yet. So a tenant sending eight times another's
  load cannot take the sequences the other one is about to ask for again.
- `flex` and `batch` requests must leave free what every live tenant is owed and does not hold, and
  `reserved_fraction` of the engine besides (so that a live request arriving after a quiet spell finds
  room at once); `batch` holds at most `background_busy_fraction` of the engine while live requests run
  (on a CPU engine, whose every step slows as the batch grows).
- A request that has waited out its tier's and its share's delay (score at or below 0) may take any
  free sequence: nothing waits forever.

Pure asyncio: no Ray, no vLLM; the clock is injectable.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any, AsyncIterator, Callable, Protocol

from common.config import SchedulingConfig
from deployments.core.types import GenerationRequest, TokenDelta

LIVE_TIERS = ("priority", "default")  # tiers that share the engine by fair allocation
BACKGROUND_TIERS = ("batch",)  # tiers that give way while live requests run


class FairShare:
    """Each tenant's recent tokens through the engine, fading with a half-life, per unit of its weight."""

    def __init__(self, half_life_s: float, clock: Callable[[], float] = time.monotonic):
        self._rate = math.log(2) / half_life_s
        self._clock = clock
        self._tenants: dict[str, list[float]] = {}  # tenant -> [tokens per weight, as of `at`, at]

    def _now_value(self, entry: list[float], now: float) -> float:
        return entry[0] * math.exp(-self._rate * (now - entry[1]))

    def charge(self, tenant: str, tokens: int, weight: float = 1.0) -> None:
        now = self._clock()
        entry = self._tenants.get(tenant)
        value = self._now_value(entry, now) if entry is not None else 0.0
        self._tenants[tenant] = [value + tokens / weight, now]

    def usage(self, tenant: str) -> float:
        entry = self._tenants.get(tenant)
        return self._now_value(entry, self._clock()) if entry is not None else 0.0

    def excesses(self, active: set[str]) -> dict[str, float]:
        """How far over the mean of the `active` tenants (those waiting or running now) each one's recent usage is
        (0 when at or below it). Tenants not active are not compared: they are competing with no one."""
        now = self._clock()
        for t in [t for t, e in self._tenants.items() if t not in active and self._now_value(e, now) < 0.5]:  # faded out: forget it
            del self._tenants[t]
        if len(active) < 2:
            return {t: 0.0 for t in active}
        values = {t: self.usage(t) for t in active}
        mean = sum(values.values()) / len(values)
        return {t: max(0.0, v / mean - 1.0) if mean > 0 else 0.0 for t, v in values.items()}


def score(config: SchedulingConfig, tier: str, excess: float, waited_s: float) -> float:
    """The request's rank among those waiting, in seconds (lowest enters first); see the module's docstring."""
    share = config.share_wait_s * min(excess, config.max_share_excess) if config.fair_share else 0.0
    return config.tier_wait_s.get(tier, 0.0) + share - waited_s  # type: ignore[call-overload]


def allocate(demands: dict[str, int], weights: dict[str, float], capacity: int) -> dict[str, float]:
    """Weighted max-min fair shares of `capacity` sequences: no tenant gets more than it wants, and what one does
    not want is shared among the others by weight (water-filling)."""
    alloc = {t: 0.0 for t in demands}
    open_ = {t for t, d in demands.items() if d > 0}
    left = float(capacity)
    while open_ and left > 1e-9:
        total = sum(weights.get(t, 1.0) for t in open_)
        share = {t: left * weights.get(t, 1.0) / total for t in open_}
        full = {t for t in open_ if demands[t] - alloc[t] <= share[t] + 1e-9}
        if not full:
            for t in open_:
                alloc[t] += share[t]
            break
        for t in full:
            left -= demands[t] - alloc[t]
            alloc[t] = float(demands[t])
        open_ -= full
    return alloc


class DemandPeaks:
    """Each tenant's largest live demand over the last `window_s` seconds (a monotonic deque per tenant: O(1) a note)."""

    def __init__(self, window_s: float):
        self._window_s = window_s
        self._peaks: dict[str, deque[tuple[float, int]]] = {}

    def note(self, tenant: str, demand: int, now: float) -> None:
        window = self._peaks.setdefault(tenant, deque())
        while window and window[-1][1] <= demand:
            window.pop()
        window.append((now, demand))
        while window[0][0] < now - self._window_s:
            window.popleft()

    def peaks(self, now: float) -> dict[str, int]:
        out = {}
        for tenant in list(self._peaks):
            window = self._peaks[tenant]
            while window and window[0][0] < now - self._window_s:
                window.popleft()
            if window and window[0][1] > 0:
                out[tenant] = window[0][1]
            elif not window:
                del self._peaks[tenant]
        return out


@dataclass
class _Waiter:
    tier: str
    tenant: str
    need: int
    since: float
    future: asyncio.Future
    weight: float = 1.0


@dataclass
class Admission:
    """A request let into the engine: the sequences it holds and the rank it entered with (vLLM's `priority`)."""

    tier: str
    tenant: str
    need: int
    priority: int
    weight: float = 1.0
    released: bool = False


@dataclass
class GateStats:
    waiting: dict[str, int] = field(default_factory=dict)  # per tier
    running: dict[str, int] = field(default_factory=dict)  # sequences held, per tier
    admitted_total: int = 0


class SlotGate:
    """The queue in front of one engine: `acquire` waits for a sequence by the rules above, `release` gives it back."""

    def __init__(self, capacity: int, config: SchedulingConfig, clock: Callable[[], float] = time.monotonic):
        self._config = config
        self.capacity = capacity
        self._reserved = min(capacity - 1, math.ceil(capacity * config.reserved_fraction)) if config.reserved_fraction > 0 else 0
        self._background_busy = max(1, math.floor(capacity * config.background_busy_fraction))
        self._clock = clock
        self.share = FairShare(config.share_half_life_s, clock)
        self.demand = DemandPeaks(config.share_half_life_s / 3)
        self._queues: dict[tuple[str, str], deque[_Waiter]] = {}  # (tier, tenant) -> FIFO: its head ranks first within it
        self._used = 0
        self._by_tier: dict[str, int] = {}
        self._by_tenant: dict[str, int] = {}
        self._live: dict[str, int] = {}  # live-tier sequences held, per tenant
        self._weights: dict[str, float] = {}
        self._alloc: dict[str, float] = {}
        self._live_pooled: dict[str, int] = {}
        self._admitted = 0

    # ---- the request's side ----------------------------------------------------------------------

    async def acquire(self, tier: str, tenant: str, n: int = 1, weight: float = 1.0, prompt_tokens: int = 0) -> Admission:
        need = max(1, min(n, self.capacity))
        self._weights[tenant] = weight
        if prompt_tokens and self._contended(tenant):
            self.share.charge(tenant, prompt_tokens, weight)
        waiter = _Waiter(tier, tenant, need, self._clock(), asyncio.get_running_loop().create_future(), weight)
        self._queues.setdefault((tier, tenant), deque()).append(waiter)
        self._pump()
        try:
            admission: Admission = await waiter.future
        except asyncio.CancelledError:
            if waiter.future.done() and not waiter.future.cancelled():
                self.release(waiter.future.result())
            else:
                self._forget(waiter)
            raise
        return admission

    def release(self, admission: Admission, completion_tokens: int = 0) -> None:
        if admission.released:
            return
        admission.released = True
        self._used -= admission.need
        self._by_tier[admission.tier] -= admission.need
        self._by_tenant[admission.tenant] -= admission.need
        if not self._by_tenant[admission.tenant]:
            del self._by_tenant[admission.tenant]
        if admission.tier in LIVE_TIERS:
            self._live[admission.tenant] -= admission.need
            if not self._live[admission.tenant]:
                del self._live[admission.tenant]
        if completion_tokens and self._contended(admission.tenant):
            self.share.charge(admission.tenant, completion_tokens, admission.weight)
        self._pump()

    def stats(self) -> GateStats:
        waiting: dict[str, int] = {}
        for (tier, _), q in self._queues.items():
            waiting[tier] = waiting.get(tier, 0) + len(q)
        return GateStats(waiting, {t: c for t, c in self._by_tier.items() if c}, self._admitted)

    # ---- the rules --------------------------------------------------------------------------------

    def _active(self) -> set[str]:
        return set(self._by_tenant) | {t for _, t in self._queues}

    def _contended(self, tenant: str) -> bool:
        """Whether another tenant is waiting or running beside `tenant`: only then do its tokens count toward its share."""
        return any(t != tenant for t in self._by_tenant) or any(t != tenant for _, t in self._queues)

    def owed(self) -> dict[str, int]:
        """Per live tenant, the sequences its fair allocation owes it that it does not hold (its recent peak demand
        bounded by its allocation, less what it runs)."""
        now = self._clock()
        pool = self._pool
        live: dict[str, int] = {}
        for tenant, held in self._live.items():
            live[pool(tenant)] = live.get(pool(tenant), 0) + held
        waiting: dict[str, int] = {}
        for (tier, tenant), q in self._queues.items():
            if tier in LIVE_TIERS:
                waiting[pool(tenant)] = waiting.get(pool(tenant), 0) + len(q) * q[0].need
        for key in {pool(t) for t in self._active()} | set(live):
            self.demand.note(key, live.get(key, 0) + waiting.get(key, 0), now)
        peaks = self.demand.peaks(now)
        self._alloc = allocate(peaks, self._weights if self._config.fair_share else {}, self.capacity)
        self._live_pooled = live
        return {t: max(0, math.floor(min(self._alloc[t], peaks[t]) + 1e-9) - live.get(t, 0)) for t in peaks}

    def _pool(self, tenant: str) -> str:
        """Whose allocation a tenant's live requests count against: its own with fair share on, one pool for all with it off."""
        return tenant if self._config.fair_share else ""

    def _room(self, head: _Waiter, rank: float, owed: dict[str, int]) -> bool:
        """Whether `head` may take a free sequence now (see the module's docstring, "Room")."""
        need = head.need
        if self._used + need > self.capacity and self._used > 0:
            return False
        free_after = self.capacity - self._used - need
        if rank > 0:  # not waited out: leave room for what others are owed
            if head.tier in LIVE_TIERS:
                mine = self._pool(head.tenant)
                within = self._live_pooled.get(mine, 0) + need <= math.floor(self._alloc.get(mine, 0.0) + 1e-9)
                if not within and free_after < sum(o for t, o in owed.items() if t != mine):
                    return False
            elif free_after < max(self._reserved, sum(owed.values())):
                return False
        if head.tier in BACKGROUND_TIERS and self._live:
            background = sum(self._by_tier.get(t, 0) for t in BACKGROUND_TIERS)
            if background + need > self._background_busy and background > 0:
                return False
        return True

    def _admit(self, head: _Waiter, rank: float) -> Admission:
        self._used += head.need
        self._by_tier[head.tier] = self._by_tier.get(head.tier, 0) + head.need
        self._by_tenant[head.tenant] = self._by_tenant.get(head.tenant, 0) + head.need
        if head.tier in LIVE_TIERS:
            self._live[head.tenant] = self._live.get(head.tenant, 0) + head.need
        self._admitted += 1
        return Admission(head.tier, head.tenant, head.need, int(rank * 1000), head.weight)

    def _pump(self) -> None:
        """Admit waiting requests, best score first, while any may take a sequence (one that may not is passed over)."""
        while self._queues and self._used < self.capacity:
            for key in [k for k, q in self._queues.items() if q[0].future.done()]:  # cancelled, not yet forgotten
                q = self._queues[key]
                while q and q[0].future.done():
                    q.popleft()
                if not q:
                    del self._queues[key]
            if not self._queues:
                return
            now = self._clock()
            excesses = self.share.excesses(self._active()) if self._config.fair_share else {}
            owed = self.owed()
            ranked = sorted((score(self._config, key[0], excesses.get(key[1], 0.0), now - q[0].since), key) for key, q in self._queues.items())
            for rank, key in ranked:
                head = self._queues[key][0]
                if self._room(head, rank, owed):
                    self._queues[key].popleft()
                    if not self._queues[key]:
                        del self._queues[key]
                    head.future.set_result(self._admit(head, rank))
                    break
            else:
                return

    def _forget(self, waiter: _Waiter) -> None:
        key = (waiter.tier, waiter.tenant)
        q = self._queues.get(key)
        if q is not None and waiter in q:
            q.remove(waiter)
            if not q:
                del self._queues[key]
        self._pump()


class Engine(Protocol):
    """The generator logic's interface (`VLLMGenerator`, `PacedEngine`)."""

    def start(self) -> None: ...

    @property
    def ready(self) -> bool: ...

    def generate(self, req: GenerationRequest, priority: int = 0) -> AsyncIterator[list[TokenDelta]]: ...

    def stats(self) -> Any: ...

    def shutdown(self) -> None: ...


class ScheduledEngine:
    """An engine behind a `SlotGate`: each request waits its turn, enters with its rank, and counts toward its tenant's share."""

    def __init__(self, engine: Engine, capacity: int, config: SchedulingConfig, clock: Callable[[], float] = time.monotonic):
        self.engine = engine
        self.gate = SlotGate(capacity, config, clock)

    def start(self) -> None:
        self.engine.start()

    @property
    def ready(self) -> bool:
        return self.engine.ready

    async def generate(self, req: GenerationRequest) -> AsyncIterator[list[TokenDelta]]:
        tenant = req.billing.tenant if req.billing is not None else ""
        admission = await self.gate.acquire(req.service_tier, tenant, req.n, req.share_weight, len(req.prompt_token_ids))
        produced = 0
        try:
            async for deltas in self.engine.generate(req, priority=admission.priority):
                for d in deltas:
                    if d[0] >= 0:
                        produced += len(d[1])
                yield deltas
        finally:
            self.gate.release(admission, produced)

    def stats(self) -> Any:
        import dataclasses

        stats = self.engine.stats()
        gate = self.gate.stats()
        return dataclasses.replace(stats, running=stats.running + sum(gate.waiting.values()), waiting=gate.waiting)

    def shutdown(self) -> None:
        self.engine.shutdown()
