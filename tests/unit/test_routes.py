"""The HTTP API over in-process fakes: shapes, SSE, and every error in the OpenAI envelope."""

from __future__ import annotations

import dataclasses
import json

import pytest
from fastapi.testclient import TestClient

from common.config import MaasConfig, RequestLimits
from deployments.openai.protocol import ChatCompletionRequest
from deployments.openai.routes import build_app
from deployments.openai.service import Backend, OpenAIService, StaticPicker
from tests.fakes import FakePostprocessorClient, FakeTokenizerClient, ScriptedEngine

MODEL = "test-model"


def make_client(engine: ScriptedEngine | None = None, ready: bool = True, limits: RequestLimits | None = None) -> TestClient:
    backend = Backend("", FakePostprocessorClient(engine or ScriptedEngine()))
    service = OpenAIService(MODEL, FakeTokenizerClient(max_model_len=128), StaticPicker(backend), is_ready=lambda: ready, limits=limits)
    return TestClient(build_app(service), raise_server_exceptions=False)


def chat_body(**kw):
    body = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}]}
    body.update(kw)
    return body


def assert_envelope(resp, status, param=None, code=None):
    assert resp.status_code == status, resp.text
    err = resp.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert err["message"] and "Traceback" not in err["message"]
    assert err["param"] == param
    if code is not None:
        assert err["code"] == code
    return err


def test_models_and_health():
    client = make_client()
    assert client.get("/v1/models").json()["data"][0]["id"] == MODEL
    assert client.get("/healthz").json()["status"] == "ok"


def test_chat_whole_response():
    body = make_client().post("/v1/chat/completions", json=chat_body(max_tokens=5)).json()
    assert body["object"] == "chat.completion"
    assert body["choices"][0]["message"] == {"role": "assistant", "content": "Hello"}
    assert body["choices"][0]["finish_reason"] == "length"
    assert body["usage"]["completion_tokens"] == 5


def test_completion_stream_ends_with_done():
    resp = make_client().post("/v1/completions", json={"model": MODEL, "prompt": "x", "max_tokens": 100, "stream": True})
    assert resp.status_code == 200 and resp.headers["content-type"].startswith("text/event-stream")
    events = [e[len("data: "):] for e in resp.text.split("\n\n") if e]
    assert events[-1] == "[DONE]"
    assert "".join(json.loads(e)["choices"][0]["text"] for e in events[:-1]) == "Hello, world! ça va?"


@pytest.mark.parametrize(
    "body,status,param,code",
    [
        (chat_body(model="nope"), 404, "model", "model_not_found"),
        (chat_body(temperature=-0.5), 400, "temperature", None),
        (chat_body(top_p=0), 400, "top_p", None),
        (chat_body(n=0), 400, "n", None),
        (chat_body(max_tokens=0), 400, "max_tokens", None),
        (chat_body(max_tokens=10_000), 400, "max_tokens", "context_length_exceeded"),
        (chat_body(stop=["a", "b", "c", "d", "e"]), 400, "stop", None),
        (chat_body(stream_options={"include_usage": True}), 400, None, None),
        ({"model": MODEL}, 400, "messages", None),
        ({"model": MODEL, "messages": []}, 400, "messages", None),
        ({"model": MODEL, "messages": [{"role": "wizard", "content": "x"}]}, 400, "messages", None),
        ({"messages": [{"role": "user", "content": "x"}]}, 400, "model", None),
    ],
)
def test_bad_chat_requests(body, status, param, code):
    assert_envelope(make_client().post("/v1/chat/completions", json=body), status, param, code)


@pytest.mark.parametrize(
    "body,param",
    [({"model": MODEL, "prompt": [1.5]}, "prompt"), ({"model": MODEL, "prompt": ""}, "prompt"), ({"model": MODEL, "prompt": "x", "max_tokens": 0}, "max_tokens")],
)
def test_bad_completion_requests(body, param):
    assert_envelope(make_client().post("/v1/completions", json=body), 400, param)


def test_a_bad_value_names_its_parameters_path_not_pydantics_union_branches():
    # `stop` is a string or a list of strings: both branches fail at one path, one entry saying both reasons.
    error = make_client().post("/v1/chat/completions", json=chat_body(stop=3)).json()["error"]
    assert error["param"] == "stop" and error["message"] == "stop: Input should be a valid string or Input should be a valid list"
    error = make_client().post("/v1/completions", json={"model": MODEL, "prompt": [1.5]}).json()["error"]
    assert error["message"].startswith("prompt: Input should be a valid string; prompt.0: ") and "[" not in error["message"]


def test_malformed_json_is_400():
    resp = make_client().post("/v1/chat/completions", content=b'{"model": ', headers={"content-type": "application/json"})
    assert_envelope(resp, 400)


