"""The postprocessor's logic: token ids → text, stop strings, finish reasons, usage.

`IncrementalDetokenizer` emits text only once it is complete UTF-8 and decodes
each step in the context of the previous tokens, so multi-byte characters split
across tokens and leading spaces come out right.  `StopMatcher` holds back the
tail that could still become a stop string, so a stop string split across chunks
is trimmed exactly.  `RequestDecoder` combines them per choice.
"""

from __future__ import annotations

import contextlib
import functools
from dataclasses import dataclass, field
from typing import Any, AsyncIterator, Callable, Protocol, Sequence

from deployments.core import shapes
from deployments.core.tools import ToolCall, ToolCallParser
from deployments.core.types import CACHED_PROMPT, PROMPT_LOGPROBS, ChoiceEvent, DecodedLogprob, GenerationRequest, SSEPiece, TokenDelta, TokenLogprob, Usage

Decode = Callable[[Sequence[int]], str]

# Tokens of prompt context used to decode the first generated tokens (as vLLM does).
_CONTEXT_TOKENS = 5
_REPLACEMENT = "\ufffd"


class IncrementalDetokenizer:
    """Turns a growing list of token ids into text deltas, never emitting half a character."""

    def __init__(self, decode: Decode, context_ids: Sequence[int] = ()):
        self._decode = decode
        self._ids: list[int] = list(context_ids[-_CONTEXT_TOKENS:])
        self._prefix = 0
        self._read = len(self._ids)

    def push(self, new_ids: Sequence[int]) -> str:
        self._ids.extend(new_ids)
        prefix_text = self._decode(self._ids[self._prefix:self._read])
        full_text = self._decode(self._ids[self._prefix:])
        if len(full_text) > len(prefix_text) and not full_text.endswith(_REPLACEMENT):
            self._prefix, self._read = self._read, len(self._ids)
            return full_text[len(prefix_text):]
        return ""

    def flush(self) -> str:
        """Whatever is still held back (an incomplete character at the very end), as decoded."""
        prefix_text = self._decode(self._ids[self._prefix:self._read])
        full_text = self._decode(self._ids[self._prefix:])
        self._prefix = self._read = len(self._ids)
        return full_text[len(prefix_text):]


class StopMatcher:
    """Finds stop strings in streamed text, holding back only what could still start one."""

    def __init__(self, stops: Sequence[str]):
        self._stops = [s for s in stops if s]
        self._held = ""

    def push(self, text: str) -> tuple[str, bool]:
        """Returns (text safe to emit, whether a stop string was hit). After a hit, nothing more is emitted."""
        if not self._stops:
            return text, False
        buf = self._held + text
        # The stop that completes first wins (as when text arrives a character at a time), so the cut does not
        # depend on how the text was chunked; of stops completing at once, the longest (it starts first).
        hits = [(i + len(s), i) for s in self._stops if (i := buf.find(s)) >= 0]
        if hits:
            self._held = ""
            return buf[: min(hits)[1]], True
        hold = self._partial_suffix(buf)
        self._held = buf[len(buf) - hold:] if hold else ""
        return buf[: len(buf) - hold], False

    @property
    def active(self) -> bool:
        """Whether there is any stop string to look for."""
        return bool(self._stops)

    def flush(self) -> str:
        held, self._held = self._held, ""
        return held

    def _partial_suffix(self, buf: str) -> int:
        longest = 0
        for stop in self._stops:
            for k in range(min(len(stop) - 1, len(buf)), longest, -1):
                if stop.startswith(buf[-k:]):
                    longest = k
                    break
        return longest


@dataclass
class ChoiceState:
    index: int
    detok: IncrementalDetokenizer
    stops: StopMatcher
    text: list[str] = field(default_factory=list)
    completion_tokens: int = 0
    finish_reason: str | None = None
    started: bool = False
    logprobs: list[DecodedLogprob] = field(default_factory=list)  # all of them, for a whole response
    tools: ToolCallParser | None = None  # chat with tools: takes the calls out of the answer
    tool_calls: list[ToolCall] | None = None
    offset: int = 0  # characters of the choice's text the logprobs have covered (text_offset)


