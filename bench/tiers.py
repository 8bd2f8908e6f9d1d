"""Tiered capacity on one engine: a noisy neighbour with fair share on and off, and service tiers under saturation.

Each target is the real Serve graph (`maas serve`, billing on) started alone, with the same engine:

* `fair`: the shipped scheduling (`engine.scheduling.policy: priority`, fair share on);
* `nofair`: the same queue with `fair_share: false` (tiers and age only);
* `fcfs`: `policy: fcfs`, requests enter vLLM first come, first served, as before tiers existed.

Against each, after a warm-up, an asyncio client measures (streamed text completions of `--tokens` tokens,
closed loop):

1. **B alone**: tenant B's `--b-streams` streams: its TTFT p50/p99.
2. **Noisy neighbour**: tenant A holds 8 times B's streams (more than the engine batches at once) while B
   runs as in 1: B's TTFT p50/p99 against B alone, each tenant's delivered tokens, and Jain's fairness
   index over them normalised by demand: each tenant's share of the delivered tokens over its max-min fair
   share of the engine's sequences (B wants fewer than half: all it asks for; A the rest). 1.0 is fair.
3. **Tiers**: one tenant sends `--tier-streams` streams at each of `priority`, `default` and `flex`
   together (more than the engine batches at once): TTFT p50/p99 per tier.
4. **Live traffic while a batch runs** (`--batch-lines` > 0): a `default` tenant at concurrency 4 alone,
   then the same while a batch of `--batch-lines` requests (through `/v1/batches`) saturates the
   engine: the live TTFT p50/p99 against alone, and the batch's tokens per second against the
   capacity the live load leaves free (simulated engine: `max_num_seqs` × steps/s less the live rate).

    python -m bench.tiers [--engine sim|real] [--targets fair nofair fcfs]

`--engine sim` (the default) runs the simulated engine (`engine.simulate_steps_per_s`, whose step time does
not grow with the batch); `--engine real` runs vLLM on this machine's CPU.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import time
from pathlib import Path

from bench.capacity import PROMPT, Tally, _pct, drive
from bench.serving import OUT, bench_key, config_with, ours, server
from common.config import load_config
from common.runtime import LOCAL_ENV, free_port

logger = logging.getLogger("bench.tiers")

SCHEDULING = {"fair": {"policy": "priority"}, "nofair": {"policy": "priority", "fair_share": False}, "fcfs": {"policy": "fcfs"}}


def target_config(target: str, args: argparse.Namespace) -> Path:
    engine: dict = {"max_num_seqs": args.max_num_seqs, "scheduling": {**SCHEDULING[target], "background_busy_fraction": args.background_busy}}
    if args.engine == "sim":
        engine["simulate_steps_per_s"] = args.steps_per_s
    every_tier = {"service_tiers": ["priority", "default", "flex"], "monthly_budget": None, "rpm": None, "tpm": None}
    overrides = {
        "engine": engine,
        # Requests must reach the generator's queue to be ordered there, not wait in Serve's router.
        "deployments": {"generator": {"max_ongoing_requests": 1024}},
        "billing": {"plans": {"enterprise": every_tier}},
    }
    return config_with(f"tiers-{args.engine}-{target}", overrides)


def figures(tally: Tally, seconds: float) -> dict:
    return {
        "tok_s": tally.tokens / seconds,
        "ttft_p50_ms": (_pct(tally.ttft, 0.5) or 0) * 1000,
        "ttft_p99_ms": (_pct(tally.ttft, 0.99) or 0) * 1000,
        "requests": tally.requests,
        "failures": tally.failures,
        "errors": tally.errors,
    }


def max_min_shares(demands: list[int], capacity: int) -> list[float]:
    """Each demand's max-min fair part of `capacity` (water-filling), as fractions of what is handed out."""
    left, alloc, open_ = float(capacity), [0.0] * len(demands), set(range(len(demands)))
    while open_ and left > 1e-9:
        each = left / len(open_)
        for i in sorted(open_):
            give = min(each, demands[i] - alloc[i])
            alloc[i] += give
            left -= give
            if alloc[i] >= demands[i] - 1e-9:
                open_.discard(i)
    total = sum(alloc)
    return [a / total for a in alloc]


