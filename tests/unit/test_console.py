"""The console's static pages and the operator API under it (tenants, traffic, health, audit filters), over in-process fakes."""

from __future__ import annotations

import re
import time
from decimal import Decimal

import httpx
import pytest

from billing.ledger import SpendRow
from billing.reports import usage_report
from deployments.openai.operations import OperationsService
from tests.fakes import FakeFleet, ScriptedEngine
from tests.unit.test_metering import Server


@pytest.fixture
def srv(tmp_path):
    fleet = FakeFleet()
    with Server(tmp_path, ScriptedEngine(), operations=OperationsService(fleet, "m")) as server:
        server.fleet = fleet
        server.admin_key, server.admin = server.core.create_key("ops", role="admin", name="console-admin")
        yield server


def _url(srv, path):
    return f"http://127.0.0.1:{srv.port}{path}"


def test_console_files_are_served_without_a_key_under_a_strict_policy(srv):
    first = httpx.get(_url(srv, "/console"))
    assert first.status_code == 308 and first.headers["location"] == "console/"
    page = httpx.get(_url(srv, "/console/"))
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html") and 'src="console.js"' in page.text
    policy = page.headers["content-security-policy"]
    assert "script-src 'self'" in policy and "connect-src 'self'" in policy and "frame-ancestors 'none'" in policy
    for name, kind in (("console.js", "text/javascript"), ("console.css", "text/css")):
        asset = httpx.get(_url(srv, f"/console/{name}"))
        assert asset.status_code == 200 and asset.headers["content-type"].startswith(kind)
    js = httpx.get(_url(srv, "/console/console.js")).text
    assert "sessionStorage" in js and "localStorage" not in js and "document.cookie" not in js and not re.findall(r"https?://(?!www\.w3\.org/2000/svg)", js)  # nothing fetched from elsewhere
    missing = httpx.get(_url(srv, "/console/../billing/ledger.py"))
    assert missing.status_code == 404 and missing.json()["error"]["type"]
    assert httpx.get(_url(srv, "/console/nope.js")).json()["error"]["code"] == "not_found"


def test_an_operator_sees_every_tenant_with_the_ledgers_numbers(srv):
    auth = {"Authorization": f"Bearer {srv.key}"}
    assert httpx.post(_url(srv, "/v1/chat/completions"), json={"model": "m", "messages": [{"role": "user", "content": "hi"}]}, headers=auth).status_code == 200
    admin = {"Authorization": f"Bearer {srv.admin_key}"}
    deadline = time.monotonic() + 30  # until the ledger has the request (a bound, not a timing claim)
    while not (tenants := httpx.get(_url(srv, "/admin/tenants"), headers=admin).json())["data"][0]["requests"]:
        assert time.monotonic() < deadline
        time.sleep(0.1)
    first = tenants["data"][0]
    usage = httpx.get(_url(srv, "/admin/usage"), headers=admin).json()
    assert first["tenant"] == "acme" and {t["tenant"] for t in tenants["data"]} == {"acme", "ops"}  # top spender first
    assert first["spent"] == usage["total"]["cost"] and first["requests"] == usage["total"]["requests"] == 1
    assert usage["by_tenant"][0]["cost"] == usage["total"]["cost"] and usage["by_model"][0]["model"] == "m@v1"
    # /v1/account names the signed-in key, so the console knows an operator from a tenant.
    me = httpx.get(_url(srv, "/v1/account"), headers=admin).json()
    assert me["key"] == {"key_id": srv.admin.key_id, "name": "console-admin", "role": "admin"}
    assert httpx.get(_url(srv, "/admin/tenants"), headers=auth).status_code == 403


def test_traffic_changes_from_the_api_follow_the_same_rules_as_the_cli(srv):
    admin = {"Authorization": f"Bearer {srv.admin_key}"}
    got = httpx.get(_url(srv, "/admin/traffic"), headers=admin).json()
    assert got["plan"]["weights"] == {"v1": 100} and [v["version"] for v in got["versions"]] == ["v1", "v2", "v3"]
    moved = httpx.post(_url(srv, "/admin/traffic"), json={"action": "canary", "version": "v2", "weight": 20}, headers=admin)
    assert moved.status_code == 200 and moved.json()["plan"]["weights"] == {"v1": 80, "v2": 20}
    assert srv.fleet.calls[-1] == ("canary", "v2", 20, f"console:{srv.admin.key_id}")
    promoted = httpx.post(_url(srv, "/admin/traffic"), json={"action": "promote"}, headers=admin).json()["plan"]
    assert promoted["stable"] == "v2" and promoted["previous"] == "v1"
    assert httpx.post(_url(srv, "/admin/traffic"), json={"action": "rollback"}, headers=admin).json()["plan"]["stable"] == "v1"
    for body, param in (
        ({"action": "canary", "version": "v2", "weight": 0}, "weight"),
        ({"action": "canary", "version": "v2"}, "weight"),
        ({"action": "explode"}, "action"),
        ({"action": "promote", "weight": 5}, "weight"),
        ({"action": "canary", "version": "../etc", "weight": 5}, "version"),
        ({"action": "canary", "version": "v1", "weight": 5}, "version"),  # already stable
        ({"action": "rollback", "extra": 1}, "extra"),
    ):
        resp = httpx.post(_url(srv, "/admin/traffic"), json=body, headers=admin)
        assert resp.status_code == 400 and resp.json()["error"]["param"] == param, (body, resp.text)
    assert httpx.post(_url(srv, "/admin/traffic"), json={"action": "rollback"}, headers=admin).status_code == 400  # nothing to roll back
    assert httpx.post(_url(srv, "/admin/traffic"), json={"action": "rollback"}, headers={"Authorization": f"Bearer {srv.key}"}).status_code == 403
    deadline = time.monotonic() + 5
    while srv.fleet.settled < 3:  # each change retires what it no longer needs, in the background
        assert time.monotonic() < deadline
        time.sleep(0.05)


