"""Billing's two witnesses merged by request id (`billing.witness`), as properties over every order of reports (hypothesis)."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from billing.records import BillingContext, UsageEvent
from billing.witness import ENGINE, INGRESS, Witnessed, close, merge

CTX = BillingContext("acme", "k", "m", "v1", "chat", "0.5", "1.5", "0.01", "h1")


def ingress(completion: int | None, delivered: int, status: str) -> UsageEvent:
    return CTX.event("r", 1.0, status, 10, completion, delivered)


def engine(produced: int, finished: bool) -> UsageEvent:
    return CTX.event("r", 2.0, "ok" if finished else "aborted", 10, produced)


@st.composite
def requests(draw):
    """One request's truth: the engine produced `produced`; the client got `delivered` <= produced; it ended ok or not."""
    produced = draw(st.integers(0, 500))
    ok = draw(st.booleans())
    delivered = produced if ok else draw(st.integers(0, produced))
    usage = produced - draw(st.integers(0, min(3, produced))) if ok else None  # a stop string ends the usage before the engine stops
    reports = [("ingress", ingress(usage, delivered, "ok" if ok else "aborted")), ("engine", engine(produced, ok))]
    survivors = draw(st.sampled_from([(0, 1), (1, 0), (0,), (1,)]))  # either witness may die with its report
    dups = draw(st.lists(st.sampled_from(survivors), max_size=3))
    return produced, delivered, usage, [reports[i] for i in list(survivors) + dups]


@settings(max_examples=500, deadline=None)
@given(requests(), st.booleans())
def test_any_order_any_duplicates_bill_once_by_the_rules(case, timeout):
    produced, delivered, usage, reports = case
    row: Witnessed | None = None
    billed = 0
    for who, report in reports:
        m = merge(row, report, INGRESS if who == "ingress" else ENGINE)
        if m is None:
            continue
        assert m.new == (row is None)
        row = m.row
        billed += m.completion_delta
        assert m.row.event.prompt_tokens == 10
    if timeout and row.pending:
        row = close(row)
    assert row is not None and billed == row.event.completion_tokens  # the deltas add up to the row: nothing counted twice
    heard = {who for who, _ in reports}
    if usage is not None and "ingress" in heard:
        assert billed == usage  # a completed response is billed the usage it told the client
    elif "engine" in heard:
        assert billed == produced  # otherwise the engine's count wins
    else:
        assert billed == delivered and (row.pending or row.closed)  # the floor, waiting for (or closed without) the engine
    assert billed <= produced  # nothing billed that was not produced


def test_a_late_engine_count_reopens_a_row_closed_at_its_floor():
    row = merge(None, ingress(None, 4, "aborted"), INGRESS).row
    closed = close(row)
    assert closed.event.status == "aborted_unmetered" and not closed.pending
    m = merge(closed, engine(9, False), ENGINE)
    assert (m.row.event.status, m.row.event.completion_tokens, m.completion_delta) == ("aborted", 9, 5)


def test_a_client_error_known_at_the_ingress_is_not_left_pending():
    row = merge(None, ingress(0, 0, "invalid_request_error"), INGRESS).row
    assert not row.pending and row.event.completion_tokens == 0


def test_cached_prompt_tokens_are_the_engines_count_in_either_order_and_counted_once():
    said = CTX.event("r", 1.0, "ok", 10, 5, 5, cached_tokens=0)  # an ingress that never heard the count (cut before usage)
    engine_says = CTX.event("r", 2.0, "ok", 10, 5, cached_tokens=8)
    for first, second, witnesses in ((said, engine_says, (INGRESS, ENGINE)), (engine_says, said, (ENGINE, INGRESS))):
        a = merge(None, first, witnesses[0])
        b = merge(a.row, second, witnesses[1])
        assert b.row.event.cached_tokens == 8 and a.cached_delta + b.cached_delta == 8