def jain(delivered: list[float], fair: list[float]) -> float:
    """Jain's index over each party's share of what was delivered, normalised by its fair share."""
    total = sum(delivered)
    x = [(d / total) / f for d, f in zip(delivered, fair)] if total else [0.0] * len(delivered)
    return sum(x) ** 2 / (len(x) * sum(v * v for v in x)) if any(x) else 0.0


async def together(*loads: tuple[str, int, dict, Tally], base: str, model: str, args: argparse.Namespace) -> None:
    await asyncio.gather(*(drive([base], key, model, streams, args.tokens, args.duration, args.warmup, tally, extra=extra) for key, streams, extra, tally in loads))


def measure(target: str, args: argparse.Namespace, stamp: str, model: str) -> dict:
    port = free_port()
    cmd, env, ready = ours(port, target_config(target, args))
    base = f"http://127.0.0.1:{port}"
    seconds = args.duration - args.warmup
    out: dict = {}
    with server(cmd, env, ready, OUT / f"{stamp}-tiers-{target}.log"):
        key_a, key_b = bench_key(env, "tenant-a"), bench_key(env, "tenant-b")
        asyncio.run(together((key_b, 4, {}, Tally()), base=base, model=model, args=argparse.Namespace(**{**vars(args), "duration": 6.0, "warmup": 5.0})))  # warm
        if "noisy" in args.parts:
            noisy_neighbour(out, target, base, model, key_a, key_b, args, seconds)
        if "tiers" in args.parts:
            time.sleep(2)
            tiers = {t: Tally() for t in ("priority", "default", "flex")}
            longer = argparse.Namespace(**{**vars(args), "duration": args.tier_duration})  # flex waits out its 30 s behind saturating live load
            asyncio.run(together(*((key_a, args.tier_streams, {"service_tier": t}, tally) for t, tally in tiers.items()), base=base, model=model, args=longer))
            out["tiers"] = {t: figures(tally, args.tier_duration - args.warmup) for t, tally in tiers.items()}
            logger.info("%s: tiers %s", target, out["tiers"])
        if "batch" in args.parts and args.batch_lines:
            time.sleep(2)
            out["batch"] = live_beside_batch(base, env, model, args)
            logger.info("%s: live beside a batch %s", target, out["batch"])
    return out


def noisy_neighbour(out: dict, target: str, base: str, model: str, key_a: str, key_b: str, args: argparse.Namespace, seconds: float) -> None:
    """B alone, then B beside A's 8 times as many streams: TTFT, tokens per second and Jain's index into `out`."""
    b_streams, a_streams = args.b_streams, 8 * args.b_streams
    alone = Tally()
    asyncio.run(together((key_b, b_streams, {}, alone), base=base, model=model, args=args))
    out["b_alone"] = figures(alone, seconds)
    logger.info("%s: B alone %s", target, out["b_alone"])
    time.sleep(2)
    a, b = Tally(), Tally()
    asyncio.run(together((key_a, a_streams, {}, a), (key_b, b_streams, {}, b), base=base, model=model, args=args))
    out["noisy_a"], out["noisy_b"] = figures(a, seconds), figures(b, seconds)
    out["jain"] = jain([a.tokens, b.tokens], max_min_shares([a_streams, b_streams], args.max_num_seqs))
    logger.info("%s: noisy A %s B %s jain %.3f", target, out["noisy_a"], out["noisy_b"], out["jain"])