def test_health_and_audit_filters(srv):
    admin = {"Authorization": f"Bearer {srv.admin_key}"}
    health = httpx.get(_url(srv, "/admin/health"), headers=admin).json()
    assert health["object"] == "health" and health["applications"]["maas"]["deployments"]["Ingress"]["replicas"] == {"RUNNING": 1}
    srv.core.set_plan("acme", "tiny", who="ops-alice")
    srv.core.record_audit("cli:bob", "model.canary", "m", "{}")
    keys = httpx.get(_url(srv, "/admin/audit"), params={"action": "key."}, headers=admin).json()["data"]
    assert keys and all(a["action"].startswith("key.") for a in keys)
    by_alice = httpx.get(_url(srv, "/admin/audit"), params={"actor": "ops-alice"}, headers=admin).json()["data"]
    assert [(a["action"], a["target"]) for a in by_alice] == [("tenant.plan", "acme")]
    assert httpx.get(_url(srv, "/admin/audit"), params={"target": "m", "action": "model."}, headers=admin).json()["data"][0]["who"] == "cli:bob"
    assert httpx.get(_url(srv, "/admin/audit"), params={"since": time.time() + 60}, headers=admin).json()["data"] == []
    assert httpx.get(_url(srv, "/admin/audit"), params={"action": "%"}, headers=admin).json()["data"] == []  # a prefix, not a pattern


def test_each_breakdown_of_a_usage_report_sums_to_its_total():
    rows = [
        SpendRow("a", "2026-11", "m", "v1", Decimal("0.0001"), Decimal("0.0001"), 2, 10, 5, day="2026-11-01"),
        SpendRow("a", "2026-11", "m", "v2", Decimal("0.0001"), Decimal("0.0001"), 1, 3, 4, day="2026-11-02"),
        SpendRow("b", "2026-11", "m", "v1", Decimal("0.0001"), Decimal("0.0001"), 5, 50, 1, day="2026-11-02"),
    ]
    report = usage_report(rows, "2026-11", "USD")
    for key in ("by_day", "by_model", "by_tenant"):
        assert sum(Decimal(x["cost"]) for x in report[key]) == Decimal(report["total"]["cost"])
        assert sum(x["requests"] for x in report[key]) == report["total"]["requests"]
    assert [d["day"] for d in report["by_day"]] == ["2026-11-01", "2026-11-02"] and report["by_tenant"][1] == {
        "tenant": "b", "requests": 5, "prompt_tokens": 50, "cached_tokens": 0, "completion_tokens": 1, "total_tokens": 51, "cost": str(rows[2].amount)}  # fmt: skip


def test_the_catalogue_says_what_each_model_does_and_what_it_costs(tmp_path):
    """`/v1/models`: the served model with its capabilities, context window and price (the stable version's, its
    cached-prompt price resolved), and a tenant's fine-tune at the fine-tune price, not fine-tunable again."""
    from common.config import MaasConfig
    from deployments.openai.catalogue import Capabilities, Listing
    from deployments.openai.service import Backend, OpenAIService, StaticPicker
    from tests.fakes import FakePostprocessorClient, FakeTokenizerClient, ScriptedEngine

    cfg = MaasConfig.model_validate({"model": {"name": "m", "tool_calls": False}, "billing": {"price_book": {"models": {"m": {
        "prompt_per_1m": "1", "completion_per_1m": "3", "training_per_1m": "50", "fine_tuned": {"prompt_per_1m": "2", "completion_per_1m": "6"}}}}}})  # fmt: skip
    book = cfg.billing.price_book
    service = OpenAIService(
        "m", FakeTokenizerClient(), StaticPicker(Backend("v1", FakePostprocessorClient(ScriptedEngine()))),
        listing=Listing.of(cfg, lambda: book.price_for("m", "v1")), adapter_price=book.fine_tuned_price("m"),
    )  # fmt: skip
    (card,) = service.models()["data"]
    assert card["id"] == "m" and card["object"] == "model" and card["context_window"] == cfg.engine.max_model_len
    assert card["capabilities"] == {**vars(Capabilities()), "tools": False, "fine_tuning": True}
    assert card["pricing"] == {"currency": "USD", "prompt_per_1m": "1", "cached_prompt_per_1m": "0.5", "completion_per_1m": "3"}
    assert Capabilities.of(cfg, fine_tune=True).fine_tuning is False
    off = MaasConfig.model_validate({"model": {"name": "m"}, "billing": {"enabled": False}})
    assert OpenAIService("m", FakeTokenizerClient(), StaticPicker(Backend("v1", None)), listing=Listing.of(off, lambda: None)).models()["data"][0]["pricing"] is None
