"""Traffic plans as pure decisions, the exact split, the live plan file, and how a deploy starts from config (no Ray)."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest

from cluster.versions import check_versions, plan_from_config
from common.config import load_config
from common.model_store import LocalModelStore
from deployments.core.traffic import SmoothWeightedPicker, TrafficError, TrafficFile, TrafficFollower, TrafficPlan, canary, promote, rollback

M = "m"


def test_canary_promote_rollback_walk():
    p0 = TrafficPlan(M, stable="v1", revision=1)
    p1 = canary(p0, "v2", 10, "ops", 5.0)
    assert p1.weights() == {"v1": 90, "v2": 10} and p1.deployed() == ["v1", "v2"]
    assert (p1.revision, p1.action, p1.updated_by, p1.updated_at) == (2, "canary", "ops", 5.0)
    p2 = promote(p1)
    assert p2.weights() == {"v2": 100} and p2.previous == "v1" and p2.deployed() == ["v2", "v1"]  # rollback target kept warm
    p3 = rollback(p2)
    assert p3.weights() == {"v1": 100} and p3.previous is None and p3.deployed() == ["v1"]
    with pytest.raises(TrafficError):
        rollback(p3)  # nothing left to undo


def test_rollback_of_a_canary_keeps_the_stable_and_its_rollback_target():
    p = promote(canary(TrafficPlan(M, "v1"), "v2", 50))
    p = canary(p, "v3", 20)
    assert p.previous is None  # a new canary moves forward: v1 is no longer kept
    p = rollback(p)
    assert p.weights() == {"v2": 100} and p.deployed() == ["v2"]


@pytest.mark.parametrize("bad", [0, 101, -5])
def test_canary_weight_bounds(bad):
    with pytest.raises(TrafficError):
        canary(TrafficPlan(M, "v1"), "v2", bad)


def test_errors_say_what_is_wrong():
    with pytest.raises(TrafficError, match="already the stable"):
        canary(TrafficPlan(M, "v1"), "v1", 10)
    with pytest.raises(TrafficError, match="no canary to promote"):
        promote(TrafficPlan(M, "v1"))
    assert promote(TrafficPlan(M, "v1"), "v3").weights() == {"v3": 100}  # promote a named version directly
    assert canary(TrafficPlan(M, "v1"), "v2", 100).weights() == {"v2": 100}


def test_smooth_weighted_round_robin_is_exact_and_interleaved():
    picker = SmoothWeightedPicker({"v1": 90, "v2": 10})
    picks = [picker.pick() for _ in range(100)]
    assert Counter(picks) == {"v1": 90, "v2": 10}
    assert max(len(run) for run in "".join("a" if p == "v1" else "b" for p in picks).split("b")) <= 10  # spread, not a burst
    half = SmoothWeightedPicker({"v1": 50, "v2": 50})
    assert [half.pick() for _ in range(4)] in (["v1", "v2", "v1", "v2"], ["v2", "v1", "v2", "v1"])


def test_traffic_file_update_is_atomic_and_followed(tmp_path):
    tf = TrafficFile(tmp_path, "app", M)
    assert tf.load() is None and tf.stamp() is None
    tf.update(lambda cur: TrafficPlan(M, "v1", revision=1))
    made: list[str] = []
    follower = TrafficFollower(tf, lambda v: made.append(v) or f"backend-{v}")
    assert follower.pick() == "backend-v1" and not follower.refresh()
    before, after = tf.update(lambda cur: canary(cur, "v2", 50))
    assert before.weights() == {"v1": 100} and after.revision == 2
    assert follower.refresh() and Counter(follower.pick() for _ in range(10)) == {"backend-v1": 5, "backend-v2": 5}
    assert made == ["v1", "v2"]  # backends are built once per version
    assert not list(tf.path.parent.glob("*.tmp-*"))
    assert json.loads(tf.path.read_text())["canary"] == "v2"


def test_a_failed_change_leaves_the_plan_untouched(tmp_path):
    tf = TrafficFile(tmp_path, "app", M)
    tf.update(lambda cur: TrafficPlan(M, "v1", revision=1))
    with pytest.raises(TrafficError):
        tf.update(lambda cur: promote(cur))
    assert tf.load() == TrafficPlan(M, "v1", revision=1)


def test_follower_without_a_plan_answers_503(tmp_path):
    from common.errors import EngineNotReadyError

    follower = TrafficFollower(TrafficFile(tmp_path, "app", M), lambda v: v)
    with pytest.raises(EngineNotReadyError):
        follower.pick()


def _config(**model):
    return load_config(overrides={"model": {"name": M, **model}, "billing": {"enabled": False}})


def test_a_deploy_keeps_the_live_plan_unless_the_config_names_versions():
    live = promote(canary(TrafficPlan(M, "v1", revision=1), "v2", 10))
    assert plan_from_config(_config(), None, "v3", "d", 1.0).weights() == {"v3": 100}  # first deploy pins latest
    assert plan_from_config(_config(), live, "v3", "d", 1.0) is live  # `latest` keeps the operator's decisions
    pinned = plan_from_config(_config(version="v1"), live, "v3", "d", 1.0)
    assert pinned.weights() == {"v1": 100} and pinned.revision == live.revision + 1 and pinned.previous is None
    with_canary = plan_from_config(_config(version="v1", canary={"version": "v2", "weight": 25}), None, "v3", "d", 1.0)
    assert with_canary.weights() == {"v1": 75, "v2": 25}


def _version(store: LocalModelStore, template: str, tmp_path: Path, name: str) -> None:
    src = tmp_path / name
    src.mkdir()
    (src / "config.json").write_text("{}")
    (src / "tokenizer_config.json").write_text(json.dumps({"chat_template": template, "name_or_path": str(src)}))
    store.publish(M, src, {})


def test_versions_must_share_the_tokenizer(tmp_path):
    store = LocalModelStore(tmp_path / "store")
    _version(store, "A", tmp_path, "a")
    _version(store, "A", tmp_path, "b")  # same template, different name_or_path: compatible
    _version(store, "B", tmp_path, "c")
    config = load_config(overrides={"model": {"name": M}, "model_store": {"root": str(store.root)}, "billing": {"enabled": False}})
    check_versions(config, canary(TrafficPlan(M, "v1"), "v2", 10))
    with pytest.raises(TrafficError, match="different tokenizer"):
        check_versions(config, canary(TrafficPlan(M, "v1"), "v3", 10))
    with pytest.raises(Exception, match="no version"):
        check_versions(config, canary(TrafficPlan(M, "v1"), "v9", 10))
