"""The generator's logic: a vLLM async engine fed token ids, streaming token ids back.

The engine runs with `skip_tokenizer_init=True`: tokenizing and detokenizing are
other stages' work.  Every engine output is passed on as it comes; batching the
messages between stages is the relay's work (`deployments.core.relay`), per engine
step, so no token waits for a later step.
"""

from __future__ import annotations

import asyncio
import glob
import logging
import os
import platform
import sys
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any, AsyncIterator, Callable, Sequence

from common.config import EngineConfig
from common.errors import EngineNotReadyError, InvalidRequestError, ServiceUnavailableError
from deployments.core.types import CACHED_PROMPT, PROMPT_LOGPROBS, GenerationRequest, TokenDelta, TokenLogprob

logger = logging.getLogger(__name__)


def whole_at_end(req: GenerationRequest) -> bool:
    """Whether a request's tokens are wanted only when it ends: not streamed, and no stop string to watch for (which
    the postprocessor matches as tokens come, to stop the engine early). vLLM's own server asks its engine for such
    requests' final output only; here the engine's count still comes every step (billing's truth if it is aborted)."""
    return not req.stream and not req.stop


async def coalesced(req: GenerationRequest, deltas: AsyncIterator[list[TokenDelta]]) -> AsyncIterator[list[TokenDelta]]:
    """`deltas` as they come, or, for a request wanted whole (`whole_at_end`), all of them in one list at the end.

    The list is the steps' deltas in order, which the postprocessor feeds exactly as if they had come one step
    at a time, so no carrier message and no postprocessor work is spent on it before it ends. Closing or
    cancelling this closes `deltas` (for the engine, an abort)."""
    try:
        if not whole_at_end(req):
            async for step in deltas:
                yield step
            return
        held: list[TokenDelta] = []
        async for step in deltas:
            held.extend(step)
        if held:
            yield held
    finally:
        close = getattr(deltas, "aclose", None)
        if close is not None:
            await close()


def engine_env_vars(config: EngineConfig, num_cpus_on_node: int | None = None) -> dict[str, str]:
    """Environment the engine process needs, fixed before vLLM is imported."""
    env = {"HF_HUB_OFFLINE": "1", "VLLM_NO_USAGE_STATS": "1", "VLLM_DO_NOT_TRACK": "1", "TOKENIZERS_PARALLELISM": "false"}
    if config.accelerator == "cpu":
        cores = num_cpus_on_node or os.cpu_count() or 1
        bind = f"0-{cores - 1}" if config.cpu_threads_bind == "all" else config.cpu_threads_bind
        env.update(
            VLLM_CPU_KVCACHE_SPACE=str(config.kv_cache_space_gib),
            VLLM_CPU_OMP_THREADS_BIND=bind,
            # Ray sets OMP_NUM_THREADS to the actor's (fractional) CPU count; the engine binds its own threads.
            OMP_NUM_THREADS=str(_count_cores(bind)),
        )
        preload = cpu_preload_libs() if config.cpu_preload == "auto" else []
        if preload:
            env["LD_PRELOAD"] = ":".join([*preload, *filter(None, os.environ.get("LD_PRELOAD", "").split(":"))])
    return env


TCMALLOC_DIRS = ("/usr/lib/x86_64-linux-gnu", "/usr/lib/aarch64-linux-gnu", "/usr/lib64", "/usr/lib", "/usr/local/lib")


def cpu_preload_libs(lib_dirs: tuple[str, ...] = TCMALLOC_DIRS, prefix: str = sys.prefix, machine: str = platform.machine()) -> list[str]:
    """tcmalloc and Intel OpenMP shared libraries to preload into a CPU engine, those that exist (vLLM's CPU install guide)."""
    found: list[str] = []
    for directory in (*lib_dirs, os.path.join(prefix, "lib")):
        candidates = sorted(glob.glob(os.path.join(directory, "libtcmalloc_minimal.so.*")) + glob.glob(os.path.join(directory, "libtcmalloc.so.*")))
        candidates = [c for c in candidates if "debug" not in c]
        if candidates:
            found.append(candidates[0])
            break
    iomp = os.path.join(prefix, "lib", "libiomp5.so")
    if machine in ("x86_64", "AMD64") and os.path.exists(iomp):
        found.append(iomp)
    return found


