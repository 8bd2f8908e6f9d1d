"""Embeddings without Ray: OpenAI's input shapes, the embedder over a fake pooling engine, and the route billed
through the real BillingClient (the real engine is tested in tests/integration/test_embeddings.py)."""

from __future__ import annotations

import asyncio
import base64
import struct
import time
from decimal import Decimal

import openai
import pytest

from common.errors import ContextLengthExceededError, InvalidRequestError
from deployments.core.embedder import Embedder
from deployments.core.embeddings import encode_vector, items_of, token_bound, tokenize
from deployments.openai.service import EmbeddingBackend, EmbeddingModel, StaticPicker
from tests.fakes import ByteTextTokenizer, HashPoolingEngine, ScriptedEngine
from tests.unit.test_metering import Server, _events


def test_every_openai_input_shape_becomes_one_item_per_vector_and_bad_ones_name_input():
    assert items_of("hi") == ["hi"]
    assert items_of(["a", "b"]) == ["a", "b"]
    assert items_of([1, 2, 3]) == [[1, 2, 3]]
    assert items_of([[1], [2, 3]]) == [[1], [2, 3]]
    for bad in ([], [""], ["a", [1]], [[1], []], [True, 1], ["x"] * 2049):
        with pytest.raises(InvalidRequestError) as err:
            items_of(bad)
        assert err.value.param == "input"


def test_the_reserved_bound_covers_the_tokens_and_long_inputs_are_refused_not_cut():
    tok = ByteTextTokenizer()
    items = ["héllo wörld", [5, 6, 7], "x"]
    ids = tokenize(items, tok, max_model_len=64)
    assert ids[1] == [5, 6, 7] and ids[0][0] == 255 and ids[0][-1] == 256
    assert sum(map(len, ids)) <= token_bound(items)
    with pytest.raises(ContextLengthExceededError) as err:
        tokenize(["y" * 70], tok, max_model_len=64)
    assert err.value.param == "input" and err.value.status_code == 400
    with pytest.raises(InvalidRequestError):
        tokenize([[999]], tok, max_model_len=64)


def test_base64_is_little_endian_float32_as_openais_clients_decode_it():
    vector = [0.5, -1.25, 3.0]
    raw = base64.b64decode(encode_vector(vector, "base64"))
    assert list(struct.unpack("<3f", raw)) == vector
    assert encode_vector(vector, "float") == vector


def test_the_embedder_counts_tokens_reports_its_witness_and_refuses_a_size_it_cannot_give():
    reports = []
    embedder = Embedder(ByteTextTokenizer(), HashPoolingEngine(dims=8), 64, on_end=lambda rid, ctx, n: reports.append((rid, ctx, n)))

    async def main():
        assert await embedder.warm_up() == 8
        out = await embedder.embed("r1", ["ab", [1, 2, 3]], billing="ctx")
        with pytest.raises(InvalidRequestError) as err:
            await embedder.embed("r2", ["ab"], dimensions=4)
        return out, err.value

    out, err = asyncio.run(main())
    assert out.prompt_tokens == 4 + 3 and len(out.vectors) == 2 and len(out.vectors[0]) == 8
    assert reports[-1] == ("r1", "ctx", 7)  # the warm-up is not billed (no context), r2 never ran
    assert err.param == "dimensions"


class _SlowClient:
    """An embedding deployment that never answers in time (a model scaled to zero, still starting)."""

    async def embed(self, request_id, items, billing=None, dimensions=None):
        await asyncio.sleep(30)


def test_embeddings_through_the_route_are_billed_at_the_engines_count_with_the_openai_client(tmp_path):
    price_per_1m = Decimal("0.25")
    from common.config import Price

    price = Price(prompt_per_1m=price_per_1m, completion_per_1m=Decimal("0"))
    logic = Embedder(ByteTextTokenizer(), HashPoolingEngine(dims=8), 64, dimensions=8)
    models = [EmbeddingModel("emb", StaticPicker(EmbeddingBackend("v1", logic, price))), EmbeddingModel("cold", StaticPicker(EmbeddingBackend("v1", _SlowClient(), price)), wait_s=0.3)]
    with Server(tmp_path, ScriptedEngine(), embedding_models=models) as srv:
        client = openai.OpenAI(base_url=f"{srv.base}/v1", api_key=srv.key, max_retries=0)
        listed = {m.id: m.model_extra for m in client.models.list().data}
        assert listed["emb"]["capabilities"]["embeddings"] and not listed["emb"]["capabilities"]["chat"]
        got = client.embeddings.create(model="emb", input=["hello", "world!"], user="u-7")
        assert [d.index for d in got.data] == [0, 1] and len(got.data[0].embedding) == 8
        assert got.usage.prompt_tokens == got.usage.total_tokens == (5 + 2) + (6 + 2)
        b64 = client.embeddings.create(model="emb", input="hello", encoding_format="base64")
        decoded = struct.unpack("<8f", base64.b64decode(b64.data[0].embedding))
        assert list(decoded) == pytest.approx(got.data[0].embedding, abs=1e-6)
        with pytest.raises(openai.BadRequestError) as err:
            client.embeddings.create(model="emb", input="hello", dimensions=4)
        assert err.value.body["param"] == "dimensions"
        with pytest.raises(openai.NotFoundError):
            client.embeddings.create(model="m", input="hello")  # the chat model does not embed
        t0 = time.monotonic()
        with pytest.raises(openai.InternalServerError) as err:
            client.embeddings.create(model="cold", input="hello")
        assert err.value.status_code == 503 and err.value.response.headers["retry-after"] and time.monotonic() - t0 < 5
        rows = [e for e in _events(srv.core, n=3) if e.model == "emb"]
    ok = sorted((e for e in rows if e.status == "ok"), key=lambda e: e.prompt_tokens)
    assert [e.prompt_tokens for e in ok] == [7, 15] and all(e.completion_tokens == 0 for e in ok)
    assert ok[1].amount() == Decimal(15) * price_per_1m / 1_000_000 and ok[1].end_user == "u-7"
