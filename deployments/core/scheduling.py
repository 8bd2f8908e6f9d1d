"""Which waiting request enters the engine next: its service tier, its tenant's recent share, and its age.

vLLM batches at most `max_num_seqs` sequences and never preempts a running one for a newcomer that
merely ranks higher, so a queue in front of the engine decides who runs: a request waits in the
generator's `SlotGate` until a sequence is free, then enters the engine (run with vLLM's priority
policy, and given the same rank there, so that memory pressure preempts the lowest-ranked first).

The rule, one number per waiting request, lowest first:

    score = tier_wait_s[tier] + share_wait_s × min(excess, max_share_excess) − seconds waited

- **Tier.** `priority` starts at 0, `default` at 5 s, `flex` at 30 s, `batch` at 600 s (the config's
  `tier_wait_s`): a request goes ahead of every request of a slower tier that has waited less than the
  gap, and behind those that have waited longer. So a tier only delays, never starves, the ones below.
- **Fair share.** Each tenant's tokens through this engine (prompt and completion) are counted with an
  exponential fade (`share_half_life_s`) and divided by its plan's `share_weight`. A tenant's `excess`
  is that figure over the mean of the tenants active lately, minus one (0 at or below the mean): a
  tenant sending eight times another's load has an excess of 0.78 against it and waits 7.8 s more
  (`share_wait_s` 10), so the lighter tenant's requests go first, as in a virtual token counter.
- **Age.** Every second waited takes a second off, so every request ends up first in time.

Sequences: the last `reserved_fraction` of them are kept for live requests (`priority` and `default`) of
tenants within their share, so that a request that is owed service finds a sequence at once instead of
waiting for a burst, a flex request or batch work to finish. `batch` requests may further hold at most
`background_busy_fraction` of the sequences while live requests are in the engine (on a CPU engine,
whose every step slows as the batch grows).

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

LIVE_TIERS = ("priority", "default")  # tiers the reserve is kept for
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

    def excesses(self, active: set[str] = frozenset()) -> dict[str, float]:  # type: ignore[assignment]
        """How far over the mean each tenant's recent usage is (0 when at or below it): the tenants that used the
        engine lately, and those in `active` (waiting or running now, though they have used nothing yet)."""
        now = self._clock()
        values = {t: self._now_value(e, now) for t, e in self._tenants.items()}
        for t in [t for t, v in values.items() if v < 0.5 and t not in active]:  # faded out: forget it
            del self._tenants[t], values[t]
        for t in active:
            values.setdefault(t, 0.0)
        if len(values) < 2:
            return {t: 0.0 for t in values}
        mean = sum(values.values()) / len(values)
        return {t: max(0.0, v / mean - 1.0) if mean > 0 else 0.0 for t, v in values.items()}


def score(config: SchedulingConfig, tier: str, excess: float, waited_s: float) -> float:
    """The request's rank among those waiting, in seconds (lowest enters first); see the module's docstring."""
    share = config.share_wait_s * min(excess, config.max_share_excess) if config.fair_share else 0.0
    return config.tier_wait_s.get(tier, 0.0) + share - waited_s  # type: ignore[call-overload]


@dataclass(frozen=True)
class Limits:
    """How many of the engine's sequences a request may bring the count to, by what it is."""

    capacity: int
    reserved: int
    background_busy: int

    @classmethod
    def of(cls, capacity: int, config: SchedulingConfig) -> "Limits":
        reserved = min(capacity - 1, math.ceil(capacity * config.reserved_fraction)) if config.reserved_fraction > 0 else 0
        return cls(capacity, max(reserved, 0), max(1, math.floor(capacity * config.background_busy_fraction)))


def fits(limits: Limits, used: int, background_used: int, live_present: bool, need: int, tier: str, owed: bool) -> bool:
    """Whether a request needing `need` sequences may enter now. `owed`: its tenant is within its share."""
    ceiling = limits.capacity if (tier in LIVE_TIERS and owed) else limits.capacity - limits.reserved
    if used + need > ceiling and used > 0:
        return False
    if tier in BACKGROUND_TIERS and live_present and background_used + need > limits.background_busy and background_used > 0:
        return False
    return True


