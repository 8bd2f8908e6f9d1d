"""Incremental detokenization, stop strings and response shapes, without Ray or a model."""

from __future__ import annotations

import json

import pytest

from deployments.core.generator import prompt_delta
from deployments.core.postprocessor import IncrementalDetokenizer, InlinePostprocessor, RequestDecoder, ResponseWriter, StopMatcher, merged
from deployments.core.types import PROMPT_LOGPROBS, GenerationRequest
from tests.fakes import ByteTokenizer, EngineSource, FakeLogprob, ScriptedEngine

TOK = ByteTokenizer()


def _request(**kw) -> GenerationRequest:
    base = dict(request_id="r1", model="m", kind="chat", prompt_token_ids=TOK.encode("hi"), max_tokens=64, created=1)
    base.update(kw)
    return GenerationRequest(**base)


def test_multibyte_character_split_across_tokens_is_emitted_whole():
    detok = IncrementalDetokenizer(TOK.decode)
    e_acute, (b1, b2, b3) = TOK.encode("é"), TOK.encode("你")
    assert detok.push(e_acute[:1]) == ""  # half a character: held back
    assert detok.push(e_acute[1:]) == "é"
    assert detok.push([b1]) == "" and detok.push([b2]) == ""
    assert detok.push([b3, *TOK.encode(" ok")]) == "你 ok"


def test_stream_equals_whole_decode_for_any_split():
    text = "Grüße, 世界! naïve café 🙂 end"
    ids = TOK.encode(text)
    for step in (1, 2, 3, 5):
        detok = IncrementalDetokenizer(TOK.decode)
        out = "".join(detok.push(ids[i:i + step]) for i in range(0, len(ids), step)) + detok.flush()
        assert out == text


class SentencePieceLike:
    """Decodes '▁' as a space but drops the leading space of a sequence, like SentencePiece."""

    vocab = {1: "▁Hello", 2: "▁world", 3: "!"}

    def decode(self, ids):
        return "".join(self.vocab[i] for i in ids).replace("▁", " ").lstrip(" ")


def test_leading_space_is_kept_when_decoding_in_context():
    sp = SentencePieceLike()
    detok = IncrementalDetokenizer(sp.decode, context_ids=[1])  # prompt ended with "Hello"
    assert detok.push([2]) == " world"
    assert detok.push([3]) == "!"


def test_stop_string_split_across_chunks_is_trimmed():
    stops = StopMatcher(["STOP"])
    assert stops.push("abc ST") == ("abc ", False)
    assert stops.push("O") == ("", False)
    assert stops.push("P and more") == ("", True)


def test_held_back_prefix_is_released_when_no_stop_follows():
    stops = StopMatcher(["\n\n", "END"])
    assert stops.push("line\n") == ("line", False)
    assert stops.push("x E") == ("\nx ", False)
    assert stops.push("N") == ("", False)
    assert stops.push("D") == ("", True)
    assert StopMatcher([]).push("anything") == ("anything", False)


def test_request_decoder_stops_each_choice_and_counts_tokens():
    req = _request(n=2, stop=["lo"])
    dec = RequestDecoder(req, TOK.decode)
    events = dec.feed([(0, TOK.encode("Hel"), None), (1, TOK.encode("Hey"), None)])
    assert [(e.index, e.text, e.finish_reason, e.first) for e in events] == [(0, "He", None, True), (1, "Hey", None, True)]
    events = dec.feed([(0, TOK.encode("lo!"), None), (1, TOK.encode("!"), "length")])
    assert [(e.index, e.text, e.finish_reason) for e in events] == [(0, "l", "stop"), (1, "!", "length")]
    assert dec.done
    assert dec.feed([(0, TOK.encode("zzz"), None)]) == []  # after a stop string, late tokens are ignored
    assert dec.usage.completion_tokens == 3 + 3 + 3 + 1
    assert ["".join(c.text) for c in dec.choices] == ["Hel", "Hey!"]


def test_logprobs_end_with_the_token_that_completed_a_stop_string():
    # The engine ran past the stop (it is found here, a step later): the tokens after it are in usage, since the
    # engine produced them, but neither in the text nor in the logprobs.
    dec = RequestDecoder(_request(stop=["lo"], logprobs=0), TOK.decode)
    ids = TOK.encode("Hello!!")
    events = dec.feed([(0, ids, None, [(-0.5, [])] * len(ids))])
    assert [(e.text, e.finish_reason) for e in events] == [("Hel", "stop")]
    assert [lp.token for lp in events[0].logprobs] == ["H", "e", "l", "l", "o"]
    assert [lp.token for lp in dec.whole()[0].logprobs] == ["H", "e", "l", "l", "o"]
    assert dec.usage.completion_tokens == len(ids)
    # Without a stop string, every token has its logprob, as before.
    plain = RequestDecoder(_request(logprobs=0), TOK.decode).feed([(0, ids, "length", [(-0.5, [])] * len(ids))])
    assert plain[0].text == "Hello!!" and len(plain[0].logprobs) == len(ids)


