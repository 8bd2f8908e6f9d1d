"""Embeddings: ray-maas's `/v1/embeddings` against vLLM's own server on the same model and engine flags, and the
cold start of a model scaled to zero.

Each server alone, one after the other (raw vLLM, then ours, `--rounds` times): the official openai client
sends requests of `--batch` texts of about `--words` words each, `--concurrency` at a time, for `--duration`
seconds after a warm-up. Ours runs the shipped default config, where all-MiniLM-L6-v2 is scaled to zero: the
first embedding request after the API is up starts its engine, and that request's latency is the cold start.

    python -m bench.embeddings            # figures as a markdown table, also written to bench/out/
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import random
import statistics
import sys
import time
from pathlib import Path

from bench.serving import OUT, bench_key, ours, server
from common.config import load_config
from common.model_store import DEFAULT_EMBEDDING_MODEL_NAME, open_store
from common.runtime import LOCAL_ENV, free_port
from deployments.core.generator import engine_env_vars

logger = logging.getLogger("bench.embeddings")
WORDS = "river stone light market garden winter signal paper music engine cloud harbor forest letter window".split()


def raw_vllm(port: int) -> tuple[list[str], dict[str, str], str]:
    """vLLM's OpenAI server with the pooling runner, on the embedding model's engine arguments from the shipped config."""
    import os

    view = load_config().for_model(DEFAULT_EMBEDDING_MODEL_NAME)
    eng = view.engine
    path = open_store(view.store_root()).resolve(view.model.name).path
    cmd = [
        sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(path), "--served-model-name", view.model.name,
        "--runner", "pooling", "--dtype", eng.dtype, "--max-model-len", str(eng.max_model_len), "--max-num-seqs", str(eng.max_num_seqs),
        "--host", "127.0.0.1", "--port", str(port), "--disable-log-stats", *(["--enforce-eager"] if eng.enforce_eager else []),
    ]  # fmt: skip
    return cmd, {**os.environ, **LOCAL_ENV, **engine_env_vars(eng, len(os.sched_getaffinity(0)))}, f"http://127.0.0.1:{port}/v1/models"


def _texts(rng: random.Random, batch: int, words: int) -> list[str]:
    return [" ".join(rng.choice(WORDS) for _ in range(words)) for _ in range(batch)]


async def drive(base: str, key: str, args: argparse.Namespace) -> dict:
    from openai import AsyncOpenAI

    client = AsyncOpenAI(base_url=f"{base}/v1", api_key=key, max_retries=0, timeout=300)
    rng = random.Random(args.seed)
    latencies: list[float] = []
    inputs = failures = 0
    t_end = time.monotonic() + args.duration
    t_measure = time.monotonic() + args.warmup

    async def worker() -> None:
        nonlocal inputs, failures
        while time.monotonic() < t_end:
            texts = _texts(rng, args.batch, args.words)
            t0 = time.monotonic()
            try:
                await client.embeddings.create(model=DEFAULT_EMBEDDING_MODEL_NAME, input=texts)
            except Exception as exc:  # counted and shown: the table says how many failed
                failures += 1
                logger.warning("request failed: %s", exc)
                continue
            if t0 >= t_measure:
                latencies.append(time.monotonic() - t0)
                inputs += len(texts)

    await asyncio.gather(*(worker() for _ in range(args.concurrency)))
    await client.close()
    measured = args.duration - args.warmup
    latencies.sort()
    return {
        "inputs_per_s": inputs / measured,
        "p50_ms": statistics.median(latencies) * 1000 if latencies else None,
        "p99_ms": latencies[int(0.99 * (len(latencies) - 1))] * 1000 if latencies else None,
        "failures": failures,
    }


async def cold_start(base: str, key: str) -> float:
    from openai import AsyncOpenAI

    client = AsyncOpenAI(base_url=f"{base}/v1", api_key=key, max_retries=0, timeout=600)
    t0 = time.monotonic()
    await client.embeddings.create(model=DEFAULT_EMBEDDING_MODEL_NAME, input="the first request after idleness")
    await client.close()
    return time.monotonic() - t0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=8, help="texts per request")
    parser.add_argument("--words", type=int, default=24, help="words per text")
    parser.add_argument("--concurrency", type=int, default=4)
    parser.add_argument("--duration", type=float, default=30.0)
    parser.add_argument("--warmup", type=float, default=5.0)
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    for noisy in ("httpx", "httpx2", "openai"):  # a line per request would cost the client more CPU than the servers' answers
        logging.getLogger(noisy).setLevel(logging.WARNING)
    OUT.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    rows: list[tuple[str, dict]] = []
    colds: list[float] = []
    for r in range(args.rounds):
        port = free_port()
        cmd, env, ready = raw_vllm(port)
        with server(cmd, env, ready, OUT / f"embeddings-raw-{stamp}-{r}.log"):
            rows.append(("raw vLLM (`--runner pooling`)", asyncio.run(drive(f"http://127.0.0.1:{port}", "none", args))))
        port = free_port()
        cmd, env, ready = ours(port)
        with server(cmd, env, ready, OUT / f"embeddings-ours-{stamp}-{r}.log"):
            key = bench_key(env)
            base = f"http://127.0.0.1:{port}"
            colds.append(asyncio.run(cold_start(base, key)))
            logger.info("cold start: %.1f s", colds[-1])
            rows.append(("ray-maas", asyncio.run(drive(base, key, args))))
    lines = [
        f"{args.batch} texts of {args.words} words per request, concurrency {args.concurrency}, {args.duration - args.warmup:g} s measured "
        f"after {args.warmup:g} s; {DEFAULT_EMBEDDING_MODEL_NAME}, the same engine flags",
        "",
        "| server | inputs/s | request p50 ms | request p99 ms | failures |",
        "| --- | --- | --- | --- | --- |",
    ]
    for name, r in rows:
        p50 = f"{r['p50_ms']:.0f}" if r["p50_ms"] is not None else "-"
        p99 = f"{r['p99_ms']:.0f}" if r["p99_ms"] is not None else "-"
        lines.append(f"| {name} | {r['inputs_per_s']:.1f} | {p50} | {p99} | {r['failures']} |")
    raw = [r["inputs_per_s"] for n, r in rows if n.startswith("raw")]
    mine = [r["inputs_per_s"] for n, r in rows if n == "ray-maas"]
    if raw and mine:
        lines += ["", f"ray-maas / raw vLLM: {statistics.mean(mine) / statistics.mean(raw):.2f}x inputs/s"]
    lines += [f"cold start (first request after the API is up, the model scaled to zero): {', '.join(f'{c:.1f} s' for c in colds)}"]
    report = "\n".join(lines) + "\n"
    Path(OUT / f"embeddings-{stamp}.md").write_text(report)
    print(report)  # noqa: T201 (the bench's output)


if __name__ == "__main__":
    main()
