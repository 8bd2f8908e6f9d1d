"""Metering through the HTTP routes (no Ray): a real HTTP server, the real BillingClient, an in-process billing core.

Every admitted request is settled exactly once, including a stream the client abandons.
"""

from __future__ import annotations

import asyncio
import threading
import time
from decimal import Decimal

import httpx
import pytest
import uvicorn

from billing.admin import BillingAdmin
from billing.client import BillingClient
from billing.ledger import Ledger
from billing.service import BillingCore
from common.config import Plan, Price, RequestLimits
from common.runtime import free_port
from deployments.openai.accounts import AccountsService
from common.file_store import FileStore
from deployments.openai.files import FilesService
from deployments.openai.routes import build_app
from deployments.openai.service import Backend, OpenAIService, StaticPicker
from tests.fakes import FakePostprocessorClient, FakeTokenizerClient, RoutePrefix, ScriptedEngine
from tests.unit.test_billing import PRICE, InProcess, config


class Server:
    """uvicorn in a thread, serving the ingress app with billing wired in-process."""

    def __init__(
        self, tmp_path, engine: ScriptedEngine, limits: RequestLimits | None = None, operations=None, billing_config=None, fine_tuning=None, adapters=None,
        prefix: str = "", max_file_bytes: int | None = None, price: Price = PRICE, embedding_models=(), batches: bool = False,
    ):  # fmt: skip
        """`prefix`: serve the app under a route prefix, as Serve does (`tests.fakes.RoutePrefix`); `base` includes it."""
        self.price = price
        self.with_batches = batches
        self.embedding_models = embedding_models
        self.prefix = prefix
        self.max_file_bytes = max_file_bytes
        self.operations = operations
        self.fine_tuning = fine_tuning  # (BillingCore, store root) -> FineTuningService, made once the core exists
        self.adapters = adapters
        self.tmp_path = tmp_path
        self.core = BillingCore(billing_config or config(free=Plan(), tiny=Plan(monthly_budget=Decimal("0.00001")), one_rpm=Plan(rpm=1)), Ledger(f"sqlite:///{tmp_path}/l.db"))
        self.key, _ = self.core.create_key("acme")
        self.engine = engine
        self.tokenizer = FakeTokenizerClient()
        self.limits = limits
        self.port = free_port()
        self.ready = threading.Event()

    async def _app(self):
        self.billing = BillingClient(self.core.config, InProcess(self.core), "h1")
        await self.billing.start()

        service = OpenAIService(
            "m", self.tokenizer, StaticPicker(Backend("v1", FakePostprocessorClient(self.engine), self.price)), billing=self.billing, limits=self.limits, adapters=self.adapters, adapter_price=PRICE,
            embedding_models=self.embedding_models,
        )
        files = FilesService(FileStore(self.tmp_path / "store"), plan_of=BillingAdmin.in_process(self.core).plan)
        fine_tuning = self.fine_tuning(self.core, self.tmp_path / "store") if self.fine_tuning else None
        accounts = AccountsService(BillingAdmin.in_process(self.core), "USD", time.time)
        batches = self._batches(service) if self.with_batches else None
        app = self.app = build_app(service, accounts, self.limits.max_body_bytes if self.limits else None, self.operations, files, self.max_file_bytes, fine_tuning, batches)
        return RoutePrefix(app, self.prefix) if self.prefix else app

    def _batches(self, service):
        """The batch actor's manager in-process, its lines run through this very service (as the ingress runs them)."""
        from deployments.core.batches import BatchManager
        from deployments.openai.batches import BatchesService
        from deployments.openai.routes import run_batch_line

        billing, book = self.billing, self.core.config.price_book

        class Lines:
            async def run(self, tenant, key_id, url, body, request_id):
                return await run_batch_line(service, billing.key_by_id(key_id), url, body, request_id)

        self.batches = BatchManager(self.tmp_path / "store", Lines(), BillingAdmin.in_process(self.core), lambda m: book.for_tier(book.price_for(m), "batch"), lambda m: 2048, retry_s=0.05)

        async def invoke(method, *args):
            result = getattr(self.batches, method)(*args)
            return await result if asyncio.iscoroutine(result) else result

        async def ticks():
            while True:
                await self.batches.tick()
                await asyncio.sleep(0.05)

        self._ticks = asyncio.get_running_loop().create_task(ticks())
        return BatchesService(invoke)

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.port}{self.prefix}"

    def run(self):
        loop = asyncio.new_event_loop()
        app = loop.run_until_complete(self._app())
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning", loop="asyncio"))
        self.ready.set()
        loop.run_until_complete(self.server.serve())
        loop.run_until_complete(self.billing.close(timeout_s=0.5))
        loop.close()

    def __enter__(self):
        self.thread = threading.Thread(target=self.run, daemon=True)
        self.thread.start()
        self.ready.wait(10)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                httpx.get(f"{self.base}/healthz")
                break
            except httpx.HTTPError:
                time.sleep(0.05)
        return self

    def __exit__(self, *exc):
        self.server.should_exit = True
        self.thread.join(10)


