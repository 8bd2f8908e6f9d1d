"""The durable ledger: usage events, tenants, API keys and the audit trail, in any SQLAlchemy database.

The embedded default is SQLite in WAL mode (one file, no server); a cluster that
must survive the loss of its head node points `billing.ledger_url` at a server
(e.g. PostgreSQL).  The billing actor is the only writer.

Usage rows are keyed by request id, one per request whichever of its two witnesses
(the ingress, the engine) reports first; `record()` merges each report into its row by
`billing.witness`'s rules, so a resent batch counts once.  Amounts are never stored as
floats: a row keeps its token counts and the unit prices (as exact decimal text) that applied.

The schema is managed by Alembic (`billing/migrations`): opening a ledger upgrades it in place.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, replace
from decimal import Decimal
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from sqlalchemy import Boolean, Column, Float, Index, Integer, MetaData, String, Table, Text, UniqueConstraint, bindparam, create_engine, event, func, inspect, select, update
from sqlalchemy.sql.expression import false
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.exc import DataError, IntegrityError, StatementError

from billing.pricing import cost, price_of
from billing.quota import day_of, period_of
from billing.records import KeyRecord, UsageEvent
from billing.witness import INGRESS, UNMETERED, Merged, Witness, Witnessed, close, merge

logger = logging.getLogger(__name__)

metadata = MetaData()

STATUS_LEN = 64  # `ok`, `aborted`, or an error code (`context_length_exceeded`, `service_unavailable`, ...)

usage = Table(
    "usage",
    metadata,
    Column("request_id", String(64), primary_key=True),
    Column("ts", Float, nullable=False),
    Column("period", String(7), nullable=False),
    Column("day", String(10), nullable=False),
    Column("tenant", String(128), nullable=False),
    Column("key_id", String(32), nullable=False),
    Column("model", String(256), nullable=False),
    Column("version", String(64), nullable=False),
    Column("kind", String(16), nullable=False),
    Column("status", String(STATUS_LEN), nullable=False),
    Column("prompt_tokens", Integer, nullable=False),
    Column("completion_tokens", Integer, nullable=True),
    Column("prompt_price", String(32), nullable=False),
    Column("completion_price", String(32), nullable=False),
    Column("reserved", String(40), nullable=False),
    Column("holder", String(128), nullable=False),
    Column("delivered_tokens", Integer, nullable=True),  # the ingress's witness (None: not heard)
    Column("engine_tokens", Integer, nullable=True),  # the engine's witness (None: not heard)
    Column("known", Boolean, nullable=False, server_default=false()),  # the ingress knew the count (billing.witness)
    Column("end_user", String(256), nullable=False, server_default=""),  # the request's `user` (the tenant's end user)
    Column("cached_tokens", Integer, nullable=False, server_default="0"),  # of prompt_tokens, the engine's prefix-cache hits (revision 0006)
    Column("cached_price", String(32), nullable=False, server_default=""),  # per 1M cached prompt tokens ("": the prompt price)
    Column("service_tier", String(16), nullable=False, server_default="default"),  # the tier its prices are (revision 0007)
    Index("ix_usage_tenant_period", "tenant", "period"),
    Index("ix_usage_period", "period"),
)

# Written until the engine's report carried the whole request (revision 0002); kept for what it holds.
engine_counts = Table(
    "engine_counts",
    metadata,
    Column("request_id", String(64), primary_key=True),
    Column("completion_tokens", Integer, nullable=False),
    Column("ts", Float, nullable=False),
)

tenants = Table(
    "tenants",
    metadata,
    Column("tenant", String(128), primary_key=True),
    Column("plan", String(64), nullable=False),
    Column("created_at", Float, nullable=False),
)

api_keys = Table(
    "api_keys",
    metadata,
    Column("key_id", String(32), primary_key=True),
    Column("key_hash", String(64), nullable=False, unique=True),
    Column("tenant", String(128), nullable=False),
    Column("role", String(16), nullable=False),
    Column("name", String(128), nullable=False, default=""),
    Column("created_at", Float, nullable=False),
    Column("expires_at", Float, nullable=True),
    Column("revoked_at", Float, nullable=True),
    Column("seq", Integer, nullable=False, index=True),
    Column("models", Text, nullable=False, server_default=""),  # allowed models, JSON list ("" or []: all)
    Column("monthly_budget", String(40), nullable=True),  # the key's own limits (Decimal as text)
    Column("rpm", Integer, nullable=True),
    Column("tpm", Integer, nullable=True),
    Column("metadata", Text, nullable=False, server_default=""),  # free-form JSON object
)


def _key_row(key: KeyRecord) -> dict:
    values = {f: getattr(key, f) for f in KeyRecord.__dataclass_fields__ if f != "plan"}
    values["models"] = json.dumps(list(key.models)) if key.models else ""
    values["monthly_budget"] = None if key.monthly_budget is None else str(key.monthly_budget)
    return values


def _key_record(row: Any) -> KeyRecord:
    values = {k: row[k] for k in KeyRecord.__dataclass_fields__ if k != "plan"}
    values["plan"] = row.get("plan") or ""
    values["models"] = tuple(json.loads(values["models"])) if values["models"] else ()
    values["monthly_budget"] = None if values["monthly_budget"] is None else Decimal(values["monthly_budget"])
    values["metadata"] = values["metadata"] or ""
    return KeyRecord(**values)

audit = Table(
    "audit",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("ts", Float, nullable=False),
    Column("who", String(128), nullable=False),
    Column("action", String(64), nullable=False),
    Column("target", String(256), nullable=False),
    Column("detail", String(2048), nullable=False, default=""),
)

# Events a batch could not store (a value the database refuses): kept for an operator, never blocking the batch.
rejected_events = Table(
    "rejected_events",
    metadata,
    Column("request_id", String(256), primary_key=True),
    Column("ts", Float, nullable=False),
    Column("reason", String(2048), nullable=False),
    Column("event", Text, nullable=False),
)

# Budget alerts: one row per (tenant, period, threshold), so each is queued once; its deliveries are tracked here.
alerts = Table(
    "alerts",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("tenant", String(128), nullable=False),
    Column("period", String(7), nullable=False),
    Column("threshold", String(16), nullable=False),
    Column("url", Text, nullable=False),
    Column("body", Text, nullable=False),
    Column("state", String(16), nullable=False),  # pending | sent | failed
    Column("attempts", Integer, nullable=False, default=0),
    Column("next_at", Float, nullable=False),
    Column("created_at", Float, nullable=False),
    Column("sent_at", Float, nullable=True),
    Column("last_error", String(512), nullable=False, default=""),
    UniqueConstraint("tenant", "period", "threshold", name="uq_alerts_tenant_period_threshold"),
)

# Small durable settings, e.g. the billing config last adopted (restored when the actor restarts).
settings = Table(
    "settings",
    metadata,
    Column("name", String(64), primary_key=True),
    Column("value", Text, nullable=False),
    Column("updated_at", Float, nullable=False),
)

_CHUNK = 500  # ids per IN (...) lookup


@dataclass(frozen=True)
class SpendRow:
    """Tokens of one tenant at one pair of unit prices in one period (summing tokens keeps amounts exact)."""

    tenant: str
    period: str
    model: str
    version: str
    prompt_price: Decimal
    completion_price: Decimal
    requests: int
    prompt_tokens: int
    completion_tokens: int
    day: str = ""
    end_user: str = ""
    key_id: str = ""
    cached_tokens: int = 0  # of prompt_tokens, those the engine's prefix cache held
    cached_price: Decimal | None = None  # per 1M of them (None: the prompt price)
    service_tier: str = "default"  # the service tier of these requests (their prices are that tier's)

    @property
    def amount(self) -> Decimal:
        return cost(self.prompt_price, self.completion_price, self.prompt_tokens, self.completion_tokens, self.cached_tokens, self.cached_price)


@dataclass(frozen=True)
class PendingRow:
    """An aborted request still waiting for the engine's count: its unknown part stays reserved."""

    request_id: str
    tenant: str
    period: str
    ts: float
    held: Decimal  # reserved − cost of the prompt
    key_id: str = ""


