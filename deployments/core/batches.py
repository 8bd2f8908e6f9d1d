"""OpenAI's Batch API, run on the serving graph at the lowest tier: its files, its records, and the manager that runs them. No Ray here.

A batch is a JSONL file of requests (`purpose=batch`, one `{"custom_id", "method", "url", "body"}` per
line). `POST /v1/batches` makes a record; the named batch actor (`deployments.batches`) wraps one
`BatchManager`, which runs each batch's lines through the ingress (`LineRunner`) as requests of the
`batch` tier: admitted, metered and billed each as a request of its own, at the batch price, and
scheduled by the generator after every live request (`deployments.core.scheduling`), so a batch fills
the engine when live traffic is light and gives way when it is not.

Exactly once. Line `i` of batch `b` is always the request `batch_<b>_<i>`, and the ledger keeps one row
per request id, so a line that runs twice (its runner died after the engine ran it, before its result
was written) is still billed once. Each result is appended to the batch's `output.jsonl` or
`errors.jsonl` as it comes and flushed; a restarted manager reads them back and runs only the lines
that have no result (a torn last line is dropped and run again), so no line is lost either.

Each batch lives in `<store root>/.batches/<batch id>/`: `batch.json` (the record, replaced atomically),
`input.jsonl` (the batch's own copy of its input file), `output.jsonl` and `errors.jsonl`. Finished,
the two result files become the tenant's files (`purpose=batch_output`), in `custom_id` order of input.

Money: creating a batch holds the worst case of its lines not started yet (prompt bytes as a bound on
prompt tokens, plus `max_tokens` or the context window per choice, at the batch price) against the
tenant's budget, or refuses it (429 `insufficient_quota`); the plan's `batch_queued_tokens` bounds the
worst-case tokens of a tenant's unfinished batches (429). The hold shrinks as lines start, each line's
own admission taking over, and is released when the batch ends however it ends: a cancelled or expired
batch bills exactly the lines that ran.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import time
import uuid
from dataclasses import asdict, dataclass, field
from decimal import Decimal
from pathlib import Path
from typing import BinaryIO, Callable, Iterable, Iterator, Protocol

from common.config import Plan, Price
from common.datasets import DatasetError
from common.errors import InvalidRequestError, NotFoundError, RateLimitError
from common.file_store import FileStore

logger = logging.getLogger(__name__)

ENDPOINTS = ("/v1/chat/completions", "/v1/completions", "/v1/embeddings")
MAX_LINES = 50_000  # OpenAI's bound on one batch
WINDOWS = {"24h": 24 * 3600.0}
ACTIVE = ("validating", "in_progress", "finalizing", "cancelling")
RETRYABLE = (429, 503)  # a line refused for now (rate limit, engine starting): tried again later, never recorded


@dataclass(frozen=True)
class BatchLine:
    index: int  # 0-based line number in the input file
    custom_id: str
    url: str
    body: dict


def parse_lines(raw_lines: Iterable[bytes], name: str) -> Iterator[BatchLine]:
    """Each non-empty line of a batch input file, checked (DatasetError naming the line otherwise)."""
    seen: set[str] = set()
    index = 0
    for n, raw in enumerate(raw_lines, 1):
        if not raw.strip():
            continue
        try:
            obj = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, ValueError):
            raise DatasetError(name, n, "not a JSON object on one line of UTF-8 text") from None
        if not isinstance(obj, dict):
            raise DatasetError(name, n, "not a JSON object")
        unknown = sorted(set(obj) - {"custom_id", "method", "url", "body"})
        if unknown:
            raise DatasetError(name, n, f"unknown field `{unknown[0]}` (a line has custom_id, method, url and body)")
        custom_id, method, url, body = obj.get("custom_id"), obj.get("method"), obj.get("url"), obj.get("body")
        if not isinstance(custom_id, str) or not 0 < len(custom_id) <= 512:
            raise DatasetError(name, n, "`custom_id` must be a text of 1 to 512 characters")
        if custom_id in seen:
            raise DatasetError(name, n, f"`custom_id` {custom_id!r} is used by an earlier line; each must be unique")
        if method != "POST":
            raise DatasetError(name, n, "`method` must be POST")
        if url not in ENDPOINTS:
            raise DatasetError(name, n, f"`url` must be one of {', '.join(ENDPOINTS)}")
        if not isinstance(body, dict) or not isinstance(body.get("model"), str):
            raise DatasetError(name, n, "`body` must be a JSON object with a `model`")
        if body.get("stream"):
            raise DatasetError(name, n, "`body.stream` is not allowed in a batch")
        seen.add(custom_id)
        if len(seen) > MAX_LINES:
            raise DatasetError(name, n, f"a batch holds at most {MAX_LINES} requests")
        yield BatchLine(index, custom_id, url, body)
        index += 1


def check_batch_upload(source: BinaryIO, name: str) -> int:
    """The number of requests in an upload with `purpose=batch`, every line checked (DatasetError otherwise)."""
    count = sum(1 for _ in parse_lines(source, name))
    if not count:
        raise DatasetError(name, 0, "the file has no request")
    return count


@dataclass(frozen=True)
class Worst:
    """A line's worst case: the tokens it may use at most, prompt and completion apart."""

    prompt: int
    completion: int

    def cost(self, price: Price) -> Decimal:
        return (price.prompt_per_1m * self.prompt + price.completion_per_1m * self.completion) / Decimal(1_000_000)