def test_unknown_route_is_404_envelope():
    assert_envelope(make_client().get("/v2/everything"), 404, code="not_found")


def test_not_ready_is_503_with_retry_after():
    client = make_client(ready=False)
    resp = client.post("/v1/chat/completions", json=chat_body())
    assert_envelope(resp, 503, code="engine_starting")
    assert resp.headers["retry-after"]
    assert client.get("/healthz").status_code == 503


def test_engine_failure_before_first_token_is_500_without_traceback():
    resp = make_client(ScriptedEngine(fail_after=0)).post("/v1/chat/completions", json=chat_body(stream=True))
    err = assert_envelope(resp, 500, code="internal_error")
    assert "exploded" not in err["message"]


def test_engine_failure_mid_stream_is_reported_in_band():
    resp = make_client(ScriptedEngine(per_message=2, fail_after=4)).post("/v1/chat/completions", json=chat_body(stream=True))
    assert resp.status_code == 200
    events = [e[len("data: "):] for e in resp.text.split("\n\n") if e]
    assert events[-1] == "[DONE]"
    assert json.loads(events[-2])["error"]["type"] == "internal_error"
    assert "exploded" not in resp.text


@pytest.mark.parametrize(
    "extra, param, code",
    [
        ({"tool_choice": "auto"}, "tool_choice", None),  # without tools, as OpenAI answers it
        ({"parallel_tool_calls": True}, "parallel_tool_calls", None),
        ({"response_format": {"type": "xml"}}, "response_format", None),
        ({"response_format": {"type": "json_schema", "json_schema": {}}}, "response_format", None),
        ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": 5}}}}, "response_format", None),
        ({"logprobs": True, "top_logprobs": 21}, "top_logprobs", None),
        ({"logprobs": "yes"}, "logprobs", None),
        ({"top_k": 1.5}, "top_k", None),
        ({"min_p": 2}, "min_p", None),
        ({"repetition_penalty": 0}, "repetition_penalty", None),
        ({"logit_bias": {"hello": 1}}, "logit_bias", None),
        ({"logit_bias": {"5": 101}}, "logit_bias", None),
    ],
)
def test_nothing_is_silently_dropped(extra, param, code):
    assert_envelope(make_client().post("/v1/chat/completions", json=chat_body(**extra)), 400, param, code)


def test_nulls_count_as_not_sent_and_vllm_sampling_extras_reach_the_engine():
    engine = ScriptedEngine()
    client = make_client(engine)
    nulls = {"tools": None, "logprobs": None, "response_format": None, "stop": None, "seed": None, "tool_choice": None}
    assert client.post("/v1/chat/completions", json=chat_body(**nulls)).status_code == 200
    extras = {"top_k": 5, "min_p": 0.1, "repetition_penalty": 1.2, "logit_bias": {"7": -100}, "response_format": {"type": "text"}}
    assert client.post("/v1/chat/completions", json=chat_body(**extras)).status_code == 200
    req = engine.requests[-1]
    assert (req.top_k, req.min_p, req.repetition_penalty, req.logit_bias) == (5, 0.1, 1.2, {7: -100.0})
    assert (engine.requests[0].top_k, engine.requests[0].logit_bias) == (None, None)  # not sent: the engine's defaults


def test_chat_logprobs_whole_and_streamed():
    client = make_client(ScriptedEngine(reply="Hi there"))
    body = client.post("/v1/chat/completions", json=chat_body(logprobs=True, top_logprobs=2)).json()
    content = body["choices"][0]["logprobs"]["content"]
    assert len(content) == body["usage"]["completion_tokens"] and "".join(t["token"] for t in content) == "Hi there"
    assert content[0]["logprob"] == -0.25 and [t["token"] for t in content[0]["top_logprobs"]] == ["H", "I"]
    assert content[0]["bytes"] == [72] and len(content[0]["top_logprobs"]) == 2
    assert client.post("/v1/chat/completions", json=chat_body(logprobs=True)).json()["choices"][0]["logprobs"]["content"][0]["top_logprobs"] == []
    assert client.post("/v1/chat/completions", json=chat_body()).json()["choices"][0]["logprobs"] is None
    resp = client.post("/v1/chat/completions", json=chat_body(stream=True, logprobs=True, top_logprobs=1))
    chunks = [json.loads(e[len("data: "):]) for e in resp.text.split("\n\n") if e and e != "data: [DONE]"]
    streamed = [t["token"] for c in chunks for ch in c["choices"] if ch["logprobs"] for t in ch["logprobs"]["content"]]
    assert "".join(streamed) == "Hi there"
    with pytest.raises(ValueError):
        ChatCompletionRequest.model_validate(chat_body(top_logprobs=2))  # top_logprobs needs logprobs


