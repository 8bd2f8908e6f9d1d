"""In-process fakes that implement the real interfaces (tokenizer, stage clients), for tests without Ray or a model."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Any, AsyncIterator, Sequence

from deployments.core.generator import prompt_delta
from deployments.core.postprocessor import InlinePostprocessor, ResponseWriter
from deployments.core.tokenizer import PromptTokenizer
from deployments.core.traffic import TrafficPlan, plan_change
from deployments.core.types import CACHED_PROMPT, GenerationRequest, TokenDelta, TokenizedPrompt

EOS = 256


@dataclass
class FakeLogprob:
    """vLLM's `Logprob`, as far as the generator reads it."""

    logprob: float


class ByteTokenizer:
    """A byte-level tokenizer: token id = one UTF-8 byte (0-255), 256 = end of sequence.

    Multi-byte characters are split across tokens, as byte-level BPE does for rare characters.
    """

    eos_token_id = EOS
    vocab_size = 257

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, token_ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        return bytes(t for t in token_ids if t != EOS).decode("utf-8", errors="replace")

    def apply_chat_template(self, conversation: list[dict[str, str]], **kwargs: Any) -> list[int]:
        text = "".join(f"<{m['role']}>{m['content']}\n" for m in conversation) + "<assistant>"
        return self.encode(text)


class ScriptedEngine:
    """Stands in for the generator: answers every prompt with a fixed text, a few tokens per message."""

    def __init__(self, reply: str = "Hello, world! ça va?", per_message: int = 3, fail_after: int | None = None, delay_s: float = 0.0, cache_block: int = 0, startup_s: float = 0.0):
        """`startup_s`: every request waits that long before its first tokens (an engine starting from zero replicas)."""
        self.reply_ids = ByteTokenizer().encode(reply)
        self.startup_s = startup_s
        self.cache_block = cache_block  # > 0: a prefix cache as vLLM's, in whole blocks of this many tokens
        self._seen: list[list[int]] = []
        self.per_message = per_message
        self.fail_after = fail_after
        self.delay_s = delay_s
        self.closed_early = 0
        self.requests: list[GenerationRequest] = []  # what the engine was asked for, in order

    async def generate(self, req: GenerationRequest) -> AsyncIterator[list[TokenDelta]]:
        self.requests.append(req)
        ids = self.reply_ids[: req.max_tokens]
        sent = 0
        # Made-up prompt logprobs (echo with logprobs), first in the first message, as the generator sends them.
        prompt = [prompt_delta(req.prompt_token_ids, [None, *({t: FakeLogprob(-0.5)} for t in req.prompt_token_ids[1:])], req.prompt_logprobs)] if req.prompt_logprobs is not None else []
        cached = self._cached(req.prompt_token_ids)
        prompt += [(CACHED_PROMPT, [], None, cached)] if cached else []
        if self.startup_s:
            await asyncio.sleep(self.startup_s)
        try:
            for start in range(0, len(ids), self.per_message):
                if self.fail_after is not None and sent >= self.fail_after:
                    raise RuntimeError("engine exploded")
                chunk = ids[start:start + self.per_message]
                sent += len(chunk)
                last = start + self.per_message >= len(ids)
                reason = ("length" if len(ids) == req.max_tokens else "stop") if last else None
                if req.logprobs is None:
                    yield [*prompt, *((i, list(chunk), reason) for i in range(req.n))]
                else:  # made-up logprobs: the sampled token first, then its neighbours
                    lps = [(-0.25 * (i + 1), ([(t, -0.25)] + [((t + k) % EOS, -1.0 - k) for k in range(1, req.logprobs)])[: req.logprobs]) for i, t in enumerate(chunk)]
                    yield [*prompt, *((i, list(chunk), reason, lps) for i in range(req.n))]
                prompt = []
                if self.delay_s:
                    await asyncio.sleep(self.delay_s)
        except (GeneratorExit, asyncio.CancelledError):
            self.closed_early += 1
            raise

    def _cached(self, ids: list[int]) -> int:
        """Whole blocks of `ids` that an earlier prompt began with (never the whole prompt: its last token is computed)."""
        if not self.cache_block:
            return 0
        best = 0
        for seen in self._seen:
            n = next((i for i, (a, b) in enumerate(zip(seen, ids)) if a != b), min(len(seen), len(ids)))
            best = max(best, n)
        self._seen.append(list(ids))
        return min(best, len(ids) - 1) // self.cache_block * self.cache_block


