"""Fuzz tier: schemathesis over the app's own OpenAPI schema, every /v1 and /admin route, with valid tenant and admin keys.

The real routes, protocol, service, billing client, files and fine-tuning services over an in-process
billing core, fake stages and a fake Jobs API (no Ray; `tests.unit.test_fine_tuning.Rig`), mounted under
a route prefix as Serve mounts an app with `route_prefix`.  About 3,000 generated cases, derandomized so
CI sees the same ones: no 5xx, every error in the OpenAI envelope, no key material (the callers' keys or
any key's hash) in any response; and every route refuses a caller without a key unless it declares itself
public.
"""

from __future__ import annotations

import logging
from collections import Counter

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings

from billing.keys import hash_key
from deployments.openai.operations import OperationsService
from deployments.openai.routes import Access, route_declaration
from tests.fakes import FakeFleet
from tests.unit.test_fine_tuning import Rig

logger = logging.getLogger(__name__)

EXAMPLES = {"/v1/chat/completions": 700, "/v1/completions": 700}
DEFAULT_EXAMPLES = 120


PREFIX = "/maas"


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    rig = Rig(tmp_path_factory.mktemp("fuzz"), prefix=PREFIX, operations=OperationsService(FakeFleet(), "m"))
    with rig.server as srv:
        srv.admin_key, _ = srv.core.create_key("operators", role="admin")
        yield srv


def _check(case, response, secrets: list[str]) -> None:
    where = f"{case.method} {case.formatted_path} -> {response.status_code}"
    assert response.status_code < 500, f"{where}: {response.text[:300]}"
    for secret in secrets:
        assert secret not in response.text, f"{where}: key material in the response"
    if response.status_code >= 400:
        body = response.json()
        assert set(body) == {"error"} and {"message", "type", "param", "code"} <= set(body["error"]), f"{where}: not the envelope: {response.text[:300]}"
        assert isinstance(body["error"]["code"], (str, type(None))) and not str(body["error"]["code"]).isdigit(), f"{where}: code {body['error']['code']!r}"


def test_every_route_answers_generated_requests_without_5xx_in_the_envelope_and_leaks_no_key(server):
    base = server.base  # under the prefix
    schema = schemathesis.openapi.from_url(f"{base}/openapi.json")
    secrets = [server.key, server.admin_key, hash_key(server.key), hash_key(server.admin_key)]
    counts: Counter[str] = Counter()
    operations = [r.ok() for r in schema.get_all_operations()]
    assert {o.path for o in operations} >= {
        "/v1/chat/completions", "/v1/completions", "/v1/models", "/v1/usage", "/admin/keys", "/admin/usage", "/admin/traffic", "/admin/tenants", "/admin/health",
        "/v1/files", "/v1/files/{file_id}", "/v1/fine_tuning/jobs", "/v1/fine_tuning/jobs/{job_id}/cancel", "/v1/keys", "/v1/keys/{key_id}", "/admin/alerts",
    }  # fmt: skip
    for op in operations:
        if not op.path.startswith(("/v1", "/admin")):
            continue
        key = server.admin_key if op.path.startswith("/admin") else server.key

        @settings(max_examples=EXAMPLES.get(op.path, DEFAULT_EXAMPLES), deadline=None, derandomize=True, database=None, suppress_health_check=list(HealthCheck))
        @given(op.as_strategy())
        def fuzz(case):
            if isinstance(case.body, dict) and "model" in case.body and counts[f"{case.method} {op.path}"] % 2:
                case.body["model"] = "m"  # every other case names the served model, so it goes past the model check
            response = case.call(base_url=base, headers={"Authorization": f"Bearer {key}"}, timeout=30)
            counts[f"{case.method} {op.path}"] += 1
            counts[f"status {response.status_code}"] += 1
            _check(case, response, secrets)

        fuzz()
    total = sum(v for k, v in counts.items() if not k.startswith("status"))
    logger.info("fuzz: %d cases; %s", total, dict(counts))
    print(f"fuzz: {total} cases; {dict(counts)}")
    assert total >= 2000


def test_every_route_refuses_a_caller_without_a_key_under_the_prefix(server):
    """Each declared route, called without a key under the route prefix: 401 unless it declares itself public."""
    for route in server.app.router.routes:
        declared = route_declaration(route)
        for method in sorted(getattr(route, "methods", None) or ()):
            path = route.path.replace("{", "").replace("}", "")  # a placeholder value for each path parameter
            resp = httpx.request(method, server.base + path, timeout=10)
            if declared["x-maas-access"] == Access.PUBLIC:
                assert resp.status_code != 401, (method, route.path)
            else:
                assert resp.status_code == 401 and resp.json()["error"]["code"], (method, route.path, resp.status_code)