def test_echo_with_logprobs_puts_the_prompts_tokens_first_in_every_choice():
    prompt = TOK.encode("hi!")
    # vLLM's prompt_logprobs: None for the first token, then {token id: Logprob} with the prompt's own token and the top ones.
    positions = [None, {prompt[1]: FakeLogprob(-1.5), 7: FakeLogprob(-0.5)}, {prompt[2]: FakeLogprob(float("-inf"))}]
    delta = prompt_delta(prompt, positions, 1)
    assert delta == (PROMPT_LOGPROBS, [], None, [(-1.5, [(7, -0.5)]), (-9999.0, [(prompt[2], -9999.0)])])
    dec = RequestDecoder(_request(kind="completion", prompt_token_ids=prompt, echo=True, logprobs=1, prompt_logprobs=1, n=2), TOK.decode)
    events = dec.feed([delta, (0, TOK.encode("ok"), "length", [(-0.1, [])] * 2), (1, TOK.encode("no"), None, [(-0.2, [])] * 2)])
    assert [e.text for e in events] == ["hi!ok", "hi!no"]
    first = events[0].logprobs
    assert [(lp.token, lp.logprob, lp.top, lp.offset) for lp in first[:3]] == [("h", None, None, 0), ("i", -1.5, [("\x07", -0.5)], 1), ("!", -9999.0, [("!", -9999.0)], 2)]
    assert [lp.offset for lp in first] == [0, 1, 2, 3, 4]
    # The second step of a choice has only its own tokens; the whole answer has the prompt's once, first.
    later = dec.feed([(1, TOK.encode("!"), "length", [(-0.3, [])])])
    assert [lp.token for lp in later[0].logprobs] == ["!"] and later[0].logprobs[0].offset == 5
    assert [lp.token for lp in dec.whole()[1].logprobs] == ["h", "i", "!", "n", "o", "!"]


async def _collect(agen):
    return [item async for item in agen]


async def test_stream_shapes_usage_and_done():
    engine = ScriptedEngine("Hi there", per_message=3)
    req = _request(stream=True, include_usage=True)
    pieces = await _collect(ResponseWriter(TOK.decode).stream(req, engine.generate(req)))
    text = "".join(p for p, _ in pieces)
    events = [line[len("data: "):] for line in text.split("\n\n") if line]
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": "Hi "}
    assert all(c["object"] == "chat.completion.chunk" and c["id"] == "chatcmpl-r1" for c in chunks)
    assert "".join(c["choices"][0]["delta"].get("content", "") for c in chunks[:-1]) == "Hi there"
    assert chunks[-2]["choices"][0]["finish_reason"] == "stop"
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"] == {"prompt_tokens": 2, "completion_tokens": 8, "total_tokens": 10, "prompt_tokens_details": {"cached_tokens": 0}}
    assert pieces[-1][1] == chunks[-1]["usage"]
    assert len(pieces) == 3 + 1  # one message per generator message, then usage+[DONE]


async def test_stream_stops_reading_the_engine_after_a_stop_string():
    engine = ScriptedEngine("one two three four five six", per_message=2)
    req = _request(kind="completion", stream=True, stop=["three"])
    stream = engine.generate(req)
    pieces = await _collect(ResponseWriter(TOK.decode).stream(req, stream))
    await stream.aclose()
    chunks = [json.loads(line[6:]) for line in "".join(p for p, _ in pieces).split("\n\n") if line and line != "data: [DONE]"]
    assert "".join(c["choices"][0]["text"] for c in chunks) == "one two "
    assert chunks[-1]["choices"][0]["finish_reason"] == "stop"
    assert engine.closed_early == 1


