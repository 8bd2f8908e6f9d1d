"""Tool calls (`deployments.core.tools`): the parser alone, streamed in every split, then through the real routes
with the official client over a scripted engine (whole and streamed, `tool_calls` in the history, the 400s)."""

from __future__ import annotations

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from deployments.core.tools import CLOSE, OPEN, ToolCallParser, ToolSpec, render_messages, required_schema, response_format_for
from tests.fakes import FakeTokenizerClient, ScriptedEngine
from tests.unit.test_metering import Server

WEATHER = {"type": "function", "function": {"name": "get_weather", "description": "Weather in a city", "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}
TIME = {"type": "function", "function": {"name": "get_time", "parameters": {"type": "object", "properties": {}}}}
CALL = f'{OPEN}\n{{"name": "get_weather", "arguments": {{"city": "Paris"}}}}\n{CLOSE}'


def _run(parser: ToolCallParser, pieces: list[str]) -> tuple[str, list]:
    content = "".join(parser.push(p) for p in pieces)
    tail, calls = parser.finish()
    return content + tail, calls


def _splits(text: str, cuts: list[int]) -> list[str]:
    cuts = sorted({min(c, len(text)) for c in cuts})
    return [text[a:b] for a, b in zip([0, *cuts], [*cuts, len(text)])]


@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers(0, 120), max_size=8))
def test_auto_finds_the_calls_however_the_text_is_split_and_streams_the_content_before_them(cuts):
    text = "Let me check. " + CALL + "\n" + CALL.replace("Paris", "Oslo")
    content, calls = _run(ToolCallParser(ToolSpec("auto", ("get_weather",))), _splits(text, cuts))
    assert content.strip() == "Let me check." and [json.loads(c.arguments)["city"] for c in calls] == ["Paris", "Oslo"]
    assert all(c.name == "get_weather" and c.id.startswith("call_") for c in calls) and len({c.id for c in calls}) == 2


@settings(max_examples=100, deadline=None)
@given(st.lists(st.integers(0, 60), max_size=6))
def test_auto_without_a_call_is_all_content_even_a_lone_angle_bracket(cuts):
    text = "a < b and <tool is not a tag <tool_ca"
    content, calls = _run(ToolCallParser(ToolSpec("auto", ("get_weather",))), _splits(text, cuts))
    assert content == text and calls == []


def test_a_block_that_does_not_parse_or_names_no_tool_stays_content():
    for bad in (f"{OPEN}not json{CLOSE}", f'{OPEN}{{"name": "rm_rf", "arguments": {{}}}}{CLOSE}'):
        assert _run(ToolCallParser(ToolSpec("auto", ("get_weather",))), [bad]) == (bad, [])


def test_required_and_named_parse_the_structured_output():
    (call,) = _run(ToolCallParser(ToolSpec("named", ("get_weather",), "get_weather")), ['{"city":', ' "Rome"}'])[1]
    assert (call.name, json.loads(call.arguments)) == ("get_weather", {"city": "Rome"})
    _, calls = _run(ToolCallParser(ToolSpec("required", ("get_weather", "get_time"))), ['[{"name": "get_time", "arguments": {}}, {"name": "get_weather", "arguments": {"city": "X"}}]'])
    assert [c.name for c in calls] == ["get_time", "get_weather"]
    assert _run(ToolCallParser(ToolSpec("named", ("get_weather",), "get_weather")), ['{"city": "Ro']) == ('{"city": "Ro', [])  # cut short: content


def test_the_forced_choices_are_structured_outputs_and_none_shows_no_tools():
    spec, fmt, shown = response_format_for([WEATHER, TIME], {"type": "function", "function": {"name": "get_time"}}, True)
    assert spec.mode == "named" and fmt["json_schema"]["schema"] == TIME["function"]["parameters"] and shown == [TIME]
    spec, fmt, shown = response_format_for([WEATHER, TIME], "required", False)
    assert fmt["json_schema"]["schema"] == required_schema([WEATHER, TIME], False) and fmt["json_schema"]["schema"]["maxItems"] == 1
    assert response_format_for([WEATHER], "none", True) == (None, None, None)
    assert response_format_for([WEATHER], None, True)[0].mode == "auto"


