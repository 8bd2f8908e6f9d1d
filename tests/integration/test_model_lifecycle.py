"""End to end: fine-tune the real default model, canary it at 50%, promote, roll back — under a steady stream of requests, none failing.

The module serves from a model store of its own (the default model's v1 linked in),
so the version it trains and the traffic plan it changes never reach other modules.
"""

from __future__ import annotations

import threading
import time

import pytest

from billing.actor import admin_client
from billing.admin import wait
from common.runtime import REPO_ROOT
from tests.integration.test_training import linked_store
from training.config import load_train_config

pytestmark = pytest.mark.integration
MODEL = "SmolLM2-135M-Instruct"


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
def v2(base_url, maas_config, tmp_path_factory) -> str:
    """A short fine-tune of the real model on the sample data, published as v2 (Serve keeps serving v1 meanwhile)."""
    from training.finetune import run

    cfg = load_train_config(
        REPO_ROOT / "training/configs/pirate.yaml",
        {
            "optim": {"max_steps": 3, "warmup_steps": 1},
            "data": {"max_seq_len": 96},
            "scaling": {"cpus_per_worker": 0.5},  # beside the serving graph on 2 CPUs
            "checkpoint": {"every_steps": 100, "storage_path": str(tmp_path_factory.mktemp("runs"))},
            "model_store": str(maas_config.store_root()),
        },
    )
    result = run(cfg)
    assert result.version == "v2" and result.metrics["eval_loss"] < result.metrics["eval_loss_before"]
    return result.version


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
            chunks = list(client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Tell a long story."}], max_tokens=300, temperature=0, stream=True, stream_options={"include_usage": True}, extra_body={"ignore_eos": True}))
            long_stream.update(versions={c.system_fingerprint for c in chunks}, usage=chunks[-1].usage, finish=[c.choices[0].finish_reason for c in chunks if c.choices][-1])

        streamer = threading.Thread(target=stream_long)
        streamer.start()
        time.sleep(2.0)
        plan = do_rollback(maas_config, who="tests")
        assert plan.weights() == {"v1": 100} and plan.deployed() == ["v1"]
        assert set(traffic.versions_since(time.monotonic(), at_least=6)) == {fp("v1")}
        streamer.join(timeout=300)
        assert long_stream["versions"] == {fp("v2")} and long_stream["finish"] == "length" and long_stream["usage"].completion_tokens == 300
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
        if by_version.get("v2", 0) >= 300:
            break
        time.sleep(0.5)
    assert by_version.get("v1", 0) > 0 and by_version.get("v2", 0) >= 300, by_version
    actions = [a["action"] for a in wait(admin_client(billing_actor).audit_log(50)) if a["action"].startswith("model.")]
    assert {"model.canary", "model.promote", "model.rollback"} <= set(actions)