def live_beside_batch(base: str, env: dict[str, str], model: str, args: argparse.Namespace) -> dict:
    """Live c=4 alone, then beside a batch that saturates the engine (its progress read from `request_counts`)."""
    import io

    from openai import OpenAI

    seconds = args.duration - args.warmup
    live_key, batch_key = bench_key(env, "tenant-live"), bench_key(env, "tenant-batch")
    alone = Tally()
    asyncio.run(together((live_key, 4, {}, alone), base=base, model=model, args=args))
    client = OpenAI(base_url=f"{base}/v1", api_key=batch_key, max_retries=2, timeout=120)
    lines = [
        json.dumps({"custom_id": f"b{i}", "method": "POST", "url": "/v1/completions", "body": {"model": model, "prompt": PROMPT, "max_tokens": args.tokens, "ignore_eos": True}})
        for i in range(args.batch_lines)
    ]
    upload = client.files.create(file=("batch.jsonl", io.BytesIO("\n".join(lines).encode())), purpose="batch")
    batch = client.batches.create(input_file_id=upload.id, endpoint="/v1/completions", completion_window="24h")
    while client.batches.retrieve(batch.id).request_counts.completed < 8:  # running, and saturating
        time.sleep(0.5)
    beside = Tally()
    counts: list[tuple[float, int]] = []

    async def live_and_progress() -> None:
        async def watch() -> None:
            t0 = time.monotonic()
            while time.monotonic() - t0 < args.duration:
                b = await asyncio.to_thread(client.batches.retrieve, batch.id)
                counts.append((time.monotonic() - t0, b.request_counts.completed))
                await asyncio.sleep(1.0)

        await asyncio.gather(together((live_key, 4, {}, beside), base=base, model=model, args=args), watch())

    asyncio.run(live_and_progress())
    # The rate while the batch still ran: a batch that ended inside the window would read slower than it ran.
    inside = [(t, c) for t, c in counts if t >= args.warmup and c < args.batch_lines]
    batch_lines_s = (inside[-1][1] - inside[0][1]) / (inside[-1][0] - inside[0][0]) if len(inside) > 1 and inside[-1][0] > inside[0][0] else 0.0
    client.batches.cancel(batch.id)
    live_alone, live_beside = figures(alone, seconds), figures(beside, seconds)
    capacity = args.max_num_seqs * args.steps_per_s if args.engine == "sim" else None
    free = capacity - live_beside["tok_s"] if capacity else None
    return {
        "live_alone": live_alone, "live_beside": live_beside, "batch_tok_s": batch_lines_s * args.tokens,
        "free_tok_s": free, "batch_share_of_free": batch_lines_s * args.tokens / free if free else None,
        "batch_outlasted_live": bool(counts) and counts[-1][1] < args.batch_lines,
    }  # fmt: skip