def test_history_with_calls_and_results_renders_as_the_model_wrote_it():
    history = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": None, "tool_calls": [{"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
        {"role": "tool", "content": "18C, sunny"},
    ]
    out = render_messages(history, [WEATHER])
    assert out[0]["role"] == "system" and out[0]["content"].startswith("Be brief.") and "<tools>" in out[0]["content"] and "get_weather" in out[0]["content"]
    assert out[2]["content"] == f'{OPEN}\n{{"name": "get_weather", "arguments": {{"city": "Paris"}}}}\n{CLOSE}'
    assert out[3] == {"role": "tool", "content": "<tool_response>\n18C, sunny\n</tool_response>"}


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    srv = Server(tmp_path_factory.mktemp("tools"), ScriptedEngine(reply="Checking. " + CALL, per_message=4))
    srv.tokenizer = FakeTokenizerClient(max_model_len=4096)  # byte-level: the tools' description is a thousand tokens
    with srv:
        yield srv


def _client(srv):
    from openai import OpenAI

    return OpenAI(base_url=f"{srv.base}/v1", api_key=srv.key, max_retries=0)


def test_the_official_client_gets_tool_calls_whole_and_streamed(server):
    client = _client(server)
    messages = [{"role": "user", "content": "Weather in Paris?"}]
    whole = client.chat.completions.create(model="m", messages=messages, tools=[WEATHER, TIME], max_tokens=200)
    choice = whole.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content == "Checking. "
    (call,) = choice.message.tool_calls
    assert call.type == "function" and call.function.name == "get_weather" and json.loads(call.function.arguments) == {"city": "Paris"}
    # The engine saw the tools in its prompt (the fake tokenizer is byte-level: the prompt's text is its bytes).
    assert b"<tools>" in bytes(t for t in server.engine.requests[-1].prompt_token_ids if t < 256)

    chunks = list(client.chat.completions.create(model="m", messages=messages, tools=[WEATHER], max_tokens=200, stream=True))
    content = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    calls = [tc for c in chunks if c.choices for tc in (c.choices[0].delta.tool_calls or [])]
    assert content == "Checking. " and OPEN not in content and chunks[-1].choices[0].finish_reason == "tool_calls"
    assert [(tc.index, tc.function.name, json.loads(tc.function.arguments)) for tc in calls] == [(0, "get_weather", {"city": "Paris"})] and calls[0].id.startswith("call_")

    # The call and its result go back into the history; `none` shows no tools, and the answer is text.
    history = [*messages, whole.choices[0].message.model_dump(exclude_none=True), {"role": "tool", "tool_call_id": call.id, "content": "18C"}]
    again = client.chat.completions.create(model="m", messages=history, tools=[WEATHER], tool_choice="none", max_tokens=200)
    assert again.choices[0].finish_reason == "stop" and OPEN in again.choices[0].message.content and not again.choices[0].message.tool_calls


def test_bad_tool_requests_are_400s_naming_the_parameter(server):
    from openai import BadRequestError

    client = _client(server)
    messages = [{"role": "user", "content": "hi"}]
    for kwargs in (
        {"tool_choice": "required"},  # no tools
        {"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "nope"}}},
        {"tools": [{"type": "function", "function": {"name": "bad name!"}}]},
        {"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "nonsense"}}}]},
        {"tools": [WEATHER], "tool_choice": "required", "response_format": {"type": "json_object"}},
    ):
        with pytest.raises(BadRequestError) as err:
            client.chat.completions.create(model="m", messages=messages, **kwargs)
        assert err.value.body["type"] == "invalid_request_error" and err.value.body["param"], kwargs
