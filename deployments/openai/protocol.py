"""Pydantic models of the OpenAI requests ray-maas accepts, with their validation rules.

Only request bodies are modelled: responses are built as plain dicts by the
postprocessor (`deployments.core.shapes`), which is the hot path.  Values are
bounded as vLLM's own server bounds them (e.g. `seed` to int64), and text must be
valid Unicode (a lone surrogate cannot be tokenized).  Limits that depend on the
deployment (prompt size, message and stop-string counts) are the service's
(`common.config.RequestLimits`).
"""

from __future__ import annotations

from decimal import Decimal
from typing import Annotated, Any, Literal

import jsonschema
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, field_validator, model_validator

from billing.keys import TENANT_PATTERN

MAX_N = 16
MAX_PROMPTS = 32  # prompts in one /v1/completions request (each is its own sub-request)
INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1  # vLLM's bounds for `seed`
INT32_MAX = 2**31 - 1


def _utf8(value: str) -> str:
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise ValueError(f"text is not valid Unicode (a lone surrogate at position {exc.start})") from None
    return value


Text = Annotated[str, AfterValidator(_utf8)]


def _check_schema(schema: dict[str, Any], what: str = "json_schema.schema") -> None:
    """A JSON Schema the engine can compile: well-formed per its metaschema (a 400 otherwise, not an engine error)."""
    try:
        jsonschema.validators.validator_for(schema).check_schema(schema)
    except jsonschema.SchemaError as exc:
        raise ValueError(f"{what} is not a valid JSON Schema: {exc.message}") from None


class StreamOptions(BaseModel):
    include_usage: bool = Field(False, description="Send a last chunk with token usage before [DONE].")


class TextContentPart(BaseModel):
    type: Literal["text"]
    text: Text


class FunctionCallIn(BaseModel):
    name: Text = Field(..., min_length=1, max_length=64)
    arguments: Text = Field("", description="The call's arguments, JSON text as the model gave them.")


class ToolCallIn(BaseModel):
    """An earlier assistant turn's tool call, in the history."""

    id: Text = Field(..., max_length=256)
    type: Literal["function"] = "function"
    function: FunctionCallIn


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")

    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: Text | list[TextContentPart] | None = None
    name: Text | None = None
    tool_calls: list[ToolCallIn] | None = Field(None, max_length=128, description="An assistant turn's tool calls.")
    tool_call_id: Text | None = Field(None, max_length=256, description="A `tool` message: the call it answers.")

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text for part in self.content)