def _events(core: BillingCore, timeout_s: float = 5.0, n: int = 1):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        events = core.ledger.events()
        if len(events) >= n:
            return events
        time.sleep(0.05)
    return core.ledger.events()


def test_a_stream_the_client_abandons_is_settled_as_aborted(tmp_path):
    engine = ScriptedEngine(reply="x" * 200, per_message=1, delay_s=0.02)
    with Server(tmp_path, engine) as srv:
        body = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "stream": True, "max_tokens": 200}
        with httpx.stream("POST", f"http://127.0.0.1:{srv.port}/v1/chat/completions", json=body, headers={"Authorization": f"Bearer {srv.key}"}) as resp:
            assert resp.status_code == 200
            lines = resp.iter_lines()
            for _ in range(3):
                next(lines)
        (event,) = _events(srv.core)
        # Billed what reached the client, a floor, until the engine's own count comes (pending meanwhile).
        assert event.status == "aborted" and event.tenant == "acme" and 0 < event.completion_tokens == event.delivered_tokens < 200
        assert srv.core.status()["pending"] == 1
        assert engine.closed_early == 1


def test_whole_and_streamed_requests_are_metered_with_their_usage(tmp_path):
    with Server(tmp_path, ScriptedEngine()) as srv:
        auth = {"Authorization": f"Bearer {srv.key}"}
        url = f"http://127.0.0.1:{srv.port}/v1/chat/completions"
        whole = httpx.post(url, json={"model": "m", "messages": [{"role": "user", "content": "hi"}]}, headers=auth).json()
        httpx.post(url, json={"model": "m", "messages": [{"role": "user", "content": "hi"}], "stream": True}, headers=auth).read()
        events = sorted(_events(srv.core, n=2), key=lambda e: e.request_id != whole["id"].removeprefix("chatcmpl-"))
        assert [(e.status, e.prompt_tokens, e.completion_tokens) for e in events] == [("ok", whole["usage"]["prompt_tokens"], whole["usage"]["completion_tokens"])] * 2
        usage = httpx.get(f"http://127.0.0.1:{srv.port}/v1/usage", headers=auth).json()
        assert usage["total"]["requests"] == 2
        assert httpx.get(f"http://127.0.0.1:{srv.port}/v1/models").status_code == 401
        assert httpx.get(f"http://127.0.0.1:{srv.port}/admin/keys", headers=auth).status_code == 403


def test_cached_prompt_tokens_are_reported_billed_at_their_price_and_shown(tmp_path):
    """The engine's prefix-cache hits: in the usage (whole and streamed), on the ledger row with their price, in
    the cost (the second of two equal long prompts costs less), in `/v1/usage` and on the invoice."""
    from openai import OpenAI

    from billing.invoice import build_invoices

    price = config().price_book.price_for("m")  # 0.50 per 1M prompt tokens; cached: the book's default half of it
    assert price.cached_prompt_per_1m == Decimal("0.25")
    with Server(tmp_path, ScriptedEngine(cache_block=16), price=price) as srv:
        client = OpenAI(base_url=f"{srv.base}/v1", api_key=srv.key, max_retries=0)
        messages = [{"role": "user", "content": "A long shared system prompt, " * 8}]
        first = client.chat.completions.create(model="m", messages=messages, max_tokens=4)
        second = client.chat.completions.create(model="m", messages=messages, max_tokens=4)
        chunks = list(client.chat.completions.create(model="m", messages=messages, max_tokens=4, stream=True, stream_options={"include_usage": True}))
        assert first.usage.prompt_tokens_details.cached_tokens == 0
        cached = second.usage.prompt_tokens_details.cached_tokens
        assert cached > 0 and cached % 16 == 0 and cached < second.usage.prompt_tokens == first.usage.prompt_tokens
        assert chunks[-1].usage.prompt_tokens_details.cached_tokens == cached
        rows = {e.request_id: e for e in _events(srv.core, n=3)}
        one, two = rows[first.id.removeprefix("chatcmpl-")], rows[second.id.removeprefix("chatcmpl-")]
        assert (one.cached_tokens, two.cached_tokens, two.cached_price) == (0, cached, "0.25")
        assert one.amount() - two.amount() == Decimal(cached) * Decimal("0.25") / 1_000_000  # the discount, exactly
        usage = client.get("/usage", cast_to=object)
        assert usage["total"]["cached_tokens"] == 2 * cached and usage["data"][0]["cached_tokens"] == 2 * cached
        (invoice,) = build_invoices(srv.core.ledger.spend(), two.ts and time.strftime("%Y-%m", time.gmtime(two.ts)))
        line = invoice.lines.iloc[0]
        assert line["cached_tokens"] == 2 * cached and line["cached_prompt_price_per_1m"] == Decimal("0.25")


