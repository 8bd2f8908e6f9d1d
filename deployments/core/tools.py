"""Tool calls on chat completions (OpenAI's `tools`, `tool_choice`, `parallel_tool_calls`): the decisions as data. No Ray.

How each `tool_choice` is served:

- `none`: the tools are not shown to the model; the answer is text.
- `auto`: the tools are described to the model in the system prompt the way Hermes-style tool models are trained
  (`<tools>...</tools>`; a call is `<tool_call>{"name": ..., "arguments": {...}}</tool_call>`), which suits any
  ChatML template, SmolLM2's included (its own has no tool support); `ToolCallParser` takes the calls out of the
  answer, streamed or whole, and the rest is its content.
- `required` and a named function: vLLM's structured outputs hold the answer to a JSON schema, so the arguments
  are valid JSON for the function's `parameters` whatever the model: for a named function the answer is its
  arguments; for `required` a list of `{"name", "arguments"}` (one item unless `parallel_tool_calls`).

Assistant messages with `tool_calls` and `tool` messages in the history are rendered in the same form, so a
conversation reads to the model as its own earlier turns did.
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass, field
from typing import Any, Literal

from common.errors import InvalidRequestError

OPEN, CLOSE = "<tool_call>", "</tool_call>"
ToolMode = Literal["auto", "required", "named"]


@dataclass(frozen=True)
class ToolCall:
    id: str
    name: str
    arguments: str  # JSON text, as OpenAI sends it

    def to_dict(self) -> dict[str, Any]:
        return {"id": self.id, "type": "function", "function": {"name": self.name, "arguments": self.arguments}}


@dataclass(frozen=True)
class ToolSpec:
    """What the postprocessor needs to know of a request's tools (sent with it)."""

    mode: ToolMode
    names: tuple[str, ...]
    named: str | None = None  # the function of a named `tool_choice`


def new_call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


def tool_system_prompt(tools: list[dict[str, Any]]) -> str:
    listed = "\n".join(json.dumps(t, ensure_ascii=False, separators=(",", ":")) for t in tools)
    return (
        "You are a function calling AI model. You may call one or more functions to assist with the user query. "
        "Don't make assumptions about what values to plug into functions. Here are the available tools:\n"
        f"<tools>\n{listed}\n</tools>\n"
        "For each function call return a json object with function name and arguments within <tool_call></tool_call> XML tags:\n"
        f'{OPEN}\n{{"name": <function-name>, "arguments": <args-json-object>}}\n{CLOSE}'
    )


def render_messages(messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None) -> list[dict[str, str]]:
    """Plain `{role, content}` messages for the model's chat template: an assistant's `tool_calls` as `<tool_call>`
    blocks, a `tool` message's result in `<tool_response>`, and (when `tools`) their description in the system prompt."""
    out: list[dict[str, str]] = []
    for m in messages:
        content = m.get("content") or ""
        if m.get("tool_calls"):
            blocks = [f'{OPEN}\n{json.dumps({"name": c["function"]["name"], "arguments": _loads(c["function"].get("arguments") or "{}")}, ensure_ascii=False)}\n{CLOSE}' for c in m["tool_calls"]]
            content = "\n".join([content, *blocks] if content else blocks)
        if m["role"] == "tool":
            content = f"<tool_response>\n{content}\n</tool_response>"
        out.append({"role": m["role"], "content": content})
    if tools:
        prompt = tool_system_prompt(tools)
        if out and out[0]["role"] in ("system", "developer"):
            out[0] = {"role": "system", "content": f"{out[0]['content']}\n\n{prompt}"}
        else:
            out.insert(0, {"role": "system", "content": prompt})
    return out


def _loads(text: str) -> Any:
    try:
        return json.loads(text)
    except ValueError:
        return text  # shown as it was sent


def required_schema(tools: list[dict[str, Any]], parallel: bool) -> dict[str, Any]:
    """`tool_choice: required`: a list of calls, each one of the tools with arguments to its schema."""
    one = [
        {
            "type": "object",
            "properties": {"name": {"type": "string", "enum": [t["function"]["name"]]}, "arguments": t["function"].get("parameters") or {"type": "object"}},
            "required": ["name", "arguments"],
        }
        for t in tools
    ]
    return {"type": "array", "minItems": 1, **({} if parallel else {"maxItems": 1}), "items": {"anyOf": one}}