def _sqlite_pragmas(dbapi_conn, _record) -> None:
    cur = dbapi_conn.cursor()
    cur.execute("PRAGMA journal_mode=WAL")
    cur.execute("PRAGMA synchronous=FULL")  # each committed batch survives a crash of the machine
    cur.execute("PRAGMA busy_timeout=5000")
    # Checkpoint the WAL every ~80 MB rather than every 4 MB, and keep 64 MB of the random-keyed indexes
    # in memory: ingestion 47k -> 72k events/s in-process (bench/RESULTS.md).
    cur.execute("PRAGMA wal_autocheckpoint=20000")
    cur.execute("PRAGMA journal_size_limit=67108864")
    cur.execute("PRAGMA cache_size=-65536")
    cur.close()


def open_engine(url: str) -> Engine:
    if url.startswith("sqlite:///"):
        path = url.removeprefix("sqlite:///")
        if path and path != ":memory:":
            Path(path).expanduser().parent.mkdir(parents=True, exist_ok=True)
        engine = create_engine(url)
        event.listen(engine, "connect", _sqlite_pragmas)
        return engine
    return create_engine(url, pool_pre_ping=True)


MIGRATIONS = Path(__file__).parent / "migrations"
LEGACY_REVISION = "0001"  # the schema ledgers had before migrations


