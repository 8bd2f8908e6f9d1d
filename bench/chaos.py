"""Chaos: steady streamed and whole traffic while each kind of process is SIGKILLed in turn, then the client's view reconciled with the ledger row by row.

The library half (traffic, kills, reconciliation) is what the chaos test of `tests/integration/test_billing_e2e.py` runs, bounded;
`python -m bench.chaos` runs it longer over every process kind, on SQLite and on a real PostgreSQL
(Debian's package, as the tests start it), and prints the table recorded in bench/RESULTS.md:

    python -m bench.chaos [--ledgers sqlite postgresql --kinds generator ingress ... --settle-s 20 --clients 4]

Targets: 0 rows lost, 0 double-counted, 0 over-billed, and every failure the client sees an error
envelope or a cut stream.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Iterator

logger = logging.getLogger("bench.chaos")

# Process kinds, by the class name Ray's state API gives their actor (Serve replicas: ServeReplica:<app>:<deployment>).
KINDS = {
    "generator": ":Generator",
    "postprocessor": ":Postprocessor",
    "tokenizer": ":Tokenizer",
    "ingress": ":Ingress",
    "billing": "BillingActor",
    "controller": "ServeController",
    "proxy": "ProxyActor",
}
MODEL = "SmolLM2-135M-Instruct"


@dataclass
class Seen:
    """One request as the client saw it."""

    stream: bool
    request_id: str | None = None
    outcome: str = ""  # ok | cut (a response that broke off) | refused (no response at all: nothing listening) | envelope | bare
    status: int | None = None
    usage: int | None = None  # completion tokens in the response's usage
    chunks: int = 0  # streamed chunks with text that reached the client
    detail: str = ""
    phase: str = ""  # the last process kind killed when the request ended ("" before the first kill)


@dataclass
class Traffic:
    """`clients` threads sending chat requests (streamed and whole in turn) until stopped."""

    base_url: str
    key: str
    clients: int = 3
    max_tokens: int = 24
    seen: list[Seen] = field(default_factory=list)
    phase: str = ""  # set by the chaos run before each kill

    def __post_init__(self) -> None:
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._lock = threading.Lock()

    def start(self) -> "Traffic":
        self._threads = [threading.Thread(target=self._loop, args=(i,), daemon=True) for i in range(self.clients)]
        for t in self._threads:
            t.start()
        return self

    def stop(self) -> list[Seen]:
        self._stop.set()
        for t in self._threads:
            t.join(timeout=180)
        return self.seen

    def _loop(self, i: int) -> None:
        import openai

        client = openai.OpenAI(base_url=self.base_url, api_key=self.key, max_retries=0, timeout=60)
        n = 0
        while not self._stop.is_set():
            s = one_request(client, stream=(n + i) % 2 == 0, max_tokens=self.max_tokens, prompt=f"Count to {n % 7 + 3}, client {i}.")
            s.phase = self.phase  # the kill it ended under (a request cut by a kill ends just after it)
            with self._lock:
                self.seen.append(s)
            if s.outcome != "ok":
                time.sleep(0.5)  # a client backs off on errors
            n += 1


def one_request(client: Any, stream: bool, max_tokens: int, prompt: str = "Say hi") -> Seen:
    import openai

    s = Seen(stream=stream)
    try:
        kwargs = dict(model=MODEL, messages=[{"role": "user", "content": prompt}], max_tokens=max_tokens, temperature=0)
        if stream:
            for chunk in client.chat.completions.create(stream=True, stream_options={"include_usage": True}, **kwargs):
                s.request_id = s.request_id or chunk.id.removeprefix("chatcmpl-")
                if chunk.usage is not None:
                    s.usage = chunk.usage.completion_tokens
                elif chunk.choices and chunk.choices[0].delta.content:
                    s.chunks += 1
            s.outcome = "ok" if s.usage is not None else "cut"
        else:
            r = client.chat.completions.create(**kwargs)
            s.request_id, s.usage, s.outcome = r.id.removeprefix("chatcmpl-"), r.usage.completion_tokens, "ok"
    except openai.APIStatusError as exc:
        s.status = exc.status_code
        body = exc.body if isinstance(exc.body, dict) else None
        s.outcome = "envelope" if body is not None and {"message", "type", "code"} <= set(body) else "bare"
        s.detail = str(exc)[:200]
    except (openai.APIConnectionError, openai.APITimeoutError, Exception) as exc:  # a cut stream or a refused connection (noqa: BLE001)
        # No response began (no id, no chunk): the connection was refused or reset before an answer, e.g. while
        # the proxy restarts. Otherwise a response broke off.
        s.outcome = "refused" if s.request_id is None and s.chunks == 0 else "cut"
        s.detail = f"{type(exc).__name__}: {exc}"[:200]
    return s


def actor_pid(kind: str) -> int | None:
    """The pid of the live actor of one process kind (the first, if several)."""
    from ray._private.state import actors  # the GCS's actor table: needs no dashboard

    pattern = KINDS[kind]
    for a in actors(actor_state_name="ALIVE").values():
        name = a.get("ActorClassName") or ""
        if (name.endswith(pattern) if pattern.startswith(":") else name == pattern) and a.get("Pid"):
            return int(a["Pid"])
    return None


def kill(kind: str) -> int:
    pid = actor_pid(kind)
    if pid is None:
        raise RuntimeError(f"no live {kind} process")
    os.kill(pid, signal.SIGKILL)
    logger.info("killed %s (pid %d)", kind, pid)
    return pid


def wait_serving(base_url: str, key: str, timeout_s: float = 240) -> float:
    """Seconds until a whole request succeeds again."""
    import openai

    client = openai.OpenAI(base_url=base_url, api_key=key, max_retries=0, timeout=30)
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout_s:
        if one_request(client, stream=False, max_tokens=2).outcome == "ok":
            return time.monotonic() - t0
        time.sleep(1)
    raise TimeoutError(f"not serving {timeout_s:.0f}s after the kill")


@dataclass
class Reconciled:
    requests: int = 0
    ok: int = 0
    cut: int = 0
    refused: int = 0
    envelope: int = 0
    bare: int = 0  # failures the client saw that were neither an envelope nor a cut stream
    lost: int = 0  # requests the client saw an id of, with no ledger row
    double: int = 0  # ledger rows counted more than once (a request id twice, or totals above the rows' sum)
    over_billed: int = 0  # rows billed more than the response said (ok) or than max_tokens (otherwise)
    floor_only: int = 0  # rows billed at the ingress's floor, no engine count (generator killed)
    problems: list[str] = field(default_factory=list)
    by_phase: dict[str, dict[str, int]] = field(default_factory=dict)  # outcomes of the requests that ended after each kill (before the next)


def reconcile(seen: list[Seen], rows: list[Any], totals_completion: int, max_tokens: int, seen_by_phase: bool = False) -> Reconciled:
    """The client's view against the ledger's rows (`UsageEvent`s of the chaos tenant) and its totals."""
    r = Reconciled(requests=len(seen))
    if seen_by_phase:
        for s in seen:
            r.by_phase.setdefault(s.phase or "before any kill", {}).setdefault(s.outcome, 0)
            r.by_phase[s.phase or "before any kill"][s.outcome] += 1
    by_id: dict[str, list[Any]] = {}
    for row in rows:
        by_id.setdefault(row.request_id, []).append(row)
    r.double = sum(len(v) - 1 for v in by_id.values())
    if totals_completion != sum(row.completion_tokens or 0 for row in rows):
        r.double += 1
        r.problems.append(f"totals {totals_completion} != sum of rows {sum(row.completion_tokens or 0 for row in rows)}")
    for s in seen:
        setattr(r, s.outcome, getattr(r, s.outcome) + 1)
        if s.outcome == "bare":
            r.problems.append(f"bare error: {s.detail}")
        if s.request_id is None:
            continue
        found = by_id.get(s.request_id)
        if not found:
            r.lost += 1
            r.problems.append(f"lost {s.request_id} ({s.outcome}, {s.chunks} chunks)")
            continue
        row = found[0]
        if s.outcome == "ok" and row.completion_tokens != s.usage:
            r.over_billed += row.completion_tokens > s.usage
            r.problems.append(f"{s.request_id}: billed {row.completion_tokens}, response said {s.usage}")
    for row in rows:
        if (row.completion_tokens or 0) > max_tokens:
            r.over_billed += 1
            r.problems.append(f"{row.request_id}: billed {row.completion_tokens} > max_tokens {max_tokens}")
        if row.status.endswith("_unmetered"):
            r.floor_only += 1
    return r


def ledger_view(billing_admin: Any, tenant: str) -> tuple[list[Any], int]:
    """The chaos tenant's rows and its completion-token total as the ledger's report sums it."""
    from billing.admin import wait
    from billing.quota import period_of

    rows = wait(billing_admin.events(None, tenant))
    total = sum(row.completion_tokens for row in wait(billing_admin.spend_rows(period_of(time.time()), tenant)))
    return rows, total


def run(base_url: str, key: str, billing_admin: Any, tenant: str, kinds: list[str], clients: int, settle_s: float, max_tokens: int, warm_s: float = 5) -> tuple[Reconciled, dict[str, float]]:
    """Traffic, each kind killed in turn (waiting until serving resumes), then the reconciliation once the ledger settles."""
    traffic = Traffic(base_url, key, clients=clients, max_tokens=max_tokens).start()
    recovery: dict[str, float] = {}
    try:
        time.sleep(warm_s)
        for kind in kinds:
            traffic.phase = kind
            kill(kind)
            recovery[kind] = wait_serving(base_url, key)
            time.sleep(warm_s)
    finally:
        seen = traffic.stop()
    time.sleep(settle_s)  # outboxes flush; pending rows close after billing.pending_timeout_s
    rows, total = ledger_view(billing_admin, tenant)
    return reconcile(seen, rows, total, max_tokens, seen_by_phase=True), recovery


def format_table(results: list[tuple[str, Reconciled, dict[str, float]]]) -> str:
    head = "| ledger | requests | ok | cut | refused | error envelopes | bare errors | rows lost | double-counted | over-billed | billed at the floor | recovery s (per kill) |"
    lines = [head, "|" + "---|" * 12]
    for ledger, r, rec in results:
        kills = ", ".join(f"{k} {v:.0f}" for k, v in rec.items())
        lines.append(f"| {ledger} | {r.requests} | {r.ok} | {r.cut} | {r.refused} | {r.envelope} | {r.bare} | {r.lost} | {r.double} | {r.over_billed} | {r.floor_only} | {kills} |")
    for ledger, r, _ in results:
        if r.by_phase:
            lines += ["", f"Outcomes of the requests that ended after each kill, before the next ({ledger}):", "", "| after | ok | cut | refused | envelope | bare |", "|---|---|---|---|---|---|"]
            for phase, counts in r.by_phase.items():
                lines.append(f"| {phase} | " + " | ".join(str(counts.get(k, 0)) for k in ("ok", "cut", "refused", "envelope", "bare")) + " |")
    return "\n".join(lines)


@contextmanager
def graph(ledger_url: str, overrides: dict, tenant: str) -> Iterator[tuple[str, Any, str]]:
    """A local cluster serving the default model over `ledger_url`: (base URL, billing admin, a key of `tenant`); stopped after."""
    from billing.actor import admin_client, get
    from billing.admin import wait
    from cluster import local
    from common.config import deep_merge, load_config
    from common.model_store import ensure_default_model, open_store
    from common.runtime import free_port

    os.environ["MAAS_LEDGER_URL"] = ledger_url
    config = load_config(overrides=deep_merge(overrides, {"http": {"host": "127.0.0.1", "port": free_port()}, "billing": {"ledger_url": ledger_url}}))
    ensure_default_model(open_store(config.store_root()), config.model.name)
    local.start_ray(num_cpus=os.cpu_count(), include_dashboard=False)
    try:
        base_url = local.deploy(config)
        admin = admin_client(get(config.billing))
        key, _ = wait(admin.create_key(tenant, "enterprise", "tenant", None, tenant, "bench"))
        yield base_url, admin, key
    finally:
        local.stop()


def main() -> None:
    import json

    from common.runtime import REPO_ROOT, use_local_env

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ledgers", nargs="+", default=["sqlite", "postgresql"], choices=["sqlite", "postgresql"])
    # The postprocessor stage runs only with `deployments.inline_postprocess: false` (by default the ingress writes responses).
    p.add_argument("--kinds", nargs="+", default=[k for k in KINDS if k != "postprocessor"], choices=list(KINDS))
    p.add_argument("--clients", type=int, default=4)
    p.add_argument("--max-tokens", type=int, default=24)
    p.add_argument("--settle-s", type=float, default=25)
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    use_local_env()
    results = []
    for ledger in args.ledgers:
        pg = None
        if ledger == "postgresql":
            from tests.postgres import PostgresServer

            pg = PostgresServer().start()
            url = pg.new_database("chaos")
        else:
            (REPO_ROOT / "bench" / "out").mkdir(exist_ok=True)  # ignored by git: a fresh clone has none
            url = f"sqlite:///{REPO_ROOT}/bench/out/chaos-{int(time.time())}.db"
        try:
            with graph(url, chaos_overrides(), "chaos") as (base_url, admin, key):
                r, rec = run(base_url, key, admin, "chaos", args.kinds, args.clients, args.settle_s, args.max_tokens)
            results.append((ledger, r, rec))
            logger.info("%s: %s", ledger, json.dumps(r.__dict__, default=str)[:2000])
        finally:
            if pg is not None:
                pg.stop()
    print(format_table(results))


def chaos_overrides() -> dict:
    """Billing closes rows the engine never counted after 10 s (60 by default), so a run settles quickly."""
    return {"billing": {"pending_timeout_s": 10, "plans": {"enterprise": {}}}}


if __name__ == "__main__":
    main()
