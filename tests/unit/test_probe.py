"""The HTTP edge, closed by default (issue 16's probe): keys before bodies, bounded bodies and values, no 5xx.

A real HTTP server (uvicorn) over the real routes, service and BillingClient, with billing in-process.
"""

from __future__ import annotations

import json
import time

import httpx
import pytest

from common.config import RequestLimits
from tests.fakes import ScriptedEngine
from tests.unit.test_metering import Server

LIMITS = RequestLimits(max_body_bytes=4096, max_prompt_chars=200, max_messages=3, max_stop_sequences=2, max_stop_chars=8)
CHAT = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}


@pytest.fixture(scope="module")
def srv(tmp_path_factory):
    with Server(tmp_path_factory.mktemp("probe"), ScriptedEngine(), LIMITS) as server:
        yield server


def _post(srv, path: str, content: bytes | str | None = None, key: str | None = "tenant", **kwargs) -> httpx.Response:
    headers = {"Content-Type": "application/json", **kwargs.pop("headers", {})}
    if key == "tenant":
        headers["Authorization"] = f"Bearer {srv.key}"
    elif key:
        headers["Authorization"] = f"Bearer {key}"
    return httpx.post(f"http://127.0.0.1:{srv.port}{path}", content=content, headers=headers, timeout=30, **kwargs)


def _envelope(resp: httpx.Response, status: int, code: str | None = None, param: str | None = None) -> dict:
    assert resp.status_code == status, resp.text
    err = resp.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and "Traceback" not in err["message"]
    assert code is None or err["code"] == code, err
    assert param is None or err["param"] == param, err
    assert not (isinstance(err["code"], str) and err["code"].isdigit()), err  # never the bare status as a code
    return err


@pytest.mark.parametrize("key", [None, "sk-maas-wrongkey-xxxxxxxxxxxxxxxxxxxx", "not a key"])
def test_without_a_valid_key_the_body_is_never_parsed(srv, key):
    _envelope(_post(srv, "/v1/chat/completions", "{not json", key=key), 401)
    _envelope(_post(srv, "/v1/completions", b"x" * 100_000, key=key), 401)  # over the size limit too: 401 first


def test_a_tenant_key_on_admin_is_refused_before_the_body(srv):
    _envelope(_post(srv, "/admin/keys", "{not json"), 403)


def test_a_body_over_the_limit_is_413_by_length_or_by_counting(srv):
    big = json.dumps({**CHAT, "messages": [{"role": "user", "content": "x" * 10_000}]})
    _envelope(_post(srv, "/v1/chat/completions", big), 413, "request_too_large")

    def chunks():
        for _ in range(10):
            yield b"x" * 1000

    _envelope(_post(srv, "/v1/chat/completions", chunks()), 413, "request_too_large")  # no Content-Length: counted


@pytest.mark.parametrize(
    "body, param",
    [
        ({**CHAT, "seed": 2**70}, "seed"),
        ({**CHAT, "seed": -(2**70)}, "seed"),
        ({**CHAT, "messages": [{"role": "user", "content": "a"}] * 4}, "messages"),
        ({**CHAT, "messages": [{"role": "user", "content": "a" * 201}]}, "messages"),
        ({**CHAT, "stop": ["a", "b", "c"]}, "stop"),
        ({**CHAT, "stop": ["123456789"]}, "stop"),
        ({**CHAT, "n": 10**6}, "n"),
        ({**CHAT, "max_tokens": 10**30}, "max_tokens"),
    ],
)
def test_values_out_of_bounds_are_400_naming_the_parameter(srv, body, param):
    _envelope(_post(srv, "/v1/chat/completions", json.dumps(body)), 400, param=param)


def test_lone_surrogates_and_deep_nesting_are_400_not_500(srv):
    _envelope(_post(srv, "/v1/completions", '{"model": "m", "prompt": "a\\ud800b", "max_tokens": 2}'), 400, param="prompt")
    _envelope(_post(srv, "/v1/chat/completions", '{"model": "m", "messages": [{"role": "user", "content": "\\udfff"}]}'), 400)
    nested = '{"model": "m", "prompt": ' + "[" * 2000 + "]" * 2000 + "}"
    _envelope(_post(srv, "/v1/completions", nested), 400)


def test_a_tenant_over_its_rate_gets_nothing_tokenized(srv):
    key, _ = srv.core.create_key("one-rpm", plan="one_rpm")
    assert _post(srv, "/v1/chat/completions", json.dumps(CHAT), key=key).status_code == 200
    calls = srv.tokenizer.calls
    _envelope(_post(srv, "/v1/chat/completions", json.dumps(CHAT), key=key), 429, "rate_limit_exceeded")
    assert srv.tokenizer.calls == calls  # refused before the tokenizer was asked


def test_a_prompt_refused_by_the_tokenizer_gives_its_placeholder_back_and_bills_nothing(srv):
    key, _ = srv.core.create_key("refused")
    body = {**CHAT, "messages": [{"role": "user", "content": "x" * 190}], "max_tokens": 200}  # > the 256-token window
    _envelope(_post(srv, "/v1/chat/completions", json.dumps(body), key=key), 400, "context_length_exceeded")
    assert srv.billing._leases["refused"].in_flight == 0
    assert _post(srv, "/v1/chat/completions", json.dumps(CHAT), key=key).status_code == 200
    deadline = time.monotonic() + 5
    while not (events := srv.core.events(tenant="refused")) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert [(e.status, e.prompt_tokens > 0) for e in events] == [("ok", True)]  # the refused request left no row


def test_a_worst_case_refused_after_tokenizing_gives_the_placeholder_back(srv):
    key, _ = srv.core.create_key("nearly-broke", plan="tiny")  # room for the one-token placeholder, not for this request
    calls = srv.tokenizer.calls
    _envelope(_post(srv, "/v1/chat/completions", json.dumps({**CHAT, "max_tokens": 100}), key=key), 429, "insufficient_quota")
    assert srv.tokenizer.calls == calls + 1
    lease = srv.billing._leases["nearly-broke"]
    assert lease.in_flight == 0 and srv.core.events(tenant="nearly-broke") == []
