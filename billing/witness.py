"""Two witnesses of every request, merged by request id: the decision as data (no I/O).

The ingress reports what it admitted and what reached the client; the generator reports what the
engine produced.  Either can die with its report still in memory, so the ledger keeps one row per
request that whichever report arrives first creates and the other completes:

- a request whose count the ingress knew is billed that count: the usage its response carried (the
  engine's tokens up to the stop, the figure the client was told), or 0 for a 4xx before any token;
- otherwise the engine's count is billed, whenever it arrives;
- otherwise the tokens the ingress delivered are billed, a floor: the row stays *pending* (the rest of
  its reservation held) until the engine's count comes or `pending_timeout_s` passes, when it is closed
  as `<status>_unmetered` at the floor.

Cached prompt tokens (those the engine's prefix cache held, priced apart) are the engine's count when its
report came, else the ingress's (the engine's count too, carried in the response's usage).

A report already heard changes nothing (a resent batch counts once), and nothing is billed that the
engine did not produce: both witnesses count produced tokens.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from billing.records import UsageEvent

Witness = Literal["ingress", "engine"]
INGRESS: Witness = "ingress"
ENGINE: Witness = "engine"
UNMETERED = "_unmetered"  # status suffix: closed without the engine's count


@dataclass(frozen=True)
class Witnessed:
    """A ledger row with what each witness said: `event.completion_tokens` is the billed count,
    `event.delivered_tokens` the ingress's (None: not heard from it)."""

    event: UsageEvent
    engine_tokens: int | None  # from the generator; None: not heard from it
    known: bool = False  # the ingress knew the request's count (its response's usage, or 0 for a 4xx before any token)

    @property
    def delivered_tokens(self) -> int | None:
        return self.event.delivered_tokens

    @property
    def closed(self) -> bool:
        return self.event.status.endswith(UNMETERED)

    @property
    def pending(self) -> bool:
        """Billed at the ingress's floor, the engine's count may still come."""
        return self.delivered_tokens is not None and self.engine_tokens is None and not self.known and not self.closed


@dataclass(frozen=True)
class Merged:
    """What one report does to the ledger: the row to write and what it adds to the tenant's spend."""

    row: Witnessed
    new: bool  # insert (else update the stored row)
    prompt_delta: int
    completion_delta: int
    cached_delta: int = 0


def merge(stored: Witnessed | None, report: UsageEvent, witness: Witness) -> Merged | None:
    """The row after `report` from `witness`, or None when it changes nothing (that witness was heard already)."""
    if witness == INGRESS:
        if stored is not None and stored.delivered_tokens is not None:
            return None
        known = report.completion_tokens is not None
        delivered = report.completion_tokens if known else (report.delivered_tokens or 0)
        engine = stored.engine_tokens if stored is not None else None
        # The ingress names the outcome the client saw; otherwise the row keeps the first report's fields.
        base = report if stored is None else stored.event._replace(status=report.status)
        completion = report.completion_tokens if known else (engine if engine is not None else delivered)
    else:
        if stored is not None and stored.engine_tokens is not None:
            return None
        engine = report.completion_tokens or 0
        delivered = stored.delivered_tokens if stored is not None else None
        known = stored is not None and stored.known
        base = report if stored is None else stored.event._replace(status=stored.event.status.removesuffix(UNMETERED), cached_tokens=report.cached_tokens)
        completion = stored.event.completion_tokens if known else engine  # type: ignore[union-attr]
    row = Witnessed(base._replace(completion_tokens=completion, delivered_tokens=delivered), engine, known)
    before = stored.event if stored is not None else None
    before_prompt, before_completion, before_cached = (before.prompt_tokens, before.completion_tokens or 0, before.cached_tokens) if before is not None else (0, 0, 0)
    return Merged(row, stored is None, row.event.prompt_tokens - before_prompt, (completion or 0) - before_completion, row.event.cached_tokens - before_cached)


def close(row: Witnessed) -> Witnessed:
    """A pending row whose engine count never came: closed at the ingress's floor."""
    return Witnessed(row.event._replace(status=row.event.status + UNMETERED), row.engine_tokens, row.known)
