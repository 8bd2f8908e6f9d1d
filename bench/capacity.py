"""Capacity benchmark without a GPU: would the serving graph cap an accelerator-class engine, and do more stage replicas lift the cap?

Both servers run the same simulated engine (`deployments.core.paced.PacedEngine`: every running
request gets one token per step at `--steps-per-s`, up to `--max-num-seqs` at once, no model):

* **baseline**: one plain FastAPI process (uvicorn) that tokenizes, runs the engine and detokenizes
  in-process with the same Ray-free logic the stages use (`PromptTokenizer`, `ResponseWriter`);
* **ours**: the real Serve graph (`maas serve`, billing on) with `engine.simulate_steps_per_s`, with
  one replica of ingress and postprocessor, then with two.

The same asyncio client holds S streams open (closed loop: each stream asks for `--tokens` tokens,
then the next request starts) for `--duration` seconds and measures, after a warm-up, delivered
tokens per second (one SSE event per engine step per stream), inter-token latency p50/p99, time to
first token, failures, and the server's CPU-seconds per 1,000 tokens. The ideal is
S x steps/s tokens a second while S <= max_num_seqs.

`--autoscale` then lets Serve's autoscaler loose on the graph (ingress, tokenizer, postprocessor
from 1 to `--max-replicas`) under a load that rises and falls, reads every deployment's replica count
from Serve's REST API each second, and prints the timeline with the failures seen in each phase.

    python -m bench.capacity [--streams 64 256 1024] [--steps-per-s 50] [--targets baseline ours1 ours2 ours1h ours2h ours1hs] [--autoscale]

(`ours1h`/`ours2h`: the same graphs with HAProxy as the front door, `http.proxy: haproxy`; a trailing `s`, as
`ours1hs`: responses written by the postprocessor stage, `deployments.inline_postprocess: false`, instead of
the ingress itself.)

On a 2-core machine the client, the servers and Ray share both cores, so the absolute figures are
this machine's; the comparison between the targets is the point.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import re
import sys
import threading
import time
import urllib.request
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fastapi import Request  # at module level: the route's annotation must resolve (postponed annotations)

from bench.serving import OUT, bench_key, config_with, ours, process_cpu_by_kind, server
from common.config import load_config
from common.model_store import ensure_default_model, open_store
from common.runtime import LOCAL_ENV, free_port

logger = logging.getLogger("bench.capacity")
PROMPT = "Write a short story about a lighthouse keeper who finds a message in a bottle on a stormy night."


# ---- the single-process baseline -------------------------------------------------------------------


def baseline_app(model_path: str, steps_per_s: float, max_num_seqs: int, max_model_len: int) -> Any:
    """One FastAPI process: the stages' own logic in-process over the simulated engine (`/v1/completions`, streamed)."""
    from fastapi import FastAPI
    from fastapi.responses import JSONResponse, StreamingResponse

    from deployments.core.paced import PacedEngine
    from deployments.core.postprocessor import ResponseWriter
    from deployments.core.tokenizer import PromptTokenizer, load_hf_tokenizer
    from deployments.core.types import GenerationRequest
    from deployments.openai.protocol import CompletionRequest

    hf = load_hf_tokenizer(model_path)
    tokenizer = PromptTokenizer(hf, max_model_len)
    backend = hf.backend_tokenizer
    writer = ResponseWriter(lambda ids: backend.decode(ids, skip_special_tokens=True))
    engine = PacedEngine(steps_per_s, max_num_seqs)
    engine.start()
    app = FastAPI()

    @app.get("/healthz")
    async def healthz() -> dict:
        return {"status": "ok"}

    @app.post("/v1/completions")
    async def completions(request: Request) -> Any:
        body = CompletionRequest.model_validate_json(await request.body())
        prompt = tokenizer.prepare_completion(body.prompt, body.max_tokens)  # type: ignore[arg-type]
        req = GenerationRequest(
            request_id=uuid.uuid4().hex, model=body.model, kind="completion", prompt_token_ids=prompt.prompt_token_ids,
            max_tokens=prompt.max_tokens, created=int(time.time()), ignore_eos=body.ignore_eos, stream=body.stream,
        )  # fmt: skip
        if not body.stream:
            return JSONResponse(await writer.complete(req, engine.generate(req)))

        async def sse() -> Any:
            async for text, _ in writer.stream(req, engine.generate(req)):
                yield text

        return StreamingResponse(sse(), media_type="text/event-stream")

    return app


