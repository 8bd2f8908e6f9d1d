"""The batched return path (deployments.core.relay), wired in one process: a Sender's streams read directly by a Receiver."""

from __future__ import annotations

import asyncio

import pytest

from deployments.core.relay import End, Hello, Receiver, Sender


class SteppingEngine:
    """Wakes every running request once per step, as vLLM's output handler does: one item per request per step."""

    def __init__(self) -> None:
        self.queues: dict[str, asyncio.Queue] = {}
        self.closed: list[str] = []

    async def run(self, request_id: str, n: int, fail_after: int | None = None):
        q = self.queues[request_id] = asyncio.Queue()
        try:
            for i in range(n):
                step = await q.get()
                if fail_after is not None and i == fail_after:
                    raise ValueError("bad request")
                yield (request_id, i, step)
        finally:
            self.queues.pop(request_id, None)
            self.closed.append(request_id)

    async def step(self, number: int) -> None:
        for q in list(self.queues.values()):
            q.put_nowait(number)
        for _ in range(5):
            await asyncio.sleep(0)  # let the woken requests and the carrier run


def wire(sender: Sender, consumer: str = "pp-1") -> tuple[Receiver, list[tuple[str, int]]]:
    opened: list[tuple[str, int]] = []

    def open_carrier(replica: str, epoch: int):
        assert replica == sender.replica
        opened.append((replica, epoch))
        return sender.carry(consumer, epoch)

    return Receiver(open_carrier), opened


async def collect(receiver: Receiver, sender: Sender, engine: SteppingEngine, rid: str, n: int, **kw) -> list:
    return [item async for item in receiver.receive(rid, sender.serve("pp-1", rid, engine.run(rid, n, **kw)))]


def test_the_items_of_one_step_travel_as_one_message_whatever_the_concurrency():
    async def main():
        engine, sender = SteppingEngine(), Sender("gen-1")
        receiver, opened = wire(sender)
        tasks = [asyncio.create_task(collect(receiver, sender, engine, f"r{i}", 10)) for i in range(32)]
        for _ in range(5):
            await asyncio.sleep(0)
        for step in range(10):
            await engine.step(step)
        results = await asyncio.gather(*tasks)
        for i, items in enumerate(results):
            assert items == [(f"r{i}", k, k) for k in range(10)]  # every item, in order
        assert sender.items_sent == 9 * 32  # the last step's items left with each request's End
        assert sender.batches_sent == 9  # one message per step, not 32
        assert len(opened) == 1  # one carrier for the pair

    asyncio.run(main())


def test_the_carrier_ends_when_idle_and_the_next_request_opens_a_new_one():
    async def main():
        engine, sender = SteppingEngine(), Sender("gen-1")
        receiver, opened = wire(sender)
        for round_ in range(3):
            task = asyncio.create_task(collect(receiver, sender, engine, f"r{round_}", 2))
            for _ in range(5):
                await asyncio.sleep(0)
            await engine.step(0)
            await engine.step(1)
            assert await task == [(f"r{round_}", 0, 0), (f"r{round_}", 1, 1)]
            for _ in range(5):
                await asyncio.sleep(0)
            assert sender._boxes == {}  # nothing held for an idle consumer: a drained replica is not kept open
        assert len(opened) == 3 and len({epoch for _, epoch in opened}) == 3

    asyncio.run(main())


def test_closing_the_receiving_end_closes_the_request_upstream_and_no_other():
    async def main():
        engine, sender = SteppingEngine(), Sender("gen-1")
        receiver, _ = wire(sender)
        keep = asyncio.create_task(collect(receiver, sender, engine, "keep", 4))
        stream = receiver.receive("gone", sender.serve("pp-1", "gone", engine.run("gone", 100)))
        first = asyncio.create_task(stream.__anext__())
        for _ in range(5):
            await asyncio.sleep(0)
        await engine.step(0)
        assert await first == ("gone", 0, 0)
        await stream.aclose()  # the client hung up
        for _ in range(5):
            await asyncio.sleep(0)
        assert "gone" in engine.closed  # the engine request was aborted
        for step in range(1, 4):
            await engine.step(step)
        assert await keep == [("keep", k, k) for k in range(4)]

    asyncio.run(main())


def test_an_error_upstream_arrives_after_the_items_before_it():
    async def main():
        engine, sender = SteppingEngine(), Sender("gen-1")
        receiver, _ = wire(sender)
        got: list = []

        async def consume():
            async for item in receiver.receive("r", sender.serve("pp-1", "r", engine.run("r", 5, fail_after=3))):
                got.append(item)

        task = asyncio.create_task(consume())
        for _ in range(5):
            await asyncio.sleep(0)
        for step in range(4):
            await engine.step(step)
        with pytest.raises(ValueError, match="bad request"):
            await task
        assert got == [("r", k, k) for k in range(3)]

    asyncio.run(main())


