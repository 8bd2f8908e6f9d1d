"""Chaos, bounded: steady streamed and whole traffic while the generator, ingress, postprocessor and billing actor are SIGKILLed in turn,
then every request the client saw reconciled with its ledger row (`bench.chaos`, which runs longer over every process kind).

Once on SQLite, every kind, and once on a real PostgreSQL, the kinds whose death touches the ledger's writers
(the billing actor that writes it, the ingress that reports to it): a killed generator or postprocessor
reaches either ledger the same way, through those two, so PostgreSQL skips their slower restarts.  Targets: 0 rows lost, 0 double-counted, 0 over-billed; every failure
an error envelope or a cut stream, except what Serve's proxy answers itself when the replica under a request dies
(docs/reliability.md lists it): at most one per client in flight at the ingress kill.
"""

from __future__ import annotations

import logging

import pytest
from sqlalchemy.engine import make_url

from bench.chaos import chaos_overrides, run
from billing.actor import admin_client
from tests.integration.conftest import LEDGERS, create_key

pytestmark = [pytest.mark.integration, LEDGERS]
logger = logging.getLogger(__name__)

CLIENTS = 3
KINDS = {"sqlite": ["generator", "ingress", "postprocessor", "billing"], "postgresql": ["ingress", "billing"]}


@pytest.fixture(scope="module")
def config_overrides() -> dict:
    return chaos_overrides()


def test_no_usage_is_lost_double_counted_or_over_billed_whatever_dies(base_url, billing_actor, ledger_url):
    key, _ = create_key(billing_actor, "chaos", plan="enterprise")
    kinds = KINDS[make_url(ledger_url).get_backend_name()]
    r, recovery = run(base_url, key, admin_client(billing_actor), "chaos", kinds, clients=CLIENTS, settle_s=20, max_tokens=24, warm_s=4)
    logger.info("chaos: %s; recovery %s; notes %s", {k: v for k, v in r.__dict__.items() if k != "problems"}, recovery, r.problems)
    assert r.ok > 0 and r.requests > r.ok, "traffic ran and the kills cut some of it"
    assert (r.lost, r.double, r.over_billed) == (0, 0, 0), r.problems
    assert r.bare <= CLIENTS, r.problems
