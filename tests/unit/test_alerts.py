"""Budget alerts: thresholds crossed once per period, signed webhooks a local receiver verifies, retries with backoff."""

from __future__ import annotations

import json
import threading
from decimal import Decimal
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from billing.alerts import SIGNATURE_HEADER, crossed, post, retry_at, sign, tenant_secret, verify
from billing.ledger import Ledger
from billing.service import BillingCore
from common.config import AlertsConfig, BillingConfig, LeaseConfig, Plan, PriceBook
from tests.unit.test_billing import NOV, Clock, event

SECRET = "whsec-test"


class Receiver:
    """A local webhook endpoint: records what it got; `down` answers 503."""

    def __init__(self) -> None:
        self.got: list[tuple[dict, str]] = []
        self.down = False
        outer = self

        self.redirect_to: str | None = None

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802
                body = self.rfile.read(int(self.headers["Content-Length"])).decode()
                if outer.redirect_to and self.path == "/hook":
                    self.send_response(307)
                    self.send_header("Location", outer.redirect_to)
                elif outer.down:
                    self.send_response(503)
                else:
                    outer.got.append((dict(self.headers), body))
                    self.send_response(204)
                self.end_headers()

            def log_message(self, *args) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_port}/hook"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()


@pytest.fixture
def receiver():
    r = Receiver()
    yield r
    r.close()


def test_thresholds_signature_and_backoff_are_pure_decisions():
    due = crossed("acme", "2026-11", Decimal("0.85"), Decimal("1"), [0.5, 0.8, 1.0], {"0.5"}, "USD")
    assert [a.threshold for a in due] == ["0.8"]
    assert crossed("acme", "2026-11", Decimal("5"), None, [0.5], set(), "USD") == []  # no budget, no alerts
    body = due[0].body(NOV)
    assert json.loads(body)["threshold"] == 0.8 and json.loads(body)["spent"] == "0.85"
    header = sign(SECRET, int(NOV), body)
    assert verify(SECRET, header, body, NOV + 10)
    assert not verify(SECRET, header, body + " ", NOV) and not verify("other", header, body, NOV)
    assert not verify(SECRET, header, body, NOV + 3600)  # an old delivery replayed
    assert [retry_at(0, n, 1.0) for n in (1, 2, 3, 10)] == [1.0, 2.0, 4.0, 300.0]


def test_each_threshold_fires_once_signed_and_a_receiver_that_is_down_gets_retries(tmp_path, receiver):
    clock = Clock()
    alerts = AlertsConfig(webhook_url=receiver.url, thresholds=[0.5, 0.8, 1.0], max_attempts=3, backoff_s=1.0)
    cfg = BillingConfig(
        price_book=PriceBook(models={"m": {"prompt_per_1m": "1000", "completion_per_1m": "1000"}}),
        plans={"free": Plan(monthly_budget=Decimal("1"))}, lease=LeaseConfig(restart_grace_s=0), alerts=alerts,
    )  # fmt: skip
    ledger = Ledger(f"sqlite:///{tmp_path}/l.db")
    core = BillingCore(cfg, ledger, clock=clock)
    core.create_key("acme")

    def spend(rid: str, tokens: int) -> None:  # 1,000 per 1M tokens: 100 tokens cost 0.1
        e = event(rid, prompt=tokens, completion=0, ts=clock.t)
        core.record([e._replace(prompt_price="1000", completion_price="1000", model="m")])
        clock.t += 1.1
        core._maintain(clock.t)

    def deliver() -> int:
        return core.deliver_alerts(clock.t, lambda row: post(row["url"], row["body"], SECRET, row["id"], clock.t, 2.0))

    spend("a", 400)
    assert deliver() == 0 and receiver.got == []  # 0.4 of the budget: nothing
    spend("b", 200)
    assert deliver() == 1
    headers, body = receiver.got[0]
    assert verify(SECRET, headers[SIGNATURE_HEADER], body, clock.t) and json.loads(body)["threshold"] == 0.5
    spend("c", 50)
    spend("d", 10)
    assert deliver() == 0  # still past 0.5 only: nothing again
    receiver.down = True
    spend("e", 500)  # past 0.8 and 1.0 at once
    assert deliver() == 0
    rows = {r["threshold"]: r for r in core.alerts("acme")}
    assert rows["0.8"]["state"] == rows["1"]["state"] == "pending" and rows["0.8"]["attempts"] == 1
    assert rows["0.8"]["next_at"] == pytest.approx(clock.t + 1.0) and deliver() == 0  # not due yet: backoff
    clock.t += 1.5
    assert deliver() == 0 and {r["attempts"] for r in core.alerts("acme") if r["state"] == "pending"} == {2}
    receiver.down = False
    clock.t += 2.5
    assert deliver() == 2 and sorted(json.loads(b)["threshold"] for _, b in receiver.got) == [0.5, 0.8, 1.0]
    assert {r["state"] for r in core.alerts("acme")} == {"sent"}
    assert sum(1 for a in core.audit_log() if a["action"] == "alert.sent") == 3
    # A restarted actor (a new core over the same ledger) does not send them again.
    again = BillingCore(cfg, ledger, clock=clock)
    again._touched.add(("acme", "2026-11"))
    again._maintain(clock.t + 5)
    assert again.deliver_alerts(clock.t + 5, lambda row: "should not be called") == 0 and len(core.alerts("acme")) == 3