def test_a_dead_upstream_replica_fails_its_requests_at_once():
    async def main():
        receiver = Receiver(lambda replica, epoch: _never())

        async def dying_control():
            yield Hello("gen-9", 1)
            raise ConnectionError("replica died")

        with pytest.raises(ConnectionError):
            async for _ in receiver.receive("r", dying_control()):
                pass

    async def _never():
        await asyncio.Event().wait()
        yield None

    asyncio.run(main())


def test_an_end_that_overtakes_its_last_batch_waits_for_it():
    async def main():
        release = asyncio.Event()

        async def slow_carrier(replica, epoch):
            await release.wait()
            yield 7, {"r": ["a", "b"]}

        async def control():
            yield Hello("gen-1", 1)
            yield End("gen-1", 7, epoch=1)

        receiver = Receiver(slow_carrier)
        task = asyncio.create_task(_all(receiver.receive("r", control())))
        for _ in range(10):
            await asyncio.sleep(0)
        assert not task.done()  # End came first; the items are still on their way
        release.set()
        assert await task == ["a", "b"]

    async def _all(it):
        return [x async for x in it]

    asyncio.run(main())


def test_a_request_never_waits_for_its_carrier():
    """A replica whose every slot is taken cannot get a carrier routed to it: its requests end with their items in End."""

    async def main():
        engine, sender = SteppingEngine(), Sender("gen-1")
        opened: list[int] = []

        async def unroutable(replica, epoch):
            opened.append(epoch)
            await asyncio.Event().wait()  # queued behind full slots, forever
            yield None

        receiver = Receiver(unroutable)
        tasks = [asyncio.create_task(collect(receiver, sender, engine, f"r{i}", 3)) for i in range(4)]
        for _ in range(5):
            await asyncio.sleep(0)
        for step in range(3):
            await engine.step(step)
        results = await asyncio.wait_for(asyncio.gather(*tasks), 5)
        assert results == [[(f"r{i}", k, k) for k in range(3)] for i in range(4)]
        assert opened and sender.batches_sent == 0
        await receiver.close()

    asyncio.run(main())


def test_a_newer_carrier_that_ends_at_once_does_not_fail_what_an_older_one_still_carries():
    """Seen at 1024 streams: the old carrier ended upstream but its last batch was still on the way when a new
    request's Hello opened a newer carrier, which the upstream had already moved past (it ended at once)."""

    async def main():
        release = asyncio.Event()
        opened: list[int] = []

        async def open_carrier(replica: str, epoch: int):
            opened.append(epoch)
            if epoch == 1:
                await release.wait()  # the old carrier's last batch is slow
                yield 1, {"r": ["last item"]}
            else:
                await asyncio.sleep(0.02)  # epoch 2: the upstream had already moved on; it ends (here, after r's End is in)

        async def control_r():
            yield Hello("gen-1", 1)
            await asyncio.sleep(0.01)
            yield End("gen-1", 1, epoch=1)  # its last item went in batch 1

        async def control_s():
            yield Hello("gen-1", 2)
            await asyncio.sleep(0.04)
            yield Hello("gen-1", 1)  # a stale Hello, late: opens nothing
            yield End("gen-1", 0, ["s item"])

        receiver = Receiver(open_carrier)
        got_r = asyncio.create_task(_items(receiver.receive("r", control_r())))
        await asyncio.sleep(0.005)
        got_s = asyncio.create_task(_items(receiver.receive("s", control_s())))
        await asyncio.sleep(0.08)
        release.set()
        return await got_r, await got_s, opened

    r, s, opened = asyncio.run(main())
    assert r == ["last item"] and s == ["s item"]
    assert opened == [1, 2]


async def _items(stream) -> list:
    return [item async for item in stream]


def test_a_newer_carriers_batch_does_not_stand_for_an_older_carriers_late_one():
    """Seen in the soak: two streams ended without their last piece. The old carrier's last batch (5) was still on
    its way when the newer carrier's batch 6 arrived; counting "received up to 6" over both carriers let the End
    waiting for batch 5 deliver the end marker first, and the late items were dropped."""

    async def main():
        release = asyncio.Event()

        async def open_carrier(replica: str, epoch: int):
            if epoch == 1:
                await release.wait()  # the old carrier's last batch is slow
                yield 5, {"r": ["r last"]}
            else:
                yield 6, {"s": ["s first"]}
                await release.wait()

        async def control_r():
            yield Hello("gen-1", 1)
            await asyncio.sleep(0.02)  # after batch 6 of the newer carrier is in
            yield End("gen-1", 5, epoch=1)

        async def control_s():
            await asyncio.sleep(0.005)
            yield Hello("gen-1", 2)
            await asyncio.sleep(0.05)
            yield End("gen-1", 6, ["s end"], epoch=2)

        receiver = Receiver(open_carrier)
        got_r = asyncio.create_task(_items(receiver.receive("r", control_r())))
        got_s = asyncio.create_task(_items(receiver.receive("s", control_s())))
        await asyncio.sleep(0.04)
        assert not got_r.done()  # its End is in, but its last batch is not
        release.set()
        assert await asyncio.wait_for(got_r, 2) == ["r last"]
        assert await asyncio.wait_for(got_s, 2) == ["s first", "s end"]
        await receiver.close()

    asyncio.run(main())


