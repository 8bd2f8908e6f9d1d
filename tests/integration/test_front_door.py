"""The default front door, Serve's HAProxy mode (`http.proxy: haproxy`, issue 25): a C load balancer in front of the
ingress replicas' own HTTP ports, in place of Serve's Python proxy.

One real cluster with the real graph behind HAProxy: chat whole and streamed through it, nothing of it (HAProxy's
stats and Prometheus frontends included) listening beyond loopback, and, with the ingress replica killed under
load, every answer HAProxy gives itself in the OpenAI envelope (502/503 with `Retry-After`), never a bare 500.
"""

from __future__ import annotations

import threading
import time

import httpx
import pytest

from tests.integration.conftest import create_key
from tests.integration.test_serving import beyond_loopback, chat, cluster_listeners, collect

MODEL = "SmolLM2-135M-Instruct"


def test_the_graph_serves_through_haproxy_whole_and_streamed(client):
    haproxies = [p for p in cluster_listeners() if "haproxy" in p[2]]
    assert haproxies, "no HAProxy listens for this cluster"
    assert chat(client, max_tokens=4).usage.completion_tokens > 0
    text, usage, finish, _ = collect(chat(client, max_tokens=8, stream=True, stream_options={"include_usage": True}))
    assert text and usage.completion_tokens > 0 and finish in ("stop", "length")


def test_nothing_listens_beyond_loopback_haproxys_own_frontends_included(client):
    chat(client, max_tokens=2)
    listening = cluster_listeners()
    assert len([p for p in listening if "haproxy" in p[2]]) >= 3, listening  # the API, stats and Prometheus frontends
    exposed = beyond_loopback(listening)
    assert not exposed, f"listening beyond loopback: {exposed}"


def test_a_version_roots_own_port_answers_404_in_the_envelope(client):
    """Under HAProxy each application's ingress replica listens on a direct port, the version applications' router-free
    root too (loopback only, nothing routes to it): it answers nothing but a 404 in the envelope."""
    chat(client, max_tokens=2)
    answers = []
    for _, port, name in cluster_listeners():
        if "VersionRoot" not in name:
            continue
        try:
            r = httpx.get(f"http://127.0.0.1:{port}/anything", timeout=3)
        except httpx.HTTPError:  # its inter-replica gRPC port
            continue
        answers.append((r.status_code, r.json()["error"]["code"] if r.status_code == 404 else r.text[:80]))
    assert answers and all(a == (404, "not_found") for a in answers), answers


def _kill_under_load(base_url: str, key: str, workers: int = 6) -> tuple[list[tuple[int, str, str | None, dict | None]], list[str]]:
    """Whole requests from `workers` clients while the ingress replica is killed and comes back: (answers, cut connections)."""
    from bench.chaos import kill, wait_serving

    body = {"model": MODEL, "messages": [{"role": "user", "content": "Say hi."}], "max_tokens": 48}  # ~1 s each: several in flight at the kill
    seen: list[tuple[int, str, str | None, dict | None]] = []
    cut: list[str] = []
    stop = threading.Event()

    def load() -> None:
        with httpx.Client(timeout=60) as http:
            while not stop.is_set() and len(seen) < 400:
                try:
                    r = http.post(f"{base_url}/chat/completions", json=body, headers={"Authorization": f"Bearer {key}"})
                except httpx.HTTPError as exc:  # closed before any answer: nothing to judge but the count
                    cut.append(type(exc).__name__)
                    continue
                try:
                    parsed = r.json()
                except ValueError:
                    parsed = None
                seen.append((r.status_code, r.headers.get("content-type", ""), r.headers.get("retry-after"), parsed))

    threads = [threading.Thread(target=load) for _ in range(workers)]
    for t in threads:
        t.start()
    time.sleep(3)
    kill("ingress")
    wait_serving(base_url, key, timeout_s=180)
    time.sleep(1)
    stop.set()
    for t in threads:
        t.join(60)
    return seen, cut


def test_with_the_ingress_killed_haproxy_answers_in_the_envelope(base_url, billing_actor):
    """Killed under load (up to three times, until HAProxy has had to answer for it), every answer is the envelope."""
    key, _ = create_key(billing_actor, "front-door", plan="enterprise")
    answers, cuts = [], []
    for _ in range(3):
        seen, cut = _kill_under_load(base_url, key)
        answers += seen
        cuts += cut
        if any(s[0] in (502, 503, 504) for s in answers):
            break
    failed = [s for s in answers if s[0] != 200]
    bare = [s for s in failed if not (s[1].startswith("application/json") and isinstance(s[3], dict) and {"message", "type", "param", "code"} <= set(s[3].get("error", {})))]
    assert not bare, f"answers outside the envelope: {bare[:3]}"
    assert any(s[0] in (502, 503, 504) for s in failed), f"three kills and HAProxy never answered: {len(answers)} answers, cut {len(cuts)}"
    assert all(s[2] is not None for s in failed if s[0] in (502, 503))  # Retry-After where a retry helps