def test_over_budget_is_429_insufficient_quota_and_nothing_is_metered(tmp_path):
    with Server(tmp_path, ScriptedEngine()) as srv:
        key, _ = srv.core.create_key("poor", plan="tiny")
        resp = httpx.post(
            f"http://127.0.0.1:{srv.port}/v1/chat/completions",
            json={"model": "m", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 100},
            headers={"Authorization": f"Bearer {key}"},
        )
        assert resp.status_code == 429 and resp.json()["error"] == {
            "message": resp.json()["error"]["message"],
            "type": "insufficient_quota",
            "param": None,
            "code": "insufficient_quota",
        }
        assert srv.core.ledger.events() == []


def test_a_tenant_reads_its_account_and_manages_its_own_keys(tmp_path):
    with Server(tmp_path, ScriptedEngine()) as srv:
        base = f"http://127.0.0.1:{srv.port}/v1"
        auth = {"Authorization": f"Bearer {srv.key}"}
        httpx.post(base + "/chat/completions", json={"model": "m", "messages": [{"role": "user", "content": "hi"}]}, headers=auth)
        account = httpx.get(base + "/account", headers=auth).json()
        assert account["tenant"] == "acme" and account["plan"] == "free" and account["monthly_budget"] is None and account["currency"] == "USD"
        made = httpx.post(base + "/keys", json={"name": "ci", "expires_in_s": 3600, "models": ["m"], "rpm": 5}, headers=auth).json()
        assert made["key"].startswith("sk-maas-") and made["models"] == ["m"] and made["rpm"] == 5 and made["tenant"] == "acme"
        listed = httpx.get(base + "/keys", headers=auth).json()["data"]
        assert {k["key_id"] for k in listed} >= {made["key_id"]} and all("key" not in k and "key_hash" not in k for k in listed)
        # The new key is restricted: it may call the API but not mint or revoke keys.
        narrow = {"Authorization": f"Bearer {made['key']}"}
        refused = httpx.post(base + "/keys", json={"name": "escalate"}, headers=narrow)
        assert refused.status_code == 403 and refused.json()["error"]["code"] == "permission_denied"
        assert httpx.post(base + "/keys", json={"tenant": "other"}, headers=auth).status_code == 400  # no tenant, role or plan here
        other, other_rec = srv.core.create_key("globex")
        assert httpx.post(base + f"/keys/{other_rec.key_id}/revoke", headers=auth).status_code == 404  # another tenant's key
        revoked = httpx.post(base + f"/keys/{made['key_id']}/revoke", headers=auth).json()
        assert revoked["revoked_at"] is not None
        deadline = time.monotonic() + 5
        while httpx.get(base + "/models", headers=narrow).status_code != 401:  # refused once the replica syncs the revocation
            assert time.monotonic() < deadline
            time.sleep(0.1)


