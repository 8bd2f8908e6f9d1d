"""The Batch API's logic (`deployments.core.batches`) with a fake line runner and the real billing core: files, records,
exactly-once resumption, cancellation, expiry, holds and the plan's queue bound; and the routes with the openai client."""

from __future__ import annotations

import asyncio
import io
import json
import time
from decimal import Decimal
from pathlib import Path

import pytest

from billing.admin import BillingAdmin
from billing.ledger import Ledger
from billing.service import BillingCore
from common.config import Plan, Price
from common.datasets import DatasetError
from common.errors import InsufficientQuotaError, InvalidRequestError, NotFoundError, RateLimitError
from common.file_store import FileStore
from deployments.core.batches import BatchLine, BatchManager, check_batch_upload, parse_lines, worst_case
from tests.unit.test_billing import config

PRICE = Price(prompt_per_1m=Decimal("0.25"), completion_per_1m=Decimal("0.75"))  # the batch tier's half of m's price


def line(i: int, url: str = "/v1/chat/completions", **body) -> bytes:
    return json.dumps({"custom_id": f"req-{i}", "method": "POST", "url": url, "body": {"model": "m", "messages": [{"role": "user", "content": f"hi {i}"}], "max_tokens": 8, **body}}).encode()


def upload(root: Path, tenant: str, lines: list[bytes]) -> str:
    data = b"\n".join(lines) + b"\n"
    return FileStore(root).create(tenant, "in.jsonl", "batch", data, check_batch_upload(io.BytesIO(data), "in.jsonl")).id


class FakeRunner:
    """Answers each line as the ingress would; `fail_at`: lines that get a 400; `hold`: an event every line waits for."""

    def __init__(self, fail_at: tuple[int, ...] = (), busy_first: int = 0) -> None:
        self.calls: list[str] = []
        self.fail_at = fail_at
        self.busy_first = busy_first  # the first N calls get a 429 (tried again later)
        self.gate: asyncio.Event | None = None

    async def run(self, tenant: str, key_id: str, url: str, body: dict, request_id: str) -> tuple[int, dict]:
        self.calls.append(request_id)
        if self.gate is not None:
            await self.gate.wait()
        if len(self.calls) <= self.busy_first:
            return 429, {"error": {"message": "slow down", "type": "requests", "param": None, "code": "rate_limit_exceeded"}}
        index = int(request_id.rsplit("_", 1)[1])
        if index in self.fail_at:
            return 400, {"error": {"message": "bad", "type": "invalid_request_error", "param": "messages", "code": None}}
        return 200, {"id": f"chatcmpl-{request_id}", "object": "chat.completion", "choices": [{"message": {"content": body["messages"][0]["content"]}}], "service_tier": "batch"}


def manager(root: Path, runner: FakeRunner, core: BillingCore | None = None, clock=None, **kw) -> BatchManager:
    billing = BillingAdmin.in_process(core) if core is not None else None
    return BatchManager(root, runner, billing, lambda model: PRICE, lambda model: 2048, max_in_flight=4, retry_s=0.01, **({"clock": clock} if clock else {}), **kw)


def test_a_batch_file_is_checked_line_by_line() -> None:
    good = [line(0), line(1, "/v1/completions")]
    assert [(x.index, x.custom_id, x.url) for x in parse_lines(good, "f")] == [(0, "req-0", "/v1/chat/completions"), (1, "req-1", "/v1/completions")]
    bad = {
        b"not json": "not a JSON object",
        line(0).replace(b'"POST"', b'"GET"'): "`method` must be POST",
        line(0).replace(b"/v1/chat/completions", b"/v1/images"): "`url` must be one of",
        line(0, stream=True): "`body.stream`",
        json.dumps({"custom_id": "x", "method": "POST", "url": "/v1/completions", "body": {}}).encode(): "`model`",
    }
    for raw, reason in bad.items():
        with pytest.raises(DatasetError) as err:
            list(parse_lines([line(9), raw], "f"))
        assert err.value.line == 2 and reason in err.value.reason
    with pytest.raises(DatasetError, match="unique"):
        list(parse_lines([line(0), line(0)], "f"))
    assert worst_case(BatchLine(0, "x", "/v1/chat/completions", {"model": "m", "max_tokens": 8, "n": 2}), 2048).completion == 16
    assert worst_case(BatchLine(0, "x", "/v1/chat/completions", {"model": "m"}), 2048).completion == 2048