@dataclass
class _Waiter:
    tier: str
    tenant: str
    need: int
    since: float
    future: asyncio.Future


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
    """The queue in front of one engine: `acquire` waits for sequences by the rule above, `release` gives them back."""

    def __init__(self, capacity: int, config: SchedulingConfig, clock: Callable[[], float] = time.monotonic):
        self._config = config
        self._limits = Limits.of(capacity, config)
        self._clock = clock
        self.share = FairShare(config.share_half_life_s, clock)
        self._queues: dict[tuple[str, str], deque[_Waiter]] = {}  # (tier, tenant) -> FIFO: its head ranks first within it
        self._used = 0
        self._by_tier: dict[str, int] = {}
        self._by_tenant: dict[str, int] = {}
        self._admitted = 0

    # ---- the request's side ----------------------------------------------------------------------

    async def acquire(self, tier: str, tenant: str, n: int = 1, weight: float = 1.0, prompt_tokens: int = 0) -> Admission:
        need = max(1, min(n, self._limits.capacity))
        if prompt_tokens:
            self.share.charge(tenant, prompt_tokens, weight)
        now = self._clock()
        if not self._queues:
            excess = self._excess(tenant)
            if self._fits(tier, need, excess):
                return self._admit(tier, tenant, need, score(self._config, tier, excess, 0.0), weight)
        waiter = _Waiter(tier, tenant, need, now, asyncio.get_running_loop().create_future())
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
        admission.weight = weight
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
        if completion_tokens:
            self.share.charge(admission.tenant, completion_tokens, admission.weight)
        self._pump()

    def stats(self) -> GateStats:
        waiting: dict[str, int] = {}
        for (tier, _), q in self._queues.items():
            waiting[tier] = waiting.get(tier, 0) + len(q)
        return GateStats(waiting, {t: c for t, c in self._by_tier.items() if c}, self._admitted)

    # ---- the rule ---------------------------------------------------------------------------------

    def _excess(self, tenant: str) -> float:
        if not self._config.fair_share:
            return 0.0
        return self.share.excesses(set(self._by_tenant) | {t for _, t in self._queues} | {tenant}).get(tenant, 0.0)

    def _live_present(self) -> bool:
        return any(self._by_tier.get(t, 0) for t in LIVE_TIERS) or any(tier in LIVE_TIERS for tier, _ in self._queues)

    def _fits(self, tier: str, need: int, excess: float) -> bool:
        background = sum(self._by_tier.get(t, 0) for t in BACKGROUND_TIERS)
        return fits(self._limits, self._used, background, self._live_present(), need, tier, excess <= 0.0)

    def _admit(self, tier: str, tenant: str, need: int, rank: float, weight: float) -> Admission:
        self._used += need
        self._by_tier[tier] = self._by_tier.get(tier, 0) + need
        self._by_tenant[tenant] = self._by_tenant.get(tenant, 0) + need
        self._admitted += 1
        return Admission(tier, tenant, need, int(rank * 1000), weight)

    def _pump(self) -> None:
        """Admit waiting requests, best score first, while any fits (one that does not fit is passed over, not waited for)."""
        while self._queues and self._used < self._limits.capacity:
            now = self._clock()
            excesses = self.share.excesses(set(self._by_tenant) | {t for _, t in self._queues}) if self._config.fair_share else {}
            ranked = sorted((score(self._config, key[0], excesses.get(key[1], 0.0), now - q[0].since), key) for key, q in self._queues.items())
            for rank, key in ranked:
                head = self._queues[key][0]
                if self._fits(head.tier, head.need, excesses.get(head.tenant, 0.0)):
                    self._queues[key].popleft()
                    if not self._queues[key]:
                        del self._queues[key]
                    head.future.set_result(self._admit(head.tier, head.tenant, head.need, rank, 1.0))
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