class RequestDecoder:
    """Per-request state of the postprocessor: one detokenizer and stop matcher per choice."""

    def __init__(self, req: GenerationRequest, decode: Decode, token_text: Callable[[int], str] | None = None):
        self.req = req
        self.choices = [
            ChoiceState(i, IncrementalDetokenizer(decode, req.prompt_token_ids), StopMatcher(req.stop), tools=ToolCallParser(req.tools) if req.tools else None)
            for i in range(req.n)
        ]
        self._token_text = token_text or (lambda t: decode([t]))
        # `echo`: the prompt's text leads each choice (decoded as the model reads it).
        self._echo = decode(req.prompt_token_ids) if req.echo and req.kind == "completion" else ""
        self._echo_logprobs: list[DecodedLogprob] = []  # the prompt's, when asked (echo with logprobs); they lead each choice's
        self.cached_tokens = 0  # the engine's prefix-cache hits of the prompt
        self._engine_finished: set[int] = set()  # choices the engine itself ended (not a stop string here)
        for c in self.choices:
            c.offset = len(self._echo)

    @property
    def done(self) -> bool:
        return all(c.finish_reason is not None for c in self.choices)

    @property
    def engine_done(self) -> bool:
        """The engine ended every choice itself, so its stream ends on its own: nothing to cancel upstream."""
        return len(self._engine_finished) == len(self.choices)

    @property
    def usage(self) -> Usage:
        return Usage(len(self.req.prompt_token_ids), sum(c.completion_tokens for c in self.choices), self.cached_tokens)

    def feed(self, deltas: Sequence[TokenDelta]) -> list[ChoiceEvent]:
        events = []
        for delta in deltas:
            index, token_ids, finish_reason = delta[0], delta[1], delta[2]
            if index == PROMPT_LOGPROBS:
                self._echo_logprobs = self._prompt_logprobs(delta[3])
                continue
            if index == CACHED_PROMPT:
                self.cached_tokens = delta[3]
                continue
            choice = self.choices[index]
            if finish_reason is not None:
                self._engine_finished.add(index)
            if choice.finish_reason is not None:
                continue  # already stopped by a stop string; the engine is still catching up
            choice.completion_tokens += len(token_ids)
            logprobs = None
            if self.req.prompt_only:  # max_tokens 0: the engine's one token is counted (and billed), never shown
                events.append(self._event(choice, "", "length", [] if len(delta) > 3 else None))
                continue
            if len(delta) > 3:  # logprobs asked: they end where the text ends, with the token that completed a stop string
                text, hit, n = self._push_until_stop(choice, token_ids)
                logprobs = self._logprobs(choice, token_ids[:n], delta[3][:n])
            else:
                text, hit = choice.stops.push(choice.detok.push(token_ids))
            if not hit and finish_reason is not None:
                tail, hit = choice.stops.push(choice.detok.flush())
                text += tail if hit else tail + choice.stops.flush()
            if hit:
                finish_reason = "stop"
            events.append(self._event(choice, text, finish_reason, logprobs))
        return events

    @staticmethod
    def _push_until_stop(choice: ChoiceState, token_ids: Sequence[int]) -> tuple[str, bool, int]:
        """The tokens one at a time until a stop string is hit: (text to emit, hit, tokens pushed).

        The same text as pushing them at once (the detokenizer and the stop matcher are incremental); only the
        logprobs path pays for it, to know which tokens the returned text covers."""
        if not choice.stops.active:
            return choice.stops.push(choice.detok.push(token_ids)) + (len(token_ids),)
        out = []
        for n, token in enumerate(token_ids, 1):
            text, hit = choice.stops.push(choice.detok.push([token]))
            out.append(text)
            if hit:
                return "".join(out), True, n
        return "".join(out), False, len(token_ids)

    def _logprobs(self, choice: ChoiceState, token_ids: Sequence[int], logprobs: Sequence[TokenLogprob]) -> list[DecodedLogprob]:
        out = []
        for token, (logprob, top) in zip(token_ids, logprobs):
            text = self._token_text(token)
            out.append(DecodedLogprob(text, logprob, [(self._token_text(t), lp) for t, lp in top], choice.offset))
            choice.offset += len(text)
        choice.logprobs.extend(out)
        return out

    def _prompt_logprobs(self, logprobs: Sequence[TokenLogprob]) -> list[DecodedLogprob]:
        """The prompt's tokens with their logprobs (the first has none: nothing precedes it), offsets from the text's start."""
        ids = self.req.prompt_token_ids
        first = self._token_text(ids[0])
        out, offset = [DecodedLogprob(first, None, None, 0)], len(first)
        for token, (logprob, top) in zip(ids[1:], logprobs):
            text = self._token_text(token)
            out.append(DecodedLogprob(text, logprob, [(self._token_text(t), lp) for t, lp in top], offset))
            offset += len(text)
        return out

    def finish_unfinished(self, reason: str = "abort") -> list[ChoiceEvent]:
        """Close choices the engine stream ended without finishing (e.g. the engine went away)."""
        return [self._event(c, "", reason) for c in self.choices if c.finish_reason is None]

    def _event(self, choice: ChoiceState, text: str, finish_reason: str | None, logprobs: list[DecodedLogprob] | None = None) -> ChoiceEvent:
        first, choice.started = not choice.started, True
        if choice.tools is not None:  # content goes out as it comes; a tool call's text is kept until the choice ends
            text = choice.tools.push(text)
            if finish_reason is not None:
                tail, calls = choice.tools.finish()
                text += tail
                if calls:
                    choice.tool_calls, finish_reason = calls, "tool_calls"
        if first and self._echo:
            text = self._echo + text
            if self._echo_logprobs:
                choice.logprobs[:0] = self._echo_logprobs
                logprobs = [*self._echo_logprobs, *(logprobs or [])]
        if text:
            choice.text.append(text)
        choice.finish_reason = finish_reason
        return ChoiceEvent(choice.index, text, finish_reason, first, logprobs, choice.tool_calls if finish_reason == "tool_calls" else None)

    def whole(self) -> list[ChoiceEvent]:
        """Each choice's complete answer (after the stream ended)."""
        wanted = self.req.logprobs is not None
        return [ChoiceEvent(c.index, "".join(c.text), c.finish_reason, False, c.logprobs if wanted else None, c.tool_calls) for c in self.choices]


