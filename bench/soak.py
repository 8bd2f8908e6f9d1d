"""Soak: steady traffic for a long while, the RSS of every process of the graph sampled each minute, the ledger reconciled at the end.

    python -m bench.soak [--minutes 20 --clients 8 --max-tokens 24]

Prints the RSS table (MiB per process kind at each sample, and the growth first → last) and the
reconciliation of every request the clients saw with its ledger row (`bench.chaos.reconcile`).
"""

from __future__ import annotations

import argparse
import logging
import time
from collections import defaultdict

import psutil

from bench.chaos import Traffic, graph, ledger_view, reconcile

logger = logging.getLogger("bench.soak")

# Process kinds by what their command line shows (Serve replicas: ray::ServeReplica:<app>:<deployment>).
PATTERNS = {
    "ingress": ":Ingress", "tokenizer": ":Tokenizer", "generator": ":Generator", "postprocessor": ":Postprocessor",
    "engine core": "VLLM::EngineCore", "engine worker": "VLLM::Worker", "billing": "BillingActor", "proxy": "ProxyActor",
    "controller": "ServeController", "raylet": "raylet", "gcs": "gcs_server",
}  # fmt: skip


def rss_by_kind() -> dict[str, float]:
    """MiB of resident memory per process kind (summed over its processes)."""
    out: dict[str, float] = defaultdict(float)
    for p in psutil.process_iter(["cmdline", "memory_info"]):
        cmd = " ".join(p.info["cmdline"] or [])
        for kind, pattern in PATTERNS.items():
            if pattern in cmd:
                out[kind] += p.info["memory_info"].rss / 2**20
                break
    return dict(out)


def format_rss(samples: list[tuple[float, dict[str, float]]]) -> str:
    kinds = sorted({k for _, s in samples for k in s})
    lines = ["| process | " + " | ".join(f"{t / 60:.0f} min" for t, _ in samples) + " | growth |", "|---|" + "---|" * (len(samples) + 1)]
    for k in kinds:
        first, last = samples[0][1].get(k, 0.0), samples[-1][1].get(k, 0.0)
        lines.append(f"| {k} | " + " | ".join(f"{s.get(k, 0.0):.0f}" for _, s in samples) + f" | {last - first:+.0f} MiB |")
    return "\n".join(lines)


def main() -> None:
    from common.runtime import REPO_ROOT, use_local_env

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--minutes", type=float, default=20)
    p.add_argument("--clients", type=int, default=8)
    p.add_argument("--max-tokens", type=int, default=24)
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    use_local_env()
    (REPO_ROOT / "bench" / "out").mkdir(exist_ok=True)  # ignored by git: a fresh clone has none
    url = f"sqlite:///{REPO_ROOT}/bench/out/soak-{int(time.time())}.db"
    with graph(url, {"billing": {"plans": {"enterprise": {}}}}, "soak") as (base_url, admin, key):
        traffic = Traffic(base_url, key, clients=args.clients, max_tokens=args.max_tokens).start()
        t0 = time.monotonic()
        samples = [(0.0, rss_by_kind())]
        try:
            while time.monotonic() - t0 < args.minutes * 60:
                time.sleep(min(60.0, args.minutes * 60 - (time.monotonic() - t0)))
                samples.append((time.monotonic() - t0, rss_by_kind()))
                logger.info("%.0f s: %d requests so far", samples[-1][0], len(traffic.seen))
        finally:
            seen = traffic.stop()
        time.sleep(5)
        rows, total = ledger_view(admin, "soak")
        r = reconcile(seen, rows, total, args.max_tokens)
    print(format_rss(samples))
    print(f"\n{r.requests} requests in {args.minutes:.0f} min at c={args.clients}: {r.ok} ok, {r.cut} cut, {r.refused} refused, {r.envelope} error envelopes, {r.bare} bare errors; "
          f"ledger: {len(rows)} rows, {r.lost} lost, {r.double} double-counted, {r.over_billed} over-billed")  # fmt: skip
    for s in seen:
        if s.outcome != "ok":
            print(f"  {s.outcome} {s.request_id} stream={s.stream} chunks={s.chunks} {s.detail}")


if __name__ == "__main__":
    main()
