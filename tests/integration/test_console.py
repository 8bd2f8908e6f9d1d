"""The web console in a real headless Chromium (Debian's `chromium`, driven by playwright) against the real app.

A tenant signs in and sees the spend its requests made, equal to `/v1/usage`; creates a key on the
page, calls the API with it, revokes it on the page and sees the API refuse it.  An operator starts
a canary and moves its weight on the page, and `maas models traffic` shows each change; a wrong
key is a clear error.  Each page is saved as a screenshot under `tests/artifacts/console/`
(the small PNGs linked from the README are these, committed under `docs/images/console/`).

The module serves from a store of its own: the default model's v1 linked in, and a v2 made of the
same files (a second version to canary without training one).
"""

from __future__ import annotations

import shutil
import time
from decimal import Decimal

import httpx
import pytest

from billing.actor import admin_client
from billing.admin import wait
from common.runtime import REPO_ROOT
from tests.integration.conftest import create_key, linked_store, linked_version

pytestmark = pytest.mark.integration
MODEL = "SmolLM2-135M-Instruct"
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
SHOTS = REPO_ROOT / "tests" / "artifacts" / "console"

if CHROMIUM is None:  # `.ci/run` installs Debian's chromium; a developer's machine may lack it
    pytest.skip("no chromium on PATH (apt-get install chromium)", allow_module_level=True)


@pytest.fixture(scope="module")
def config_overrides(tmp_path_factory) -> dict:
    root = linked_store(tmp_path_factory)
    linked_version(root, MODEL, "v2")
    # Serve's Python proxy stays one config line away from the default HAProxy, and the postprocessor stage from the
    # ingress writing responses itself: this module runs on both alternatives.
    return {"model_store": {"root": str(root)}, "model": {"version": "v1"}, "http": {"proxy": "python"}, "deployments": {"inline_postprocess": False}}  # v2 waits for the canary


@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import sync_playwright

    SHOTS.mkdir(parents=True, exist_ok=True)
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox", "--disable-dev-shm-usage"])
        try:
            yield b
        finally:
            b.close()


@pytest.fixture
def page(browser):
    context = browser.new_context(viewport={"width": 1100, "height": 760})
    page = context.new_page()
    page.set_default_timeout(60_000)
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    page.errors = errors
    yield page
    context.close()
    assert not page.errors, page.errors  # no script error on any page


def _console(base_url: str) -> str:
    return base_url.removesuffix("/v1") + "/console"


def _sign_in(page, base_url: str, key: str) -> None:
    page.goto(_console(base_url))
    page.fill("#key-input", key)
    page.click("#sign-in-form button")


def _shot(page, name: str) -> None:
    page.screenshot(path=str(SHOTS / f"{name}.png"), full_page=True)


def _until(check, timeout_s: float = 30.0, every_s: float = 0.25):
    deadline = time.monotonic() + timeout_s
    while not (value := check()):
        assert time.monotonic() < deadline, "timed out"
        time.sleep(every_s)
    return value


def test_a_wrong_key_is_a_clear_error(page, base_url):
    _sign_in(page, base_url, "sk-maas-not-a-real-key")
    error = page.wait_for_selector("#error:not([hidden])")
    assert "This key was not accepted" in error.inner_text() and "Incorrect API key" in error.inner_text()
    assert page.is_visible("#sign-in") and not page.is_visible("#nav")
    assert page.evaluate("sessionStorage.length") == 0
    _shot(page, "sign-in-error")