class StreamedResponse:
    """One streamed request's SSE pieces, fed a generator message at a time by plain calls.

    `feed` gives the piece for one message (every choice's news, or None), `end` the last pieces (choices the
    engine left unfinished, then usage and [DONE]). A piece is (sse_text, completion tokens so far) while
    generating and (sse_text, usage) last. The postprocessor's carrier loop feeds every request of an
    engine step in turn (`deployments.core.relay.Receiver.consume`).
    """

    def __init__(self, req: GenerationRequest, decoder: RequestDecoder):
        self._req = req
        self._decoder = decoder
        self._template = shapes.ChunkTemplate(req)  # per token, only what changes is encoded

    @property
    def done(self) -> bool:
        """Every choice has finished (stop strings included): read no more."""
        return self._decoder.done

    @property
    def cut(self) -> bool:
        """Finished here before the engine finished (a stop string): the engine request should be cancelled. When the
        engine ended every choice itself, its stream is about to end anyway, and cancelling it would cost more."""
        return self._decoder.done and not self._decoder.engine_done

    def feed(self, deltas: Sequence[TokenDelta]) -> SSEPiece | None:
        events = self._decoder.feed(deltas)
        return (self._template.chunks(events), self._decoder.usage.completion_tokens) if events else None

    def end(self) -> list[SSEPiece]:
        decoder = self._decoder
        out = [] if decoder.done else [(self._template.chunks(decoder.finish_unfinished()), decoder.usage.completion_tokens)]
        usage = decoder.usage
        return [*out, (shapes.sse_end(self._req, usage), usage.to_dict())]


class WholeResponse:
    """One non-streamed request's body, fed the same way as `StreamedResponse`."""

    def __init__(self, req: GenerationRequest, decoder: RequestDecoder):
        self._req = req
        self._decoder = decoder
        # Without stop strings or logprobs nothing depends on where the steps split the text, so a choice's run of
        # steps (a whole request's output arrives as every step's deltas at once) is decoded in one push.
        self._merge = not req.stop and req.logprobs is None and not req.prompt_only

    @property
    def done(self) -> bool:
        return self._decoder.done

    @property
    def cut(self) -> bool:
        """See `StreamedResponse.cut`."""
        return self._decoder.done and not self._decoder.engine_done

    def feed(self, deltas: Sequence[TokenDelta]) -> None:
        self._decoder.feed(merged(deltas) if self._merge else deltas)

    def end(self) -> dict:
        self._decoder.finish_unfinished()
        return shapes.full_response(self._req, self._decoder.whole(), self._decoder.usage)