class _SamplingFields(BaseModel):
    """Sampling parameters shared by chat and text completions.

    Nothing is silently dropped: a parameter this API does not implement is a 400 naming it (a client must
    not believe, say, JSON mode was applied when it was not). A parameter sent as `null` counts as not sent.
    """

    model_config = ConfigDict(extra="forbid")

    model: Text = Field(..., min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0.0, le=2.0)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    n: int = Field(1, ge=1, le=MAX_N)
    seed: int | None = Field(None, ge=INT64_MIN, le=INT64_MAX)
    stop: Text | list[Text] | None = None
    presence_penalty: float | None = Field(None, ge=-2.0, le=2.0)
    frequency_penalty: float | None = Field(None, ge=-2.0, le=2.0)
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: Text | None = Field(None, max_length=256, description="The tenant's own end user: kept on the ledger row (`/v1/usage?by_user=true`).")
    service_tier: Literal["auto", "default", "flex", "priority"] | None = Field(
        None,
        description="How fast the request is scheduled, at that tier's price: `priority` first, `flex` after `default` (at a "
        "discount); `auto` or none: the plan's default. A tier the plan does not offer is a 403. The response says the tier it ran at.",
    )
    ignore_eos: bool = Field(False, description="vLLM extension: keep generating past the end-of-sequence token (benchmarks).")
    # vLLM's sampling extras, passed to the engine (bounded as vLLM bounds them).
    top_k: int | None = Field(None, ge=-1, le=INT32_MAX, description="Sample from the k most likely tokens; 0 or -1 for all.")
    min_p: float | None = Field(None, ge=0.0, le=1.0, description="Drop tokens less likely than min_p times the most likely one.")
    repetition_penalty: float | None = Field(None, gt=0.0, le=2.0, description="Above 1 discourages tokens already in the prompt or output.")
    logit_bias: dict[str, float] | None = Field(None, description="Token id (as a string) -> bias added to its logit, -100 to 100.")
    response_format: dict[str, Any] | None = Field(
        None, description='{"type": "text"} (the default), {"type": "json_object"}, or {"type": "json_schema", "json_schema": {"name": ..., "schema": {...}}}: enforced by the engine.'
    )

    @model_validator(mode="before")
    @classmethod
    def _nulls_are_not_sent(cls, data: Any) -> Any:
        return {k: v for k, v in data.items() if v is not None} if isinstance(data, dict) else data

    @field_validator("logit_bias")
    @classmethod
    def _check_logit_bias(cls, value: dict[str, float] | None) -> dict[str, float] | None:
        for token, bias in (value or {}).items():
            if not token.isdigit():
                raise ValueError(f"keys are token ids as strings; got {token!r}")
            if not -100 <= bias <= 100:
                raise ValueError(f"biases are between -100 and 100; got {bias} for token {token}")
        return value

    @field_validator("response_format")
    @classmethod
    def _check_response_format(cls, value: dict[str, Any] | None) -> dict[str, Any] | None:
        if value is None:
            return None
        kind = value.get("type")
        if kind not in ("text", "json_object", "json_schema"):
            raise ValueError(f"type must be 'text', 'json_object' or 'json_schema'; got {kind!r}")
        if kind == "json_schema":
            spec = value.get("json_schema")
            if not isinstance(spec, dict) or not isinstance(spec.get("name"), str) or not spec["name"]:
                raise ValueError("json_schema must be an object with a non-empty `name` and a `schema`")
            schema = spec.get("schema", {"type": "object"})
            if not isinstance(schema, dict):
                raise ValueError("json_schema.schema must be a JSON Schema object")
            _check_schema(schema)
        return None if kind == "text" else value

    @field_validator("stop")
    @classmethod
    def _check_stop(cls, value: str | list[str] | None) -> list[str]:
        stops = [value] if isinstance(value, str) else list(value or [])
        if any(not s for s in stops):
            raise ValueError("stop sequences must be non-empty strings")
        return stops

    @model_validator(mode="after")
    def _check_stream_options(self) -> "_SamplingFields":
        if self.stream_options is not None and not self.stream:
            raise ValueError("stream_options is only allowed when stream is true")
        return self

    @field_validator("n")
    @classmethod
    def _n_needs_sampling(cls, n: int, info: Any) -> int:
        if n > 1 and info.data.get("temperature") == 0:
            raise ValueError("n > 1 needs sampling (temperature above 0): greedy decoding gives every choice the same text")
        return n

    @property
    def stop_list(self) -> list[str]:
        return list(self.stop or [])  # type: ignore[arg-type]

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)

    @property
    def token_bias(self) -> dict[int, float] | None:
        return {int(t): b for t, b in self.logit_bias.items()} if self.logit_bias else None


