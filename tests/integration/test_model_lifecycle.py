"""End to end: canary a second version of the real default model at 50%, promote, roll back — under a steady stream of requests, none failing.

The module serves from a model store of its own (the default model's v1 linked in, and a v2 of the same
weights: routing between versions is what is under test here; training one is test_training's and
test_fine_tuning_api's), so the traffic plan it changes never reaches other modules.
"""

from __future__ import annotations

import threading
import time

import pytest

from billing.actor import admin_client
from billing.admin import wait
from tests.integration.conftest import linked_store, linked_version

pytestmark = pytest.mark.integration
MODEL = "SmolLM2-135M-Instruct"
LONG = 160  # tokens of the stream that outlives its version: it spans the rollback


@pytest.fixture(scope="module")
def config_overrides(tmp_path_factory) -> dict:
    return {"model_store": {"root": str(linked_store(tmp_path_factory))}, "deployments": {"ingress": {"autoscaling": {"min_replicas": 2, "max_replicas": 2}}}}


class Traffic:
    """Requests in two threads (one streaming, one not) until stopped; records version and outcome of each."""

    def __init__(self, client):
        self.client = client
        self.results: list[tuple[float, str | None, str | None]] = []  # (start time, version, error)
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._loop, args=(stream,), daemon=True) for stream in (False, True)]

    def _one(self, stream: bool) -> str | None:
        kwargs = dict(model=MODEL, messages=[{"role": "user", "content": "Say something about the sea."}], max_tokens=6, temperature=0)
        if not stream:
            resp = self.client.chat.completions.create(**kwargs)
            assert resp.usage.completion_tokens >= 1
            return resp.system_fingerprint
        fingerprints = {c.system_fingerprint for c in self.client.chat.completions.create(stream=True, **kwargs)}
        assert len(fingerprints) == 1
        return fingerprints.pop()

    def _loop(self, stream: bool) -> None:
        while not self._stop.is_set():
            t0 = time.monotonic()
            try:
                self.results.append((t0, self._one(stream), None))
            except Exception as exc:  # recorded: the test asserts there are none
                self.results.append((t0, None, repr(exc)))

    def start(self) -> "Traffic":
        for t in self._threads:
            t.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(timeout=120)

    def versions_since(self, t0: float, at_least: int = 8, timeout_s: float = 180) -> list[str | None]:
        deadline = time.monotonic() + timeout_s
        while len([r for r in self.results if r[0] >= t0]) < at_least and time.monotonic() < deadline:
            time.sleep(0.2)
        return [r[1] for r in self.results if r[0] >= t0]


@pytest.fixture(scope="module")
def v2(maas_config) -> str:
    """v2 published in the store while Serve keeps serving v1."""
    linked_version(maas_config.store_root(), MODEL, "v2")
    return "v2"


def test_canary_promote_rollback_under_load(base_url, maas_config, client, v2, billing_actor):

    from cluster.versions import do_canary, do_promote, do_rollback, traffic_file

    fp = lambda v: f"{MODEL}@{v}"  # noqa: E731
    traffic = Traffic(client).start()
    try:
        assert set(traffic.versions_since(time.monotonic() - 1, at_least=4)) == {fp("v1")}

        plan = do_canary(maas_config, v2, 50, who="tests")
        assert plan.weights() == {"v1": 50, "v2": 50}
        seen = traffic.versions_since(time.monotonic(), at_least=12)
        assert set(seen) == {fp("v1"), fp("v2")}, seen  # both versions answer

        plan = do_promote(maas_config, None, who="tests")
        assert plan.weights() == {"v2": 100} and plan.previous == "v1"
        assert set(traffic.versions_since(time.monotonic(), at_least=6)) == {fp("v2")}

        # A long stream that starts on v2 must finish on v2 although the rollback retires v2 meanwhile.
        long_stream = {}

        def stream_long():
            chunks = list(client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Tell a long story."}], max_tokens=LONG, temperature=0, stream=True, stream_options={"include_usage": True}, extra_body={"ignore_eos": True}))
            long_stream.update(versions={c.system_fingerprint for c in chunks}, usage=chunks[-1].usage, finish=[c.choices[0].finish_reason for c in chunks if c.choices][-1])

        streamer = threading.Thread(target=stream_long)
        streamer.start()
        time.sleep(2.0)
        plan = do_rollback(maas_config, who="tests")
        assert plan.weights() == {"v1": 100} and plan.deployed() == ["v1"]
        assert set(traffic.versions_since(time.monotonic(), at_least=6)) == {fp("v1")}
        streamer.join(timeout=300)
        assert long_stream["versions"] == {fp("v2")} and long_stream["finish"] == "length" and long_stream["usage"].completion_tokens == LONG
    finally:
        traffic.stop()

    errors = [r for r in traffic.results if r[2] is not None]
    assert not errors, errors[:5]
    assert len(traffic.results) >= 30
    assert traffic_file(maas_config).load().stable == "v1"

    # The ledger attributes tokens to the version that served them; the audit log has every switch.
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        rows = wait(admin_client(billing_actor).spend_rows(None, "tests"))
        by_version = {r.version: r.completion_tokens for r in rows if r.model == MODEL}
        if by_version.get("v2", 0) >= LONG:
            break
        time.sleep(0.5)
    assert by_version.get("v1", 0) > 0 and by_version.get("v2", 0) >= LONG, by_version
    actions = [a["action"] for a in wait(admin_client(billing_actor).audit_log(50)) if a["action"].startswith("model.")]
    assert {"model.canary", "model.promote", "model.rollback"} <= set(actions)
