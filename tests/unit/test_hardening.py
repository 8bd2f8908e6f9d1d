"""Closed by default (issue 16), the parts that need no Ray: keys, tenants, plans, the ledger, jobs, streams."""

from __future__ import annotations

import asyncio
import json
import time
from decimal import Decimal

import pytest

from billing.client import BillingClient
from billing.ledger import Ledger
from billing.records import UsageEvent
from billing.service import BillingCore
from common import envs
from common.config import BillingConfig, Plan
from common.errors import AuthenticationError, InvalidRequestError, ServiceUnavailableError
from deployments.openai.protocol import ChatCompletionRequest
from deployments.openai.service import Backend, OpenAIService, StaticPicker
from tests.fakes import FakePostprocessorClient, FakeTokenizerClient, ScriptedEngine
from tests.unit.test_billing import NOV, PRICE, InProcess, config


def _event(rid: str, tenant: str | None = "acme", status: str = "ok") -> UsageEvent:
    return UsageEvent(rid, time.time(), tenant, "sk-maas-aaaaaaaa", "m", "v1", "chat", status, 10, 5, "0.5", "1.5", "0.01", "h1")  # type: ignore[arg-type]


def test_one_bad_event_is_set_aside_and_the_rest_of_its_batch_is_stored(tmp_path):
    ledger = Ledger(f"sqlite:///{tmp_path}/l.db")
    batch = [_event("r1"), _event("r2", tenant=None), _event("r3"), _event("r4", status="service_unavailable")]
    fresh = [m.row.event for m in ledger.record(batch)]
    assert sorted(e.request_id for e in fresh) == ["r1", "r3", "r4"]
    assert [r["request_id"] for r in ledger.rejected()] == ["r2"] and "NOT NULL" in ledger.rejected()[0]["reason"]
    assert ledger.record(batch) == []  # resent: the stored ones count once, the bad one stays aside once
    assert len(ledger.rejected()) == 1 and ledger.count() == 3


def test_keys_are_never_overwritten_and_a_collision_draws_another(tmp_path):
    class CollidingOnce(Ledger):
        tries = 0

        def insert_key(self, key):
            self.tries += 1
            return False if self.tries == 1 else super().insert_key(key)

    ledger = CollidingOnce(f"sqlite:///{tmp_path}/l.db")
    core = BillingCore(config(), ledger)
    _, record = core.create_key("acme")
    assert ledger.tries == 2 and [k.key_id for k in core.list_keys()] == [record.key_id]
    assert not ledger.insert_key(record)  # the same id again: refused, the stored key stays
    first = core.revoke_key(record.key_id).revoked_at
    time.sleep(0.01)
    assert core.revoke_key(record.key_id).revoked_at == first


@pytest.mark.parametrize("tenant", ["a/b", "../etc", "", "x" * 129, "sp ace", ".", ".."])
def test_tenant_names_are_validated_in_the_billing_core(tmp_path, tenant):
    core = BillingCore(config(), Ledger(f"sqlite:///{tmp_path}/l.db"))
    with pytest.raises(InvalidRequestError) as err:
        core.create_key(tenant)
    assert err.value.param == "tenant"
    with pytest.raises(InvalidRequestError):
        core.set_plan(tenant, "free")


def test_a_plan_the_config_no_longer_has_gets_the_default_plan_never_unlimited(tmp_path):
    ledger = Ledger(f"sqlite:///{tmp_path}/l.db")
    BillingCore(config(free=Plan(rpm=10), gold=Plan()), ledger).create_key("acme", plan="gold")
    core = BillingCore(config(free=Plan(rpm=10)), ledger)  # gold was removed from the config
    assert core.plan_of("acme") == Plan(rpm=10)
    with pytest.raises(ValueError, match="default_plan"):
        BillingConfig.model_validate({"plans": {"gold": {}}, "default_plan": "free"})


def test_a_restarted_actor_keeps_the_config_it_was_last_given(tmp_path):
    ledger = Ledger(f"sqlite:///{tmp_path}/l.db")
    first = config(free=Plan(rpm=10))
    core = BillingCore(first, ledger)
    later = config(free=Plan(rpm=99))
    assert core.configure(later, "deploy")
    assert BillingCore(first, ledger, restarted=True).config == later  # Ray replays the first config; the ledger's wins
    assert BillingCore(first, ledger).config == first  # a new actor takes the config it is created with


def test_a_job_receives_only_allow_listed_variables():
    env = {"MAAS_MODEL_STORE": "/s", "MAAS_TRAIN_STORAGE": "/t", "MAAS_LEDGER_URL": "postgresql://u:pw@h/db", "MAAS_API_KEY": "sk-maas-x", "PATH": "/bin"}
    assert envs.job_env(env) == {"MAAS_MODEL_STORE": "/s", "MAAS_TRAIN_STORAGE": "/t"}


