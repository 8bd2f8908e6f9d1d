"""Pydantic models of the OpenAI requests ray-maas accepts, with their validation rules.

Only request bodies are modelled: responses are built as plain dicts by the
postprocessor (`deployments.core.shapes`), which is the hot path.  Values are
bounded as vLLM's own server bounds them (e.g. `seed` to int64), and text must be
valid Unicode (a lone surrogate cannot be tokenized).  Limits that depend on the
deployment (prompt size, message and stop-string counts) are the service's
(`common.config.RequestLimits`).
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, field_validator, model_validator

from billing.keys import TENANT_PATTERN

MAX_N = 16
INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1  # vLLM's bounds for `seed`
INT32_MAX = 2**31 - 1


def _utf8(value: str) -> str:
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise ValueError(f"text is not valid Unicode (a lone surrogate at position {exc.start})") from None
    return value


Text = Annotated[str, AfterValidator(_utf8)]


class StreamOptions(BaseModel):
    include_usage: bool = Field(False, description="Send a last chunk with token usage before [DONE].")


class TextContentPart(BaseModel):
    type: Literal["text"]
    text: Text


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")

    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: Text | list[TextContentPart] | None = None
    name: Text | None = None

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
    user: Text | None = None
    ignore_eos: bool = Field(False, description="vLLM extension: keep generating past the end-of-sequence token (benchmarks).")
    # vLLM's sampling extras, passed to the engine (bounded as vLLM bounds them).
    top_k: int | None = Field(None, ge=-1, le=INT32_MAX, description="Sample from the k most likely tokens; 0 or -1 for all.")
    min_p: float | None = Field(None, ge=0.0, le=1.0, description="Drop tokens less likely than min_p times the most likely one.")
    repetition_penalty: float | None = Field(None, gt=0.0, le=2.0, description="Above 1 discourages tokens already in the prompt or output.")
    logit_bias: dict[str, float] | None = Field(None, description="Token id (as a string) -> bias added to its logit, -100 to 100.")
    response_format: dict[str, Any] | None = Field(None, description="Only {\"type\": \"text\"} (the default) is implemented so far.")

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
    def _text_only(cls, value: dict[str, Any] | None) -> dict[str, Any] | None:
        if value is not None and value.get("type", "text") != "text":
            raise ValueError(f"response_format {value.get('type')!r} is not supported yet; only 'text' is")
        return value

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

    @property
    def stop_list(self) -> list[str]:
        return list(self.stop or [])  # type: ignore[arg-type]

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)

    @property
    def token_bias(self) -> dict[int, float] | None:
        return {int(t): b for t, b in self.logit_bias.items()} if self.logit_bias else None


class ChatCompletionRequest(_SamplingFields):
    messages: list[ChatMessage] = Field(..., min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool | None = None
    top_logprobs: int | None = None
    tools: list[Any] | None = None

    @model_validator(mode="after")
    def _unsupported(self) -> "ChatCompletionRequest":
        if self.logprobs or self.top_logprobs:
            raise ValueError("logprobs are not supported yet")
        if self.tools:
            raise ValueError("tools are not supported by this model")
        return self

    @property
    def token_limit(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens


class CompletionRequest(_SamplingFields):
    prompt: Text | list[Text] | list[int] = Field(...)
    max_tokens: int | None = Field(16, ge=1)  # OpenAI's default for text completions
    echo: bool = False
    logprobs: int | None = None
    suffix: str | None = None

    @field_validator("prompt")
    @classmethod
    def _one_prompt(cls, value: str | list[str] | list[int]) -> str | list[int]:
        if isinstance(value, list):
            if not value:
                raise ValueError("prompt must not be empty")
            if all(isinstance(v, str) for v in value):
                if len(value) != 1:
                    raise ValueError("only one prompt per request is supported; send one request per prompt")
                return value[0]
        if isinstance(value, str) and not value:
            raise ValueError("prompt must not be empty")
        return value

    @model_validator(mode="after")
    def _unsupported(self) -> "CompletionRequest":
        if self.echo or self.logprobs or self.suffix:
            raise ValueError("echo, logprobs and suffix are not supported yet")
        return self

    @property
    def token_limit(self) -> int | None:
        return self.max_tokens


class CreateKeyRequest(BaseModel):
    """Body of POST /admin/keys."""

    model_config = ConfigDict(extra="forbid")

    tenant: str = Field(..., min_length=1, max_length=128, pattern=TENANT_PATTERN)
    plan: str | None = Field(None, description="Plan of the tenant (kept if omitted, the default plan for a new tenant).")
    role: Literal["tenant", "admin"] = "tenant"
    expires_in_s: float | None = Field(None, gt=0)
    name: str = Field("", max_length=128)
