"""Billing benchmarks: ledger ingestion through the billing actor, and the latency admission adds per request.

1. Ingestion: usage events made durable in SQLite (WAL, synchronous=FULL) through
   the real billing actor, in the batches replicas send; beside it the same ledger
   written in-process (no actor) as the baseline.  Target: >= 50k events/s.
2. Admission, in-process: authenticate + admit + settle with the real BillingClient
   against the real actor (leases, so most requests never leave the replica).
3. Admission, over HTTP: the same app with billing on and off, one request at a
   time (max_tokens=1), latency p50/p99 side by side.  Target: <= 1 ms p99 added.

    python -m bench.billing [--events 300000] [--admissions 20000] [--http-requests 150] [--skip-http]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import statistics
import tempfile
import time
import uuid
from decimal import Decimal
from pathlib import Path

logger = logging.getLogger("bench.billing")
OUT = Path(__file__).resolve().parent / "out"


def _events(n: int, tenant: str = "bench") -> list:
    from billing.records import UsageEvent

    now = time.time()
    return [UsageEvent(uuid.uuid4().hex, now, tenant, "sk-maas-bench", "m", "v1", "chat", "ok", 128, 64, "0.05", "0.20", "0.0001", "bench") for _ in range(n)]


def _pct(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))]


def bench_ingestion(n: int, batch: int, tmp: Path) -> dict:
    import ray

    from billing import actor
    from billing.admin import wait
    from billing.ledger import Ledger
    from common.config import BillingConfig

    events = _events(n)
    batches = [events[i : i + batch] for i in range(0, n, batch)]
    # Baseline: the same Ledger in this process (no actor, no serialization).
    ledger = Ledger(f"sqlite:///{tmp}/direct.db")
    t0 = time.perf_counter()
    for b in batches:
        ledger.record(b)
    direct = n / (time.perf_counter() - t0)
    ledger.close()
    # Through the actor, two batches in flight (a replica sends one per flush; several replicas overlap).
    config = BillingConfig(ledger_url=f"sqlite:///{tmp}/actor.db", actor_name="bench-billing")
    handle = actor.get_or_create(config)
    ray.get(handle.status.remote())
    t0 = time.perf_counter()
    inflight = []
    for b in batches:
        inflight.append(handle.record.remote(b))
        if len(inflight) >= 2:
            ray.get(inflight.pop(0))
    ray.get(inflight)
    through_actor = n / (time.perf_counter() - t0)
    admin = actor.admin_client(handle)
    stored = wait(admin.status())["events"]
    # Resending everything must add nothing.
    t0 = time.perf_counter()
    ray.get([handle.record.remote(b) for b in batches[:5]])
    assert wait(admin.status())["events"] == stored == n
    ray.kill(handle, no_restart=True)
    return {"events": n, "batch": batch, "direct_events_per_s": direct, "actor_events_per_s": through_actor, "ratio_actor_vs_direct": through_actor / direct}


async def _admission_loop(n: int, config, handle) -> list[float]:
    from billing import actor
    from billing.client import BillingClient
    from common.config import Price

    client = BillingClient(config, actor.ActorTransport(handle), "bench-holder")
    await client.start()
    key, _ = await actor.admin_client(handle).create_key("bench-tenant", "pro", "tenant", None, "", "bench")
    await asyncio.sleep(0.3)
    price = Price(prompt_per_1m=Decimal("0.05"), completion_per_1m=Decimal("0.20"))
    header = f"Bearer {key}"
    # Warm-up: a freshly started actor grants nothing for `lease.restart_grace_s` (1 s) while replicas re-report.
    client.settle(await client.admit(await client.authenticate(header), "warm", "m", "v1", "chat", price, 128, 64), 128, 64, "ok")
    samples = []
    for i in range(n):
        t0 = time.perf_counter()
        principal = await client.authenticate(header)
        ticket = await client.admit(principal, f"adm-{i}", "m", "v1", "chat", price, 128, 64)
        client.settle(ticket, 128, 64, "ok")
        samples.append((time.perf_counter() - t0) * 1e3)
        if i % 50 == 0:
            await asyncio.sleep(0)  # let the flush loop run, as a serving replica would
    await client.close()
    return samples


def bench_admission_inprocess(n: int, tmp: Path) -> dict:
    from billing import actor
    from common.config import BillingConfig, Plan

    config = BillingConfig(
        ledger_url=f"sqlite:///{tmp}/adm.db",
        actor_name="bench-admission",
        plans={"pro": Plan(monthly_budget=Decimal("1000000"), rpm=10_000_000, tpm=10_000_000_000)},
        default_plan="pro",
    )
    handle = actor.get_or_create(config)
    samples = asyncio.run(_admission_loop(n, config, handle))
    import ray

    ray.kill(handle, no_restart=True)
    return {"requests": n, "p50_ms": _pct(samples, 0.5), "p99_ms": _pct(samples, 0.99), "max_ms": max(samples), "mean_ms": statistics.fmean(samples)}


def _http_latencies(base: str, key: str, model: str, n: int) -> list[float]:
    import httpx

    body = {"model": model, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 1, "temperature": 0}
    headers = {"Authorization": f"Bearer {key}"}
    with httpx.Client(timeout=60) as client:
        for _ in range(10):  # warm-up
            client.post(f"{base}/chat/completions", json=body, headers=headers).raise_for_status()
        out = []
        for _ in range(n):
            t0 = time.perf_counter()
            client.post(f"{base}/chat/completions", json=body, headers=headers).raise_for_status()
            out.append((time.perf_counter() - t0) * 1e3)
        return out


def bench_admission_http(n: int, tmp: Path) -> dict:
    from ray import serve

    from cluster import local
    from common.config import load_config
    from common.runtime import free_port

    results = {}
    port = free_port()  # one HTTP proxy serves both runs
    for billing_on in (True, False):
        config = load_config(overrides={"http": {"port": port}, "billing": {"enabled": billing_on, "ledger_url": f"sqlite:///{tmp}/http.db"}})
        base = local.deploy(config)
        key = "none"
        if billing_on:
            from billing import actor
            from billing.admin import wait

            key, _ = wait(actor.admin_client(actor.get(config.billing)).create_key("bench-http", "enterprise", "tenant", None, "", "bench"))
            time.sleep(0.5)
        samples = _http_latencies(base, key, config.model.name, n)
        results["on" if billing_on else "off"] = {"p50_ms": _pct(samples, 0.5), "p99_ms": _pct(samples, 0.99), "mean_ms": statistics.fmean(samples)}
        serve.delete(config.app_name)
    results["added_p50_ms"] = results["on"]["p50_ms"] - results["off"]["p50_ms"]
    results["added_p99_ms"] = results["on"]["p99_ms"] - results["off"]["p99_ms"]
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--events", type=int, default=300_000)
    parser.add_argument("--batch", type=int, default=5000, help="events per message (billing.max_batch)")
    parser.add_argument("--admissions", type=int, default=20_000)
    parser.add_argument("--http-requests", type=int, default=150)
    parser.add_argument("--skip-http", action="store_true", help="skip the HTTP A/B (it loads the model twice)")
    parser.add_argument("--only-http", action="store_true", help="only the HTTP A/B")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")

    from cluster import local

    OUT.mkdir(parents=True, exist_ok=True)
    local.start_ray(num_cpus=os.cpu_count(), include_dashboard=False)
    report: dict = {}
    try:
        with tempfile.TemporaryDirectory() as d:
            tmp = Path(d)
            if not args.only_http:
                report["ingestion"] = bench_ingestion(args.events, args.batch, tmp)
                logger.info("ingestion: %s", report["ingestion"])
                report["admission_inprocess"] = bench_admission_inprocess(args.admissions, tmp)
                logger.info("admission (in-process): %s", report["admission_inprocess"])
            if not args.skip_http:
                report["admission_http"] = bench_admission_http(args.http_requests, tmp)
                logger.info("admission (HTTP): %s", report["admission_http"])
    finally:
        local.stop()
    lines = []
    if "ingestion" in report:
        ing, adm = report["ingestion"], report["admission_inprocess"]
        lines += [
            f"ledger ingestion ({ing['events']} events, batches of {ing['batch']}, SQLite WAL synchronous=FULL):",
            f"  through the billing actor: {ing['actor_events_per_s']:,.0f} events/s   in-process baseline: {ing['direct_events_per_s']:,.0f} events/s   ratio {ing['ratio_actor_vs_direct']:.2f}",
            f"admission in-process (authenticate + admit + settle, {adm['requests']} requests, leases from the real actor):",
            f"  p50 {adm['p50_ms'] * 1000:.0f} us   p99 {adm['p99_ms'] * 1000:.0f} us   max {adm['max_ms']:.2f} ms",
        ]
    if "admission_http" in report:
        h = report["admission_http"]
        lines += [
            f"admission over HTTP (chat, max_tokens=1, c=1, {args.http_requests} requests each):",
            f"  billing off: p50 {h['off']['p50_ms']:.1f} ms  p99 {h['off']['p99_ms']:.1f} ms   billing on: p50 {h['on']['p50_ms']:.1f} ms  p99 {h['on']['p99_ms']:.1f} ms",
            f"  added: p50 {h['added_p50_ms']:+.2f} ms  p99 {h['added_p99_ms']:+.2f} ms",
        ]
    text = "\n".join(lines)
    print(text)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    (OUT / f"{stamp}-billing.json").write_text(json.dumps(report, indent=2, default=str))
    (OUT / f"{stamp}-billing.md").write_text(text + "\n")


if __name__ == "__main__":
    main()