async def test_a_stream_closed_before_its_first_piece_is_read_is_settled(tmp_path):
    core = BillingCore(config(free=Plan(monthly_budget=Decimal("1"), rpm=100, tpm=100_000)), Ledger(f"sqlite:///{tmp_path}/l.db"))
    key, _ = core.create_key("acme")
    billing = BillingClient(core.config, InProcess(core), "h1")
    await billing.start()
    engine = ScriptedEngine(delay_s=0.05)
    service = OpenAIService("m", FakeTokenizerClient(), StaticPicker(Backend("v1", FakePostprocessorClient(engine), PRICE)), billing=billing)
    principal = await service.authenticate(f"Bearer {key}")
    body = ChatCompletionRequest(model="m", messages=[{"role": "user", "content": "hi"}], stream=True)
    stream = await service.chat(body, principal)
    lease = billing._leases["acme"]
    assert lease.in_flight > 0
    await stream.aclose()  # the client left before the response's first body chunk went out
    assert lease.in_flight == 0 and billing.queued == 1
    await billing.close(timeout_s=1)
    (event,) = core.events(tenant="acme")
    # Billed the floor (nothing reached the client) while the engine's own count may follow.
    assert (event.status, event.completion_tokens, event.delivered_tokens) == ("aborted", 0, 0) and core.status()["pending"] == 1


async def test_a_replica_that_cannot_sync_answers_503_never_401_and_reports_unhealthy(tmp_path):
    now = [NOV]
    core = BillingCore(config(), Ledger(f"sqlite:///{tmp_path}/l.db"), clock=lambda: now[0])
    key, _ = core.create_key("acme")
    transport = InProcess(core)
    transport.down = True  # the billing actor is not up yet
    client = BillingClient(core.config, transport, "h1", clock=lambda: now[0])
    starting = asyncio.get_running_loop().create_task(client.start())
    await asyncio.sleep(0.05)
    with pytest.raises(ServiceUnavailableError):
        await client.authenticate(f"Bearer {key}")  # a valid key: billing cannot tell yet, so 503, not 401
    with pytest.raises(AuthenticationError):
        await client.authenticate(None)  # no key at all is a 401 whatever billing's state
    assert client.health() is None
    now[0] += 2 * client.stale_after_s + 1
    assert "never synced" in client.health()  # Serve's health check replaces a replica stuck like this
    transport.down = False
    await asyncio.wait_for(starting, 5)  # it kept retrying
    assert (await client.authenticate(f"Bearer {key}")).tenant == "acme" and client.health() is None
    transport.down = True
    now[0] += client.stale_after_s + 1  # the actor may have dropped this replica's leases and missed a revocation
    with pytest.raises(ServiceUnavailableError):
        await client.authenticate(f"Bearer {key}")
    with pytest.raises(ServiceUnavailableError):
        await client.admit(core.list_keys()[0], "r1", "m", "v1", "chat", PRICE, 10, 10)
    await client.close(timeout_s=0)


async def test_usage_reports_are_rate_limited_per_tenant(tmp_path):
    from billing.admin import BillingAdmin
    from common.errors import RateLimitError
    from deployments.openai.accounts import AccountsService

    now = [NOV]
    core = BillingCore(config(), Ledger(f"sqlite:///{tmp_path}/l.db"))
    _, acme = core.create_key("acme")
    _, other = core.create_key("other")
    accounts = AccountsService(BillingAdmin.in_process(core), "USD", lambda: now[0], reports_per_s=1.0, reports_burst=3)
    for _ in range(3):
        await accounts.tenant_usage(acme, None, None)
    with pytest.raises(RateLimitError) as err:
        await accounts.tenant_usage(acme, None, None)
    assert err.value.status_code == 429 and err.value.headers["Retry-After"] == "1"
    await accounts.tenant_usage(other, None, None)  # another tenant's bucket is its own
    now[0] += 1.0
    await accounts.tenant_usage(acme, None, None)


def test_replica_servers_bind_the_node_ip_not_every_interface():
    from deployments.app import deployment_options
    from deployments.network import SETUP_HOOK, node_address, setup_hook_env
    from common.config import DeploymentConfig

    assert node_address("[::]:0", "127.0.0.1") == "127.0.0.1:0"
    assert node_address("0.0.0.0:9000", "10.1.2.3") == "10.1.2.3:9000"
    assert node_address("[::]:0", "fd00::5") == "[fd00::5]:0"
    assert node_address("127.0.0.2:5", "127.0.0.1") == "127.0.0.2:5"  # a concrete address is kept
    env = deployment_options(DeploymentConfig(env_vars={"A": "1"}))["ray_actor_options"]["runtime_env"]["env_vars"]
    assert env == {**setup_hook_env(), "A": "1"} and SETUP_HOOK in env.values()