def worst_case(line: BatchLine, context_window: int) -> Worst:
    """At most as many prompt tokens as its body has bytes (a token is at least a byte; the chat template's are few
    beside the JSON's quotes and keys), each bounded by the context window; `max_tokens` (or the window) per choice."""
    body = line.body
    text = json.dumps(body, ensure_ascii=False).encode("utf-8")
    if line.url == "/v1/embeddings":
        items = body.get("input")
        count = len(items) if isinstance(items, list) and items and not isinstance(items[0], int) else 1
        return Worst(min(len(text), context_window * count), 0)
    n = body.get("n") if isinstance(body.get("n"), int) and body["n"] > 0 else 1
    asked = body.get("max_completion_tokens") or body.get("max_tokens")
    completion = min(asked, context_window) if isinstance(asked, int) and asked > 0 else context_window
    return Worst(min(len(text), context_window), completion * n)


@dataclass
class Batch:
    """The record of one batch (OpenAI's Batch object, plus what the manager needs)."""

    id: str
    tenant: str
    key_id: str
    endpoint: str
    input_file_id: str
    completion_window: str
    created_at: int
    expires_at: int
    status: str = "validating"
    metadata: dict | None = None
    total: int = 0
    completed: int = 0
    failed: int = 0
    worst_tokens: int = 0  # all lines' worst case, what the plan's `batch_queued_tokens` bounds
    output_file_id: str | None = None
    error_file_id: str | None = None
    errors: list[dict] = field(default_factory=list)  # validation errors: {code, message, line, param}
    in_progress_at: int | None = None
    finalizing_at: int | None = None
    completed_at: int | None = None
    failed_at: int | None = None
    expired_at: int | None = None
    cancelling_at: int | None = None
    cancelled_at: int | None = None

    def to_openai(self) -> dict:
        return {
            "id": self.id, "object": "batch", "endpoint": self.endpoint, "errors": {"object": "list", "data": self.errors} if self.errors else None,
            "input_file_id": self.input_file_id, "completion_window": self.completion_window, "status": self.status,
            "output_file_id": self.output_file_id, "error_file_id": self.error_file_id, "created_at": self.created_at,
            "in_progress_at": self.in_progress_at, "expires_at": self.expires_at, "finalizing_at": self.finalizing_at,
            "completed_at": self.completed_at, "failed_at": self.failed_at, "expired_at": self.expired_at,
            "cancelling_at": self.cancelling_at, "cancelled_at": self.cancelled_at,
            "request_counts": {"total": self.total, "completed": self.completed, "failed": self.failed}, "metadata": self.metadata,
        }  # fmt: skip

    def request_id(self, index: int) -> str:
        """The request id of line `index`: the same however often it runs (the ledger's idempotency key)."""
        return f"{self.id}_{index}"