def migrate(engine: Engine) -> str:
    """Upgrade the ledger's schema to the newest revision in place (a new ledger is created); returns it.

    A ledger made before migrations (tables, no `alembic_version`) is first stamped as revision 0001."""
    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS))
    with engine.begin() as conn:
        cfg.attributes["connection"] = conn
        before = MigrationContext.configure(conn).get_current_revision()
        if before is None and inspect(conn).has_table("usage"):
            command.stamp(cfg, LEGACY_REVISION)
            before = LEGACY_REVISION
        command.upgrade(cfg, "head")
        after = MigrationContext.configure(conn).get_current_revision()
    if after != before:
        logger.info("ledger schema: %s -> %s", before or "(new)", after)
    return after or ""


def _refused(exc: StatementError) -> bool:
    """Whether the database refused the rows themselves (a bad value), rather than failing to run (connection, lock)."""
    return isinstance(exc, (DataError, IntegrityError)) or isinstance(exc.orig, (TypeError, ValueError))


class Ledger:
    """All reads and writes of the billing database."""

    def __init__(self, url: str):
        self.url = url
        self.engine = open_engine(url)
        self.revision = migrate(self.engine)
        self._mark = {"qmark": "?", "numeric": ":{}", "named": ":p{}"}.get(self.engine.dialect.paramstyle, "%s")
        columns = [*UsageEvent._fields, "engine_tokens", "known", "period", "day"]
        self._insert_usage = f"INSERT INTO usage ({', '.join(columns)}) VALUES ({self._marks(len(columns))})"
        self._select_rows = f"SELECT {', '.join(UsageEvent._fields)}, engine_tokens, known FROM usage WHERE request_id IN "

    def _marks(self, n: int) -> str:
        return ", ".join(self._mark.format(i + 1) for i in range(n))

    def close(self) -> None:
        self.engine.dispose()

    # ---- usage -----------------------------------------------------------------------------

    def record(self, events: Sequence[UsageEvent], witness: Witness = INGRESS) -> list[Merged]:
        """Merge one witness's reports into their rows; return what each report changed (nothing: left out).

        One transaction per batch: either the whole batch is durable or none of it.  A report the database
        refuses (a value out of a column's range, a missing field) does not block the others: the batch is
        split until that report stands alone, and it is set aside in `rejected_events` for an operator.
        Connection and lock errors still fail the call (the sender keeps the batch and retries).
        """
        batch: dict[str, UsageEvent] = {}
        for e in events:
            batch.setdefault(e.request_id, e)
        if not batch:
            return []
        return self._record_split(list(batch.values()), witness)

    def _record_split(self, events: list[UsageEvent], witness: Witness) -> list[Merged]:
        try:
            return self._record_batch(events, witness)
        except StatementError as exc:
            if not _refused(exc):
                raise  # an operational failure (connection, lock): not the events' fault
            if len(events) == 1:
                self._set_aside(events[0], exc)
                return []
            half = len(events) // 2
            return self._record_split(events[:half], witness) + self._record_split(events[half:], witness)

    def _set_aside(self, e: UsageEvent, exc: Exception) -> None:
        logger.error("ledger: usage event %s refused by the database, set aside in rejected_events: %s", str(e.request_id)[:64], exc)
        with self.engine.begin() as conn:
            if conn.execute(select(rejected_events.c.request_id).where(rejected_events.c.request_id == str(e.request_id)[:256])).first() is None:
                conn.execute(rejected_events.insert().values(request_id=str(e.request_id)[:256], ts=time.time(), reason=str(exc)[:2048], event=json.dumps(e._asdict(), default=str)))

    def rejected(self) -> list[dict]:
        """Events set aside because the database refused them."""
        with self.engine.connect() as conn:
            return [dict(r) for r in conn.execute(select(rejected_events).order_by(rejected_events.c.ts)).mappings()]

    def _record_batch(self, events: list[UsageEvent], witness: Witness) -> list[Merged]:
        with self.engine.begin() as conn:
            stored = {w.event.request_id: w for w in self._witnessed(conn, [e.request_id for e in events])}
            merged = [m for m in (merge(stored.get(e.request_id), e, witness) for e in events) if m is not None]
            days = _Days()
            rows = [(*m.row.event, m.row.engine_tokens, m.row.known, *days(m.row.event.ts)) for m in merged if m.new]
            if rows:
                # The hot path: the driver's executemany, not per-row ORM/Core compilation (bench/RESULTS.md).
                conn.exec_driver_sql(self._insert_usage, rows)
            changed = [m.row for m in merged if not m.new]
            if changed:
                self._update(conn, changed)
        return merged

    @staticmethod
    def _update(conn: Connection, rows: list[Witnessed]) -> None:
        fields = ("status", "prompt_tokens", "completion_tokens", "delivered_tokens", "cached_tokens")
        q = update(usage).where(usage.c.request_id == bindparam("rid")).values(**{f: bindparam(f"v_{f}") for f in (*fields, "engine_tokens", "known")})
        conn.execute(q, [{"rid": w.event.request_id, **{f"v_{f}": getattr(w.event, f) for f in fields}, "v_engine_tokens": w.engine_tokens, "v_known": w.known} for w in rows])

    def close_pending(self, older_than: float) -> list[Witnessed]:
        """Pending rows whose engine count never came: closed at the ingress's floor (logged); their holds end."""
        with self.engine.begin() as conn:
            rows = [close(w) for w in self._pending_rows(conn) if w.event.ts < older_than]
            if rows:
                self._update(conn, rows)
        for w in rows:
            logger.warning("request %s: no engine count arrived; billed the %d tokens the client got", w.event.request_id, w.event.completion_tokens or 0)
        return rows

    def pending(self) -> list[PendingRow]:
        with self.engine.connect() as conn:
            return [
                PendingRow(
                    e.request_id, e.tenant, period_of(e.ts), e.ts,
                    Decimal(e.reserved) - e.amount(), e.key_id,
                )  # fmt: skip
                for e in (w.event for w in self._pending_rows(conn))
            ]

    def _pending_rows(self, conn: Connection) -> list[Witnessed]:
        cond = usage.c.delivered_tokens.is_not(None) & usage.c.engine_tokens.is_(None) & ~usage.c.known & ~usage.c.status.endswith(UNMETERED, autoescape=True)
        q = select(*[usage.c[f] for f in UsageEvent._fields], usage.c.engine_tokens, usage.c.known).where(cond)
        return [Witnessed(UsageEvent(*r[:-2]), r[-2], bool(r[-1])) for r in conn.execute(q)]

    def witnessed(self, request_ids: Iterable[str]) -> list[Witnessed]:
        """Rows with what each witness said."""
        with self.engine.connect() as conn:
            return list(self._witnessed(conn, list(request_ids)))

    def spend(self, period: str | None = None, tenant: str | None = None, by_day: bool = False, by_user: bool = False, by_key: bool = False) -> list[SpendRow]:
        """Token sums grouped by tenant, period, model, version and unit prices (and day, end user, key); exact amounts via `SpendRow.amount`."""
        cols = [usage.c.tenant, usage.c.period, usage.c.model, usage.c.version, usage.c.prompt_price, usage.c.completion_price, usage.c.cached_price, usage.c.service_tier]
        extra = [c for c, wanted in ((usage.c.day, by_day), (usage.c.end_user, by_user), (usage.c.key_id, by_key)) if wanted]
        cols += extra
        sums = (func.sum(usage.c.cached_tokens), func.count(), func.sum(usage.c.prompt_tokens), func.coalesce(func.sum(usage.c.completion_tokens), 0))
        q = select(*cols, *sums).group_by(*cols)
        if period is not None:
            q = q.where(usage.c.period == period)
        if tenant is not None:
            q = q.where(usage.c.tenant == tenant)
        with self.engine.connect() as conn:
            out = []
            for r in conn.execute(q):
                out.append(
                    SpendRow(
                        r[0], r[1], r[2], r[3], Decimal(r[4]), Decimal(r[5]), int(r[-3]), int(r[-2] or 0), int(r[-1] or 0),
                        r[8] if by_day else "", r[8 + by_day] if by_user else "", r[8 + by_day + by_user] if by_key else "",
                        int(r[-4] or 0), price_of(r[6]), r[7] or "default",
                    )  # fmt: skip
                )
            return out

    def events(self, request_ids: Iterable[str] | None = None, tenant: str | None = None) -> list[UsageEvent]:
        cond = None
        if request_ids is not None:
            cond = usage.c.request_id.in_(list(request_ids))
        if tenant is not None:
            cond = usage.c.tenant == tenant if cond is None else cond & (usage.c.tenant == tenant)
        with self.engine.connect() as conn:
            return list(self._rows(conn, cond))

    def count(self) -> int:
        with self.engine.connect() as conn:
            return int(conn.execute(select(func.count()).select_from(usage)).scalar_one())

    # ---- tenants and keys -------------------------------------------------------------------

    def upsert_tenant(self, tenant: str, plan: str) -> None:
        with self.engine.begin() as conn:
            if conn.execute(select(tenants.c.tenant).where(tenants.c.tenant == tenant)).first():
                conn.execute(update(tenants).where(tenants.c.tenant == tenant).values(plan=plan))
            else:
                conn.execute(tenants.insert().values(tenant=tenant, plan=plan, created_at=time.time()))

    def tenant_plans(self) -> dict[str, str]:
        with self.engine.connect() as conn:
            return {r.tenant: r.plan for r in conn.execute(select(tenants))}

    def next_key_seq(self) -> int:
        with self.engine.connect() as conn:
            return int(conn.execute(select(func.coalesce(func.max(api_keys.c.seq), 0))).scalar_one()) + 1

    def insert_key(self, key: KeyRecord) -> bool:
        """Store a new key; False (nothing written) when its id or hash is taken already. Keys are never overwritten."""
        values = _key_row(key)
        try:
            with self.engine.begin() as conn:
                conn.execute(api_keys.insert().values(**values))
        except IntegrityError:
            return False
        return True

    def revoke_key(self, key_id: str, revoked_at: float, seq: int) -> KeyRecord | None:
        """Mark a key revoked (the first revocation time stays); None when there is no such key."""
        with self.engine.begin() as conn:
            row = conn.execute(select(api_keys).where(api_keys.c.key_id == key_id)).mappings().first()
            if row is None:
                return None
            values = {"revoked_at": row["revoked_at"] or revoked_at, "seq": seq}
            conn.execute(update(api_keys).where(api_keys.c.key_id == key_id).values(**values))
        return _key_record({**row, **values})

    def key(self, key_id: str) -> KeyRecord | None:
        with self.engine.connect() as conn:
            row = conn.execute(select(api_keys).where(api_keys.c.key_id == key_id)).mappings().first()
        return None if row is None else _key_record(row)

    def update_key(self, key_id: str, changes: dict[str, Any], seq: int) -> KeyRecord | None:
        """Replace some of a key's fields (its name and policy, as `KeyRecord` holds them); None when there is no such key."""
        with self.engine.begin() as conn:
            row = conn.execute(select(api_keys).where(api_keys.c.key_id == key_id)).mappings().first()
            if row is None:
                return None
            record = replace(_key_record(row), **changes, seq=seq)
            values = _key_row(record)
            conn.execute(update(api_keys).where(api_keys.c.key_id == key_id).values(**{k: values[k] for k in (*changes, "seq")}))
        return record

    def keys(self, since_seq: int = 0) -> list[KeyRecord]:
        with self.engine.connect() as conn:
            q = select(api_keys, tenants.c.plan).outerjoin(tenants, tenants.c.tenant == api_keys.c.tenant)
            rows = conn.execute(q.where(api_keys.c.seq > since_seq).order_by(api_keys.c.seq))
            return [_key_record(r._mapping) for r in rows]

    def touch_keys(self, tenant: str, seq: int) -> int:
        """Give every key of `tenant` the change counter `seq` (its plan changed: replicas take the keys again); how many."""
        with self.engine.begin() as conn:
            return conn.execute(update(api_keys).where(api_keys.c.tenant == tenant).values(seq=seq)).rowcount

    # ---- audit ------------------------------------------------------------------------------

    def save_setting(self, name: str, value: str) -> None:
        with self.engine.begin() as conn:
            conn.execute(settings.delete().where(settings.c.name == name))
            conn.execute(settings.insert().values(name=name, value=value, updated_at=time.time()))

    def setting(self, name: str) -> str | None:
        with self.engine.connect() as conn:
            return conn.execute(select(settings.c.value).where(settings.c.name == name)).scalar()

    def audit(self, who: str, action: str, target: str, detail: str = "") -> None:
        with self.engine.begin() as conn:
            conn.execute(audit.insert().values(ts=time.time(), who=who, action=action, target=target, detail=detail))

    # ---- budget alerts ----------------------------------------------------------------------

    def queue_alert(self, tenant: str, period: str, threshold: str, url: str, body: str, now: float) -> bool:
        """Record an alert to send; False (nothing written) when that threshold was queued this period already."""
        try:
            with self.engine.begin() as conn:
                conn.execute(alerts.insert().values(tenant=tenant, period=period, threshold=threshold, url=url, body=body, state="pending", attempts=0, next_at=now, created_at=now))
        except IntegrityError:
            return False
        return True

    def alert_thresholds(self, tenant: str, period: str) -> set[str]:
        with self.engine.connect() as conn:
            return {r[0] for r in conn.execute(select(alerts.c.threshold).where((alerts.c.tenant == tenant) & (alerts.c.period == period)))}

    def due_alerts(self, now: float, limit: int = 50) -> list[dict]:
        with self.engine.connect() as conn:
            q = select(alerts).where((alerts.c.state == "pending") & (alerts.c.next_at <= now)).order_by(alerts.c.next_at).limit(limit)
            return [dict(r._mapping) for r in conn.execute(q)]

    def update_alert(self, alert_id: int, **values: object) -> None:
        with self.engine.begin() as conn:
            conn.execute(update(alerts).where(alerts.c.id == alert_id).values(**values))

    def alerts(self, tenant: str | None = None) -> list[dict]:
        with self.engine.connect() as conn:
            q = select(alerts).order_by(alerts.c.id)
            if tenant is not None:
                q = q.where(alerts.c.tenant == tenant)
            return [dict(r._mapping) for r in conn.execute(q)]

    def audit_log(self, limit: int = 100, action: str | None = None, who: str | None = None, target: str | None = None, since: float | None = None) -> list[dict]:
        """The newest entries first; `action` matches a prefix (`key.` for every key action), `who` and `target` exactly."""
        q = select(audit)
        if action:
            q = q.where(audit.c.action.startswith(action, autoescape=True))
        if who:
            q = q.where(audit.c.who == who)
        if target:
            q = q.where(audit.c.target == target)
        if since is not None:
            q = q.where(audit.c.ts >= since)
        with self.engine.connect() as conn:
            return [r._asdict() for r in conn.execute(q.order_by(audit.c.id.desc()).limit(limit))]

    # ---- helpers ----------------------------------------------------------------------------

    def _witnessed(self, conn: Connection, ids: list[str]) -> Iterator[Witnessed]:
        """The stored rows of `ids` (primary-key lookups, in chunks)."""
        for i in range(0, len(ids), _CHUNK):
            chunk = ids[i : i + _CHUNK]
            for r in conn.exec_driver_sql(f"{self._select_rows}({self._marks(len(chunk))})", tuple(chunk)):
                yield Witnessed(UsageEvent(*r[:-2]), r[-2], bool(r[-1]))

    @staticmethod
    def _rows(conn: Connection, cond) -> Iterator[UsageEvent]:
        q = select(*[usage.c[f] for f in UsageEvent._fields])
        if cond is not None:
            q = q.where(cond)
        for r in conn.execute(q):
            yield UsageEvent(*r)


class _Days:
    """(period, day) of timestamps, computed once per UTC day of a batch."""

    def __init__(self) -> None:
        self._memo: dict[int, tuple[str, str]] = {}

    def __call__(self, ts: float) -> tuple[str, str]:
        key = int(ts // 86400)
        if key not in self._memo:
            self._memo[key] = (period_of(ts), day_of(ts))
        return self._memo[key]