def test_a_receiver_down_for_good_is_given_up_on_and_audited(tmp_path, receiver):
    clock = Clock()
    cfg = BillingConfig(plans={"free": Plan(monthly_budget=Decimal("0.000001"))}, alerts=AlertsConfig(tenant_webhooks={"acme": receiver.url}, thresholds=[1.0], max_attempts=2))
    core = BillingCore(cfg, Ledger(f"sqlite:///{tmp_path}/l.db"), clock=clock)
    core.record([event("x", ts=clock.t)])
    core._maintain(clock.t + 2)
    receiver.down = True
    send = lambda row: post(row["url"], row["body"], SECRET, row["id"], clock.t, 2.0)  # noqa: E731
    core.deliver_alerts(clock.t + 2, send)
    core.deliver_alerts(clock.t + 400, send)
    (row,) = core.alerts("acme")
    assert row["state"] == "failed" and row["attempts"] == 2 and row["last_error"] == "HTTP 503"
    assert any(a["action"] == "alert.failed" for a in core.audit_log())


def test_each_tenant_has_its_own_secret_the_id_is_signed_and_redirects_are_not_followed(receiver):
    """Issue 24, item 10: one secret signed every tenant's alerts; the alert id was outside the signature; urllib followed redirects."""
    acme, globex = tenant_secret(SECRET, "acme"), tenant_secret(SECRET, "globex")
    assert acme != globex and SECRET not in acme and acme == tenant_secret(SECRET, "acme")
    body = crossed("acme", "2026-11", Decimal("1"), Decimal("1"), [1.0], set(), "USD")[0].body(NOV)
    assert post(receiver.url, body, acme, 7, NOV, 2.0) is None
    headers, sent = receiver.got[-1]
    assert json.loads(sent)["id"] == 7 and json.loads(sent)["timestamp"] == int(NOV)  # inside what is signed
    assert verify(acme, headers[SIGNATURE_HEADER], sent, NOV) and not verify(globex, headers[SIGNATURE_HEADER], sent, NOV)
    assert not verify(acme, headers[SIGNATURE_HEADER], sent.replace('"id":7', '"id":8'), NOV)
    receiver.redirect_to = receiver.url + "-elsewhere"
    before = len(receiver.got)
    error = post(receiver.url, body, acme, 8, NOV, 2.0)
    assert error is not None and error.startswith("HTTP 307") and len(receiver.got) == before  # the 3xx is the answer; nothing is re-sent
