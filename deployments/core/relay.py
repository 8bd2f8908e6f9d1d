"""Batched return path between two stages: per engine step, one message per downstream replica.

Serve routes every request on its own (health, autoscaling, cancellation and drains stay
Serve's), but a per-request stream costs one message per request per step, so messages grow
with concurrency.  Here a request's own stream carries only control: `Hello` when the
downstream replica (the *consumer*) has no carrier on this replica yet, and `End` last.
Its items (token deltas, SSE chunks) go into the consumer's `Outbox`, and one long-lived
*carrier* stream per (upstream replica, consumer) takes everything waiting each time it
runs: the items of every request that advanced in one engine step travel as one message.

No timers: the carrier wakes when the first item of a step arrives and runs after the
other requests woken by the same step (asyncio's ready queue is FIFO), so a step's items
leave together and nothing waits for a later step.  A carrier ends when its consumer has
no open request here, so a replica being drained is not held open by it; the next request
says `Hello` again and the consumer opens a new carrier (`epoch` tells a fresh carrier
from a stale one).

A request never waits for a carrier: what the carrier has not taken when the request ends
leaves in its `End` (so a replica whose every slot is taken cannot deadlock waiting for a
carrier Serve cannot route to it; until the carrier comes, items wait for it or the end).

Ordering: carried batches are numbered per upstream replica; `End` names the last batch
that carried an item of the request and the carrier (epoch) that carried it, and the
consumer hands over End's own items and ends the request only once that carrier has
brought that batch (a request's control stream and the carrier are different streams).
Only one carrier's stream is ordered, so what has arrived is counted per epoch: an old
carrier's last batch may still be on its way when a newer carrier's first one is in.  An
error raised upstream after some items arrives after them, the same way.

One wake per engine step, not per request: a consumer that can handle a request's items as
plain calls (the postprocessor's decoding, say) uses `Receiver.consume`, and the carrier's loop
hands each batch's items to every request's handler in turn, pushing what they make into the
next stage's outbox with `Sender.put`; the requests' own tasks sleep until their request ends.

`Sender` is the upstream half, `Receiver` the downstream half; both are plain asyncio and
the Serve wrappers (`deployments.generator`, `deployments.postprocessor`,
`deployments.handles`) connect them over Serve streams.
"""

from __future__ import annotations

import asyncio
import contextvars
import itertools
import logging
from dataclasses import dataclass, field
from typing import Any, AsyncIterator, Callable

logger = logging.getLogger(__name__)

Batch = tuple[int, dict[str, list[Any]]]  # (sequence number, {request id: items in order})


@dataclass(frozen=True)
class Hello:
    """The consumer has no carrier on `replica`: open one with this `epoch`."""

    replica: str
    epoch: int


@dataclass(frozen=True)
class End:
    """The request ended: its items up to batch `seq` of `replica` were carried (0: none) by the carrier of
    `epoch`, `items` are the rest. With `failed`, the request's error is the next thing its control stream raises."""

    replica: str
    seq: int
    items: list[Any] = field(default_factory=list)
    failed: bool = False
    epoch: int = 0


class _Outbox:
    """What one consumer has waiting on this replica, and its carrier's state."""

    def __init__(self, epoch: int) -> None:
        self.pending: dict[str, list[Any]] = {}
        self.open: set[str] = set()  # requests of this consumer running here
        self.last: dict[str, tuple[int, int]] = {}  # request id -> (epoch, batch) that carried its latest item
        self.wake = asyncio.Event()
        self.carried = False
        self.epoch = epoch  # the carrier this outbox waits for; a new one each time a carrier ends


