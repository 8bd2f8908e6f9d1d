"""OpenAI response shapes (chat and text completions, streamed and whole), built as plain dicts / SSE text."""

from __future__ import annotations

import json
from typing import Any, Sequence

import msgspec

from deployments.core.types import ChoiceEvent, DecodedLogprob, GenerationRequest, Usage

DONE = "data: [DONE]\n\n"


def _dumps(obj: Any) -> str:
    return json.dumps(obj, ensure_ascii=False, separators=(",", ":"))


def fingerprint(req: GenerationRequest) -> str | None:
    """`system_fingerprint`: which model version produced the response (e.g. `SmolLM2-135M-Instruct@v2`)."""
    return f"{req.model}@{req.model_version}" if req.model_version else None


def _chunk(req: GenerationRequest, choices: list[dict[str, Any]]) -> dict[str, Any]:
    chunk: dict[str, Any] = {
        "id": req.response_id,
        "object": "chat.completion.chunk" if req.kind == "chat" else "text_completion",
        "created": req.created,
        "model": req.model,
        "service_tier": req.service_tier,
        "system_fingerprint": fingerprint(req),
        "choices": choices,
    }
    if req.include_usage:
        chunk["usage"] = None
    return chunk


def _entry(token: str, logprob: float | None) -> dict[str, Any]:
    return {"token": token, "logprob": logprob, "bytes": list(token.encode("utf-8"))}


def logprobs(req: GenerationRequest, tokens: Sequence[DecodedLogprob] | None) -> dict[str, Any] | None:
    """A choice's `logprobs` object: chat's `content` list, or text completions' four parallel lists."""
    if tokens is None or req.logprobs is None:
        return None
    if req.kind == "chat":
        return {"content": [{**_entry(t.token, t.logprob), "top_logprobs": [_entry(tok, lp) for tok, lp in t.top or []]} for t in tokens], "refusal": None}
    return {
        "tokens": [t.token for t in tokens],
        "token_logprobs": [t.logprob for t in tokens],
        "top_logprobs": [None if t.top is None else dict(t.top) for t in tokens],
        "text_offset": [t.offset for t in tokens],
    }


def tool_call_deltas(calls: Sequence[Any]) -> list[dict[str, Any]]:
    """A stream's `delta.tool_calls`: each call whole, in one chunk (its name and all of its arguments), as `index` orders them."""
    return [{"index": i, **c.to_dict()} for i, c in enumerate(calls)]


def _stream_choice(req: GenerationRequest, ev: ChoiceEvent) -> dict[str, Any]:
    if req.kind == "chat":
        delta: dict[str, Any] = {"role": "assistant"} if ev.first else {}
        if ev.text or ev.first:
            delta["content"] = ev.text
        if ev.tool_calls:
            delta["tool_calls"] = tool_call_deltas(ev.tool_calls)
        return {"index": ev.index + req.choice_offset, "delta": delta, "logprobs": logprobs(req, ev.logprobs), "finish_reason": ev.finish_reason}
    return {"index": ev.index + req.choice_offset, "text": ev.text, "logprobs": logprobs(req, ev.logprobs), "finish_reason": ev.finish_reason}


def sse_chunks(req: GenerationRequest, events: Sequence[ChoiceEvent]) -> str:
    """One SSE event per choice that has news (OpenAI sends one choice per chunk)."""
    return "".join(f"data: {_dumps(_chunk(req, [_stream_choice(req, ev)]))}\n\n" for ev in events)


_encode = msgspec.json.Encoder().encode  # a string's JSON, escaped as json.dumps(ensure_ascii=False) would, in C


class ChunkTemplate:
    """One request's stream chunks with everything fixed encoded once (id, object, created, model, fingerprint):
    per token only the text, the finish reason and (when asked for) the logprobs are encoded. The same JSON as
    `sse_chunks` (tests compare them); the postprocessor makes one per streamed request."""

    def __init__(self, req: GenerationRequest):
        self._req = req
        head = _dumps({k: v for k, v in _chunk(req, []).items() if k not in ("choices", "usage")})
        self._head = f"data: {head[:-1]},\"choices\":[{{\"index\":"
        self._tail = "]" + (',"usage":null' if req.include_usage else "") + "}\n\n"
        self._chat = req.kind == "chat"

    def chunks(self, events: Sequence[ChoiceEvent]) -> str:
        return "".join(self.chunk(ev) for ev in events)

    def chunk(self, ev: ChoiceEvent) -> str:
        req = self._req
        finish = "null" if ev.finish_reason is None else _encode(ev.finish_reason).decode()
        lp = "null" if ev.logprobs is None or req.logprobs is None else _dumps(logprobs(req, ev.logprobs))
        if self._chat:
            if ev.tool_calls:  # once per choice: the JSON of the reference shape
                delta = _dumps(_stream_choice(req, ev)["delta"])
            elif ev.first:
                delta = f'{{"role":"assistant","content":{_encode(ev.text).decode()}}}'
            else:
                delta = f'{{"content":{_encode(ev.text).decode()}}}' if ev.text else "{}"
            body = f'"delta":{delta},"logprobs":{lp},"finish_reason":{finish}}}'
        else:
            body = f'"text":{_encode(ev.text).decode()},"logprobs":{lp},"finish_reason":{finish}}}'
        return f"{self._head}{ev.index + req.choice_offset},{body}{self._tail}"


def sse_end(req: GenerationRequest, usage: Usage) -> str:
    """The usage chunk (when asked for) and the [DONE] sentinel."""
    if not req.include_usage:
        return DONE
    chunk = _chunk(req, [])
    chunk["usage"] = usage.to_dict()
    return f"data: {_dumps(chunk)}\n\n{DONE}"


def sse_error(envelope: dict[str, Any]) -> str:
    """An error in the middle of a stream, then [DONE] (headers are already sent)."""
    return f"data: {_dumps(envelope)}\n\n{DONE}"


def _message(c: ChoiceEvent) -> dict[str, Any]:
    if not c.tool_calls:
        return {"role": "assistant", "content": c.text}
    return {"role": "assistant", "content": c.text or None, "tool_calls": [call.to_dict() for call in c.tool_calls]}


def full_response(req: GenerationRequest, choices: Sequence[ChoiceEvent], usage: Usage) -> dict[str, Any]:
    """The whole (non-streamed) body; each choice's `text` is its complete answer."""
    if req.kind == "chat":
        body = [{"index": c.index, "message": _message(c), "logprobs": logprobs(req, c.logprobs), "finish_reason": c.finish_reason} for c in choices]
        obj = "chat.completion"
    else:
        body = [{"index": c.index + req.choice_offset, "text": c.text, "logprobs": logprobs(req, c.logprobs), "finish_reason": c.finish_reason} for c in choices]
        obj = "text_completion"
    return {
        "id": req.response_id, "object": obj, "created": req.created, "model": req.model, "service_tier": req.service_tier, "system_fingerprint": fingerprint(req),
        "choices": body, "usage": usage.to_dict(),
    }  # fmt: skip