def test_a_carrier_does_not_belong_to_the_request_that_opened_it():
    """At the ingress, Serve cancels every call a request made when that request is cancelled: a carrier opened in
    a request's context died with it, and the batch it was carrying for other requests was lost (seen in the soak)."""
    import contextvars

    request = contextvars.ContextVar("request", default=None)
    seen = []

    async def open_carrier(replica: str, epoch: int):
        seen.append(request.get())
        yield 1, {"r": ["item"]}

    async def control():
        yield Hello("gen-1", 1)
        yield End("gen-1", 1, epoch=1)

    async def main():
        request.set("http-request-1")
        receiver = Receiver(open_carrier)
        assert [x async for x in receiver.receive("r", control())] == ["item"]
        await receiver.close()

    asyncio.run(main())
    assert seen == [None]


def test_consume_hands_each_step_to_every_request_in_the_carriers_loop_with_no_wake_per_request():
    """One wake per engine step: the handlers run inside the carrier's task, and the requests' tasks sleep until the end."""

    async def main():
        engine, sender = SteppingEngine(), Sender("gen-1")
        receiver, _ = wire(sender)
        got: dict[str, list] = {}
        tasks_seen: set = set()

        def handler(rid: str):
            def on_items(items: list) -> bool:
                tasks_seen.add(asyncio.current_task())
                got.setdefault(rid, []).extend(items)
                return False
            return on_items

        tasks = [asyncio.create_task(receiver.consume(f"r{i}", sender.serve("pp-1", f"r{i}", engine.run(f"r{i}", 6)), handler(f"r{i}"))) for i in range(8)]
        for _ in range(5):
            await asyncio.sleep(0)
        for step in range(6):
            await engine.step(step)
        await asyncio.wait_for(asyncio.gather(*tasks), 5)
        await receiver.close()
        return got, tasks_seen, tasks

    got, tasks_seen, tasks = asyncio.run(main())
    assert {rid: [i for _, i, _ in items] for rid, items in got.items()} == {f"r{i}": list(range(6)) for i in range(8)}
    assert not tasks_seen & set(tasks)  # no request's own task ran a handler (items left in an End may run in a control task)


def test_consume_stops_reading_when_the_handler_has_all_it_wants_and_cancels_upstream():
    async def main():
        engine, sender = SteppingEngine(), Sender("gen-1")
        receiver, _ = wire(sender)
        seen = []

        def on_items(items: list) -> bool:
            seen.extend(items)
            return len(seen) >= 2

        task = asyncio.create_task(receiver.consume("r", sender.serve("pp-1", "r", engine.run("r", 100)), on_items))
        for step in range(4):
            await engine.step(step)
        await asyncio.wait_for(task, 5)
        for _ in range(5):
            await asyncio.sleep(0)
        await receiver.close()
        return seen, engine.closed

    seen, closed = asyncio.run(main())
    assert len(seen) >= 2
    assert closed == ["r"]  # the upstream request was closed (for the generator: the engine request aborted)


def test_consume_raises_the_upstream_error_after_the_items_before_it_and_a_handler_error_as_its_own():
    async def main():
        engine, sender = SteppingEngine(), Sender("gen-1")
        receiver, _ = wire(sender)
        seen = []
        task = asyncio.create_task(receiver.consume("r", sender.serve("pp-1", "r", engine.run("r", 5, fail_after=3)), lambda items: seen.extend(items) or False))
        for step in range(5):
            await engine.step(step)
        with pytest.raises(ValueError, match="bad request"):
            await asyncio.wait_for(task, 5)

        def bad(items: list) -> bool:
            raise KeyError("handler")

        task = asyncio.create_task(receiver.consume("s", sender.serve("pp-1", "s", engine.run("s", 5)), bad))
        for step in range(3):
            await engine.step(step)
        with pytest.raises(KeyError):
            await asyncio.wait_for(task, 5)
        await receiver.close()
        return [i for _, i, _ in seen]

    assert asyncio.run(main()) == [0, 1, 2]


def test_sender_put_adds_to_a_running_request_in_order_and_ignores_an_ended_one():
    async def main():
        engine, sender = SteppingEngine(), Sender("gen-1")
        receiver, _ = wire(sender)

        async def items():
            sender.put("pp-1", "r", "pushed-1")
            yield "yielded"
            sender.put("pp-1", "r", "pushed-2")

        got = [x async for x in receiver.receive("r", sender.serve("pp-1", "r", items()))]
        sender.put("pp-1", "r", "late")  # ended: dropped, no outbox left behind
        await receiver.close()
        return got, sender._boxes

    got, boxes = asyncio.run(main())
    assert got == ["pushed-1", "yielded", "pushed-2"]
    assert boxes == {}