def test_a_tenant_sees_its_spend_and_manages_its_keys(page, base_url, billing_actor):
    from openai import AuthenticationError, OpenAI

    key, _ = create_key(billing_actor, "console-tenant", plan="enterprise")
    client = OpenAI(base_url=base_url, api_key=key, max_retries=0, timeout=120)
    for n, tier in ((3, "default"), (5, "flex")):
        client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Hello!"}], max_tokens=n, temperature=0, service_tier=tier)
    _until(lambda: sum(r.requests for r in wait(admin_client(billing_actor).spend_rows(None, "console-tenant"))) == 2)
    usage = httpx.get(base_url + "/usage", headers={"Authorization": f"Bearer {key}"}).json()  # reports are rate-limited: read once

    _sign_in(page, base_url, key)
    page.wait_for_selector("#view[data-page=usage] [data-testid=total-cost]")
    shown_cost = page.inner_text("[data-testid=total-cost]").split()[0]
    assert Decimal(shown_cost) == Decimal(usage["total"]["cost"]) > 0
    assert int(page.inner_text("[data-testid=total-tokens]").replace(",", "")) == usage["total"]["prompt_tokens"] + usage["total"]["completion_tokens"]
    assert int(page.inner_text("[data-testid=total-requests]")) == 2
    assert page.inner_text("[data-testid=plan]") == "enterprise"
    assert f"{MODEL}@v1" in page.inner_text("[data-testid=by-model]")
    tiers = page.inner_text("[data-testid=by-tier]")
    assert "flex" in tiers and "default" in tiers  # spend by service tier
    assert page.evaluate("document.cookie") == "" and key not in page.url  # the key is in session storage only
    _shot(page, "tenant-usage")

    page.click("a[data-page=keys]")
    page.fill("#create-key input[name=name]", "made-in-console")
    page.fill("#create-key input[name=days]", "7")
    page.fill("#create-key input[name=models]", MODEL)  # the key's own policy, inside the tenant's
    page.fill("#create-key input[name=rpm]", "30")
    page.fill("#create-key input[name=metadata]", "team=qa")
    page.click("#create-key button")
    secret = page.wait_for_selector("[data-testid=new-key-secret]").inner_text().strip()
    assert secret.startswith("sk-maas-")
    row_text = page.locator("table[data-testid=keys] tr", has_text="made-in-console").inner_text()
    assert MODEL in row_text and "30 rpm" in row_text
    policy = next(k for k in httpx.get(base_url + "/keys", headers={"Authorization": f"Bearer {key}"}).json()["data"] if k["name"] == "made-in-console")
    assert policy["models"] == [MODEL] and policy["rpm"] == 30 and policy["metadata"] == {"team": "qa"} and policy["expires_at"] is not None
    _shot(page, "tenant-keys")
    made = OpenAI(base_url=base_url, api_key=secret, max_retries=0, timeout=120)
    assert made.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Hi"}], max_tokens=2).usage.completion_tokens >= 1

    page.on("dialog", lambda dialog: dialog.accept())
    row = page.locator("table[data-testid=keys] tr", has_text="made-in-console")
    row.locator("button[data-action=revoke]").click()
    page.wait_for_selector("#notice:not([hidden])")
    assert "revoked" in page.locator("table[data-testid=keys] tr", has_text="made-in-console").inner_text()

    def refused() -> bool:
        try:
            made.models.list()
            return False
        except AuthenticationError:
            return True

    _until(refused, 15)  # each replica drops a revoked key at its next sync

    # The catalogue: the model, what it does and its price, as /v1/models says (the stable version's price).
    page.click("a[data-page=models]")
    row = page.wait_for_selector(f"table[data-testid=models] tr[data-model='{MODEL}']").inner_text()
    card = next(m for m in client.models.list().model_dump()["data"] if m["id"] == MODEL)
    assert "chat" in row and "tool calls" in row and card["pricing"]["prompt_per_1m"] in row and card["pricing"]["cached_prompt_per_1m"] in row
    embedder = page.wait_for_selector("table[data-testid=models] tr[data-model='all-MiniLM-L6-v2']").inner_text()
    assert "embeddings" in embedder and "chat" not in embedder and "0.02" in embedder  # the catalogue's embedding model, at its price
    _shot(page, "tenant-models")

    # The tenant's batches: none yet, said so (the Batch API's page).
    page.click("a[data-page=batches]")
    assert "No batches yet" in page.wait_for_selector("[data-testid=batches]").inner_text()