def test_replicas_hand_messages_to_a_busy_loop_within_the_switch_interval(monkeypatch):
    import sys

    from deployments.network import shorten_gil_switch_interval

    before = sys.getswitchinterval()
    try:
        monkeypatch.delenv("MAAS_GIL_SWITCH_INTERVAL_MS", raising=False)
        shorten_gil_switch_interval()
        assert sys.getswitchinterval() == 0.0005  # the default: 0.5 ms, not Python's 5
        monkeypatch.setenv("MAAS_GIL_SWITCH_INTERVAL_MS", "2")
        shorten_gil_switch_interval()
        assert sys.getswitchinterval() == 0.002
        sys.setswitchinterval(before)
        monkeypatch.setenv("MAAS_GIL_SWITCH_INTERVAL_MS", "0")  # 0 keeps Python's own
        shorten_gil_switch_interval()
        assert sys.getswitchinterval() == before
    finally:
        sys.setswitchinterval(before)


async def test_a_key_limited_to_other_models_gets_403_model_not_allowed(tmp_path):
    from common.errors import PermissionDeniedError

    core = BillingCore(config(free=Plan(monthly_budget=Decimal("1"))), Ledger(f"sqlite:///{tmp_path}/l.db"))
    narrow, _ = core.create_key("acme", policy={"models": ["another-model"]})
    wide, _ = core.create_key("acme", policy={"models": ["m", "another-model"]})
    billing = BillingClient(core.config, InProcess(core), "h1")
    await billing.start()
    engine = ScriptedEngine()
    service = OpenAIService("m", FakeTokenizerClient(), StaticPicker(Backend("v1", FakePostprocessorClient(engine), PRICE)), billing=billing)
    body = ChatCompletionRequest(model="m", messages=[{"role": "user", "content": "hi"}])
    with pytest.raises(PermissionDeniedError) as err:
        await service.chat(body, await service.authenticate(f"Bearer {narrow}"))
    assert err.value.code == "model_not_allowed" and err.value.param == "model" and engine.requests == []
    assert (await service.chat(body, await service.authenticate(f"Bearer {wide}")))["usage"]["completion_tokens"] > 0
    await billing.close(timeout_s=1)


def test_haproxy_binds_its_frontends_where_the_api_does_and_answers_its_errors_in_the_envelope(tmp_path):
    """Issue 25: Serve's HAProxy template binds stats and Prometheus on every interface and answers 502/503/504 as a bare 500."""
    import ray.serve._private.haproxy_templates as templates

    from common.config import MaasConfig
    from deployments.network import edit_haproxy_template, error_files, front_door_env

    edited = edit_haproxy_template(templates.HAPROXY_CONFIG_TEMPLATE, error_files(tmp_path))
    binds = [line.strip() for line in edited.splitlines() if line.strip().startswith("bind ")]
    assert binds and all(b.startswith(("bind {{ config.frontend_host }}", "bind {{ config.grpc_frontend_host }}")) for b in binds), binds
    for status in (502, 503, 504):
        assert f"errorfile {status} {tmp_path}/{status}.http" in edited
        raw = (tmp_path / f"{status}.http").read_bytes()
        head, _, body = raw.partition(b"\r\n\r\n")
        lines = head.decode().split("\r\n")
        assert lines[0].startswith(f"HTTP/1.1 {status} ") and f"Content-Length: {len(body)}" in lines and "Content-Type: application/json" in lines
        assert set(json.loads(body)["error"]) == {"message", "type", "param", "code"}
        assert ("Retry-After: 1" in lines or "Retry-After: 2" in lines) == (status != 504)
    with pytest.raises(ValueError):
        edit_haproxy_template("global\n", tmp_path)  # Serve's template changed: fail loudly rather than serve unbound
    assert front_door_env(MaasConfig.model_validate({"http": {"proxy": "python"}})) == {"RAY_SERVE_ENABLE_HA_PROXY": "0"}
    env = front_door_env(MaasConfig(), cpus=2)  # the default front door
    assert env["RAY_SERVE_ENABLE_HA_PROXY"] == "1" and env["RAY_SERVE_HAPROXY_NBTHREAD"] == "2" and any("SETUP_HOOK" in k for k in env)
