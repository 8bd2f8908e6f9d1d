"""The simulated engine (`deployments.core.paced.PacedEngine`): pace, batch bound, finish reasons, early ends."""

from __future__ import annotations

import asyncio
import time

from deployments.core.paced import PacedEngine
from deployments.core.types import GenerationRequest


def _req(rid: str, max_tokens: int, n: int = 1) -> GenerationRequest:
    return GenerationRequest(request_id=rid, model="m", kind="completion", prompt_token_ids=[5, 6, 7], max_tokens=max_tokens, created=0, n=n)


async def _collect(engine: PacedEngine, req: GenerationRequest) -> list:
    return [deltas async for deltas in engine.generate(req)]


def test_every_running_request_gets_one_token_per_choice_per_step():
    engine = PacedEngine(steps_per_s=100, max_num_seqs=8)
    engine.start()

    async def main():
        t0 = time.monotonic()
        outs = await asyncio.gather(_collect(engine, _req("a", 4)), _collect(engine, _req("b", 3, n=2)))
        return outs, time.monotonic() - t0

    (a, b), elapsed = asyncio.run(main())
    assert [d for step in a for d in step] == [(0, [5], None), (0, [6], None), (0, [7], None), (0, [5], "length")]
    assert len(b) == 3 and all(len(step) == 2 for step in b)  # both choices advance in the same step
    assert b[-1] == [(0, [7], "length"), (1, [7], "length")]
    assert 0.025 <= elapsed < 0.5  # four steps at 100 steps/s, not all at once
    assert engine.stats().finished_total == 2 and engine.steps == 4


def test_requests_beyond_max_num_seqs_wait_their_turn():
    engine = PacedEngine(steps_per_s=200, max_num_seqs=1)
    engine.start()

    async def main():
        return await asyncio.gather(_collect(engine, _req("a", 2)), _collect(engine, _req("b", 2)))

    asyncio.run(main())
    assert engine.steps == 4  # one at a time: 2 steps each


def test_a_consumer_that_leaves_early_is_reported_unfinished_with_what_was_produced():
    ended: list[tuple[str, int]] = []
    engine = PacedEngine(steps_per_s=200, max_num_seqs=4, on_end=lambda req, n, finished: ended.append((req.request_id, n)) if not finished else None)
    engine.start()

    async def main():
        stream = engine.generate(_req("gone", 100))
        await stream.__anext__()
        await stream.__anext__()
        await stream.aclose()
        await asyncio.sleep(0.02)

    asyncio.run(main())
    assert ended and ended[0][0] == "gone" and ended[0][1] >= 2
    assert engine.stats().aborted_total == 1 and engine.stats().running == 0


def test_a_request_wanted_whole_leaves_the_generator_once_with_every_steps_deltas_in_order():
    from dataclasses import replace

    from deployments.core.generator import coalesced

    engine = PacedEngine(steps_per_s=200, max_num_seqs=8)
    engine.start()

    async def run(req: GenerationRequest) -> list:
        return [deltas async for deltas in coalesced(req, engine.generate(req))]

    whole = asyncio.run(run(_req("whole", 4, n=2)))  # not streamed, no stop string: one message at the end
    assert len(whole) == 1 and [d for d in whole[0] if d[0] == 0] == [(0, [5], None), (0, [6], None), (0, [7], None), (0, [5], "length")]
    assert len(asyncio.run(run(replace(_req("streamed", 4), stream=True)))) == 4  # every step, as the client reads it
    assert len(asyncio.run(run(replace(_req("stops", 4), stop=["x"])))) == 4  # the postprocessor watches for the stop string


def test_closing_a_request_wanted_whole_aborts_it_and_reports_what_the_engine_produced():
    from deployments.core.generator import coalesced

    ended: list[tuple[str, int, bool]] = []
    engine = PacedEngine(steps_per_s=200, max_num_seqs=4, on_end=lambda req, n, finished: ended.append((req.request_id, n, finished)))
    engine.start()

    async def main():
        task = asyncio.ensure_future(coalesced(_req("gone", 100), engine.generate(_req("gone", 100))).__anext__())
        await asyncio.sleep(0.05)  # a few steps run, nothing is sent yet
        task.cancel()
        await asyncio.sleep(0.02)

    asyncio.run(main())
    assert len(ended) == 1 and ended[0][0] == "gone" and ended[0][1] >= 3 and not ended[0][2]  # engine truth, not 0