def _count_cores(bind: str) -> int:
    total = 0
    for part in bind.replace("|", ",").split(","):
        lo, _, hi = part.partition("-")
        total += (int(hi) - int(lo) + 1) if hi else 1
    return max(total, 1)


def engine_args(model_path: str, config: EngineConfig) -> dict[str, Any]:
    """AsyncEngineArgs fields for a model folder under this config."""
    args: dict[str, Any] = {
        "model": model_path,
        "dtype": config.dtype,
        "max_model_len": config.max_model_len,
        "max_num_seqs": config.max_num_seqs,
        "enforce_eager": config.enforce_eager,
        # Token ids in and out; the engine loads the tokenizer only to build structured-output grammars.
        "skip_tokenizer_init": not config.structured_outputs,
        "max_logprobs": config.max_logprobs,
        "seed": config.seed,
        "disable_log_stats": not config.log_stats,
        # Requests enter the engine in the generator's order (deployments.core.scheduling); the engine keeps that rank
        # for what it decides itself (which request memory pressure preempts).
        "scheduling_policy": "priority" if config.scheduling.policy == "priority" else "fcfs",
    }
    if config.enable_lora is True:  # `auto` is resolved before an engine is built (deployments.version_app)
        args.update(enable_lora=True, max_loras=config.max_loras, max_cpu_loras=max(config.max_cpu_loras, config.max_loras), max_lora_rank=config.max_lora_rank)
    if config.accelerator == "gpu":
        args["gpu_memory_utilization"] = config.gpu_memory_utilization
    args.update(config.extra_args)
    return args


def client_error(exc: BaseException) -> InvalidRequestError | None:
    """The 400 for an engine error the request caused: vLLM's `VLLMClientError` family (its validation errors are
    not ValueErrors since 0.2x) or a ValueError; None for anything else (the server's fault)."""
    if isinstance(exc, InvalidRequestError):
        return exc
    if isinstance(exc, ValueError) or any(cls.__name__ == "VLLMClientError" for cls in type(exc).__mro__):
        err = InvalidRequestError(str(exc), param=getattr(exc, "parameter", None))
        err.__cause__ = exc
        return err
    return None


def structured_outputs(response_format: dict | None) -> Any:
    """vLLM's StructuredOutputsParams for an OpenAI `response_format` (None for text)."""
    kind = (response_format or {}).get("type", "text")
    if kind == "text":
        return None
    from vllm.sampling_params import StructuredOutputsParams

    if kind == "json_object":
        return StructuredOutputsParams(json_object=True)
    return StructuredOutputsParams(json=response_format["json_schema"].get("schema") or {"type": "object"})  # type: ignore[index]


_NO_LOGPROB = -9999.0  # what vLLM's server sends for -inf (JSON has no infinity)


def _finite(lp: float) -> float:
    return lp if lp > _NO_LOGPROB else _NO_LOGPROB


def token_logprobs(token_ids: Sequence[int], positions: Any, top: int) -> list[TokenLogprob]:
    """Per new token: its logprob and the `top` most likely tokens', from vLLM's per-position {token id: Logprob}."""
    out: list[TokenLogprob] = []
    for i, token in enumerate(token_ids):
        at = (positions[i] if positions is not None and i < len(positions) else None) or {}
        chosen = at.get(token)
        ranked = sorted(((t, lp.logprob) for t, lp in at.items()), key=lambda p: -p[1])[:top]
        out.append((_finite(chosen.logprob) if chosen is not None else _NO_LOGPROB, [(t, _finite(lp)) for t, lp in ranked]))
    return out


def prompt_delta(prompt_token_ids: Sequence[int], positions: Any, top: int) -> TokenDelta:
    """The prompt's logprobs as a stream delta (see `PROMPT_LOGPROBS`), from vLLM's `prompt_logprobs`: a list as long
    as the prompt whose first entry is None (no token precedes the first one)."""
    return (PROMPT_LOGPROBS, [], None, token_logprobs(prompt_token_ids[1:], list(positions)[1:], top))


@dataclass
class EngineStats:
    ready: bool
    running: int
    started_total: int
    finished_total: int
    aborted_total: int
    recent_aborted: list[str]
    startup_s: float | None
    aborted_tokens: dict[str, int]  # request id -> tokens produced before the abort (recent ones)
    adapters: bool = False  # the engine serves LoRA adapters
    waiting: dict[str, int] = field(default_factory=dict)  # requests waiting for the engine, per service tier (deployments.core.scheduling)


