"""Prompt preparation and the context-window check."""

import pytest

from common.errors import ContextLengthExceededError, InvalidRequestError
import asyncio

from deployments.core.tokenizer import NearTokenizer, PromptTokenizer, fit_context
from tests.fakes import EOS, ByteTokenizer


def test_fit_context_defaults_to_the_room_left():
    assert fit_context(10, None, 100) == 90
    assert fit_context(10, 90, 100) == 90


def test_fit_context_rejects_past_the_window():
    with pytest.raises(ContextLengthExceededError) as err:
        fit_context(10, 91, 100)
    assert err.value.status_code == 400 and err.value.code == "context_length_exceeded" and err.value.param == "max_tokens"
    with pytest.raises(ContextLengthExceededError):
        fit_context(100, None, 100)


def test_prepare_chat_and_completion():
    tok = PromptTokenizer(ByteTokenizer(), max_model_len=64)
    chat = tok.prepare_chat([{"role": "user", "content": "hi"}], None)
    assert chat.prompt_token_ids == ByteTokenizer().encode("<user>hi\n<assistant>")
    assert chat.max_tokens == 64 - chat.num_prompt_tokens and chat.stop_token_ids == [EOS]
    assert tok.prepare_completion([104, 105], 5).prompt_token_ids == [104, 105]
    with pytest.raises(InvalidRequestError):
        tok.prepare_completion([999], 5)
    with pytest.raises(ContextLengthExceededError):
        tok.prepare_completion("x" * 70, None)


def test_engine_validation_errors_become_400s_and_server_faults_do_not():
    from common.errors import InvalidRequestError
    from deployments.core.generator import client_error

    class VLLMClientError(Exception):  # stands for vllm.exceptions.VLLMClientError (matched by name, no vLLM import)
        pass

    class VLLMValidationError(VLLMClientError):
        def __init__(self, message: str, parameter: str | None = None):
            super().__init__(message)
            self.parameter = parameter

    err = client_error(VLLMValidationError("seed out of range", parameter="seed"))
    assert isinstance(err, InvalidRequestError) and err.status_code == 400 and err.param == "seed"
    assert client_error(ValueError("top_k must be -1 or at least 1")).status_code == 400
    assert client_error(RuntimeError("engine dead")) is None


class _Stage:
    """The tokenizer stage's interface over the same logic, counting its calls."""

    def __init__(self, logic: PromptTokenizer):
        self.logic, self.calls = logic, 0

    async def prepare_chat(self, messages, max_tokens, request_id=""):
        self.calls += 1
        return self.logic.prepare_chat(messages, max_tokens)

    async def prepare_completion(self, prompt, max_tokens, request_id=""):
        self.calls += 1
        return self.logic.prepare_completion(prompt, max_tokens)


def test_near_tokenizer_keeps_short_prompts_local_and_sends_long_ones_to_the_stage_with_the_same_result():
    logic = PromptTokenizer(ByteTokenizer(), max_model_len=256)
    stage = _Stage(logic)
    near = NearTokenizer(logic, stage, max_chars=10)
    short, long = [{"role": "user", "content": "hi"}], [{"role": "user", "content": "x" * 11}]
    assert asyncio.run(near.prepare_chat(short, None)) == logic.prepare_chat(short, None)
    assert asyncio.run(near.prepare_completion("hello", 5)) == logic.prepare_completion("hello", 5)
    assert stage.calls == 0 and near.inline == 2
    assert asyncio.run(near.prepare_chat(long, None)) == logic.prepare_chat(long, None)
    assert asyncio.run(near.prepare_completion("y" * 11, 5)) == logic.prepare_completion("y" * 11, 5)
    assert stage.calls == 2 and near.remote == 2
    with pytest.raises(InvalidRequestError):  # the same errors either way
        asyncio.run(near.prepare_completion([999], 5))
    off = NearTokenizer(logic, stage, max_chars=0)  # 0: every prompt goes to the stage
    asyncio.run(off.prepare_completion("hi", 5))
    assert stage.calls == 3 and off.inline == 0