def format_report(results: dict[str, dict], args: argparse.Namespace) -> str:
    engine = f"simulated engine, {args.steps_per_s:g} steps/s" if args.engine == "sim" else "vLLM on CPU"
    lines: list[str] = []
    if any("jain" in r for r in results.values()):
        lines += [
            f"Noisy neighbour ({engine}, max_num_seqs {args.max_num_seqs}, {args.tokens} tokens per request): B {args.b_streams} streams, A {8 * args.b_streams}",
            "",
            "| target | B alone TTFT p50 / p99 ms | B beside A TTFT p50 / p99 ms | B p99 vs alone | A tok/s | B tok/s | Jain (demand-normalised) |",
            "|---|---|---|---|---|---|---|",
        ]
    for target, r in results.items():
        if "jain" not in r:
            continue
        alone, b, a = r["b_alone"], r["noisy_b"], r["noisy_a"]
        ratio = b["ttft_p99_ms"] / alone["ttft_p99_ms"] if alone["ttft_p99_ms"] else float("nan")
        lines.append(
            f"| {target} | {alone['ttft_p50_ms']:.0f} / {alone['ttft_p99_ms']:.0f} | {b['ttft_p50_ms']:.0f} / {b['ttft_p99_ms']:.0f} | {ratio:.2f}x | "
            f"{a['tok_s']:.0f} | {b['tok_s']:.0f} | {r['jain']:.3f} |"
        )
    if any("tiers" in r for r in results.values()):
        lines += ["", f"Tiers under saturation: {args.tier_streams} streams at each tier, one tenant", "", "| target | priority TTFT p50 / p99 ms | default | flex | tok/s p / d / f |", "|---|---|---|---|---|"]
    for target, r in results.items():
        if "tiers" not in r:
            continue
        t = r["tiers"]
        cells = " | ".join(f"{t[x]['ttft_p50_ms']:.0f} / {t[x]['ttft_p99_ms']:.0f}" for x in ("priority", "default", "flex"))
        rates = " / ".join(f"{t[x]['tok_s']:.0f}" for x in ("priority", "default", "flex"))
        lines.append(f"| {target} | {cells} | {rates} |")
    if any("batch" in r for r in results.values()):
        lines += ["", f"Live traffic (default tier, 4 streams) while a batch of {args.batch_lines} requests runs", "",
                  "| target | live alone TTFT p50 / p99 ms | beside the batch | p50 / p99 vs alone | batch tok/s | of the capacity left free |", "|---|---|---|---|---|---|"]
        for target, r in results.items():
            if "batch" not in r:
                continue
            b = r["batch"]
            a, s = b["live_alone"], b["live_beside"]
            share = f"{b['batch_share_of_free']:.2f}" if b["batch_share_of_free"] is not None else "-"
            if not b.get("batch_outlasted_live", True):
                share += " (the batch ended before the live run: raise --batch-lines)"
            lines.append(
                f"| {target} | {a['ttft_p50_ms']:.0f} / {a['ttft_p99_ms']:.0f} | {s['ttft_p50_ms']:.0f} / {s['ttft_p99_ms']:.0f} | "
                f"{s['ttft_p50_ms'] / max(a['ttft_p50_ms'], 1e-9):.2f}x / {s['ttft_p99_ms'] / max(a['ttft_p99_ms'], 1e-9):.2f}x | {b['batch_tok_s']:.0f} | {share} |"
            )
    def runs(r: dict) -> list[dict]:
        return [r[k] for k in ("b_alone", "noisy_a", "noisy_b") if k in r] + list(r.get("tiers", {}).values()) + ([r["batch"]["live_alone"], r["batch"]["live_beside"]] if "batch" in r else [])

    failures = {target: sum(f["failures"] for f in runs(r)) for target, r in results.items()}
    lines += ["", f"Failures: {failures}"]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--engine", choices=["sim", "real"], default="sim")
    parser.add_argument("--targets", nargs="+", default=["fair", "nofair", "fcfs"], choices=list(SCHEDULING))
    parser.add_argument("--steps-per-s", type=float, default=50.0)
    parser.add_argument("--max-num-seqs", type=int, default=32)
    parser.add_argument("--tokens", type=int, default=64, help="completion tokens per request")
    parser.add_argument("--b-streams", type=int, default=6, help="tenant B's streams; A holds 8 times as many")
    parser.add_argument("--tier-streams", type=int, default=16, help="streams at each tier in the tiers run")
    parser.add_argument("--tier-duration", type=float, default=45.0, help="seconds of the tiers run (flex enters after waiting 30 s)")
    parser.add_argument("--parts", nargs="+", default=["noisy", "tiers", "batch"], choices=["noisy", "tiers", "batch"], help="which runs to make")
    parser.add_argument("--batch-lines", type=int, default=1000, help="requests in the batch beside live traffic, enough to outlast it (0: skip that run)")
    parser.add_argument("--background-busy", type=float, default=1.0, help="engine.scheduling.background_busy_fraction (1: as on an accelerator)")
    parser.add_argument("--duration", type=float, default=25.0, help="seconds per measurement, warm-up included")
    parser.add_argument("--warmup", type=float, default=8.0)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    os.environ.update(LOCAL_ENV)
    OUT.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    model = load_config().model.name
    results = {target: measure(target, args, stamp, model) for target in args.targets}
    report = format_report(results, args)
    (OUT / f"{stamp}-tiers-{args.engine}.json").write_text(json.dumps({"args": vars(args), "results": results}, indent=2))
    (OUT / f"{stamp}-tiers-{args.engine}.md").write_text(report)
    print(report)


if __name__ == "__main__":
    main()