def _queue_wait(stats: Any) -> float | None:
    """Queue wait from vLLM's per-request timestamps (present when the engine logs stats)."""
    queued, scheduled = getattr(stats, "queued_ts", 0.0), getattr(stats, "scheduled_ts", 0.0)
    return scheduled - queued if queued and scheduled and scheduled >= queued else None


class VLLMGenerator:
    """Owns one vLLM AsyncLLM; `generate` streams token deltas for a GenerationRequest."""

    def __init__(
        self,
        model_path: str,
        config: EngineConfig,
        on_end: Callable[[GenerationRequest, int, bool], None] | None = None,
        on_queue_wait: Callable[[float], None] | None = None,
        stat_loggers: list[Any] | None = None,
    ):
        self._model_path = model_path
        self._on_end = on_end  # (request, tokens produced, finished, cached prompt tokens) as each request leaves the engine: billing's witness
        self._on_queue_wait = on_queue_wait  # seconds a request waited before its first scheduling (needs log_stats)
        self._stat_loggers = stat_loggers  # vLLM StatLoggerFactory list (the Serve wrapper's exports to Ray)
        self._config = config
        self._engine: Any = None
        self._startup_s: float | None = None
        self._started = 0
        self._finished = 0
        self._aborted: deque[str] = deque(maxlen=256)
        self._aborted_tokens: dict[str, int] = {}
        self._aborted_total = 0
        self._lora_ids: dict[tuple[str, str], int] = {}  # adapter -> vLLM's integer id for it (stable while this engine lives)

    def start(self) -> None:
        """Build the engine (blocking, tens of seconds on CPU). Call once, at replica start-up."""
        from vllm.engine.arg_utils import AsyncEngineArgs
        from vllm.v1.engine.async_llm import AsyncLLM

        t0 = time.monotonic()
        self._engine = AsyncLLM.from_engine_args(
            AsyncEngineArgs(**engine_args(self._model_path, self._config)), stat_loggers=self._stat_loggers if self._config.log_stats else None
        )
        self._startup_s = time.monotonic() - t0
        logger.info("vLLM engine for %s ready in %.1fs", self._model_path, self._startup_s)

    @property
    def ready(self) -> bool:
        return self._engine is not None and not self._engine.errored

    def _sampling_params(self, req: GenerationRequest) -> Any:
        from vllm import SamplingParams
        from vllm.sampling_params import RequestOutputKind

        return SamplingParams(
            n=req.n,
            max_tokens=req.max_tokens,
            temperature=1.0 if req.temperature is None else req.temperature,
            top_p=1.0 if req.top_p is None else req.top_p,
            seed=req.seed,
            presence_penalty=req.presence_penalty or 0.0,
            frequency_penalty=req.frequency_penalty or 0.0,
            # The model's end-of-turn ids stop generation unless the client asked to ignore EOS (as vLLM's server does).
            stop_token_ids=[] if req.ignore_eos else list(req.stop_token_ids),
            ignore_eos=req.ignore_eos,
            **{k: v for k, v in (("top_k", req.top_k), ("min_p", req.min_p), ("repetition_penalty", req.repetition_penalty), ("logit_bias", req.logit_bias)) if v is not None},
            logprobs=req.logprobs,
            prompt_logprobs=req.prompt_logprobs,
            structured_outputs=structured_outputs(req.response_format),
            detokenize=False,
            output_kind=RequestOutputKind.DELTA,
        )

    async def generate(self, req: GenerationRequest, priority: int = 0) -> AsyncIterator[list[TokenDelta]]:
        """Stream `[(choice index, new token ids, finish reason), ...]` until every choice finishes.

        If the consumer goes away (the stream is closed or cancelled), the engine request is aborted. `priority` is
        vLLM's (lower first), the rank the request entered with (`deployments.core.scheduling`).
        """
        if not self.ready:
            raise EngineNotReadyError() if self._engine is None else ServiceUnavailableError("The engine has failed; the replica will be replaced.")
        from vllm.inputs import TokensPrompt

        trace = {"generator_called": time.time()}
        try:
            params = self._sampling_params(req)
        except Exception as exc:
            raise client_error(exc) or exc
        self._started += 1
        pending = req.n
        produced = 0  # the engine's own count of completion tokens, all choices
        finished = False
        stats = None
        cached: int | None = None  # the engine's prefix-cache hits of the prompt, known from its first output
        want_prompt = req.prompt_logprobs is not None
        try:
            async for out in self._stream(TokensPrompt(prompt_token_ids=req.prompt_token_ids), params, req.request_id, self._lora(req), priority):
                stats = out.metrics or stats
                deltas: list[TokenDelta] = []
                if cached is None:
                    cached = getattr(out, "num_cached_tokens", None) or 0
                    if cached:
                        deltas.append((CACHED_PROMPT, [], None, cached))
                if want_prompt and out.prompt_logprobs:  # at prefill's end; once, though each of n choices may bring them
                    deltas.append(prompt_delta(req.prompt_token_ids, out.prompt_logprobs, req.prompt_logprobs or 0))
                    want_prompt = False
                for o in out.outputs:
                    produced += len(o.token_ids)
                    pending -= o.finish_reason is not None
                    delta: TokenDelta = (o.index, list(o.token_ids), o.finish_reason)
                    if req.logprobs is not None:
                        delta += (token_logprobs(o.token_ids, o.logprobs, req.logprobs),)
                    deltas.append(delta)
                if deltas:
                    if "generator_first_output" not in trace:
                        trace["generator_first_output"] = time.time()
                    yield deltas
            self._finished += 1
            finished = True
            queue_s = _queue_wait(stats)
            if queue_s is not None and self._on_queue_wait is not None:
                self._on_queue_wait(queue_s)
            logger.info("engine request finished", extra={"request_id": req.request_id, "completion_tokens": produced, "queue_s": queue_s, "version": req.model_version, "trace": trace})
        except (asyncio.CancelledError, GeneratorExit):
            # vLLM's generate() aborts the engine request on cancellation; record it for observers.
            if pending > 0:
                self._aborted_total += 1
                self._aborted.append(req.request_id)
                self._aborted_tokens[req.request_id] = produced
                if len(self._aborted_tokens) > 2 * (self._aborted.maxlen or 256):
                    keep = set(self._aborted)
                    self._aborted_tokens = {k: v for k, v in self._aborted_tokens.items() if k in keep}
                logger.info("engine request aborted by its consumer", extra={"request_id": req.request_id, "completion_tokens": produced, "version": req.model_version})
            raise
        finally:
            if self._on_end is not None:
                self._on_end(req, produced, finished, cached or 0)

    def _lora(self, req: GenerationRequest) -> Any:
        """vLLM's LoRARequest for a fine-tune's request (the engine loads the adapter on first use, LRU-bounded), else None."""
        if req.adapter is None:
            return None
        if self._config.enable_lora is not True:  # `auto` before the first adapter: its job turns LoRA on before it succeeds
            raise ServiceUnavailableError(
                "This model's engines are being restarted to serve fine-tuned adapters; retry shortly.", code="adapters_starting", headers={"Retry-After": "10"}
            )
        from vllm.lora.request import LoRARequest

        lora_id = self._lora_ids.setdefault(req.adapter, len(self._lora_ids) + 1)
        return LoRARequest(req.adapter[0], lora_id, req.adapter[1])

    async def _stream(self, prompt: Any, params: Any, request_id: str, lora: Any = None, priority: int = 0) -> AsyncIterator[Any]:
        """The engine's outputs; its validation errors (raised when it takes the request) become 400s."""
        try:
            async for out in self._engine.generate(prompt, params, request_id, lora_request=lora, priority=priority):
                yield out
        except Exception as exc:
            raise client_error(exc) or exc

    def stats(self) -> EngineStats:
        return EngineStats(
            ready=self.ready,
            running=self._engine.get_num_unfinished_requests() if self._engine is not None else 0,
            started_total=self._started,
            finished_total=self._finished,
            aborted_total=self._aborted_total,
            recent_aborted=list(self._aborted),
            startup_s=self._startup_s,
            aborted_tokens={rid: self._aborted_tokens[rid] for rid in self._aborted if rid in self._aborted_tokens},
            adapters=self._config.enable_lora is True,
        )

    def shutdown(self) -> None:
        if self._engine is not None:
            self._engine.shutdown()
            self._engine = None