# ---- the client ------------------------------------------------------------------------------------


@dataclass
class Tally:
    """What the client saw inside the measurement window."""

    tokens: int = 0
    requests: int = 0
    failures: int = 0
    errors: dict[str, int] = field(default_factory=dict)
    itl: list[float] = field(default_factory=list)
    ttft: list[float] = field(default_factory=list)

    def fail(self, what: str) -> None:
        self.failures += 1
        self.errors[what] = self.errors.get(what, 0) + 1


async def _one_stream(session: Any, url: str, headers: dict, body: bytes, tally: Tally, window: tuple[float, float]) -> None:
    start = time.monotonic()
    last = None
    async with session.post(url, data=body, headers=headers) as resp:
        if resp.status != 200:
            tally.fail(f"HTTP {resp.status}")
            await resp.read()
            return
        buf = b""
        async for chunk in resp.content.iter_any():
            now = time.monotonic()
            buf += chunk
            events = buf.count(b"data: {")
            if b'{"error"' in buf:
                tally.fail("in-band error")
            if events:
                buf = buf[buf.rindex(b"data: {") + 7:]  # keep only the tail that may hold a split marker
                inside = window[0] <= now <= window[1]
                if inside:
                    tally.tokens += events
                    if last is None:
                        tally.ttft.append(now - start)
                    else:
                        tally.itl.append(now - last)
                        tally.itl.extend([0.0] * (events - 1))  # events that arrived together
                last = now
    if window[0] <= time.monotonic() <= window[1]:
        tally.requests += 1


async def drive(
    bases: list[str], key: str, model: str, streams: int, tokens: int, duration_s: float, warmup_s: float, tally: Tally | None = None, stop: asyncio.Event | None = None,
    extra: dict | None = None,
) -> Tally:
    """Hold `streams` streams open for `duration_s` seconds, spread over `bases`; count what arrives after `warmup_s`.
    `extra`: more fields of every request's body (e.g. `service_tier`)."""
    import aiohttp

    tally = tally or Tally()
    body = json.dumps({"model": model, "prompt": PROMPT, "max_tokens": tokens, "stream": True, "ignore_eos": True, **(extra or {})}).encode()
    headers = {"Authorization": f"Bearer {key}", "Content-Type": "application/json"}
    t0 = time.monotonic()
    window = (t0 + warmup_s, t0 + duration_s)

    async def slot(i: int) -> None:
        await asyncio.sleep(i * 0.002)  # do not open every connection in the same millisecond
        while time.monotonic() < window[1] and not (stop and stop.is_set()):
            try:
                await _one_stream(session, f"{bases[i % len(bases)]}/v1/completions", headers, body, tally, window)
            except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
                tally.fail(type(exc).__name__)
                await asyncio.sleep(0.1)

    timeout = aiohttp.ClientTimeout(total=None, sock_read=60)
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0), timeout=timeout) as session:
        await asyncio.gather(*(slot(i) for i in range(streams)))
    return tally