async def test_inline_postprocessor_closes_the_engine_stream_at_once_on_a_stop_string_and_never_otherwise():
    """The ingress writes responses itself by default: a stop string cancels the engine request as soon as it is
    found (not when the stream is collected), and a request the engine finished is read to its end, never cancelled
    (a cancel per request costs a gRPC call across stages)."""
    engine = ScriptedEngine("one two three four five six", per_message=2)
    inline = InlinePostprocessor(ResponseWriter(TOK.decode), EngineSource(engine))
    stopped = await _collect(inline.stream(_request(kind="completion", stream=True, stop=["three"])))
    chunks = [json.loads(line[6:]) for line in "".join(p for p, _ in stopped).split("\n\n") if line and line != "data: [DONE]"]
    assert engine.closed_early == 1 and "".join(c["choices"][0]["text"] for c in chunks if c["choices"]) == "one two "
    whole = await inline.complete(_request(kind="completion", stop=["four"]))
    assert whole["choices"][0]["text"] == "one two three " and engine.closed_early == 2
    pieces = await _collect(inline.stream(_request(kind="completion", stream=True)))
    body = await inline.complete(_request(kind="completion"))
    assert engine.closed_early == 2  # finished by the engine: nothing cancelled
    assert pieces[-1][1]["completion_tokens"] == body["usage"]["completion_tokens"] == len(TOK.encode("one two three four five six"))


def test_a_whole_answer_arriving_at_once_is_decoded_in_one_push_with_the_same_text():
    """A request not streamed, with no stop string, gets every step's deltas in one message at its end: a choice's run
    of steps is joined and decoded once, with the text the steps would have made one by one."""
    text = "Grüße, 世界! naïve café 🙂 end"
    ids = TOK.encode(text)
    steps = [(0, [t], None) for t in ids[:-1]] + [(0, [ids[-1]], "length")]
    assert merged(steps) == [(0, ids, "length")]
    assert merged([(0, [1], None), (1, [2], None), (0, [3], "stop")]) == [(0, [1], None), (1, [2], None), (0, [3], "stop")]
    assert merged([(0, [1], None, [(-0.1, [])]), (0, [2], "stop", [(-0.2, [])])]) == [(0, [1], None, [(-0.1, [])]), (0, [2], "stop", [(-0.2, [])])]
    decodes = []

    def decode(token_ids):
        decodes.append(len(token_ids))
        return TOK.decode(token_ids)

    out = ResponseWriter(decode).whole(_request(kind="completion", max_tokens=len(ids)))
    out.feed(steps)
    body = out.end()
    assert body["choices"][0]["text"] == text and body["usage"]["completion_tokens"] == len(ids)
    assert len(decodes) <= 4  # not two per step
    stopped = ResponseWriter(TOK.decode).whole(_request(kind="completion", max_tokens=len(ids), stop=["café"]))
    stopped.feed(steps)  # a stop string: fed step by step, so the usage counts only what was shown
    assert stopped.end()["choices"][0]["text"] == "Grüße, 世界! naïve "


async def test_complete_builds_whole_response():
    engine = ScriptedEngine("abcdef", per_message=4)
    req = _request(kind="completion", max_tokens=5, n=2)
    body = await ResponseWriter(TOK.decode).complete(req, engine.generate(req))
    assert body["object"] == "text_completion"
    assert [c["text"] for c in body["choices"]] == ["abcde", "abcde"]
    assert [c["finish_reason"] for c in body["choices"]] == ["length", "length"]
    assert body["usage"] == {"prompt_tokens": 2, "completion_tokens": 10, "total_tokens": 12, "prompt_tokens_details": {"cached_tokens": 0}}


def test_real_tokenizer_roundtrip_if_model_present():
    from common.config import load_config
    from common.model_store import open_store

    config = load_config()
    try:
        mv = open_store(config.store_root()).resolve(config.model.name)
    except Exception:
        pytest.skip("default model not imported (make model)")
    from deployments.core.tokenizer import load_hf_tokenizer

    tok = load_hf_tokenizer(mv.path)
    text = " Bonjour, 你好世界 — naïve 🙂!"
    ids = tok.encode(text, add_special_tokens=False)
    decode = lambda t: tok.decode(t, skip_special_tokens=True)  # noqa: E731
    detok = IncrementalDetokenizer(decode, context_ids=tok.encode("Say:", add_special_tokens=False))
    assert "".join(detok.push([i]) for i in ids) + detok.flush() == text


def test_the_stop_that_completes_first_wins_however_the_text_is_chunked():
    """Found by the property tier: with stops "é" and "aéa", "é" completes first, so the cut is after "a", whether
    "aéa" arrives whole or a character at a time (it used to give "" whole and "a" chunked)."""
    for chunks in (["a\u00e9a"], ["a", "\u00e9", "a"], ["a\u00e9", "a"]):
        m, out = StopMatcher(["\u00e9", "a\u00e9a"]), ""
        for c in chunks:
            piece, hit = m.push(c)
            out += piece
            if hit:
                break
        assert (out, hit) == ("a", True), chunks
