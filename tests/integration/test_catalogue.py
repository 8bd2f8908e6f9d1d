"""Two chat models in one cluster (the real engine twice): each with its own tokenizer, versions, traffic plan and price.

The second chat model is the default model's weights published under another name (what is under test is that
the catalogue serves, routes, bills and rolls out each model on its own, not a second architecture). The module
serves from a store of its own, so its plans never reach other modules; the embedding model is left out of its
config (test_serving covers it).
"""

from __future__ import annotations

import json
from decimal import Decimal

import httpx
import openai
import pytest

from common.model_store import METADATA_FILE
from tests.integration.conftest import linked_store, linked_version, wait_for

pytestmark = pytest.mark.integration
MAIN, SECOND = "SmolLM2-135M-Instruct", "SmolLM2-second"
ASK = [{"role": "user", "content": "Name a colour."}]


def _publish_as(root, source: str, name: str) -> None:
    """`source`'s v1 under another model name (links to the same files), as `maas models publish` would hold it."""
    src, dst = root / source / "v1", root / name / "v1"
    dst.mkdir(parents=True)
    for f in src.iterdir():
        if f.name != METADATA_FILE:
            (dst / f.name).symlink_to(f.resolve())
    meta = json.loads((src / METADATA_FILE).read_text())
    (dst / METADATA_FILE).write_text(json.dumps({**meta, "name": name, "version": "v1"}))


@pytest.fixture(scope="module")
def store_root(tmp_path_factory):
    root = linked_store(tmp_path_factory)
    _publish_as(root, MAIN, SECOND)
    return root


@pytest.fixture(scope="module")
def config_overrides(store_root) -> dict:
    return {
        "model_store": {"root": str(store_root)},
        # Its generators ask for less CPU than the main model's (0.5), so that its canary's stages fit the 2 CPUs too.
        # (Scaling to zero is tested on the embedding model, test_serving, and the stream's bound in tests/unit.)
        "models": [{"name": SECOND, "task": "chat", "engine": {"max_num_seqs": 8}, "deployment": {"num_cpus": 0.2}}],
        "billing": {"price_book": {"models": {SECOND: {"prompt_per_1m": "0.10", "completion_per_1m": "0.40"}}}},
    }


def _usage(base_url: str, key: str) -> dict:
    return httpx.get(base_url + "/usage", headers={"Authorization": f"Bearer {key}"}).json()


def test_both_chat_models_are_listed_and_answer_each_on_its_own_engine_at_its_own_price(base_url, client, api_key, maas_config):
    listed = {m.id: m.model_extra for m in client.models.list().data}
    assert list(listed) == [MAIN, SECOND] and listed[SECOND]["pricing"]["completion_per_1m"] == "0.40"
    assert listed[SECOND]["capabilities"]["chat"] and not listed[SECOND]["capabilities"]["fine_tuning"]  # no training price
    one = client.chat.completions.create(model=MAIN, messages=ASK, max_tokens=4, temperature=0)
    two = wait_for(lambda: _answer(client, SECOND), timeout_s=240)  # 503 until the ingress has seen its engine ready
    streamed = list(client.chat.completions.create(model=SECOND, messages=ASK, max_tokens=4, temperature=0, stream=True))
    assert one.model == MAIN and two.model == SECOND and streamed[0].model == SECOND
    assert two.choices[0].message.content == one.choices[0].message.content  # the same weights, greedy
    report = wait_for(lambda: (u := _usage(base_url, api_key)) and u["total"]["requests"] >= 3 and u)
    by_model = {}
    for row in report["data"]:
        by_model.setdefault(row["model"], []).append(row)
    second = by_model[SECOND]
    cost = sum(Decimal(r["cost"]) for r in second)
    tokens = (sum(r["prompt_tokens"] for r in second), sum(r["completion_tokens"] for r in second))
    assert cost == (Decimal("0.10") * tokens[0] + Decimal("0.40") * tokens[1]) / 1_000_000


def test_the_second_models_canary_and_rollback_leave_the_main_model_alone(client, maas_config, store_root):
    from deployments import fleet

    linked_version(store_root, SECOND, "v2")  # published after the deploy, as a fine-tune's would be
    view = maas_config.for_model(SECOND)
    fleet.do_canary(view, "v2", 50, who="test")
    seen = {client.chat.completions.create(model=SECOND, messages=ASK, max_tokens=2, temperature=0).system_fingerprint for _ in range(12)}
    main = {client.chat.completions.create(model=MAIN, messages=ASK, max_tokens=2, temperature=0).system_fingerprint for _ in range(4)}
    assert any("v2" in (f or "") for f in seen) and any("v1" in (f or "") for f in seen)
    assert all("v2" not in (f or "") for f in main)
    assert fleet.traffic_file(maas_config).load().weights() == {"v1": 100}
    fleet.do_rollback(view, who="test")
    assert fleet.traffic_file(view).load().weights() == {"v1": 100}


def _answer(client, model: str):
    """A chat answer, or None while the model's engine is still starting (503)."""
    try:
        return client.chat.completions.create(model=model, messages=ASK, max_tokens=4, temperature=0)
    except openai.InternalServerError as exc:
        if exc.status_code != 503:
            raise
        return None