def test_a_batch_runs_every_line_once_and_writes_its_files(tmp_path: Path) -> None:
    async def scenario() -> tuple[dict, list[str], list[dict], list[dict]]:
        runner = FakeRunner(fail_at=(2,), busy_first=1)
        m = manager(tmp_path, runner)
        created = await m.create("acme", "key1", upload(tmp_path, "acme", [line(i) for i in range(5)]), "/v1/chat/completions", "24h", {"job": "nightly"})
        assert created["status"] == "validating" and created["request_counts"]["total"] == 5 and created["metadata"] == {"job": "nightly"}
        await m.tick()
        await m.wait_idle()
        batch = m.get("acme", created["id"])
        files = FileStore(tmp_path)
        out = [json.loads(x) for x in files.data_path("acme", batch["output_file_id"]).read_text().splitlines()]
        err = [json.loads(x) for x in files.data_path("acme", batch["error_file_id"]).read_text().splitlines()]
        return batch, runner.calls, out, err

    batch, calls, out, err = asyncio.run(scenario())
    assert batch["status"] == "completed" and batch["request_counts"] == {"total": 5, "completed": 4, "failed": 1}
    assert batch["in_progress_at"] and batch["finalizing_at"] and batch["completed_at"]
    assert len(calls) == 6 and len(set(calls)) == 5  # the 429 was tried again, under the same request id
    assert [o["custom_id"] for o in out] == ["req-0", "req-1", "req-3", "req-4"]  # in the input's order
    assert out[0]["response"]["status_code"] == 200 and out[0]["response"]["body"]["choices"][0]["message"]["content"] == "hi 0"
    assert [(e["custom_id"], e["response"]["status_code"]) for e in err] == [("req-2", 400)]


def test_a_restarted_manager_resumes_without_running_a_line_twice(tmp_path: Path) -> None:
    """The first manager dies with two results written (the last one torn); the next runs only the others."""

    async def first() -> str:
        runner = FakeRunner()
        m = manager(tmp_path, runner)
        created = await m.create("acme", "key1", upload(tmp_path, "acme", [line(i) for i in range(6)]), "/v1/chat/completions")
        await m.tick()
        await asyncio.sleep(0.05)
        return created["id"]

    batch_id = asyncio.run(first())  # the loop ends: every task of the first manager dies with it
    folder = tmp_path / ".batches" / batch_id
    written = (folder / "output.jsonl").read_bytes().splitlines(keepends=True)
    assert len(written) == 6
    (folder / "output.jsonl").write_bytes(b"".join(written[:2]) + written[2][:20])  # as if it died mid-write
    state = json.loads((folder / "batch.json").read_text())
    state["status"] = "in_progress"  # it died before finishing
    (folder / "batch.json").write_text(json.dumps(state))

    async def second() -> tuple[dict, list[str]]:
        runner = FakeRunner()
        m = manager(tmp_path, runner)
        await m.tick()
        await m.wait_idle()
        return m.get("acme", batch_id), runner.calls

    batch, calls = asyncio.run(second())
    assert batch["status"] == "completed" and batch["request_counts"]["completed"] == 6
    assert calls == [f"{batch_id}_{i}" for i in range(2, 6)]  # the torn line and the rest, each once
    out = FileStore(tmp_path).data_path("acme", batch["output_file_id"]).read_text().splitlines()
    assert sorted(json.loads(x)["custom_id"] for x in out) == [f"req-{i}" for i in range(6)]


def test_cancel_bills_the_lines_that_ran_and_expiry_records_the_rest(tmp_path: Path) -> None:
    async def scenario() -> tuple[dict, dict, list[str]]:
        runner = FakeRunner()
        runner.gate = asyncio.Event()
        now = [1_000_000.0]
        m = manager(tmp_path, runner, clock=lambda: now[0])
        a = await m.create("acme", "key1", upload(tmp_path, "acme", [line(i) for i in range(10)]), "/v1/chat/completions")
        await m.tick()
        await asyncio.sleep(0.02)  # 4 lines are running (max_in_flight)
        cancelling = await m.cancel("acme", a["id"])
        assert cancelling["status"] == "cancelling" and cancelling["cancelling_at"]
        runner.gate.set()
        await m.wait_idle()
        b = await m.create("acme", "key1", upload(tmp_path, "acme", [line(i) for i in range(3)]), "/v1/chat/completions")
        now[0] += 25 * 3600  # its window passes before it starts
        await m.tick()
        await m.wait_idle()
        return m.get("acme", a["id"]), m.get("acme", b["id"]), runner.calls

    cancelled, expired, calls = asyncio.run(scenario())
    assert cancelled["status"] == "cancelled" and cancelled["request_counts"] == {"total": 10, "completed": 4, "failed": 0}
    assert len(calls) == 4
    assert expired["status"] == "expired" and expired["request_counts"] == {"total": 3, "completed": 0, "failed": 3}
    errors = [json.loads(x) for x in FileStore(tmp_path).data_path("acme", expired["error_file_id"]).read_text().splitlines()]
    assert {e["error"]["code"] for e in errors} == {"batch_expired"}