class FunctionDef(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field(..., pattern=r"^[A-Za-z0-9_-]{1,64}$")
    description: Text | None = None
    parameters: dict[str, Any] | None = Field(None, description="The arguments' JSON Schema (an object).")
    strict: bool | None = None

    @field_validator("parameters")
    @classmethod
    def _schema(cls, value: dict[str, Any] | None) -> dict[str, Any] | None:
        if value is not None:
            _check_schema(value, "parameters")
        return value


class ToolDef(BaseModel):
    model_config = ConfigDict(extra="forbid")

    type: Literal["function"]
    function: FunctionDef


class FunctionName(BaseModel):
    name: Text


class NamedToolChoice(BaseModel):
    type: Literal["function"]
    function: FunctionName


class ChatCompletionRequest(_SamplingFields):
    messages: list[ChatMessage] = Field(..., min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool = Field(False, strict=True, description="Return the logprob of each completion token.")
    top_logprobs: int | None = Field(None, ge=0, le=20, description="With logprobs: also the this many most likely tokens at each position.")
    tools: list[ToolDef] | None = Field(None, max_length=128, description="Functions the model may call (deployments.core.tools).")
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = Field(
        None, description="`auto` (the default with tools), `none`, `required`, or a named function; `required` and a named function are enforced by the engine."
    )
    parallel_tool_calls: bool = Field(True, description="With `required`: whether the answer may make more than one call.")

    @model_validator(mode="after")
    def _unsupported(self) -> "ChatCompletionRequest":
        if self.top_logprobs is not None and not self.logprobs:
            raise ValueError("top_logprobs needs logprobs set to true")
        return self  # tools and tool_choice together: `deployments.core.tools.check_tool_choice` (a 400 naming the parameter)

    @property
    def tool_dicts(self) -> list[dict[str, Any]] | None:
        return [t.model_dump(exclude_none=True) for t in self.tools] if self.tools else None

    @property
    def tool_choice_value(self) -> Any:
        return self.tool_choice.model_dump() if isinstance(self.tool_choice, NamedToolChoice) else self.tool_choice

    @property
    def engine_logprobs(self) -> int | None:
        """How many top logprobs to ask the engine for (None: none at all)."""
        return (self.top_logprobs or 0) if self.logprobs else None

    @property
    def token_limit(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens


class CompletionRequest(_SamplingFields):
    prompt: Text | list[Text] | list[int] | list[list[int]] = Field(
        ..., description=f"A text, a list of texts, token ids, or a list of token-id lists (at most {MAX_PROMPTS} prompts); each prompt's choices follow the previous one's."
    )
    max_tokens: int | None = Field(16, ge=0, description="Most tokens each completion may have (OpenAI's default 16); 0 only with `echo`, to score the prompt without a completion.")
    echo: bool = Field(False, description="The prompt's text comes before each completion; with `logprobs`, its tokens' logprobs too.")
    logprobs: int | None = Field(None, ge=0, le=20, description="Return each completion token's logprob and this many most likely tokens' (with `echo`, the prompt's tokens too).")
    suffix: str | None = None

    @field_validator("prompt")
    @classmethod
    def _check_prompts(cls, value: str | list[str] | list[int] | list[list[int]]) -> str | list[str] | list[int] | list[list[int]]:
        many = isinstance(value, list) and bool(value) and not isinstance(value[0], int)
        prompts = value if many else [value]
        if not prompts or len(prompts) > MAX_PROMPTS:
            raise ValueError(f"send between 1 and {MAX_PROMPTS} prompts; got {len(prompts)}")
        if any(not p for p in prompts):
            raise ValueError("a prompt must not be empty")
        return value

    @property
    def prompts(self) -> list[str | list[int]]:
        """The prompts, one per sub-request: a list of texts or token-id lists stays a list; a lone one becomes [it]."""
        p = self.prompt
        return list(p) if isinstance(p, list) and p and not isinstance(p[0], int) else [p]  # type: ignore[list-item]

    @model_validator(mode="after")
    def _unsupported(self) -> "CompletionRequest":
        if self.suffix:
            raise ValueError("suffix is not supported by this model")
        return self

    @property
    def engine_logprobs(self) -> int | None:
        return self.logprobs

    @property
    def prompt_logprobs(self) -> int | None:
        """How many top logprobs to ask for at each prompt token (`echo` with `logprobs`), else None."""
        return self.logprobs if self.echo else None

    @property
    def prompt_only(self) -> bool:
        """`echo` with max_tokens 0: the answer is the prompt alone (the engine still makes one token, as vLLM's does)."""
        return self.echo and self.max_tokens == 0

    @property
    def token_limit(self) -> int | None:
        return 1 if self.prompt_only else self.max_tokens


class KeyPolicy(BaseModel):
    """A key's own policy, inside its tenant's plan: the fields a new key may set and a key's update may change."""

    model_config = ConfigDict(extra="forbid")

    models: list[Annotated[str, Field(min_length=1, max_length=256)]] | None = Field(
        None, max_length=64, description="Models the key may call (403 `model_not_allowed` otherwise); all if null or empty."
    )
    monthly_budget: Decimal | None = Field(None, ge=0, le=10**12, decimal_places=10, description="The key's own monthly budget, inside its tenant's (null: none).")
    rpm: int | None = Field(None, ge=1, le=INT32_MAX, description="The key's own requests per minute, inside its tenant's (null: none).")
    tpm: int | None = Field(None, ge=1, le=INT32_MAX, description="The key's own tokens per minute, inside its tenant's (null: none).")
    metadata: dict[str, Any] | None = Field(None, description="Free-form JSON object kept with the key (at most 4096 characters).")


class KeyPolicyFields(KeyPolicy):
    """A new key's name, lifetime and own policy (POST /v1/keys: a tenant's own key)."""

    expires_in_s: float | None = Field(None, gt=0)
    name: str = Field("", max_length=128)

    def policy(self) -> dict[str, Any]:
        return {"models": self.models, "monthly_budget": self.monthly_budget, "rpm": self.rpm, "tpm": self.tpm, "metadata": self.metadata}


class UpdateKeyRequest(KeyPolicy):
    """Body of POST /v1/keys/{id} and /admin/keys/{id}: the fields sent replace the key's (null clears one); the others stay."""

    name: str | None = Field(None, max_length=128)

    def changes(self) -> dict[str, Any]:
        """Only the fields the body named (pydantic's `model_fields_set`), so that an omitted one stays as it is."""
        return {k: getattr(self, k) for k in self.model_fields_set}


class CreateKeyRequest(KeyPolicyFields):
    """Body of POST /admin/keys."""

    tenant: str = Field(..., min_length=1, max_length=128, pattern=TENANT_PATTERN)
    plan: str | None = Field(None, description="Plan of the tenant (kept if omitted, the default plan for a new tenant).")
    role: Literal["tenant", "admin"] = "tenant"


class TrafficChange(BaseModel):
    """Body of POST /admin/traffic: one change of the live traffic plan (what `maas models canary|promote|rollback` do)."""

    model_config = ConfigDict(extra="forbid")

    action: Literal["canary", "promote", "rollback"] = Field(..., description="canary: send `weight`% to `version`; promote: make it stable; rollback: undo.")
    version: str | None = Field(None, min_length=1, max_length=64, pattern=r"^v\d+$", description="The store version (canary; promote defaults to the canary).")
    weight: int | None = Field(None, ge=1, le=100, description="Percent of requests to the canary (canary only).")


class FineTuneHyperparameters(BaseModel):
    """OpenAI's hyperparameters; `auto` takes the server's default (`fine_tuning.*`)."""

    model_config = ConfigDict(extra="forbid")

    n_epochs: Annotated[int, Field(ge=1, le=50)] | Literal["auto"] = "auto"
    batch_size: Annotated[int, Field(ge=1, le=256)] | Literal["auto"] = "auto"
    learning_rate_multiplier: Annotated[float, Field(gt=0, le=100)] | Literal["auto"] = "auto"


class MethodSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")

    hyperparameters: FineTuneHyperparameters | None = None


class LoraSettings(MethodSettings):
    rank: int = Field(8, ge=1, le=512, description="Rank of the adapter (at most the engine's `max_lora_rank`).")
    alpha: float | None = Field(None, gt=0, le=10_000, description="Scale of the update (default: twice the rank).")


class FineTuneMethod(BaseModel):
    """`lora` (the default; OpenAI's `supervised` means the same here) or `full` (admin keys: the base model's next version)."""

    model_config = ConfigDict(extra="forbid")

    type: Literal["supervised", "lora", "full"]
    supervised: MethodSettings | None = None
    lora: LoraSettings | None = None
    full: MethodSettings | None = None


class CreateFineTuningJobRequest(BaseModel):
    """Body of POST /v1/fine_tuning/jobs (OpenAI's, with LoRA settings under `method`)."""

    model_config = ConfigDict(extra="forbid")

    model: str = Field(..., min_length=1, max_length=256)
    training_file: str = Field(..., min_length=1, max_length=64)
    validation_file: str | None = Field(None, min_length=1, max_length=64)
    suffix: str | None = Field(None, max_length=40, pattern=r"^[A-Za-z0-9_-]*$", description="Part of the fine-tuned model's id.")
    hyperparameters: FineTuneHyperparameters | None = None
    method: FineTuneMethod | None = None
    seed: int | None = Field(None, ge=0, le=2**31 - 1)
    metadata: dict[Annotated[str, Field(max_length=64)], Annotated[str, Field(max_length=512)]] | None = Field(None, max_length=16)
    integrations: list[Any] | None = Field(None, max_length=0, description="Not offered (must be empty).")


class EmbeddingRequest(BaseModel):
    """`POST /v1/embeddings`, OpenAI's shape: a vector per input, in order."""

    model_config = ConfigDict(extra="forbid")

    model: Text = Field(..., min_length=1)
    input: Text | list[Text] | list[int] | list[list[int]] = Field(
        ..., description="A text, a list of texts, a list of token ids, or a list of token-id lists (at most 2048 inputs); one vector each."
    )
    encoding_format: Literal["float", "base64"] = Field("float", description="`float`: lists of numbers; `base64`: little-endian float32 bytes, base64-encoded.")
    dimensions: int | None = Field(None, ge=1, description="The vectors' size: accepted only where the model gives it (its own size).")
    user: Text | None = Field(None, max_length=256, description="Your end user's id, kept on the request's ledger row.")


class CreateBatchRequest(BaseModel):
    """`POST /v1/batches`: run every request of an uploaded JSONL file (`purpose=batch`) at the batch tier, within 24 hours."""

    model_config = ConfigDict(extra="forbid")

    input_file_id: Text = Field(..., max_length=64, description="The uploaded file (`purpose=batch`): one request per line.")
    endpoint: Literal["/v1/chat/completions", "/v1/completions", "/v1/embeddings"] = Field(..., description="Every line's `url`.")
    completion_window: Literal["24h"] = Field(..., description="Lines not run within it end the batch `expired`.")
    metadata: dict[str, Text] | None = Field(None, max_length=16, description="Up to 16 key-value pairs, kept with the batch.")
