"""Closed by default, the newer routes too (issue 24): one test per finding of the hostile-tenant review.

Each runs the real routes, services, billing core and fine-tuning manager over in-process fakes of the
stages and of Ray's Jobs API (`tests.unit.test_fine_tuning.Rig`), most of them under a route prefix, as
Serve mounts an application with `route_prefix` set.
"""

from __future__ import annotations

import httpx
import pytest

from deployments.openai.routes import Access, route_declaration
from tests.unit.test_fine_tuning import GOOD, Rig

PREFIX = "/maas"


@pytest.fixture
def rig(tmp_path):
    r = Rig(tmp_path, prefix=PREFIX)
    with r.server:
        yield r


def test_every_route_declares_who_may_call_it(tmp_path):
    """Item 1: the app with every optional part mounted; a route added without a declaration fails here."""
    rig = Rig(tmp_path)
    with rig.server:
        app = rig.server.app
        undeclared = [f"{sorted(getattr(r, 'methods', None) or [])} {r.path}" for r in app.router.routes if route_declaration(r) is None]
        assert not undeclared, f"routes without an access declaration: {undeclared}"
        by_path = {(r.path, m): route_declaration(r)["x-maas-access"] for r in app.router.routes for m in (getattr(r, "methods", None) or ())}
        assert by_path[("/healthz", "GET")] == Access.PUBLIC
        assert by_path[("/v1/files", "POST")] == by_path[("/v1/fine_tuning/jobs", "POST")] == Access.TENANT
        assert all(v == Access.ADMIN for (path, _), v in by_path.items() if path.startswith("/admin"))
        assert {p for (p, _), v in by_path.items() if v == Access.PUBLIC} <= {"/healthz", "/console", "/console/", "/console/{name}", "/openapi.json", "/docs", "/docs/oauth2-redirect", "/redoc"}


def test_a_route_prefix_does_not_turn_authentication_off(rig):
    """Item 1: under `route_prefix: /maas`, Serve keeps the whole path; the admin and tenant routes still need their keys."""
    base = rig.server.base
    for method, path in [("GET", "/admin/keys"), ("POST", "/admin/traffic"), ("GET", "/admin/fine_tuning/jobs"), ("GET", "/v1/files"), ("POST", "/v1/completions"), ("POST", "/v1/keys")]:
        resp = httpx.request(method, base + path, json={}, timeout=10)
        assert resp.status_code == 401, (method, path, resp.status_code, resp.text)
        assert resp.json()["error"]["code"] is not None
    tenant = {"Authorization": f"Bearer {rig.server.key}"}
    assert httpx.get(base + "/admin/keys", headers=tenant).status_code == 403
    assert httpx.get(base + "/v1/files", headers=tenant).status_code == 200
    assert httpx.get(base + "/healthz").status_code == 200
    assert httpx.get(base + "/nowhere").status_code == 401  # an unknown path: 404 only for a caller with a key
    assert httpx.get(base + "/nowhere", headers=tenant).status_code == 404