def test_a_keys_policy_is_changed_in_place_by_its_tenant_or_an_operator(tmp_path):
    with Server(tmp_path, ScriptedEngine()) as srv:
        base = f"http://127.0.0.1:{srv.port}"
        auth = {"Authorization": f"Bearer {srv.key}"}
        chat = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}
        made = httpx.post(base + "/v1/keys", json={"name": "ci", "models": ["other"], "metadata": {"team": "a"}}, headers=auth).json()
        narrow = {"Authorization": f"Bearer {made['key']}"}
        refused = httpx.post(base + "/v1/chat/completions", json=chat, headers=narrow)
        assert refused.status_code == 403 and refused.json()["error"]["code"] == "model_not_allowed"
        # Only the fields sent change (null clears one); the key itself, and its secret, stay.
        changed = httpx.post(base + f"/v1/keys/{made['key_id']}", json={"models": None, "rpm": 1}, headers=auth).json()
        assert (changed["models"], changed["rpm"], changed["name"], changed["metadata"]) == (None, 1, "ci", {"team": "a"}) and "key" not in changed
        deadline = time.monotonic() + 5
        while (r := httpx.post(base + "/v1/chat/completions", json=chat, headers=narrow)).status_code == 403:  # until the replica syncs it
            assert time.monotonic() < deadline
            time.sleep(0.1)
        assert r.status_code == 200
        limited = httpx.post(base + "/v1/chat/completions", json=chat, headers=narrow)  # its new 1 RPM holds
        assert limited.status_code == 429 and "own limit" in limited.json()["error"]["message"]
        # A key with a policy of its own cannot change keys; another tenant's key is not found; bad values are 400s.
        # (`narrow` has spent its 1 RPM, and calls that change keys take a request slot before anything else: a 429.)
        assert httpx.post(base + f"/v1/keys/{made['key_id']}", json={"rpm": 100}, headers=narrow).status_code == 429
        listed_only, _ = srv.core.create_key("acme", policy={"models": ["m"]})
        assert httpx.post(base + f"/v1/keys/{made['key_id']}", json={"rpm": 100}, headers={"Authorization": f"Bearer {listed_only}"}).status_code == 403
        _, other = srv.core.create_key("globex")
        assert httpx.post(base + f"/v1/keys/{other.key_id}", json={"rpm": 5}, headers=auth).status_code == 404
        for body, param in (({"rpm": 0}, "rpm"), ({"tenant": "globex"}, "tenant"), ({"models": "m"}, "models")):
            bad = httpx.post(base + f"/v1/keys/{made['key_id']}", json=body, headers=auth)
            assert bad.status_code == 400 and bad.json()["error"]["param"] == param, bad.text
        # An operator changes any tenant's key; the audit log says who changed what.
        admin, admin_rec = srv.core.create_key("ops", role="admin")
        ops = {"Authorization": f"Bearer {admin}"}
        renamed = httpx.post(base + f"/admin/keys/{other.key_id}", json={"name": "batch", "tpm": 1000}, headers=ops).json()
        assert (renamed["tenant"], renamed["name"], renamed["tpm"]) == ("globex", "batch", 1000)
        audit = httpx.get(base + "/admin/audit", params={"action": "key.update"}, headers=ops).json()["data"]
        tenants_key = srv.core.ledger.keys()[0].key_id  # the server's first key: acme's, which made the tenant's change
        assert [(a["target"], a["who"]) for a in audit] == [(other.key_id, admin_rec.key_id), (made["key_id"], tenants_key)]
        httpx.post(base + f"/v1/keys/{made['key_id']}/revoke", headers=auth)
        gone = httpx.post(base + f"/v1/keys/{made['key_id']}", json={"rpm": 5}, headers=auth)
        assert gone.status_code == 400 and gone.json()["error"]["code"] == "revoked_api_key"