def test_completion_logprobs_and_echo():
    engine = ScriptedEngine(reply="abc")
    client = make_client(engine)
    body = client.post("/v1/completions", json={"model": MODEL, "prompt": "xy", "logprobs": 2}).json()
    lp = body["choices"][0]["logprobs"]
    assert lp["tokens"] == ["a", "b", "c"] and lp["text_offset"] == [0, 1, 2] and lp["top_logprobs"][0] == {"a": -0.25, "b": -2.0}
    echoed = client.post("/v1/completions", json={"model": MODEL, "prompt": "xy", "echo": True}).json()
    assert echoed["choices"][0]["text"] == "xyabc" and echoed["usage"]["completion_tokens"] == 3
    streamed = client.post("/v1/completions", json={"model": MODEL, "prompt": "xy", "echo": True, "stream": True}).text
    texts = [json.loads(e[6:])["choices"][0]["text"] for e in streamed.split("\n\n") if e.startswith("data: {")]
    assert "".join(texts) == "xyabc"


def test_echo_with_logprobs_scores_the_prompt_and_max_tokens_0_the_prompt_alone():
    # As lm-evaluation-harness and perplexity scripts call it: the prompt's tokens lead, the first with no logprob.
    engine = ScriptedEngine(reply="abc")
    client = make_client(engine)
    lp = client.post("/v1/completions", json={"model": MODEL, "prompt": "xy", "echo": True, "logprobs": 1}).json()["choices"][0]["logprobs"]
    assert engine.requests[-1].prompt_logprobs == 1
    assert lp["tokens"] == ["x", "y", "a", "b", "c"] and lp["text_offset"] == [0, 1, 2, 3, 4]
    assert lp["token_logprobs"][:2] == [None, -0.5] and lp["top_logprobs"][:2] == [None, {"y": -0.5}]
    body = client.post("/v1/completions", json={"model": MODEL, "prompt": "xy", "echo": True, "logprobs": 0, "max_tokens": 0}).json()
    assert engine.requests[-1].max_tokens == 1 and engine.requests[-1].prompt_only  # the engine makes one token: vLLM cannot make none
    choice = body["choices"][0]
    assert choice["text"] == "xy" and choice["finish_reason"] == "length" and choice["logprobs"]["tokens"] == ["x", "y"]
    assert body["usage"] == {"prompt_tokens": 2, "completion_tokens": 1, "total_tokens": 3, "prompt_tokens_details": {"cached_tokens": 0}}  # what the engine made, billed
    streamed = client.post("/v1/completions", json={"model": MODEL, "prompt": "xy", "echo": True, "logprobs": 1, "max_tokens": 2, "stream": True}).text
    chunks = [json.loads(e[6:])["choices"][0] for e in streamed.split("\n\n") if e.startswith("data: {")]
    assert chunks[0]["text"].startswith("xy") and chunks[0]["logprobs"]["tokens"][:2] == ["x", "y"]
    assert [t for c in chunks for t in c["logprobs"]["tokens"]] == ["x", "y", "a", "b"]


def test_response_format_reaches_the_engine_and_can_be_switched_off():
    engine = ScriptedEngine()
    client = make_client(engine)
    schema = {"type": "object", "properties": {"name": {"type": "string"}}, "required": ["name"]}
    fmt = {"type": "json_schema", "json_schema": {"name": "person", "schema": schema}}
    assert client.post("/v1/chat/completions", json=chat_body(response_format=fmt)).status_code == 200
    assert engine.requests[-1].response_format == fmt
    assert client.post("/v1/chat/completions", json=chat_body(response_format={"type": "json_object"})).status_code == 200
    assert engine.requests[-1].response_format == {"type": "json_object"}
    off = make_client(limits=dataclasses.replace(MaasConfig().request_limits(), structured_outputs=False))
    assert_envelope(off.post("/v1/chat/completions", json=chat_body(response_format={"type": "json_object"})), 400, "response_format")


