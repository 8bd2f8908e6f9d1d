"""Hypothesis properties of the pure pieces a fuzzer cannot reach through HTTP: the detokenizer, the stop matcher, and the quota decisions."""

from __future__ import annotations

from decimal import Decimal

from hypothesis import given, settings
from hypothesis import strategies as st

from billing.quota import Ask, decide_grant
from common.config import LeaseConfig, Plan
from deployments.core.postprocessor import IncrementalDetokenizer, StopMatcher
from tests.fakes import ByteTokenizer

TEXT = st.text(alphabet=st.sampled_from("ab c\n\u00e9\u4e2d\U0001f600"), max_size=60)


def chunks(draw, items: list) -> list[list]:
    cuts = sorted(draw(st.lists(st.integers(0, len(items)), max_size=8)))
    bounds = [0, *cuts, len(items)]
    return [items[a:b] for a, b in zip(bounds, bounds[1:])]


@settings(max_examples=300, deadline=None)
@given(st.data(), TEXT, TEXT)
def test_the_detokenizer_streams_exactly_the_whole_decode_however_ids_are_split(data, context, text):
    tok = ByteTokenizer()
    ids = tok.encode(text)
    detok = IncrementalDetokenizer(tok.decode, tok.encode(context))
    out = "".join(detok.push(part) for part in chunks(data.draw, ids)) + detok.flush()
    assert out == text  # never a half character, never a character twice


@settings(max_examples=300, deadline=None)
@given(st.data(), TEXT, st.lists(st.text(alphabet="ab c\u00e9", min_size=1, max_size=4), max_size=3))
def test_the_stop_matcher_cuts_at_the_first_stop_however_text_arrives(data, text, stops):
    matcher = StopMatcher(stops)
    out, hit = "", False
    for part in chunks(data.draw, list(text)):
        piece, hit = matcher.push("".join(part))
        out += piece
        if hit:
            break
    if not hit:
        out += matcher.flush()
    # What a character-at-a-time stream gives: cut at the stop that completes first (of those completing at
    # the same character, the longest); however the text is chunked, the same.
    first = next((end - len(s) for end in range(1, len(text) + 1) for s in sorted(stops, key=len, reverse=True) if text[:end].endswith(s)), None)
    assert hit == (first is not None)
    assert out == (text[:first] if first is not None else text)


@settings(max_examples=500, deadline=None)
@given(
    budget=st.one_of(st.none(), st.decimals(min_value=0, max_value=100, places=4)),
    committed=st.decimals(min_value=0, max_value=120, places=4),
    ask_budget=st.decimals(min_value=0, max_value=10, places=6),
    rpm=st.one_of(st.none(), st.integers(1, 100)),
    used=st.integers(0, 150),
    ask_requests=st.integers(0, 5),
)
def test_a_grant_never_lets_a_tenant_past_its_budget_or_rate(budget, committed, ask_budget, rpm, used, ask_requests):
    plan = Plan(monthly_budget=budget, rpm=rpm)
    grant = decide_grant(plan, LeaseConfig(), Ask("t", "2026-11", 1, ask_budget, ask_requests, 0), committed, (used, 0), 1795000000.0)
    if budget is not None and grant.budget:
        assert committed + grant.budget <= budget
        assert grant.budget >= ask_budget  # a grant covers what was asked
    if rpm is not None and grant.requests:
        assert used + grant.requests <= rpm
    if grant.denied is None:
        assert (budget is None or ask_budget <= max(budget - committed, Decimal(0))) and (rpm is None or ask_requests == 0 or grant.requests >= ask_requests)


@settings(max_examples=400, deadline=None)
@given(
    st.sampled_from(["chat", "completion"]), st.booleans(), st.integers(0, 40), st.sampled_from(["", "v2"]), st.text(max_size=30),
    st.booleans(), st.sampled_from([None, "stop", "length", "abort"]), st.integers(0, 3), st.one_of(st.none(), st.floats(-20, 0)),
)
def test_a_streamed_chunk_from_the_template_is_the_json_the_dict_path_makes(kind, usage, offset, version, text, first, finish, index, logprob):
    """Issue 25: stream chunks rendered from a per-request template (text, finish reason and logprobs encoded per token)."""
    import json

    from deployments.core import shapes
    from deployments.core.types import ChoiceEvent, DecodedLogprob, GenerationRequest

    lp = None if logprob is None else [DecodedLogprob(text or "x", logprob, [("a", -0.5), ('"\n', -1.5)], 0)]
    req = GenerationRequest(
        "r\u00e9q", "m\"odel", kind, [1], 8, 1733000000, include_usage=usage, choice_offset=offset, model_version=version,
        logprobs=None if lp is None else 2,
    )  # fmt: skip
    events = [ChoiceEvent(index, text, finish, first, lp)]
    expected, got = shapes.sse_chunks(req, events), shapes.ChunkTemplate(req).chunks(events)
    assert got.startswith("data: ") and got.endswith("\n\n")
    assert json.loads(got[len("data: "):]) == json.loads(expected[len("data: "):])
    if text.isprintable() and '"' not in text and "\\" not in text:
        assert got == expected
