"""The replica side of billing (no Ray): authentication, admission from leases, and the usage outbox.

An ingress replica holds one `BillingClient`.  Keys are checked against a local
copy of the key table (hashes only); admission takes a reservation from the
tenant's local lease; usage events queue in an outbox.  One background loop,
every `flush_interval_s`, sends the outbox, the leases held and any asks to the
billing actor in a single message; events leave the outbox only once the actor
acknowledges them, so an actor restart loses nothing (the ledger is idempotent
on request id, so a resend counts once).  The request path waits on the actor
only when a lease runs dry.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import defaultdict
from dataclasses import dataclass, replace
from decimal import Decimal
from typing import Any, Awaitable, Callable, Generic, Protocol, TypeVar

from billing.keys import bearer_token, check_key
from billing.pricing import Quote, TierChoice, choose_tier, price_text, quote
from billing.quota import ZERO, Ask, RateState, Reservation, TenantLease, period_of, rate_state, refill, release, reserve, settle, shortfall, window_of
from billing.records import BillingContext, Claim, KeyRecord, SyncReply, SyncRequest, UsageEvent, key_subject, split_subject
from common.config import BillingConfig, Price
from common.errors import AuthenticationError, InsufficientQuotaError, PermissionDeniedError, RateLimitError, ServiceUnavailableError

logger = logging.getLogger(__name__)

T = TypeVar("T")


class Transport(Protocol):
    async def sync(self, req: SyncRequest) -> SyncReply: ...


class Outbox(Generic[T]):
    """Items waiting for an acknowledgement, oldest first: a batch leaves only once the receiver acknowledged it.

    `send(batch, *extra)` delivers one batch (and may carry more in the same message, as the ingress's sync does);
    `flush()` sends batch after batch until the outbox is empty or a send fails.  Failures are counted and
    logged sparingly (the 1st, 10th and every 100th in a row).
    """

    def __init__(self, send: Callable[..., Awaitable[Any]], max_batch: int, what: str = "items"):
        self._items: list[T] = []
        self._send = send
        self._max_batch = max_batch
        self._what = what
        self._lock = asyncio.Lock()
        self.failures = 0

    def add(self, item: T) -> None:
        self._items.append(item)

    def __len__(self) -> int:
        return len(self._items)

    def pending(self, skip: int = 0) -> list[T]:
        """Queued items from `skip` on (not yet in flight)."""
        return self._items[skip:]

    async def send_batch(self, *extra: Any) -> tuple[bool, Any]:
        """Send the oldest batch (with `extra` for `send`); drop it once acknowledged. Returns (delivered, the send's reply)."""
        async with self._lock:
            batch = self._items[: self._max_batch]
            try:
                reply = await self._send(batch, *extra)
            except Exception as exc:
                self.failures += 1
                if self.failures in (1, 10) or self.failures % 100 == 0:
                    logger.warning("billing actor unreachable (%d tries in a row); keeping %d %s: %s", self.failures, len(self._items), self._what, exc)
                return False, None
            del self._items[: len(batch)]
            self.failures = 0
            return True, reply

    async def flush(self) -> bool:
        """Send until empty; False when a send failed (the rest stays queued)."""
        while self._items:
            delivered, _ = await self.send_batch()
            if not delivered:
                return False
        return True


async def run_periodically(interval_s: float, step: Callable[[], Awaitable[Any]]) -> None:
    """Call `step` every `interval_s` until cancelled; a failing step is logged and retried."""
    while True:
        try:
            await step()
        except asyncio.CancelledError:
            raise
        except Exception:
            logger.exception("billing background step failed")
        await asyncio.sleep(interval_s)


@dataclass(frozen=True)
class Ticket:
    """An admitted request: who, what, and the reservation to settle."""

    request_id: str
    key: KeyRecord
    model: str
    version: str
    kind: str
    reservation: Reservation
    holder: str = ""
    end_user: str = ""
    key_reservation: Reservation | None = None  # a key with limits of its own: its hold on the key's lease too
    service_tier: str = "default"  # the tier it runs at; its quote is at that tier's prices

    def context(self) -> BillingContext:
        """Who pays and at what prices: goes with the request to the generator, the second witness."""
        r = self.reservation
        q = r.quote
        return BillingContext(
            r.tenant, self.key.key_id, self.model, self.version, self.kind, str(q.prompt_price), str(q.completion_price), str(r.reserved), self.holder, self.end_user,
            price_text(q.cached_price), self.service_tier, self.request_id,
        )  # fmt: skip


class BillingClient:
    def __init__(
        self,
        config: BillingConfig,
        transport: Transport,
        holder: str,
        clock: Callable[[], float] = time.time,
        on_outbox: Callable[[int], None] = lambda queued: None,
    ):
        self.config = config
        self.holder = holder
        self._transport = transport
        self._clock = clock
        self._on_outbox = on_outbox  # events still waiting for an acknowledgement, after each sync (a gauge)
        self._keys: dict[str, KeyRecord] = {}
        self._keys_seq = 0
        self._leases: dict[str, TenantLease] = defaultdict(TenantLease)
        self._hints: dict[str, Quote] = {}
        self._outbox: Outbox[UsageEvent] = Outbox(self._send, config.max_batch, "usage events")
        self._loop_task: asyncio.Task | None = None
        self.synced = False  # at least one sync succeeded
        self._synced_event = asyncio.Event()
        self._created_at = clock()
        self._last_sync: float | None = None
        self._active_at = clock()  # the last request seen: the sync loop slows down once there has been none for a while
        self._waker: asyncio.Future | None = None  # the sync loop's wait between syncs
        # Fail closed: past this long without a sync the key table may miss revocations and the actor drops this
        # replica's leases (after `holder_ttl_s`), so keys and leases are no longer trusted.
        self.stale_after_s = config.lease.holder_ttl_s

    # ---- lifecycle ---------------------------------------------------------------------------

    async def start(self) -> None:
        """First sync (loads every key), then the background loop. Retries until the actor answers, however long:
        meanwhile requests get 503 (never 401), and `health()` reports it so Serve replaces a replica stuck so."""
        while await self._sync() is None:
            await asyncio.sleep(0.5)
        self._loop_task = asyncio.get_running_loop().create_task(self._sync_loop())

    async def _sync_loop(self) -> None:
        """Sync every `flush_interval_s` while requests come or events wait; every `idle_sync_interval_s` once idle (an idle
        replica's syncs were most of the actor's and the ingress's CPU with no traffic: bench/RESULTS.md). A request wakes it."""
        while True:
            try:
                await self._sync()
            except asyncio.CancelledError:
                raise
            except Exception:
                logger.exception("billing background step failed")
            loop = asyncio.get_running_loop()
            self._waker = loop.create_future()
            timer = loop.call_later(self.config.flush_interval_s if self._active() else self.config.idle_sync_interval_s, self._wake)
            try:
                await self._waker
            finally:
                timer.cancel()

    def _wake(self) -> None:
        """End the sync loop's wait now."""
        if self._waker is not None and not self._waker.done():
            self._waker.set_result(None)

    def _active(self) -> bool:
        return bool(len(self._outbox)) or self._clock() - self._active_at < self.config.idle_after_s

    async def _refresh(self) -> None:
        """Wait (a little) for a sync that starts now: the key table as the actor has it."""
        self._synced_event.clear()
        self._wake()
        try:
            await asyncio.wait_for(self._synced_event.wait(), timeout=3 * self.config.flush_interval_s)
        except asyncio.TimeoutError:
            pass

    async def close(self, timeout_s: float = 5.0) -> None:
        """Stop the loop and try to deliver what is still queued."""
        if self._loop_task is not None:
            self._loop_task.cancel()
        deadline = self._clock() + timeout_s
        while self._outbox and self._clock() < deadline:
            if await self._sync() is None:
                await asyncio.sleep(0.2)

    @property
    def queued(self) -> int:
        return len(self._outbox)

    @property
    def fresh(self) -> bool:
        """Synced within `stale_after_s`: its keys and leases can be trusted."""
        return self._last_sync is not None and self._clock() - self._last_sync <= self.stale_after_s

    def health(self) -> str | None:
        """Why this replica should be replaced (no sync for twice the staleness bound), or None."""
        since = self._last_sync if self._last_sync is not None else self._created_at
        silent = self._clock() - since
        if silent > 2 * self.stale_after_s:
            return f"no billing sync for {silent:.0f}s ({'never synced' if self._last_sync is None else 'since the last one'})"
        return None

    def _require_fresh(self) -> None:
        if not self.fresh:
            what = "is starting" if self._last_sync is None else "has not been reachable for a while"
            raise ServiceUnavailableError(f"Billing {what}; keys and quotas cannot be checked. Retry shortly.", headers={"Retry-After": "2"})

    # ---- the request path --------------------------------------------------------------------

    async def authenticate(self, authorization: str | None) -> KeyRecord:
        """The caller's key. A key this replica does not know yet (created a moment ago) waits for the next sync, once.

        No header, or a malformed one, is a 401 whatever billing's state; any other key is a 503 while the key
        table is not fresh (fail closed: a stale table may still hold a revoked key)."""
        bearer_token(authorization)
        self._require_fresh()
        now = self._clock()
        self._active_at = now
        if self._last_sync is not None and now - self._last_sync > 2 * self.config.flush_interval_s:
            await self._refresh()  # the replica was idle: its key table may be older than a revocation
        try:
            return check_key(self._keys, authorization, self._clock())
        except AuthenticationError as exc:
            if exc.code != "invalid_api_key" or not authorization:
                raise
        await self._refresh()
        return check_key(self._keys, authorization, self._clock())

    async def require_admin(self, authorization: str | None) -> KeyRecord:
        key = await self.authenticate(authorization)
        if key.role != "admin":
            raise PermissionDeniedError("This route needs an admin key.")
        return key

    def service_tier(self, key: KeyRecord, requested: str | None) -> TierChoice:
        """The tier a request of `key`'s tenant runs at (its plan's default for None or `auto`), or a 403 when its plan
        does not offer `requested`."""
        plans = self.config.plans
        return choose_tier(plans.get(key.plan) or plans[self.config.default_plan], requested)

    async def admit(
        self, key: KeyRecord, request_id: str, model: str, version: str, kind: str, price: Price, prompt_tokens: int, max_tokens: int, n: int = 1, end_user: str = "",
        service_tier: str = "default",
    ) -> Ticket:
        """Reserve the request's worst case and its request slot from the tenant's lease, asking the actor only when it runs dry.

        The ingress admits a one-token placeholder before tokenizing (the request slot, so a tenant at its
        limits gets nothing tokenized) and `resize`s to the true worst case once the prompt is tokenized.
        `price` is the list price; the request is quoted at `service_tier`'s multiple of it."""
        self._active_at = self._clock()
        q = quote(self.config.price_book.for_tier(price, service_tier), prompt_tokens, max_tokens, n)
        reservation = await self._reserve(key.tenant, q, slot=True)
        key_reservation = None
        if key.limited:  # the key's own limits, inside the tenant's: both must admit it
            try:
                key_reservation = await self._reserve(key.subject, q, slot=True)
            except BaseException:
                release(self._leases[key.tenant], reservation)
                raise
        return Ticket(request_id, key, model, version, kind, reservation, self.holder, end_user, key_reservation, service_tier)

    async def resize(self, ticket: Ticket, prompt_tokens: int, max_tokens: int, n: int = 1) -> Ticket:
        """The ticket for the request's true worst case (no second request slot), then the old reservation is given
        back. If the new one cannot be had (a 429), the old ticket still holds its reservation: `release` it."""
        r, kr = ticket.reservation, ticket.key_reservation
        q = Quote(r.quote.prompt_price, r.quote.completion_price, prompt_tokens, max_tokens * n, r.quote.cached_price)
        new = await self._reserve(r.tenant, q, slot=False)
        new_key = None
        if kr is not None:
            try:
                new_key = await self._reserve(kr.tenant, q, slot=False)
            except BaseException:
                release(self._leases[r.tenant], new)
                raise
            release(self._leases[kr.tenant], kr)
        release(self._leases[r.tenant], r)
        return replace(ticket, reservation=new, key_reservation=new_key)

    def release(self, ticket: Ticket) -> None:
        """A request refused before it ran (bad input, context too long): nothing to bill; its request slot stays used."""
        for r in (ticket.reservation, ticket.key_reservation):
            if r is not None:
                release(self._leases[r.tenant], r)

    async def _reserve(self, tenant: str, q: Quote, slot: bool) -> Reservation:
        self._require_fresh()  # the actor may have dropped this replica's leases
        self._hints[tenant] = q
        for attempt in range(4):
            now = self._clock()
            lease = self._leases[tenant]
            lease.roll(period_of(now), window_of(now))
            if shortfall(lease, tenant, q, slot) is None:
                return reserve(lease, tenant, q, slot)
            reply = await self._sync(need=(tenant, q, slot))
            if reply is None:
                raise ServiceUnavailableError("The billing service is unavailable; retry shortly.", headers={"Retry-After": "1"})
            grant = next((g for g in reply.grants if g.tenant == tenant), None)
            if grant is not None and grant.denied == "warming_up":
                await asyncio.sleep(grant.retry_after_s)
            elif grant is not None and grant.denied:
                own = split_subject(tenant)[1] is not None
                raise _denial(grant.denied, f"This API key's own limit: {grant.message}" if own else grant.message, grant.retry_after_s)
        raise ServiceUnavailableError("Could not reserve quota; retry shortly.", headers={"Retry-After": "1"})

    def key_by_id(self, key_id: str) -> KeyRecord:
        """A valid key of this replica's table by its id (a batch runs as the key that created it), or a 401 once it is
        revoked or expired."""
        self._require_fresh()
        key = next((k for k in self._keys.values() if k.key_id == key_id), None)
        if key is None or not key.valid_at(self._clock()):
            raise AuthenticationError(f"The API key `{key_id}` that created this batch is revoked or expired.", code="invalid_api_key")
        return key

    def rate_state(self, tenant: str) -> RateState | None:
        """The tenant's rate limits and what remains this minute, as this replica sees them (None: nothing known yet)."""
        lease = self._leases.get(tenant)
        return rate_state(lease, self._clock()) if lease is not None else None

    def settle(self, ticket: Ticket, prompt_tokens: int, completion_tokens: int | None, status: str, delivered_tokens: int = 0, cached_tokens: int = 0) -> None:
        """End of a request: release the reservation and queue the ingress's report of it.

        `completion_tokens` is the usage its response carried; None when it ended without one (the engine's
        count follows), and then `delivered_tokens` is what reached the client, the floor billed meanwhile.
        `cached_tokens`: of the prompt's, those the engine's prefix cache held (its count, from the usage)."""
        r = ticket.reservation
        settle(self._leases[r.tenant], r, completion_tokens, cached_tokens, prompt_tokens)
        if ticket.key_reservation is not None:
            settle(self._leases[ticket.key_reservation.tenant], ticket.key_reservation, completion_tokens, cached_tokens, prompt_tokens)
        self._outbox.add(ticket.context().event(ticket.request_id, self._clock(), status, prompt_tokens, completion_tokens, delivered_tokens, cached_tokens))

    # ---- the channel to the actor ------------------------------------------------------------

    async def _sync(self, need: tuple[str, Quote, bool] | None = None) -> SyncReply | None:
        """One message to the actor: the oldest batch of events, the leases held, asks, and key changes back."""
        _, reply = await self._outbox.send_batch(need)
        self._on_outbox(len(self._outbox))
        return reply

    async def _send(self, events: list[UsageEvent], need: tuple[str, Quote, bool] | None) -> SyncReply:
        now = self._clock()
        asks = self._asks(now, need)
        claims = self._claims(unsent=self._outbox.pending(skip=len(events)))
        reply = await self._transport.sync(SyncRequest(self.holder, events, claims, asks, self._keys_seq))
        for grant in reply.grants:
            self._leases[grant.tenant].apply(grant)
        for key in reply.keys:
            self._keys[key.key_hash] = key
        self._keys_seq = max(self._keys_seq, reply.keys_seq)
        self.synced = True
        self._last_sync = self._clock()
        self._synced_event.set()
        return reply

    def _asks(self, now: float, need: tuple[str, Quote, bool] | None) -> list[Ask]:
        period, window = period_of(now), window_of(now)
        asks: dict[str, Ask] = {}
        for tenant, lease in self._leases.items():
            lease.roll(period, window)
            if need is not None and tenant == need[0]:
                ask = shortfall(lease, tenant, need[1], need[2])
            elif tenant in self._hints and now - lease.last_used < self.config.lease.idle_release_s:
                ask = refill(lease, tenant, self._hints[tenant], self.config.lease.refill_below)
            else:
                if lease.budget:  # idle: hand the unused budget back
                    lease.budget = ZERO
                ask = None
            if ask is not None:
                asks[tenant] = ask
        if need is not None and need[0] not in self._leases:
            lease = self._leases[need[0]]
            lease.roll(period, window)
            ask = shortfall(lease, need[0], need[1], need[2])
            if ask is not None:
                asks[need[0]] = ask
        return list(asks.values())

    def _claims(self, unsent: list[UsageEvent]) -> list[Claim]:
        """Leases held, plus what settled requests not in this message will cost (so nothing is undercounted)."""
        extra: dict[tuple[str, str], Decimal] = defaultdict(lambda: ZERO)
        for e in unsent:
            amount = Decimal(e.reserved) if e.completion_tokens is None else e.amount()
            extra[(e.tenant, period_of(e.ts))] += amount
            subject = key_subject(e.tenant, e.key_id)
            if subject in self._leases:  # a key with limits of its own: its lease claims it too
                extra[(subject, period_of(e.ts))] += amount
        claims = [Claim(t, lease.period, lease.claim() + extra.pop((t, lease.period), ZERO)) for t, lease in self._leases.items()]
        claims += [Claim(t, p, a) for (t, p), a in extra.items()]
        return [c for c in claims if c.amount]


def _denial(reason: str, message: str, retry_after_s: float) -> Exception:
    if reason == "insufficient_quota":
        return InsufficientQuotaError(message)
    return RateLimitError(message, limit_type=reason, retry_after_s=retry_after_s)


class EngineWitness:
    """The generator's side of billing: each request's engine count, with who pays for it, sent until acknowledged.

    The second witness (`billing.witness`): the ledger gets every request's usage even when the ingress that
    admitted it dies with its own report unsent.  Batched like the ingress's outbox: one message per flush."""

    def __init__(self, send: Callable[[list[UsageEvent]], Awaitable[Any]], flush_interval_s: float, max_batch: int = 5000, clock: Callable[[], float] = time.time):
        self._outbox: Outbox[UsageEvent] = Outbox(send, max_batch, "engine reports")
        self._interval = flush_interval_s
        self._clock = clock
        self._task: asyncio.Task | None = None

    def report(self, request_id: str, context: BillingContext | None, prompt_tokens: int, produced: int, finished: bool, cached_tokens: int = 0) -> None:
        """A request left the engine (`finished`, or aborted) having produced `produced` tokens, `cached_tokens` of its
        prompt held by the prefix cache; unbilled requests (no context) are skipped."""
        if context is None:
            return
        self._outbox.add(context.event(request_id, self._clock(), "ok" if finished else "aborted", prompt_tokens, produced, cached_tokens=cached_tokens))
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(run_periodically(self._interval, self._outbox.flush))

    async def flush(self) -> bool:
        return await self._outbox.flush()

    def __len__(self) -> int:
        return len(self._outbox)