class FakeTokenizerClient:
    """The tokenizer stage in-process; `calls` counts the prompts it was asked to prepare."""

    def __init__(self, max_model_len: int = 256):
        self.logic = PromptTokenizer(ByteTokenizer(), max_model_len)
        self.calls = 0

    async def prepare_chat(self, messages: list[dict[str, str]], max_tokens: int | None, request_id: str = "") -> TokenizedPrompt:
        self.calls += 1
        return self.logic.prepare_chat(messages, max_tokens)

    async def prepare_completion(self, prompt: str | list[int], max_tokens: int | None, request_id: str = "") -> TokenizedPrompt:
        self.calls += 1
        return self.logic.prepare_completion(prompt, max_tokens)


class EngineSource:
    """A generator stage's `TokenSource` over a scripted engine in-process (no carriers)."""

    def __init__(self, engine: ScriptedEngine):
        self.stream = engine.generate


class FakePostprocessorClient(InlinePostprocessor):
    """The ingress's own postprocessing (the default) over a scripted engine."""

    def __init__(self, engine: ScriptedEngine):
        self.engine = engine
        super().__init__(ResponseWriter(ByteTokenizer().decode), EngineSource(engine))


class FakeFleet:
    """`deployments.openai.operations.Fleet` over an in-memory plan and the same pure traffic changes as Serve's."""

    def __init__(self):
        self.live = TrafficPlan("m", stable="v1", revision=1)
        self.store = ["v1", "v2", "v3"]
        self.calls: list[tuple] = []
        self.settled = 0

    def _json(self) -> dict:
        return {**self.live.to_json(), "weights": self.live.weights(), "deployed": self.live.deployed()}

    def plan(self) -> dict | None:
        return self._json()

    def versions(self) -> list[dict]:
        return [{"version": v, "created_at": None, "base": None, "eval_loss": None} for v in self.store]

    def change(self, action, version, weight, who) -> dict:
        self.calls.append((action, version, weight, who))
        self.live = plan_change(action, version, weight, who)(self.live)
        return self._json()

    def settle(self) -> list[str]:
        self.settled += 1
        return []

    def health(self) -> dict:
        return {"applications": {"maas": {"status": "RUNNING", "message": "", "deployments": {"Ingress": {"status": "HEALTHY", "message": "", "replicas": {"RUNNING": 1}}}}}, "proxies": {"n1": "HEALTHY"}}


class RoutePrefix:
    """What Serve does with an application's `route_prefix` (Ray's `replica.py`): the whole path is kept, the prefix
    is added to `root_path`, and a path outside the prefix never reaches the app (404)."""

    def __init__(self, app: Any, prefix: str):
        self.app, self.prefix = app, prefix.rstrip("/")

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] == "http":
            path = scope["path"]
            if not (path == self.prefix or path.startswith(self.prefix + "/")):
                await send({"type": "http.response.start", "status": 404, "headers": [(b"content-type", b"text/plain")]})
                await send({"type": "http.response.body", "body": b"Not Found"})
                return
            scope = {**scope, "root_path": scope.get("root_path", "") + self.prefix}
        await self.app(scope, receive, send)


class ByteTextTokenizer(ByteTokenizer):
    """`ByteTokenizer` called as a Hugging Face tokenizer on a batch of texts: a start (255) and an end (EOS) token
    around each, as BERT's [CLS] and [SEP]."""

    def __call__(self, texts: list[str], add_special_tokens: bool = True) -> dict:
        return {"input_ids": [([255] if add_special_tokens else []) + self.encode(t) + ([EOS] if add_special_tokens else []) for t in texts]}


class HashPoolingEngine:
    """Stands in for vLLM's pooling runner: a normalized vector per token-id list, the same for the same ids."""

    def __init__(self, dims: int = 8, delay_s: float = 0.0):
        self.dims, self.delay_s = dims, delay_s
        self.seen: list[list[int]] = []

    async def encode(self, token_ids: list[int], request_id: str):
        import asyncio
        import math

        if self.delay_s:
            await asyncio.sleep(self.delay_s)
        self.seen.append(list(token_ids))
        raw = [float(sum((t + 1) * (i + j + 1) for j, t in enumerate(token_ids)) % 97 + 1) for i in range(self.dims)]
        norm = math.sqrt(sum(x * x for x in raw))
        yield [x / norm for x in raw]
