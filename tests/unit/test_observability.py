"""Structured logs (JSON lines, request id, no key material) and the ingress's request records, without Ray."""

from __future__ import annotations

import json
import logging

import pytest
from fastapi.testclient import TestClient

from billing.keys import new_key
from common import logs
from deployments.openai.routes import build_app
from deployments.openai.service import Backend, OpenAIService, RequestRecord, StaticPicker
from tests.fakes import FakePostprocessorClient, FakeTokenizerClient, ScriptedEngine

MODEL = "test-model"


class Recorder:
    def __init__(self) -> None:
        self.records: list[RequestRecord] = []

    def finished(self, record: RequestRecord) -> None:
        self.records.append(record)


def test_redact_keeps_the_key_id_and_drops_every_secret():
    key, record = new_key("acme", "tenant", 1)
    secret = key[len(record.key_id) + 1:]  # token_urlsafe: may itself hold '-' and '_'
    line = logs.redact(f"auth failed for {key}; header was Authorization: Bearer {key} and 'bearer abc.def'")
    assert key not in line and secret not in line
    assert f"{record.key_id}-***" in line and "Bearer ***" in line and "bearer ***" in line
    assert logs.redact("nothing to see") == "nothing to see"


def test_redact_drops_a_secret_whose_own_characters_include_dashes():
    # token_urlsafe secrets hold '-': the whole secret goes, not just what follows its last dash.
    key = "sk-maas-1c0ad064-5Ab_cd-EF-A"
    assert logs.redact(f"key {key} end") == "key sk-maas-1c0ad064-*** end"


@pytest.fixture
def restore_loggers():
    yield
    for name in logs.PROJECT_LOGGERS:  # leave the process's logging as other tests expect it
        lg = logging.getLogger(name)
        for h in [h for h in lg.handlers if getattr(h, "_maas", False)]:
            lg.removeHandler(h)
            h.close()
        lg.propagate = True
        lg.setLevel(logging.NOTSET)


def test_json_lines_carry_the_request_id_and_fields(tmp_path, restore_loggers):
    path = logs.configure("unit", tmp_path, "INFO")
    log = logging.getLogger("deployments.test")
    key, _ = new_key("acme", "tenant", 2)
    log.info("explicit", extra={"request_id": "r1", "prompt_tokens": 7, "tenant": "acme"})
    with logs.request_scope("r2"):
        log.warning("scoped %s", key)
    log.info("none")
    for h in logging.getLogger("deployments").handlers:
        h.flush()
    lines = [json.loads(x) for x in path.read_text().splitlines()]
    assert [x["msg"] for x in lines][-3:][0] == "explicit"
    first, second, third = lines[-3:]
    assert first["request_id"] == "r1" and first["prompt_tokens"] == 7 and first["tenant"] == "acme" and first["stage"] == "unit"
    assert second["request_id"] == "r2" and second["level"] == "WARNING" and key not in json.dumps(second)
    assert "request_id" not in third
    assert path.name.startswith("unit-") and path.parent.name == "maas"
    logs.configure("unit", tmp_path, "INFO")  # idempotent: still one file handler per logger
    assert sum(1 for h in logging.getLogger("billing").handlers if getattr(h, "_maas", False)) == 1




def test_an_exception_is_one_readable_traceback_string(tmp_path, restore_loggers):
    path = logs.configure("unit", tmp_path, "INFO")
    log = logging.getLogger("billing.test")
    try:
        try:
            raise KeyError("inner")
        except KeyError as inner:
            raise RuntimeError("outer with sk-maas-abcdefgh-SECRETSECRET") from inner
    except RuntimeError as exc:
        log.error("as instance", exc_info=exc)
        log.exception("inside except")
    for h in logging.getLogger("billing").handlers:
        h.flush()
    for line in [json.loads(x) for x in path.read_text().splitlines()][-2:]:
        text = line["exc"]
        assert isinstance(text, str) and text.startswith("Traceback (most recent call last):")
        assert "KeyError: 'inner'" in text and "direct cause" in text and text.endswith("RuntimeError: outer with sk-maas-abcdefgh-***")
def _client(recorder: Recorder, engine: ScriptedEngine | None = None) -> TestClient:
    service = OpenAIService(MODEL, FakeTokenizerClient(max_model_len=128), StaticPicker(Backend("v3", FakePostprocessorClient(engine or ScriptedEngine()))), observer=recorder)
    return TestClient(build_app(service), raise_server_exceptions=False)


def test_every_request_ends_in_exactly_one_record():
    rec = Recorder()
    client = _client(rec)
    body = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}]}
    whole = client.post("/v1/chat/completions", json={**body, "max_tokens": 5}).json()
    client.post("/v1/chat/completions", json={**body, "stream": True, "max_tokens": 50})
    client.post("/v1/chat/completions", json={**body, "model": "nope"})
    client.post("/v1/completions", json={"model": MODEL, "prompt": "x" * 500})  # past the context window
    ok, streamed, unknown, too_long = rec.records
    assert ok.status == "ok" and ok.version == "v3" and ok.completion_tokens == whole["usage"]["completion_tokens"] == 5
    assert ok.request_id in whole["id"] and ok.prompt_tokens == whole["usage"]["prompt_tokens"] and ok.itl_s is None
    assert streamed.status == "ok" and streamed.stream and streamed.ttft_s is not None and streamed.itl_s is not None
    assert streamed.ttft_s <= streamed.duration_s
    assert unknown.status == "model_not_found" and unknown.version == ""
    assert too_long.status == "context_length_exceeded" and too_long.kind == "completion"


def test_a_failure_mid_stream_is_recorded_as_an_error():
    rec = Recorder()
    client = _client(rec, ScriptedEngine(fail_after=2))
    client.post("/v1/completions", json={"model": MODEL, "prompt": "x", "max_tokens": 50, "stream": True})
    (record,) = rec.records
    assert record.status not in ("ok", "aborted") and record.completion_tokens is None


def test_a_client_leaving_right_after_the_last_piece_ends_the_request_ok():
    """Closing the stream after `[DONE]` but before it is exhausted is not an abort (the engine made every token)."""
    import asyncio

    from deployments.openai.protocol import ChatCompletionRequest

    rec = Recorder()
    service = OpenAIService(MODEL, FakeTokenizerClient(max_model_len=128), StaticPicker(Backend("v3", FakePostprocessorClient(ScriptedEngine()))), observer=rec)

    async def run():
        body = ChatCompletionRequest.model_validate({"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "stream": True, "max_tokens": 50})
        stream = await service.chat(body)
        async for _text, usage in stream:
            if isinstance(usage, dict):
                break  # the final piece: stop here, as a server does when the client hangs up
        await stream.aclose()
        return usage

    usage = asyncio.run(run())
    (record,) = rec.records
    assert record.status == "ok" and record.completion_tokens == usage["completion_tokens"] > 0
