"""What a server costs doing nothing: CPU per process kind of each server, idle, after it has settled.

A front end's CPU per token (`bench.serving`) mixes two things: the work per token, and what every
process of the server burns whatever the load (Ray's heartbeats and metrics, Serve's health checks
and autoscaling reports, our actors' polls). At low load the second dominates. This starts each server
alone (`bench.serving`'s targets, the same config), sends one request so everything is loaded, waits
`--settle` seconds, and reports each process kind's CPU (cores: CPU-seconds per second) over
`--seconds` seconds.

    python -m bench.idle [--targets raw ours servellm-direct --settle 20 --seconds 30]
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import time
import urllib.request

from bench.serving import DEFAULT_CONFIG, OUT, TARGETS, bench_key, ours, process_cpu_by_kind, raw_vllm, serve_llm, server
from common.config import load_config
from common.model_store import ensure_default_model, open_store
from common.runtime import LOCAL_ENV, free_port

logger = logging.getLogger("bench.idle")


def one_request(base: str, model: str, key: str | None) -> None:
    body = json.dumps({"model": model, "prompt": "Hello", "max_tokens": 4}).encode()
    headers = {"Content-Type": "application/json", **({"Authorization": f"Bearer {key}"} if key else {})}
    with urllib.request.urlopen(urllib.request.Request(f"{base}/v1/completions", body, headers), timeout=120) as resp:
        resp.read()


def measure(target: str, args: argparse.Namespace, stamp: str) -> dict[str, float]:
    config = load_config()
    port = free_port()
    if target == "raw":
        model = ensure_default_model(open_store(config.store_root()), config.model.name)
        cmd, env, ready = raw_vllm(model.path, config.model.name, port, DEFAULT_CONFIG)
    elif target == "ours":
        cmd, env, ready = ours(port, DEFAULT_CONFIG)
    else:
        cmd, env, ready = serve_llm(port, direct=target == "servellm-direct")
    with server(cmd, env, ready, OUT / f"{stamp}-idle-{target}.log") as proc:
        one_request(f"http://127.0.0.1:{port}", config.model.name, bench_key(env) if target == "ours" else None)
        time.sleep(args.settle)
        before, t0 = process_cpu_by_kind(proc.pid), time.monotonic()
        time.sleep(args.seconds)
        after, elapsed = process_cpu_by_kind(proc.pid), time.monotonic() - t0
    return {kind: (after[kind] - before.get(kind, 0.0)) / elapsed for kind in after}


def format_report(results: dict[str, dict[str, float]], args: argparse.Namespace) -> str:
    lines = [f"Idle CPU (cores) after {args.settle:g} s settled, over {args.seconds:g} s", ""]
    for target, split in results.items():
        front = sum(v for k, v in split.items() if k != "engine")
        lines += [f"### {TARGETS[target]}: front end {front:.3f} cores, engine {split.get('engine', 0.0):.3f}", "", "| process | cores |", "|---|---|"]
        lines += [f"| {kind} | {cores:.3f} |" for kind, cores in sorted(split.items(), key=lambda kv: -kv[1]) if cores >= 0.001]
        lines.append("")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--targets", nargs="+", default=["raw", "ours", "servellm-direct"], choices=list(TARGETS))
    parser.add_argument("--settle", type=float, default=20.0, help="seconds after the first request before measuring")
    parser.add_argument("--seconds", type=float, default=30.0, help="seconds measured")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    os.environ.update(LOCAL_ENV)
    OUT.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    results = {target: measure(target, args, stamp) for target in args.targets}
    report = format_report(results, args)
    (OUT / f"{stamp}-idle.md").write_text(report)
    logger.info("\n%s", report)


if __name__ == "__main__":
    main()
