"""The HTTP API over in-process fakes: shapes, SSE, and every error in the OpenAI envelope."""

from __future__ import annotations

import json

import pytest
from fastapi.testclient import TestClient

from deployments.openai.routes import build_app
from deployments.openai.service import Backend, OpenAIService, StaticPicker
from tests.fakes import FakePostprocessorClient, FakeTokenizerClient, ScriptedEngine

MODEL = "test-model"


def make_client(engine: ScriptedEngine | None = None, ready: bool = True) -> TestClient:
    service = OpenAIService(MODEL, FakeTokenizerClient(max_model_len=128), StaticPicker(Backend("", FakePostprocessorClient(engine or ScriptedEngine()))), is_ready=lambda: ready)
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
    [({"model": MODEL, "prompt": ["a", "b"]}, "prompt"), ({"model": MODEL, "prompt": ""}, "prompt"), ({"model": MODEL, "prompt": "x", "echo": True}, None)],
)
def test_bad_completion_requests(body, param):
    assert_envelope(make_client().post("/v1/completions", json=body), 400, param)


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
        ({"tool_choice": "auto"}, "tool_choice", "unsupported_parameter"),
        ({"parallel_tool_calls": True}, "parallel_tool_calls", "unsupported_parameter"),
        ({"response_format": {"type": "json_object"}}, "response_format", None),
        ({"response_format": {"type": "json_schema", "json_schema": {}}}, "response_format", None),
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