def test_a_list_of_prompts_is_one_response_with_each_prompts_choices_in_turn():
    engine = ScriptedEngine(reply="ok")
    client = make_client(engine)
    body = client.post("/v1/completions", json={"model": MODEL, "prompt": ["a", "bb", "ccc"], "n": 2, "echo": True}).json()
    assert [c["index"] for c in body["choices"]] == [0, 1, 2, 3, 4, 5]
    assert [c["text"] for c in body["choices"]] == ["aok", "aok", "bbok", "bbok", "cccok", "cccok"]
    assert body["usage"] == {"prompt_tokens": 6, "completion_tokens": 12, "total_tokens": 18, "prompt_tokens_details": {"cached_tokens": 0}}
    ids = sorted(r.request_id for r in engine.requests[-3:])
    assert body["id"] == "cmpl-" + ids[0][:-2] and [i[-2:] for i in ids] == ["-0", "-1", "-2"]  # sub-requests <id>-<i>
    tokens = client.post("/v1/completions", json={"model": MODEL, "prompt": [[97], [98, 98]], "max_tokens": 1}).json()
    assert [c["index"] for c in tokens["choices"]] == [0, 1] and tokens["usage"]["prompt_tokens"] == 3
    resp = client.post("/v1/completions", json={"model": MODEL, "prompt": ["a", "bb"], "stream": True, "stream_options": {"include_usage": True}})
    events = [e[len("data: "):] for e in resp.text.split("\n\n") if e]
    assert events[-1] == "[DONE]" and events.count("[DONE]") == 1
    chunks = [json.loads(e) for e in events[:-1]]
    assert chunks[-1]["usage"] == {"prompt_tokens": 3, "completion_tokens": 4, "total_tokens": 7, "prompt_tokens_details": {"cached_tokens": 0}} and not any(c.get("usage") for c in chunks[:-1])
    texts = {i: "".join(c["choices"][0]["text"] for c in chunks[:-1] if c["choices"][0]["index"] == i) for i in (0, 1)}
    assert texts == {0: "ok", 1: "ok"} and {c["id"] for c in chunks} == {chunks[0]["id"]}


@pytest.mark.parametrize("prompt", [[], ["a", ""], ["x"] * 33, [[]]])
def test_bad_prompt_lists(prompt):
    assert_envelope(make_client().post("/v1/completions", json={"model": MODEL, "prompt": prompt}), 400, "prompt")


def test_one_refused_prompt_runs_none():
    engine = ScriptedEngine()
    resp = make_client(engine).post("/v1/completions", json={"model": MODEL, "prompt": ["short", "x" * 200], "max_tokens": 8})
    assert_envelope(resp, 400, "max_tokens", "context_length_exceeded")
    assert engine.requests == []


def test_several_greedy_choices_are_refused_naming_n():
    client = make_client()
    err = assert_envelope(client.post("/v1/chat/completions", json=chat_body(n=2, temperature=0)), 400, "n")
    assert "temperature" in err["message"]
    assert client.post("/v1/chat/completions", json=chat_body(n=2, temperature=0.7)).status_code == 200


def test_several_chat_models_each_answer_by_their_own_stages_and_the_404_names_the_catalogue():
    """A chat model served beside the main one has its own tokenizer, versions and engine; `model` picks it."""
    main_engine, other_engine = ScriptedEngine(reply="from main"), ScriptedEngine(reply="from other")
    other = OpenAIService("other-model", FakeTokenizerClient(max_model_len=128), StaticPicker(Backend("v3", FakePostprocessorClient(other_engine))))
    service = OpenAIService(MODEL, FakeTokenizerClient(max_model_len=128), StaticPicker(Backend("v1", FakePostprocessorClient(main_engine))), chat_models=[other])
    client = TestClient(build_app(service), raise_server_exceptions=False)
    assert [m["id"] for m in client.get("/v1/models").json()["data"]] == [MODEL, "other-model"]
    one = client.post("/v1/chat/completions", json=chat_body(max_tokens=20)).json()
    two = client.post("/v1/chat/completions", json=chat_body(model="other-model", max_tokens=20)).json()
    three = client.post("/v1/completions", json={"model": "other-model", "prompt": "x", "max_tokens": 20}).json()
    assert (one["model"], one["choices"][0]["message"]["content"]) == (MODEL, "from main")
    assert (two["model"], two["choices"][0]["message"]["content"]) == ("other-model", "from other")
    assert three["choices"][0]["text"] == "from other"
    err = assert_envelope(client.post("/v1/chat/completions", json=chat_body(model="nope")), 404, param="model")
    assert MODEL in err["message"] and "other-model" in err["message"]


def test_a_stream_of_a_model_scaled_to_zero_waits_for_its_engine_up_to_its_bound_then_gets_503_retry_after():
    slow = OpenAIService(MODEL, FakeTokenizerClient(max_model_len=128), StaticPicker(Backend("v1", FakePostprocessorClient(ScriptedEngine(startup_s=3.0)))), first_piece_wait_s=0.3)
    client = TestClient(build_app(slow), raise_server_exceptions=False)
    resp = client.post("/v1/chat/completions", json=chat_body(stream=True, max_tokens=5))
    assert_envelope(resp, 503, code="engine_starting")
    assert resp.headers["retry-after"]
    patient = OpenAIService(MODEL, FakeTokenizerClient(max_model_len=128), StaticPicker(Backend("v1", FakePostprocessorClient(ScriptedEngine(startup_s=0.5)))), first_piece_wait_s=5)
    resp = TestClient(build_app(patient)).post("/v1/chat/completions", json=chat_body(stream=True, max_tokens=5))
    assert resp.status_code == 200 and resp.text.rstrip().endswith("data: [DONE]")  # within its bound: served, not refused