def test_service_tiers_are_offered_by_plan_priced_by_multiplier_echoed_and_broken_down(tmp_path):
    """`service_tier` with the openai client: the plan's default for `auto`, the response names the tier it ran at (whole
    and streamed), the ledger row is priced at the tier's multiple and says the tier, a tier the plan does not offer is a
    403 that bills nothing, and a plan change reaches the replica with the keys. `/v1/usage` and the invoice break down by tier."""
    import openai
    from openai import OpenAI

    from billing.invoice import build_invoices

    plans = {"free": Plan(), "pro": Plan(service_tiers=["priority", "default", "flex"])}
    with Server(tmp_path, ScriptedEngine(), billing_config=config(**plans)) as srv:
        client = OpenAI(base_url=f"{srv.base}/v1", api_key=srv.key, max_retries=0)
        ask = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}
        auto = client.chat.completions.create(**ask, service_tier="auto")
        flex = client.chat.completions.create(**ask, service_tier="flex")
        chunks = list(client.chat.completions.create(**ask, service_tier="flex", stream=True))
        assert (auto.service_tier, flex.service_tier, {c.service_tier for c in chunks}) == ("default", "flex", {"flex"})
        try:
            client.chat.completions.create(**ask, service_tier="priority")
            raise AssertionError("priority is not on the free plan")
        except openai.PermissionDeniedError as exc:
            assert exc.status_code == 403 and exc.body["code"] == "service_tier_not_allowed" and exc.body["param"] == "service_tier"
        srv.core.set_plan("acme", "pro")
        deadline = time.monotonic() + 5
        while True:  # the replica learns the plan with the keys at its next sync
            try:
                fast = client.chat.completions.create(**ask, service_tier="priority")
                break
            except openai.PermissionDeniedError:
                assert time.monotonic() < deadline
                time.sleep(0.1)
        assert fast.service_tier == "priority"
        rows = {e.request_id: e for e in _events(srv.core, n=4)}
        assert len(rows) == 4  # the refused one bills nothing
        by_id = lambda r: rows[r.id.removeprefix("chatcmpl-")]  # noqa: E731
        assert [(by_id(r).service_tier, by_id(r).prompt_price, by_id(r).completion_price) for r in (auto, flex, fast)] == [
            ("default", "0.50", "1.50"), ("flex", "0.25", "0.75"), ("priority", "1", "3"),
        ]  # fmt: skip
        usage = client.get("/usage", cast_to=object)
        assert {t["service_tier"]: t["requests"] for t in usage["by_tier"]} == {"default": 1, "flex": 2, "priority": 1}
        assert {d["service_tier"] for d in usage["data"]} == {"default", "flex", "priority"}
        (invoice,) = build_invoices(srv.core.ledger.spend(), time.strftime("%Y-%m", time.gmtime(by_id(fast).ts)))
        assert sorted(invoice.lines["service_tier"]) == ["default", "flex", "priority"]


def test_the_batch_api_with_the_openai_client_runs_each_line_once_at_the_batch_price(tmp_path):
    """Upload (`purpose=batch`), create, poll to `completed`, read the output by `custom_id`: one ledger row per line at
    the batch tier's price; a bad line is in the error file with its 400, billed nothing."""
    import io
    import json

    import openai
    from openai import OpenAI

    with Server(tmp_path, ScriptedEngine(), batches=True) as srv:
        client = OpenAI(base_url=f"{srv.base}/v1", api_key=srv.key, max_retries=0)
        lines = [
            {"custom_id": f"q{i}", "method": "POST", "url": "/v1/chat/completions", "body": {"model": "m", "messages": [{"role": "user", "content": f"hi {i}"}], "max_tokens": 4}}
            for i in range(5)
        ]
        lines[3]["body"]["temperature"] = 9  # out of range: that line's own 400, in the error file
        upload = client.files.create(file=("in.jsonl", io.BytesIO("\n".join(json.dumps(x) for x in lines).encode())), purpose="batch")
        assert upload.purpose == "batch"
        batch = client.batches.create(input_file_id=upload.id, endpoint="/v1/chat/completions", completion_window="24h", metadata={"k": "v"})
        deadline = time.monotonic() + 30
        while batch.status not in ("completed", "failed", "expired", "cancelled"):
            assert time.monotonic() < deadline
            time.sleep(0.1)
            batch = client.batches.retrieve(batch.id)
        assert batch.status == "completed" and (batch.request_counts.completed, batch.request_counts.failed) == (4, 1)
        out = [json.loads(x) for x in client.files.content(batch.output_file_id).text.splitlines()]
        err = [json.loads(x) for x in client.files.content(batch.error_file_id).text.splitlines()]
        assert [o["custom_id"] for o in out] == ["q0", "q1", "q2", "q4"] and [e["custom_id"] for e in err] == ["q3"]
        assert err[0]["response"]["status_code"] == 400 and err[0]["response"]["body"]["error"]["param"] == "temperature"
        assert all(o["response"]["body"]["service_tier"] == "batch" for o in out)
        rows = [e for e in _events(srv.core, n=4) if e.request_id.startswith(batch.id)]
        assert sorted(e.request_id for e in rows) == sorted(o["response"]["request_id"] for o in out)  # one row per line that ran
        assert {(e.service_tier, e.prompt_price, e.completion_price) for e in rows} == {("batch", "0.25", "0.75")}
        assert [b.id for b in client.batches.list().data] == [batch.id]
        with pytest.raises(openai.BadRequestError):
            client.batches.create(input_file_id=upload.id, endpoint="/v1/completions", completion_window="24h")
        with pytest.raises(openai.BadRequestError):  # a fine-tuning upload is checked as a batch file
            client.files.create(file=("bad.jsonl", io.BytesIO(b'{"messages": []}\n')), purpose="batch")