class Sender:
    """The upstream half: runs each request's items into its consumer's outbox and serves the carriers."""

    def __init__(self, replica: str):
        self.replica = replica
        self._boxes: dict[str, _Outbox] = {}
        self._seq = 0  # batch numbers, monotonic over every consumer and carrier of this replica
        self._epochs = itertools.count(1)  # carrier epochs, monotonic too: a consumer never mistakes an old carrier for a new one
        self.requests = 0
        self.batches_sent = 0  # carrier messages
        self.items_sent = 0  # items they carried
        self.items_in_ends = 0  # items that left with their request's End instead

    def stats(self) -> dict[str, int]:
        return {"requests": self.requests, "batches_sent": self.batches_sent, "items_sent": self.items_sent, "items_in_ends": self.items_in_ends}

    async def serve(self, consumer: str, request_id: str, items: AsyncIterator[Any]) -> AsyncIterator[Hello | End]:
        """One request's control stream: `Hello` first when `consumer` has no carrier here, `End` last.

        Its items go to the carrier. Closing or cancelling this stream closes `items` (for the
        generator, that aborts the engine request) and drops what was not carried yet.
        """
        box = self._boxes.get(consumer)
        if box is None:
            box = self._boxes[consumer] = _Outbox(next(self._epochs))
        box.open.add(request_id)
        self.requests += 1
        try:
            if not box.carried:
                yield Hello(self.replica, box.epoch)
            error: BaseException | None = None
            try:
                async for item in items:
                    _put(box, request_id, item)
            except Exception as exc:  # in-band: delivered after the items before it
                error = exc
            # What the carrier has not taken yet leaves with End: a request never waits for a carrier,
            # so a replica full of requests cannot wait on a carrier that Serve cannot route to it.
            rest = box.pending.pop(request_id, [])
            self.items_in_ends += len(rest)
            epoch, seq = box.last.get(request_id, (0, 0))
            yield End(self.replica, seq, rest, error is not None, epoch)
            if error is not None:
                raise error
        finally:
            close = getattr(items, "aclose", None)
            if close is not None:
                await close()  # now, not when collected: for the generator, the engine request is aborted here
            box.open.discard(request_id)
            box.pending.pop(request_id, None)
            box.last.pop(request_id, None)
            box.wake.set()  # an idle carrier ends
            if not box.open and not box.carried and not box.pending:
                self._boxes.pop(consumer, None)

    def put(self, consumer: str, request_id: str, item: Any) -> None:
        """Add an item to a request being served (`serve`), from outside its item stream: a plain call, in order
        with the items the stream yields. Ignored once the request has ended."""
        box = self._boxes.get(consumer)
        if box is not None and request_id in box.open:
            _put(box, request_id, item)

    async def carry(self, consumer: str, epoch: int) -> AsyncIterator[Batch]:
        """The carrier for `consumer`: every batch waiting each time it wakes, until the consumer has no open request here.

        A carrier for an old epoch, or a second one for the current epoch, ends at once.
        """
        box = self._boxes.get(consumer)
        if box is None or box.carried or epoch != box.epoch:
            return
        box.carried = True
        try:
            while True:
                if box.pending:
                    self._seq += 1
                    batch, box.pending = box.pending, {}
                    for request_id, items in batch.items():
                        box.last[request_id] = (epoch, self._seq)
                        self.items_sent += len(items)
                    self.batches_sent += 1
                    yield self._seq, batch
                elif not box.open:
                    return
                else:
                    box.wake.clear()
                    await box.wake.wait()
        finally:
            box.carried = False
            box.epoch = next(self._epochs)
            if not box.open and not box.pending:
                self._boxes.pop(consumer, None)


def _put(box: _Outbox, request_id: str, item: Any) -> None:
    box.pending.setdefault(request_id, []).append(item)
    box.wake.set()


_END = object()


class _Handler:
    """A request's inbox for `Receiver.consume`: its items go to a plain function in the carrier's loop."""

    def __init__(self, on_items: Callable[[list[Any]], bool]):
        self._on_items = on_items
        self.done: asyncio.Future = asyncio.get_running_loop().create_future()

    def put_nowait(self, what: Any) -> None:
        if self.done.done():
            return
        if what is _END:
            self.done.set_result(None)
        elif isinstance(what, BaseException):
            self.done.set_exception(what)
        else:
            try:
                if self._on_items(what):
                    self.done.set_result(None)
            except Exception as exc:  # the request's own failure; the carrier goes on with the others
                self.done.set_exception(exc)


