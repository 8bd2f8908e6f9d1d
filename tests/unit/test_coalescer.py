"""Stream coalescing: every token at once below the budget, ceil(streaming/budget) tokens per message above it."""

from deployments.core.generator import Coalescer


def test_below_budget_every_token_is_due_at_once():
    buf = Coalescer(budget=4, streaming=lambda: 3)
    for token in range(5):
        buf.add(0, [token], None)
        assert buf.due()
        assert buf.take() == [(0, [token], None)]


def test_saturated_replica_packs_tokens_but_sends_first_and_last_at_once():
    streaming = [16]
    buf = Coalescer(budget=4, streaming=lambda: streaming[0])
    buf.add(0, [1], None)
    assert buf.due() and buf.take() == [(0, [1], None)]  # first token: immediately
    for token in (2, 3, 4):
        buf.add(0, [token], None)
        assert not buf.due()
    buf.add(0, [5], None)
    assert buf.due() and buf.take() == [(0, [2, 3, 4, 5], None)]  # ceil(16/4) = 4 per message
    buf.add(0, [6], None)
    streaming[0] = 2  # load dropped: back to one token per message
    assert buf.due() and buf.take() == [(0, [6], None)]
    streaming[0] = 32
    buf.add(0, [7], "stop")
    assert buf.due() and buf.take() == [(0, [7], "stop")]  # the end is never held


def test_choices_are_kept_apart():
    buf = Coalescer(budget=1, streaming=lambda: 2)
    buf.add(0, [1], None)
    buf.add(1, [9], None)
    assert buf.take() == [(0, [1], None), (1, [9], None)]
    buf.add(0, [2], None)
    assert not buf.due()
    buf.add(1, [8], "length")
    assert buf.due() and buf.take() == [(0, [2], None), (1, [8], "length")]
    assert not buf.due()