class LineRunner(Protocol):
    """Runs one line as a request of `tenant`'s key at the batch tier; (HTTP status, response body or error envelope)."""

    async def run(self, tenant: str, key_id: str, url: str, body: dict, request_id: str) -> tuple[int, dict]: ...


class BatchBilling(Protocol):
    async def hold(self, key: str, tenant: str, amount: Decimal, period: str, key_id: str = "") -> None: ...

    async def release(self, key: str) -> None: ...

    async def plan(self, tenant: str) -> Plan: ...


class BatchStore:
    """The batches' folders under the store root."""

    def __init__(self, root: str | Path):
        self.root = Path(root).expanduser().resolve() / ".batches"

    def folder(self, batch_id: str) -> Path:
        if not batch_id.startswith("batch_") or not batch_id[6:].isalnum():
            raise NotFoundError(f"No batch `{batch_id}`.", param="batch_id")
        return self.root / batch_id

    def save(self, batch: Batch) -> None:
        folder = self.folder(batch.id)
        folder.mkdir(parents=True, exist_ok=True)
        tmp = folder / f".batch.json.{uuid.uuid4().hex}"
        tmp.write_text(json.dumps(asdict(batch)))
        os.replace(tmp, folder / "batch.json")

    def load(self, batch_id: str) -> Batch | None:
        try:
            return Batch(**json.loads((self.folder(batch_id) / "batch.json").read_text()))
        except FileNotFoundError:
            return None

    def all(self) -> list[Batch]:
        if not self.root.is_dir():
            return []
        found = (self.load(p.name) for p in self.root.iterdir() if p.name.startswith("batch_") and (p / "batch.json").is_file())
        return sorted((b for b in found if b is not None), key=lambda b: (-b.created_at, b.id))

    def results(self, batch_id: str) -> dict[int, dict]:
        """Every line's recorded result (output and errors), by line index; a torn last line is dropped from its file."""
        done: dict[int, dict] = {}
        for name in ("output.jsonl", "errors.jsonl"):
            path = self.folder(batch_id) / name
            if not path.exists():
                continue
            data = path.read_bytes()
            keep = data if data.endswith(b"\n") or not data else data[: data.rfind(b"\n") + 1]
            if len(keep) != len(data):
                path.write_bytes(keep)  # the runner died while writing it: that line runs again
            for raw in keep.splitlines():
                entry = json.loads(raw)
                done[entry.pop("_line")] = entry
        return done

    def append(self, batch_id: str, name: str, entries: list[dict]) -> None:
        with open(self.folder(batch_id) / name, "ab") as out:
            out.write(b"".join(json.dumps(e, ensure_ascii=False).encode() + b"\n" for e in entries))
            out.flush()
            os.fsync(out.fileno())


def _period(ts: float) -> str:
    return time.strftime("%Y-%m", time.gmtime(ts))