def _pct(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def summarize(tally: Tally, measured_s: float, cpu_s: float | None) -> dict:
    return {
        "tok_s": tally.tokens / measured_s,
        "itl_p50_ms": (_pct(tally.itl, 0.5) or 0) * 1000,
        "itl_p99_ms": (_pct(tally.itl, 0.99) or 0) * 1000,
        "ttft_p50_ms": (_pct(tally.ttft, 0.5) or 0) * 1000,
        "requests": tally.requests,
        "failures": tally.failures,
        "errors": tally.errors,
        "cpu_s_per_1k_tokens": cpu_s / tally.tokens * 1000 if cpu_s is not None and tally.tokens else None,
    }


# ---- the targets -----------------------------------------------------------------------------------


def ours_config(args: argparse.Namespace, replicas: int | None, autoscale: bool = False, proxy: str = "python", inline: bool = True) -> Path:
    """A config file for `maas serve`: the default one with the simulated engine, the replica counts, the front door and
    where responses are written (`inline`: in the ingress; else in the postprocessor stage) under test."""
    stage: dict[str, Any] = {"max_ongoing_requests": 4 * max(args.streams)}
    if autoscale:
        scale = {"min_replicas": 1, "max_replicas": args.max_replicas, "target_ongoing_requests": args.target_ongoing, "upscale_delay_s": 2, "downscale_delay_s": 10}
        stages = {name: {**stage, "autoscaling": scale} for name in ("ingress", "tokenizer", "postprocessor")}
    else:
        fixed = {"min_replicas": replicas, "max_replicas": replicas}
        stages = {"ingress": {**stage, "autoscaling": fixed}, "tokenizer": stage, "postprocessor": {**stage, "autoscaling": fixed}}
    stages["generator"] = {"max_ongoing_requests": 4 * max(args.streams)}
    stages["inline_postprocess"] = inline
    overrides = {"engine": {"simulate_steps_per_s": args.steps_per_s, "max_num_seqs": args.max_num_seqs}, "deployments": stages, "http": {"proxy": proxy}}
    return config_with(f"capacity-{'autoscale' if autoscale else replicas}-{proxy}{'' if inline else '-staged'}", overrides)


def start_target(target: str, args: argparse.Namespace, stamp: str) -> tuple[Any, str, dict[str, str], Path]:
    port = free_port()
    log = OUT / f"{stamp}-capacity-{target}.log"
    if target == "baseline":
        cmd = [sys.executable, "-m", "bench.capacity", "--serve-baseline", "--port", str(port), "--steps-per-s", str(args.steps_per_s), "--max-num-seqs", str(args.max_num_seqs)]
        return server(cmd, {**os.environ, **LOCAL_ENV}, f"http://127.0.0.1:{port}/healthz", log), f"http://127.0.0.1:{port}", {}, log
    replicas = None if target == "autoscale" else int(target[len("ours")])
    proxy = "haproxy" if target.rstrip("s").endswith("h") else "python"
    cmd, env, ready = ours(port, ours_config(args, replicas, autoscale=target == "autoscale", proxy=proxy, inline=not target.endswith("s")))
    return server(cmd, env, ready, log), f"http://127.0.0.1:{port}", env, log


def direct_ingress_ports(timeout_s: float = 2.0) -> list[int]:
    """The HTTP ports of the ingress replicas themselves (Serve's direct ingress, on in throughput mode): loopback
    listeners in Serve's direct-ingress range that answer our `/healthz`."""
    ports = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            local, state = line.split()[1], line.split()[3]
            port = int(local.rsplit(":", 1)[1], 16)
            if state == "0A" and 30000 <= port <= 31000:  # LISTEN; RAY_SERVE_DIRECT_INGRESS_{MIN,MAX}_HTTP_PORT
                ports.add(port)
    found = []
    for port in sorted(ports):
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=timeout_s) as resp:
                if resp.status == 200:
                    found.append(port)
        except Exception:
            continue  # another app's ingress (a version app's postprocessor has no HTTP routes)
    return found


def measure(target: str, args: argparse.Namespace, stamp: str, model: str) -> dict[str, dict[int, dict]]:
    """{path: {streams: figures}}: the baseline's one process, or the graph through Serve's HTTP proxy and direct to its ingress replicas."""
    ctx, base, env, _ = start_target(target, args, stamp)
    results: dict[str, dict[int, dict]] = {}
    with ctx as proc:
        key = bench_key(env) if env else "none"
        paths = {target: [base]}
        if target != "baseline":
            ports = direct_ingress_ports()
            paths = {f"{target}/proxy": [base], **({f"{target}/direct": [f"http://127.0.0.1:{p}" for p in ports]} if ports else {})}
            logger.info("%s: ingress replicas listen directly on %s", target, ports)
        for path, bases in paths.items():
            results[path] = {}
            for streams in args.streams:
                before = process_cpu_by_kind(proc.pid)
                tally = asyncio.run(drive(bases, key, model, streams, args.tokens, args.duration, args.warmup))
                after = process_cpu_by_kind(proc.pid)
                by_kind = {k: v - before.get(k, 0.0) for k, v in after.items()}
                results[path][streams] = summarize(tally, args.duration - args.warmup, sum(by_kind.values()))
                results[path][streams]["cpu_by_kind"] = {k: v / tally.tokens * 1000 for k, v in by_kind.items() if v > 0} if tally.tokens else {}
                logger.info("%s at %d streams: %s", path, streams, {k: v for k, v in results[path][streams].items() if k != "errors"})
                time.sleep(2)  # let the last streams drain
    return results


