"""A simulated engine for capacity tests: steps every running request at a fixed pace, no model.

`PacedEngine` has the generator logic's interface (`deployments.core.generator.VLLMGenerator`:
`start`, `ready`, `generate`, `stats`, `shutdown`), so the real Serve graph can run over it
(`engine.simulate_steps_per_s` in the config). Each step gives every running request one token
per choice, as a GPU engine's decode step does; at most `max_num_seqs` run at once and the rest
wait their turn. The tokens echo the prompt's own ids, so the real detokenizer has real text to
decode. It shows what the stages around an engine cost at an accelerator's pace on a machine that
has none (`bench/capacity.py`).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from dataclasses import dataclass, field
from typing import AsyncIterator, Callable

from deployments.core.generator import EngineStats
from deployments.core.types import GenerationRequest, TokenDelta

logger = logging.getLogger(__name__)


@dataclass
class _Running:
    req: GenerationRequest
    out: asyncio.Queue
    produced: list[int] = field(default_factory=list)  # tokens so far, per choice

    def step(self) -> list[TokenDelta]:
        deltas: list[TokenDelta] = []
        ids = self.req.prompt_token_ids
        for index, count in enumerate(self.produced):
            if count >= self.req.max_tokens:
                continue
            self.produced[index] = count + 1
            deltas.append((index, [ids[count % len(ids)]], "length" if count + 1 >= self.req.max_tokens else None))
        return deltas

    @property
    def done(self) -> bool:
        return all(count >= self.req.max_tokens for count in self.produced)


class PacedEngine:
    """`steps_per_s` engine steps a second, one token per running choice each step, `max_num_seqs` requests at once."""

    def __init__(self, steps_per_s: float, max_num_seqs: int, on_end: Callable[[GenerationRequest, int, bool], None] | None = None):
        self._interval = 1.0 / steps_per_s
        self._max_num_seqs = max_num_seqs
        self._on_end = on_end
        self._waiting: deque[_Running] = deque()
        self._running: dict[str, _Running] = {}
        self._stepper: asyncio.Task | None = None
        self._started = self._finished = self._aborted = 0
        self._recent_aborted: deque[str] = deque(maxlen=256)
        self._ready = False
        self.steps = 0

    def start(self) -> None:
        self._ready = True
        logger.info("simulated engine ready: %.0f steps/s, %d sequences at once", 1 / self._interval, self._max_num_seqs)

    @property
    def ready(self) -> bool:
        return self._ready

    async def generate(self, req: GenerationRequest, priority: int = 0) -> AsyncIterator[list[TokenDelta]]:
        """Stream `[(choice index, new token ids, finish reason), ...]`, one message per step, until every choice finishes.
        `priority` is taken and not used: the generator's queue (`deployments.core.scheduling`) orders what enters."""
        run = _Running(req, asyncio.Queue(), [0] * req.n)
        self._started += 1
        self._waiting.append(run)
        if self._stepper is None or self._stepper.done():
            self._stepper = asyncio.get_running_loop().create_task(self._step_loop())
        try:
            while True:
                deltas = await run.out.get()
                yield deltas
                if run.done and run.out.empty():
                    break
            self._finished += 1
        finally:
            if not run.done:
                self._aborted += 1
                self._recent_aborted.append(req.request_id)
            if self._on_end is not None:
                self._on_end(req, sum(run.produced), run.done)
            self._running.pop(req.request_id, None)
            if run in self._waiting:
                self._waiting.remove(run)

    async def _step_loop(self) -> None:
        next_step = time.monotonic()
        while self._running or self._waiting:
            while self._waiting and len(self._running) < self._max_num_seqs:
                run = self._waiting.popleft()
                self._running[run.req.request_id] = run
            for rid, run in list(self._running.items()):
                run.out.put_nowait(run.step())
                if run.done:
                    del self._running[rid]
            self.steps += 1
            next_step += self._interval
            delay = next_step - time.monotonic()
            if delay < 0:  # behind (the replica's loop is busy): keep the pace from now, do not burst to catch up
                next_step, delay = time.monotonic(), 0.0
            await asyncio.sleep(delay)

    def stats(self) -> EngineStats:
        return EngineStats(
            ready=self._ready,
            running=len(self._running) + len(self._waiting),
            started_total=self._started,
            finished_total=self._finished,
            aborted_total=self._aborted,
            recent_aborted=list(self._recent_aborted),
            startup_s=0.0,
            aborted_tokens={},
        )

    def shutdown(self) -> None:
        if self._stepper is not None:
            self._stepper.cancel()
        self._ready = False