def merged(deltas: Sequence[TokenDelta]) -> list[TokenDelta]:
    """Consecutive token deltas of one choice as one: its ids joined, the last one's finish reason (deltas that carry
    logprobs, the prompt's or the cache's records pass as they are). The detokenizer is incremental, so the text is
    the same, for one decode where each step took two."""
    out: list[TokenDelta] = []
    for delta in deltas:
        last = out[-1] if out else None
        if last is not None and len(delta) == 3 and len(last) == 3 and delta[0] == last[0] >= 0 and last[2] is None:
            out[-1] = (delta[0], [*last[1], *delta[1]], delta[2])
        else:
            out.append(delta)
    return out


class ResponseWriter:
    """The postprocessor's logic: drives a RequestDecoder over a generator's token stream, writing OpenAI responses."""

    def __init__(self, decode: Decode, token_text: Callable[[int], str] | None = None):
        """`decode` makes the text; `token_text` one token's text for logprobs (special tokens shown), cached here."""
        self._decode = decode
        self._token_text = functools.lru_cache(maxsize=1 << 16)(token_text or (lambda t: decode([t])))

    def streamed(self, req: GenerationRequest) -> StreamedResponse:
        return StreamedResponse(req, RequestDecoder(req, self._decode, self._token_text))

    def whole(self, req: GenerationRequest) -> WholeResponse:
        return WholeResponse(req, RequestDecoder(req, self._decode, self._token_text))

    async def stream(self, req: GenerationRequest, token_stream: AsyncIterator[list[TokenDelta]]) -> AsyncIterator[SSEPiece]:
        """`StreamedResponse`'s pieces over an async token stream (one engine step's deltas per item)."""
        out = self.streamed(req)
        async with _reading(token_stream) as deltas_of:
            async for deltas in deltas_of:
                if out.done:
                    continue  # every choice finished here; the engine's end follows
                piece = out.feed(deltas)
                if piece is not None:
                    yield piece
                if out.cut:
                    break
        for piece in out.end():
            yield piece

    async def complete(self, req: GenerationRequest, token_stream: AsyncIterator[list[TokenDelta]]) -> dict:
        """The whole (non-streaming) response body."""
        out = self.whole(req)
        async with _reading(token_stream) as deltas_of:
            async for deltas in deltas_of:
                if not out.done:
                    out.feed(deltas)
                if out.cut:
                    break
        return out.end()


def rust_writer(tokenizer: Any) -> ResponseWriter:
    """A `ResponseWriter` over a Hugging Face tokenizer's Rust backend: decode is on the per-token path."""
    backend = tokenizer.backend_tokenizer
    return ResponseWriter(lambda ids: backend.decode(ids, skip_special_tokens=True), lambda t: backend.decode([t], skip_special_tokens=False))


class TokenSource(Protocol):
    """A generator stage as its consumer sees it: a request's token deltas, one engine step's per item."""

    def stream(self, req: GenerationRequest) -> AsyncIterator[list[TokenDelta]]: ...


class InlinePostprocessor:
    """The postprocessor stage's work done by its caller (the ingress), straight over the generator's token stream.

    Implements the ingress's `PostprocessorClient` (`deployments.openai.service`), so the ingress reaches a version
    either through the postprocessor stage or through this, by config (`deployments.inline_postprocess`). The
    pieces are the stage's own (`ResponseWriter`): only the process doing the work differs.
    """

    def __init__(self, writer: ResponseWriter, generator: TokenSource):
        self._writer = writer
        self._generator = generator

    def stream(self, req: GenerationRequest) -> AsyncIterator[SSEPiece]:
        return self._writer.stream(req, self._generator.stream(req))

    async def complete(self, req: GenerationRequest) -> dict:
        return await self._writer.complete(req, self._generator.stream(req))


@contextlib.asynccontextmanager
async def _reading(token_stream: AsyncIterator[list[TokenDelta]]) -> AsyncIterator[AsyncIterator[list[TokenDelta]]]:
    """Close the token stream as soon as reading ends, not when it is collected: closing it early (a stop string, the
    client gone) cancels the engine request now. A stream read to its end has nothing left to cancel."""
    try:
        yield token_stream
    finally:
        close = getattr(token_stream, "aclose", None)
        if close is not None:
            await close()