def response_format_for(tools: list[dict[str, Any]], choice: Any, parallel: bool) -> tuple[ToolSpec | None, dict[str, Any] | None, list[dict[str, Any]] | None]:
    """(what the postprocessor parses, the structured output the engine enforces, the tools to show the model)."""
    names = tuple(t["function"]["name"] for t in tools)
    if not tools or choice == "none":
        return None, None, None
    if choice in (None, "auto"):
        return ToolSpec("auto", names), None, tools
    if choice == "required":
        return ToolSpec("required", names), {"type": "json_schema", "json_schema": {"name": "tool_calls", "schema": required_schema(tools, parallel)}}, tools
    name = choice["function"]["name"]
    fn = next(t for t in tools if t["function"]["name"] == name)
    schema = fn["function"].get("parameters") or {"type": "object"}
    return ToolSpec("named", names, name), {"type": "json_schema", "json_schema": {"name": name, "schema": schema}}, [fn]


@dataclass
class ToolCallParser:
    """One choice's answer split into content and tool calls, while it streams.

    `auto`: text goes out as content until a `<tool_call>` tag begins (a possible start of one is held back);
    from there on it is kept, and `finish` parses the blocks. `required`/named: the whole answer is the
    structured output, parsed at the end."""

    spec: ToolSpec
    _held: str = ""
    _calling: bool = False
    _kept: list[str] = field(default_factory=list)

    def push(self, text: str) -> str:
        """The part of `text` that is content, safe to send now."""
        if self.spec.mode != "auto" or self._calling:
            self._kept.append(text)
            return ""
        text = self._held + text
        at = text.find(OPEN)
        if at >= 0:
            self._calling, self._held = True, ""
            self._kept.append(text[at:])
            return text[:at]
        keep = next((n for n in range(min(len(OPEN) - 1, len(text)), 0, -1) if OPEN.startswith(text[-n:])), 0)
        self._held = text[len(text) - keep:] if keep else ""
        return text[: len(text) - keep]

    def finish(self) -> tuple[str, list[ToolCall]]:
        """(content still to send, the calls): no calls when the answer made none (or none that parse)."""
        kept, self._kept = "".join(self._kept), []
        if self.spec.mode == "named":  # cut short (`length`), it does not parse: the text is the content then
            args = kept.strip()
            return ("", [ToolCall(new_call_id(), self.spec.named or "", args)]) if _is_object(args) else (kept, [])
        if self.spec.mode == "required":
            items = _loads(kept)
            calls = [_call(c) for c in items if _call_like(c, self.spec.names)] if isinstance(items, list) else []
            return ("", calls) if calls else (kept, [])
        tail, self._held = self._held, ""
        if not self._calling:
            return tail, []
        calls, rest = [], []
        for part in kept.split(OPEN)[1:]:
            body, _, after = part.partition(CLOSE)
            parsed = _loads(body.strip())
            if _call_like(parsed, self.spec.names):
                calls.append(_call(parsed))
            else:
                rest.append(OPEN + part)
                continue
            rest.append(after)
        text = "".join(rest).strip()
        return (text if calls else kept + tail), calls


def _call(parsed: dict[str, Any]) -> ToolCall:
    """A call from the model's `{"name", "arguments"}` object (`_call_like`), its arguments as OpenAI's JSON text."""
    return ToolCall(new_call_id(), parsed["name"], json.dumps(parsed.get("arguments", {}), ensure_ascii=False))


def _is_object(text: str) -> bool:
    return isinstance(_loads(text), dict)


def _call_like(value: Any, names: tuple[str, ...]) -> bool:
    return isinstance(value, dict) and value.get("name") in names and isinstance(value.get("arguments", {}), dict)


def check_tool_choice(tools: list[dict[str, Any]] | None, choice: Any, response_format: dict[str, Any] | None = None, parallel_sent: bool = False) -> None:
    """A 400 for a `tool_choice` (or `parallel_tool_calls`) without `tools`, one that `tools` cannot satisfy, or one
    that a `response_format` contradicts (as OpenAI answers them)."""
    if not tools:
        if choice is not None:
            raise InvalidRequestError("tool_choice is only allowed when tools are given.", param="tool_choice")
        if parallel_sent:
            raise InvalidRequestError("parallel_tool_calls is only allowed when tools are given.", param="parallel_tool_calls")
        return
    if choice in (None, "none", "auto"):
        return
    if isinstance(choice, dict) and choice["function"]["name"] not in {t["function"]["name"] for t in tools}:
        raise InvalidRequestError(f"tool_choice names the function `{choice['function']['name']}`, which is not among the tools.", param="tool_choice")
    if (response_format or {}).get("type", "text") != "text":
        raise InvalidRequestError("response_format cannot be combined with a tool_choice that forces a call (its arguments follow the function's schema).", param="response_format")
