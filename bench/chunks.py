"""Micro-benchmark of two per-token costs of the front door (issue 25), no Ray: `python -m bench.chunks`.

* rendering one streamed chunk: the dict path (`shapes.sse_chunks`: a dict per token, `json.dumps`) against the
  per-request template (`shapes.ChunkTemplate`: the fixed fields encoded once, the text by msgspec);
* one carrier message (16 requests' items of one engine step) through each serializer Serve's handles offer
  (cloudpickle is the default; `pickle` and `msgpack` are `handle.options(request_serialization=...)` choices).

Prints microseconds per operation, the median of `--repeats` runs.
"""

from __future__ import annotations

import argparse
import logging
import pickle
import statistics
import time
from typing import Any, Callable

logger = logging.getLogger("bench.chunks")


def _per_op_us(fn: Callable[[], Any], n: int, repeats: int) -> float:
    runs = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in range(n):
            fn()
        runs.append((time.perf_counter() - t0) / n * 1e6)
    return statistics.median(runs)


def main(argv: list[str] | None = None) -> int:
    import cloudpickle
    import msgpack

    from deployments.core import shapes
    from deployments.core.types import ChoiceEvent, GenerationRequest

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=20000)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    req = GenerationRequest("0" * 32, "SmolLM2-135M-Instruct", "chat", [1, 2, 3], 64, 1733000000, stream=True, include_usage=True, model_version="v1")
    events = [ChoiceEvent(0, " word", None)]
    template = shapes.ChunkTemplate(req)
    assert template.chunks(events) == shapes.sse_chunks(req, events)
    rows = [
        ("chunk: dict + json.dumps", _per_op_us(lambda: shapes.sse_chunks(req, events), args.n, args.repeats)),
        ("chunk: per-request template + msgspec", _per_op_us(lambda: template.chunks(events), args.n, args.repeats)),
    ]
    deltas = (1234, {f"{i:032x}": [(0, [1234], None)] for i in range(16)})
    sse = (1234, {f"{i:032x}": [(shapes.sse_chunks(req, events), 5)] for i in range(16)})
    for what, batch in (("token deltas", deltas), ("SSE pieces", sse)):
        for name, dumps in (("cloudpickle", cloudpickle.dumps), ("pickle", lambda o: pickle.dumps(o, protocol=5)), ("msgpack", msgpack.packb)):
            loads = msgpack.unpackb if name == "msgpack" else pickle.loads
            rows.append((f"carrier message, 16 requests' {what}: {name} round trip", _per_op_us(lambda: loads(dumps(batch)), args.n // 4, args.repeats)))
    for name, us in rows:
        logger.info("%-70s %8.2f us", name, us)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