# ---- autoscaling -----------------------------------------------------------------------------------


def serve_replicas(dashboard: str) -> dict[str, int]:
    """Running replicas per deployment, from Serve's REST API (`GET /api/serve/applications/`)."""
    with urllib.request.urlopen(f"{dashboard}/api/serve/applications/", timeout=5) as resp:
        apps = json.load(resp).get("applications", {})
    counts: dict[str, int] = {}
    for app in apps.values():
        for name, dep in (app.get("deployments") or {}).items():
            running = sum(1 for r in dep.get("replicas", []) if r.get("state") == "RUNNING")
            counts[name] = counts.get(name, 0) + running
    return counts


def autoscale(args: argparse.Namespace, stamp: str, model: str) -> list[dict]:
    """A load that rises and falls; Serve's replica counts each second beside the client's view."""
    phases = [(s, d) for s, d in zip(args.autoscale_streams, args.autoscale_phase_s)]
    ctx, base, env, log = start_target("autoscale", args, stamp)
    timeline: list[dict] = []
    with ctx:
        match = re.search(r"Ray dashboard: (http://\S+)", log.read_text())
        dashboard = match.group(1) if match else "http://127.0.0.1:8265"
        key = bench_key(env)
        bases = [base] if args.autoscale_via == "proxy" else []  # direct: the replicas that exist when each phase starts
        tallies: list[Tally] = []
        state = {"phase": 0, "streams": 0}
        done = threading.Event()

        def sample() -> None:
            t0 = time.monotonic()
            while not done.is_set():
                try:
                    counts = serve_replicas(dashboard)
                except Exception as exc:  # the REST API is best effort; a gap in the timeline says so
                    counts = {"error": str(exc)[:40]}
                timeline.append({"t": round(time.monotonic() - t0, 1), "streams": state["streams"], **counts, "failures": sum(t.failures for t in tallies)})
                done.wait(1.0)

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        for i, (streams, seconds) in enumerate(phases):
            state.update(phase=i, streams=streams)
            tally = Tally()
            tallies.append(tally)
            if streams and args.autoscale_via == "direct":
                bases = [f"http://127.0.0.1:{p}" for p in direct_ingress_ports()]
            if streams:
                asyncio.run(drive(bases, key, model, streams, args.tokens, seconds, 0.0, tally))
            else:
                time.sleep(seconds)
            logger.info("phase %d (%d streams, %ds): %d tokens, %d requests, %d failures %s", i, streams, seconds, tally.tokens, tally.requests, tally.failures, tally.errors)
        done.set()
        sampler.join()
    return timeline


# ---- report ----------------------------------------------------------------------------------------

LABELS = {
    "baseline": "one FastAPI process", "ours1": "graph, 1 ingress", "ours2": "graph, 2 ingress",
    "ours1h": "graph, 1 ingress", "ours2h": "graph, 2 ingress",
    "ours1hs": "graph, 1 ingress + 1 postprocessor stage", "ours2hs": "graph, 2 ingress + 2 postprocessor stage",
}  # fmt: skip; `h`: the front door is HAProxy (http.proxy: haproxy); `s`: responses written by the postprocessor stage, not inline
VIA = {"proxy": "via Serve's HTTP proxy", "direct": "direct to the ingress replicas", "haproxy": "via HAProxy"}


def _label(path: str) -> str:
    target, _, via = path.partition("/")
    via = "haproxy" if via == "proxy" and target.rstrip("s").endswith("h") else via
    return LABELS.get(target, target) + (f", {VIA[via]}" if via else "")