class BatchManager:
    """Creates, runs, resumes and cancels batches; the actor calls `tick()` every `poll_s` and the rest from the API."""

    def __init__(
        self,
        store_root: str | Path,
        runner: LineRunner,
        billing: BatchBilling | None,
        price_of: Callable[[str], Price],
        window_of: Callable[[str], int],
        max_in_flight: int = 64,
        clock: Callable[[], float] = time.time,
        retry_s: float = 1.0,
    ):
        """`price_of(model)`: a line's price per token at the batch tier (an unknown model raises); `window_of(model)`: its context window."""
        self.store = BatchStore(store_root)
        self.files = FileStore(store_root)
        self._runner = runner
        self._billing = billing
        self._price_of = price_of
        self._window_of = window_of
        self._max_in_flight = max_in_flight
        self._clock = clock
        self._retry_s = retry_s
        self._running: dict[str, asyncio.Task] = {}
        self._active: set[str] | None = None  # the batches not ended yet; None until the first look at the store

    # ---- the API's side ------------------------------------------------------------------------------

    async def create(self, tenant: str, key_id: str, input_file_id: str, endpoint: str, completion_window: str = "24h", metadata: dict | None = None) -> dict:
        if endpoint not in ENDPOINTS:
            raise InvalidRequestError(f"`endpoint` must be one of {', '.join(ENDPOINTS)}.", param="endpoint")
        if completion_window not in WINDOWS:
            raise InvalidRequestError("`completion_window` must be 24h.", param="completion_window")
        record = self.files.get(tenant, input_file_id)
        if record.purpose != "batch":
            raise InvalidRequestError(f"The file `{input_file_id}` was uploaded for `{record.purpose}`, not `batch`.", param="input_file_id")
        now = self._clock()
        batch = Batch(
            f"batch_{uuid.uuid4().hex[:24]}", tenant, key_id, endpoint, input_file_id, completion_window, int(now), int(now + WINDOWS[completion_window]), metadata=metadata
        )
        lines = self._read_input(self.files.data_path(tenant, input_file_id), input_file_id)
        wrong = next((line for line in lines if line.url != endpoint), None)
        if wrong is not None:
            raise InvalidRequestError(f"Line {wrong.index + 1} of `{input_file_id}` is for {wrong.url}; every line must be for the batch's endpoint {endpoint}.", param="input_file_id")
        worst = [worst_case(line, self._window_of(line.body["model"])) for line in lines]
        amount = sum((w.cost(self._price_of(line.body["model"])) for w, line in zip(worst, lines)), Decimal(0))
        batch.total, batch.worst_tokens = len(lines), sum(w.prompt + w.completion for w in worst)
        if self._billing is not None:
            plan = await self._billing.plan(tenant)
            queued = sum(b.worst_tokens for b in self._active_batches() if b.tenant == tenant)
            if plan.batch_queued_tokens is not None and queued + batch.worst_tokens > plan.batch_queued_tokens:
                raise RateLimitError(
                    f"Your unfinished batches may use up to {queued} tokens and this one {batch.worst_tokens}; your plan queues at most {plan.batch_queued_tokens}.",
                    limit_type="tokens", code="batch_queue_full", retry_after_s=60,
                )  # fmt: skip
            await self._billing.hold(batch.id, tenant, amount, _period(now), key_id)  # 429 insufficient_quota when it does not fit
        folder = self.store.folder(batch.id)
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "input.jsonl").write_bytes(self.files.data_path(tenant, input_file_id).read_bytes())  # its own copy
        self.store.save(batch)
        if self._active is not None:
            self._active.add(batch.id)
        logger.info("batch %s created: %d requests to %s, worst case %s", batch.id, batch.total, endpoint, amount)
        return batch.to_openai()

    def get(self, tenant: str | None, batch_id: str) -> dict:
        return self._own(tenant, batch_id).to_openai()

    def list(self, tenant: str | None, after: str | None = None, limit: int = 20) -> dict:
        """A tenant's batches (every tenant's for None), newest first."""
        batches = [b for b in self.store.all() if tenant is None or b.tenant == tenant]
        if after:
            ids = [b.id for b in batches]
            batches = batches[ids.index(after) + 1 :] if after in ids else []
        page = batches[:limit]
        return {
            "object": "list", "data": [b.to_openai() | ({"tenant": b.tenant} if tenant is None else {}) for b in page],
            "first_id": page[0].id if page else None, "last_id": page[-1].id if page else None, "has_more": len(batches) > limit,
        }  # fmt: skip

    async def cancel(self, tenant: str | None, batch_id: str) -> dict:
        """Stop starting lines; the lines running finish (and are billed), then the batch is `cancelled` with what ran."""
        batch = self._own(tenant, batch_id)
        if batch.status in ("validating", "in_progress"):
            batch.status, batch.cancelling_at = "cancelling", int(self._clock())
            self.store.save(batch)
            logger.info("batch %s cancelling", batch.id)
            if batch.id not in self._running:
                await self._finish(batch)
        return self.store.load(batch.id).to_openai()  # type: ignore[union-attr]

    def _own(self, tenant: str | None, batch_id: str) -> Batch:
        batch = self.store.load(batch_id)
        if batch is None or (tenant is not None and batch.tenant != tenant):
            raise NotFoundError(f"No batch `{batch_id}`" + (" in your tenant." if tenant is not None else "."), param="batch_id")
        return batch

    # ---- running ---------------------------------------------------------------------------------------

    async def tick(self) -> None:
        """Start (or resume, after a restart) every active batch not running here; finish the ones past their window."""
        for batch in self._active_batches():
            if batch.id not in self._running:
                task = asyncio.get_running_loop().create_task(self._run(batch.id))
                self._running[batch.id] = task
                task.add_done_callback(lambda _t, bid=batch.id: self._ended(bid))

    def _ended(self, batch_id: str) -> None:
        """Its run is over: forgotten by the poll unless it is somehow still active (then the next poll runs it again)."""
        self._running.pop(batch_id, None)
        batch = self.store.load(batch_id)
        if self._active is not None and (batch is None or batch.status not in ACTIVE):
            self._active.discard(batch_id)

    def _active_batches(self) -> list[Batch]:
        """The batches not ended yet. The whole store is read once (a restarted manager resumes what it finds); after that
        only these, so a poll costs the same whatever the history of ended batches."""
        if self._active is None:
            self._active = {b.id for b in self.store.all() if b.status in ACTIVE}
        found = []
        for batch_id in sorted(self._active):
            batch = self.store.load(batch_id)
            if batch is None or batch.status not in ACTIVE:
                self._active.discard(batch_id)
            else:
                found.append(batch)
        return found

    async def wait_idle(self) -> None:
        while self._running:
            await asyncio.gather(*list(self._running.values()), return_exceptions=True)

    def _read_input(self, path: Path, name: str) -> list[BatchLine]:
        try:
            with open(path, "rb") as source:
                return list(parse_lines(source, name))
        except DatasetError as exc:
            raise InvalidRequestError(f"Invalid batch file (line {exc.line}: {exc.reason}).", param="input_file_id", code="invalid_file_format") from None

    async def _run(self, batch_id: str) -> None:
        batch = self.store.load(batch_id)
        if batch is None:
            return
        try:
            lines = self._read_input(self.store.folder(batch.id) / "input.jsonl", batch.input_file_id)
        except InvalidRequestError as exc:
            batch.status, batch.failed_at, batch.errors = "failed", int(self._clock()), [{"code": "invalid_file_format", "message": exc.message, "line": None, "param": None}]
            self.store.save(batch)
            await self._release(batch)
            return
        if batch.status == "validating":
            batch.status, batch.in_progress_at = "in_progress", int(self._clock())
            self.store.save(batch)
        done = self.store.results(batch.id)
        todo = [line for line in lines if line.index not in done]
        batch.completed = sum(1 for e in done.values() if e["response"]["status_code"] == 200)
        batch.failed = len(done) - batch.completed
        self.store.save(batch)
        if done:
            logger.info("batch %s resumed: %d of %d lines have results", batch.id, len(done), len(lines))
        windows = {m: self._window_of(m) for m in {line.body["model"] for line in lines}}
        worst = {line.index: worst_case(line, windows[line.body["model"]]).cost(self._price_of(line.body["model"])) for line in todo}
        left = sum(worst.values(), Decimal(0))
        await self._hold(batch, left)
        slots = asyncio.Semaphore(self._max_in_flight)
        tasks: list[asyncio.Task] = []
        for started, line in enumerate(todo):
            await slots.acquire()
            current = self.store.load(batch.id)
            if current is None or current.status != "in_progress" or self._clock() >= batch.expires_at:
                slots.release()
                break
            left -= worst[line.index]
            if started % 8 == 7:
                await self._hold(batch, left)  # the lines' own admissions take over their parts
            tasks.append(asyncio.get_running_loop().create_task(self._line(batch, line, slots)))
        await asyncio.gather(*tasks, return_exceptions=True)
        await self._finish(self.store.load(batch.id) or batch)

    async def _line(self, batch: Batch, line: BatchLine, slots: asyncio.Semaphore) -> None:
        try:
            while True:
                try:
                    status, body = await self._runner.run(batch.tenant, batch.key_id, line.url, line.body, batch.request_id(line.index))
                except Exception as exc:  # the ingress is unreachable or restarting: try again later
                    logger.warning("batch %s line %d: %s; retrying", batch.id, line.index, exc)
                    status, body = 503, {}
                if status not in RETRYABLE:
                    break
                if self._clock() >= batch.expires_at:
                    return  # expired: `_finish` records it with the others never run
                await asyncio.sleep(self._retry_s)
            entry = {"id": f"batch_req_{batch.request_id(line.index)}", "custom_id": line.custom_id, "response": {"status_code": status, "request_id": batch.request_id(line.index), "body": body}, "error": None}
            self.store.append(batch.id, "output.jsonl" if status == 200 else "errors.jsonl", [{**entry, "_line": line.index}])
            current = self.store.load(batch.id)  # the counts as they go (a cancel may have changed the status meanwhile)
            if current is not None:
                current.completed, current.failed = current.completed + (status == 200), current.failed + (status != 200)
                self.store.save(current)
        finally:
            slots.release()

    async def _finish(self, batch: Batch) -> None:
        """Every line has a result, or the batch was cancelled or expired: write its files, set its end, release its hold."""
        lines = self._read_input(self.store.folder(batch.id) / "input.jsonl", batch.input_file_id)
        done = self.store.results(batch.id)
        now = self._clock()
        ended = "cancelled" if batch.status == "cancelling" else ("expired" if len(done) < len(lines) and now >= batch.expires_at else None)
        if ended is None and len(done) < len(lines):
            return  # stopped early (the actor is stopping): resumed by the next tick
        batch.status, batch.finalizing_at = ("finalizing" if ended is None else batch.status), int(now)
        self.store.save(batch)
        outputs, errors = [], []
        for line in lines:
            entry = done.get(line.index)
            if entry is None:
                if ended != "expired":
                    continue
                code, message = "batch_expired", "This line was not run within the batch's completion window."
                entry = {"id": f"batch_req_{batch.request_id(line.index)}", "custom_id": line.custom_id, "response": None, "error": {"code": code, "message": message}}
            (outputs if entry.get("response") and entry["response"]["status_code"] == 200 else errors).append(entry)
        batch.completed, batch.failed = len(outputs), len(errors)
        if outputs:
            batch.output_file_id = self._keep(batch, "output", outputs)
        if errors:
            batch.error_file_id = self._keep(batch, "errors", errors)
        end = int(self._clock())
        if ended == "cancelled":
            batch.status, batch.cancelled_at = "cancelled", end
        elif ended == "expired":
            batch.status, batch.expired_at = "expired", end
        else:
            batch.status, batch.completed_at = "completed", end
        self.store.save(batch)
        await self._release(batch)
        logger.info("batch %s %s: %d completed, %d failed", batch.id, batch.status, batch.completed, batch.failed)

    def _keep(self, batch: Batch, what: str, entries: list[dict]) -> str:
        data = b"".join(json.dumps(e, ensure_ascii=False).encode() + b"\n" for e in entries)
        return self.files.create(batch.tenant, f"{batch.id}_{what}.jsonl", "batch_output", data, len(entries)).id

    async def _hold(self, batch: Batch, amount: Decimal) -> None:
        if self._billing is not None:
            try:
                await self._billing.hold(batch.id, batch.tenant, max(amount, Decimal(0)), _period(batch.created_at), batch.key_id)
            except Exception:  # the budget moved meanwhile: the hold it had stands (a refused hold is never dropped)
                logger.debug("could not re-assert the hold of %s", batch.id, exc_info=True)

    async def _release(self, batch: Batch) -> None:
        if self._billing is not None:
            try:
                await self._billing.release(batch.id)
            except Exception:
                logger.warning("could not release the hold of batch %s; the billing actor drops it when it restarts", batch.id, exc_info=True)