def test_a_batch_holds_its_worst_case_and_the_plan_bounds_queued_tokens(tmp_path: Path) -> None:
    plans = {"free": Plan(monthly_budget=Decimal("0.0001")), "big": Plan(monthly_budget=Decimal("100"), batch_queued_tokens=5000)}
    core = BillingCore(config(**plans), Ledger(f"sqlite:///{tmp_path}/l.db"))
    core.create_key("poor", "free")
    core.create_key("rich", "big")

    async def scenario() -> list[str]:
        runner = FakeRunner()
        runner.gate = asyncio.Event()
        m = manager(tmp_path, runner, core)
        seen = []
        with pytest.raises(InsufficientQuotaError) as err:  # 20 lines of up to ~2,100 tokens at 0.75/1M: over 0.0001
            await m.create("poor", "k", upload(tmp_path, "poor", [line(i, max_tokens=2000) for i in range(20)]), "/v1/chat/completions")
        seen.append(err.value.message.split(";")[0])
        one = await m.create("rich", "k", upload(tmp_path, "rich", [line(i, max_tokens=1000) for i in range(3)]), "/v1/chat/completions")
        seen.append(str(core.committed("rich", time.strftime("%Y-%m", time.gmtime(one["created_at"])))))
        with pytest.raises(RateLimitError) as err:  # 3 × ~1,100 queued: another 3 pass the plan's 5,000
            await m.create("rich", "k", upload(tmp_path, "rich", [line(i, max_tokens=1000) for i in range(3)]), "/v1/chat/completions")
        seen.append(err.value.code)
        runner.gate.set()
        await m.tick()
        await m.wait_idle()
        seen.append(str(core.committed("rich", time.strftime("%Y-%m", time.gmtime(one["created_at"])))))
        return seen

    refused, held, queue_full, after = asyncio.run(scenario())
    assert refused.startswith("This batch may cost up to")
    assert Decimal(held) > 0 and queue_full == "batch_queue_full" and Decimal(after) == 0  # released when it ends (the fake bills nothing)


def test_a_tenant_sees_only_its_own_batches_and_bad_requests_are_400s(tmp_path: Path) -> None:
    async def scenario() -> None:
        m = manager(tmp_path, FakeRunner())
        file_id = upload(tmp_path, "acme", [line(0)])
        created = await m.create("acme", "k", file_id, "/v1/chat/completions")
        with pytest.raises(NotFoundError):
            m.get("other", created["id"])
        with pytest.raises(NotFoundError):
            await m.create("other", "k", file_id, "/v1/chat/completions")  # another tenant's file
        with pytest.raises(InvalidRequestError, match="every line must be for the batch's endpoint"):
            await m.create("acme", "k", file_id, "/v1/completions")
        assert [b["id"] for b in m.list("acme")["data"]] == [created["id"]] and m.list("other")["data"] == []
        assert m.list(None)["data"][0]["tenant"] == "acme"  # an operator's view names the tenant

    asyncio.run(scenario())


def test_each_run_of_a_line_is_its_own_request_in_the_graph_billed_under_the_lines_id() -> None:
    from billing.records import BillingContext
    from deployments.openai.service import RunAs, _ledger_id

    run_as = RunAs("batch_abc_7")
    first, second = run_as.engine_id(), run_as.engine_id()
    assert first != second and first.startswith("batch_abc_7.")  # two attempts may overlap after a restart: distinct in the relay
    assert _ledger_id(first, run_as) == _ledger_id(second, run_as) == "batch_abc_7"
    assert _ledger_id(f"{first}-2", run_as) == "batch_abc_7-2"  # a list of prompts' sub-request
    assert _ledger_id("plain", None) == "plain"
    ctx = BillingContext("t", "k", "m", "v", "chat", "1", "1", "0", "h", request_id="batch_abc_7")
    assert ctx.event(first, 0.0, "ok", 3, 2).request_id == "batch_abc_7"  # the engine's witness reports under the line's id


def test_polling_reads_only_the_batches_not_ended(tmp_path: Path) -> None:
    """A long history of ended batches costs the poll nothing: only the first look reads the whole store."""

    async def scenario() -> str:
        m = manager(tmp_path, FakeRunner())
        ended = await m.create("acme", "key1", upload(tmp_path, "acme", [line(0)]), "/v1/chat/completions")
        await m.tick()
        await m.wait_idle()
        (tmp_path / ".batches" / ended["id"] / "batch.json").write_text("{torn")  # never read again
        later = await m.create("acme", "key1", upload(tmp_path, "acme", [line(0), line(1)]), "/v1/chat/completions")
        await m.tick()  # starts the new one without reading the ended one
        await m.wait_idle()
        return m.get("acme", later["id"])["status"]

    assert asyncio.run(scenario()) == "completed"