def format_report(results: dict[str, dict[int, dict]], args: argparse.Namespace) -> str:
    lines = [
        f"simulated engine: {args.steps_per_s:g} steps/s, one token per stream per step, {args.max_num_seqs} streams at once; "
        f"{args.tokens} tokens per request; {args.duration - args.warmup:g} s measured after {args.warmup:g} s warm-up",
        "",
        "| streams | server | delivered tok/s | of ideal | vs baseline | ITL p50 ms | ITL p99 ms | TTFT p50 ms | CPU-s / 1k tok | failures |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for streams in args.streams:
        ideal = min(streams, args.max_num_seqs) * args.steps_per_s
        base = results.get("baseline", {}).get(streams, {}).get("tok_s")
        for target in results:
            r = results[target].get(streams)

            if not r:
                continue
            vs = f"{r['tok_s'] / base:.2f}x" if base else "-"
            cpu = f"{r['cpu_s_per_1k_tokens']:.2f}" if r.get("cpu_s_per_1k_tokens") is not None else "-"
            lines.append(
                f"| {streams} | {_label(target)} | {r['tok_s']:.0f} | {r['tok_s'] / ideal:.2f} | {vs} | {r['itl_p50_ms']:.1f} | "
                f"{r['itl_p99_ms']:.1f} | {r['ttft_p50_ms']:.0f} | {cpu} | {r['failures']} |"
            )
    lines += ["", "CPU-s per 1k tokens by process (the whole run, warm-up included, over the tokens measured):", ""]
    for target in results:
        for streams in args.streams:
            split = results[target].get(streams, {}).get("cpu_by_kind") or {}
            if split:
                top = sorted(split.items(), key=lambda kv: -kv[1])
                lines.append(f"- {streams} streams, {_label(target)}: " + ", ".join(f"{k} {v:.3f}" for k, v in top if v >= 0.005))
    return "\n".join(lines) + "\n"


def format_timeline(timeline: list[dict]) -> str:
    names = sorted({k for row in timeline for k in row} - {"t", "streams", "failures"})
    lines = ["| t s | streams | " + " | ".join(names) + " | failures |", "| --- | --- |" + " --- |" * (len(names) + 1)]
    previous = None
    for row in timeline:
        key = tuple([row["streams"], row.get("failures")] + [row.get(n) for n in names])
        if key != previous:  # only the rows where something changed
            lines.append(f"| {row['t']:.0f} | {row['streams']} | " + " | ".join(str(row.get(n, "-")) for n in names) + f" | {row['failures']} |")
            previous = key
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--streams", type=int, nargs="+", default=[64, 256, 1024])
    parser.add_argument("--steps-per-s", type=float, default=50.0)
    parser.add_argument("--max-num-seqs", type=int, default=1024)
    parser.add_argument("--tokens", type=int, default=64, help="completion tokens per request")
    parser.add_argument("--duration", type=float, default=25.0, help="seconds per measurement, warm-up included")
    parser.add_argument("--warmup", type=float, default=8.0)
    parser.add_argument("--targets", nargs="+", default=["baseline", "ours1", "ours2"], choices=list(LABELS))
    parser.add_argument("--autoscale", action="store_true", help="also run the autoscaling timeline")
    parser.add_argument("--autoscale-only", action="store_true")
    parser.add_argument("--autoscale-streams", type=int, nargs="+", default=[16, 256, 512, 16, 0])
    parser.add_argument("--autoscale-phase-s", type=int, nargs="+", default=[15, 40, 40, 40, 20])
    parser.add_argument("--max-replicas", type=int, default=2)
    parser.add_argument("--target-ongoing", type=float, default=64)
    parser.add_argument("--autoscale-via", choices=list(VIA), default="proxy", help="how the autoscaling load reaches the ingress (direct: the replicas found at each phase start)")
    parser.add_argument("--serve-baseline", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    os.environ.update(LOCAL_ENV)
    config = load_config()
    model = ensure_default_model(open_store(config.store_root()), config.model.name)
    if args.serve_baseline:
        import uvicorn

        uvicorn.run(baseline_app(str(model.path), args.steps_per_s, args.max_num_seqs, config.engine.max_model_len), host="127.0.0.1", port=args.port, log_level="warning", loop="uvloop", http="httptools")
        return
    OUT.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    report = ""
    if not args.autoscale_only:
        results = {path: figures for target in args.targets for path, figures in measure(target, args, stamp, config.model.name).items()}
        report = format_report(results, args)
        (OUT / f"{stamp}-capacity.json").write_text(json.dumps({"args": vars(args), "results": results}, indent=2))
    if args.autoscale or args.autoscale_only:
        timeline = autoscale(args, stamp, config.model.name)
        report += "\nAutoscaling (Serve's running replicas per deployment, a row each time something changed):\n\n" + format_timeline(timeline)
        (OUT / f"{stamp}-capacity-autoscale.json").write_text(json.dumps(timeline, indent=2))
    print(report)
    (OUT / f"{stamp}-capacity.md").write_text(report)


if __name__ == "__main__":
    main()