def test_an_operator_moves_the_canary_weight_and_the_cli_sees_it(page, base_url, billing_actor, maas_config):
    from click.testing import CliRunner

    from cluster.cli import main

    def cli_traffic() -> str:
        result = CliRunner().invoke(main, ["models", "traffic"], env={"MAAS_MODEL_STORE": str(maas_config.store_root())})
        assert result.exit_code == 0, result.output
        return result.output

    assert f"{MODEL}: v1 100%" in cli_traffic()
    admin_key, admin = create_key(billing_actor, "operators", role="admin")
    _sign_in(page, base_url, admin_key)
    page.wait_for_selector("a[data-page=traffic]")
    seen = {}
    for name in ("tenants", "spend", "health", "audit"):
        page.click(f"a[data-page={name}]")
        seen[name] = page.wait_for_selector(f"#view[data-page={name}] table").inner_text()
        _shot(page, f"operator-{name}")
    assert "console-tenant" in seen["tenants"] and "enterprise" in seen["tenants"]
    assert "Ingress" in seen["health"] and "Generator" in seen["health"] and "HEALTHY" in seen["health"]

    page.click("a[data-page=traffic]")
    page.select_option("#canary-form select[name=version]", "v2")
    page.fill("#canary-form input[name=weight]", "30")
    page.click("#canary-form button")  # deploys v2 (a real engine) before the plan changes
    page.wait_for_selector("[data-testid=canary]:has-text('v2 at 30%')", timeout=600_000)
    assert f"{MODEL}: v1 70%, v2 30%" in cli_traffic()

    page.fill("#canary-form input[name=weight]", "60")
    page.click("#canary-form button")
    page.wait_for_selector("[data-testid=canary]:has-text('v2 at 60%')", timeout=120_000)
    line = cli_traffic()
    assert f"{MODEL}: v1 40%, v2 60%" in line and f"by console:{admin.key_id}" in line
    _shot(page, "operator-traffic")

    page.click("a[data-page=audit]")
    page.select_option("#audit-filters select[name=action]", "model.")
    page.fill("#audit-filters input[name=actor]", f"console:{admin.key_id}")
    page.click("#audit-filters button")
    rows = page.locator("table[data-testid=audit] tbody tr")
    _until(lambda: rows.count() == 2, 15)  # the two canary changes, nothing else
    assert all("model.canary" in t and f"console:{admin.key_id}" in t for t in rows.all_inner_texts())

    page.click("a[data-page=traffic]")
    page.click("#rollback")
    page.wait_for_selector("[data-testid=canary]:has-text('none')", timeout=120_000)
    assert f"{MODEL}: v1 100%" in cli_traffic()


def test_the_postprocessor_stage_writes_responses_when_the_ingress_does_not(base_url, billing_actor, maas_config):
    """`deployments.inline_postprocess: false` (this module) puts the postprocessor stage back between ingress and
    generator: streams with a stop string, usage in the last chunk and whole answers come out as they do inline."""
    from openai import OpenAI

    assert not maas_config.deployments.inline_postprocess
    key, _ = create_key(billing_actor, "staged-tenant", plan="enterprise")
    client = OpenAI(base_url=base_url, api_key=key, max_retries=0, timeout=120)
    whole = client.completions.create(model=MODEL, prompt="1, 2, 3,", max_tokens=12, temperature=0)
    text = whole.choices[0].text
    stop = text[len(text) // 2:][:3]
    chunks = list(client.completions.create(model=MODEL, prompt="1, 2, 3,", max_tokens=12, temperature=0, stop=[stop], stream=True, stream_options={"include_usage": True}))
    streamed = "".join(c.choices[0].text for c in chunks if c.choices)
    assert stop and text.startswith(streamed) and stop not in streamed and len(streamed) < len(text)
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop" and chunks[-1].usage.completion_tokens >= 1