@dataclass
class _Carrier:
    epoch: int  # the newest epoch opened; a Hello for it or an older one opens nothing
    first: int  # the first epoch this record knows: an End naming an older one lost its carrier
    tasks: set[asyncio.Task] = field(default_factory=set)  # carriers still streaming (an older one may still bring its last batches)
    received: dict[int, int] = field(default_factory=dict)  # epoch -> highest batch its carrier has handed over (each carrier is ordered)
    ended: set[int] = field(default_factory=set)  # epochs whose carrier has ended (recent ones)
    ends: dict[str, tuple[int, int, tuple[Any, ...]]] = field(default_factory=dict)  # request id -> (epoch, batch to wait for, what to deliver then)

    def forget_old(self, keep: int = 64) -> None:
        """Bound the per-epoch records: an End naming a forgotten epoch fails (its carrier ended long ago)."""
        if len(self.ended) > keep:
            for epoch in sorted(self.ended)[: len(self.ended) - keep]:
                self.ended.discard(epoch)
                self.received.pop(epoch, None)
                self.first = max(self.first, epoch + 1)


class Receiver:
    """The downstream half: one carrier per upstream replica, each request's items handed to it in order.

    `open_carrier(replica, epoch)` opens the carrier stream to that one replica (Serve routes it there).
    """

    def __init__(self, open_carrier: Callable[[str, int], AsyncIterator[Batch]]):
        self._open_carrier = open_carrier
        self._carriers: dict[str, _Carrier] = {}
        self._inboxes: dict[str, asyncio.Queue | _Handler] = {}

    async def receive(self, request_id: str, control: AsyncIterator[Hello | End]) -> AsyncIterator[Any]:
        """The request's items in order; `control` is its own stream from the upstream stage.

        Closing this iterator closes `control` (which cancels the request upstream). An error raised by
        `control` (the upstream replica died, or the request failed there) is raised here, after any
        items that came before it.
        """
        inbox: asyncio.Queue = asyncio.Queue()
        self._inboxes[request_id] = inbox
        pump = asyncio.get_running_loop().create_task(self._follow(request_id, control, inbox))
        try:
            while True:
                item = await inbox.get()
                if item is _END:
                    return
                if isinstance(item, BaseException):
                    raise item
                for one in item:
                    yield one
        finally:
            await self._forget(request_id, pump)

    async def consume(self, request_id: str, control: AsyncIterator[Hello | End], on_items: Callable[[list[Any]], bool]) -> None:
        """`receive` without a wake per item: `on_items` gets each batch's items for the request, called in the
        carrier's loop (so it must not block); returns when the request ended, or as soon as `on_items` returns
        True (it has all it wants: `control` is closed, which cancels the request upstream). Raises what
        `receive` would raise, or what `on_items` raised."""
        handler = _Handler(on_items)
        self._inboxes[request_id] = handler
        pump = asyncio.get_running_loop().create_task(self._follow(request_id, control, handler))
        try:
            await handler.done
        finally:
            await self._forget(request_id, pump)

    async def _forget(self, request_id: str, pump: asyncio.Task) -> None:
        self._inboxes.pop(request_id, None)
        for carrier in self._carriers.values():
            carrier.ends.pop(request_id, None)
        if not pump.done():
            pump.cancel()
            await asyncio.gather(pump, return_exceptions=True)

    async def _follow(self, request_id: str, control: AsyncIterator[Hello | End], inbox: asyncio.Queue | _Handler) -> None:
        end: End | None = None
        try:
            async for message in control:
                if isinstance(message, Hello):
                    self._hello(message)
                else:
                    end = message
                    if not message.failed:
                        self._end_after(message, request_id, _END)
        except asyncio.CancelledError:
            raise
        except BaseException as exc:
            if end is not None and end.failed:
                self._end_after(end, request_id, exc)  # the request's own error, after its items
            else:
                inbox.put_nowait(exc)  # the upstream replica or the call failed: at once
            return
        if end is None:
            inbox.put_nowait(RuntimeError("The upstream stage ended a request without saying so."))
        elif end.failed:
            self._end_after(end, request_id, RuntimeError("The upstream stage failed a request without an error."))

    def _hello(self, hello: Hello) -> None:
        carrier = self._carriers.get(hello.replica)
        if carrier is None:
            carrier = self._carriers[hello.replica] = _Carrier(hello.epoch, hello.epoch)
        elif hello.epoch <= carrier.epoch:
            return  # opened already, or stale (a late Hello: the upstream has moved past that epoch)
        carrier.epoch = hello.epoch
        # A fresh context: the carrier serves every request of that replica, so it must not belong to the request
        # whose Hello opened it (Serve cancels the calls a request made when that request is cancelled).
        task = asyncio.get_running_loop().create_task(self._carry(hello.replica, hello.epoch, carrier), context=contextvars.Context())
        carrier.tasks.add(task)

    def _end_after(self, end: End, request_id: str, last: Any) -> None:
        """Deliver the End's own items and then `last` (the end marker or the request's error) once batch `end.seq`
        of carrier `end.epoch` is in."""
        carrier = self._carriers.get(end.replica)
        if request_id not in self._inboxes:
            return
        what = (end.items, last) if end.items else (last,)
        if end.seq == 0 or (carrier is not None and carrier.received.get(end.epoch, 0) >= end.seq):
            self._deliver(request_id, what)
        elif carrier is None or end.epoch < carrier.first or end.epoch in carrier.ended:
            self._deliver(request_id, (RuntimeError(f"No carrier from replica {end.replica} brought the last items of a request it ended."),))
        else:
            carrier.ends[request_id] = (end.epoch, end.seq, what)

    def _deliver(self, request_id: str, what: tuple[Any, ...]) -> None:
        """Hand items (a list), the end marker or an error to a request still being received."""
        inbox = self._inboxes.get(request_id)
        if inbox is not None:
            for one in what:
                inbox.put_nowait(one)

    async def _carry(self, replica: str, epoch: int, carrier: _Carrier) -> None:
        error: BaseException | None = None
        try:
            async for seq, batch in self._open_carrier(replica, epoch):
                for request_id, items in batch.items():
                    self._deliver(request_id, (items,))
                carrier.received[epoch] = seq
                if carrier.ends:
                    for request_id, (at, wait_for, what) in list(carrier.ends.items()):
                        if at == epoch and wait_for <= seq:
                            del carrier.ends[request_id]
                            self._deliver(request_id, what)
        except asyncio.CancelledError:
            raise
        except BaseException as exc:
            error = exc
            logger.warning("carrier from replica %s failed: %s", replica, exc)
        finally:
            carrier.tasks.discard(asyncio.current_task())  # type: ignore[arg-type]
            carrier.ended.add(epoch)
            # No other carrier brings this one's batches: what still waits for them ends with the error.
            for request_id, (at, _, _) in list(carrier.ends.items()):
                if at == epoch:
                    del carrier.ends[request_id]
                    self._deliver(request_id, (error or RuntimeError(f"The carrier from replica {replica} ended before a request's last items."),))
            carrier.forget_old()
            if error is not None and self._carriers.get(replica) is carrier:
                self._carriers.pop(replica, None)
                for task in carrier.tasks:  # the replica is gone or failing: the next Hello starts afresh
                    task.cancel()

    async def close(self) -> None:
        """Stop every carrier (the replica is shutting down)."""
        tasks = [t for c in self._carriers.values() for t in c.tasks if not t.done()]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
