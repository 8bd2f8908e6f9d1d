"""Model version lifecycle on a running cluster: deploy the versions a plan needs, switch traffic, retire the rest.

Every change follows the same order, so no request is dropped:

1. the new plan is computed (pure, `deployments.core.traffic`) and checked against the store;
2. every version it needs is deployed as its own Serve application and is RUNNING;
3. the plan file is replaced (ingress replicas follow it within `model.traffic_poll_s`);
4. after the replicas have switched (plus a grace period), versions no longer needed are
   deleted; Serve drains them, so requests already streaming finish on the version they
   started on (up to `model.drain_timeout_s`).

Each change is written to the audit log when billing is on.  Needs a connected Ray.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from dataclasses import replace
from typing import Callable

from common.config import MaasConfig
from common.model_store import open_store
from deployments.app import build_app, build_version_app
from deployments.core.traffic import TrafficError, TrafficFile, TrafficPlan, canary, promote, rollback, version_app_name

logger = logging.getLogger(__name__)

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja")
SWITCH_GRACE_S = 5.0  # beyond the poll interval, before a retired version is deleted


def traffic_file(config: MaasConfig) -> TrafficFile:
    return TrafficFile(config.store_root(), config.app_name, config.model.name)


def plan_from_config(config: MaasConfig, existing: TrafficPlan | None, latest: str, who: str, now: float) -> TrafficPlan:
    """The plan a deploy starts from: the live one, unless the config names versions explicitly (pure)."""
    pinned = config.model.version if config.model.version != "latest" else None
    wanted_canary = config.model.canary
    if existing is None:
        plan = TrafficPlan(config.model.name, stable=pinned or latest, revision=1, action="deploy", updated_by=who, updated_at=now)
    elif (pinned and pinned != existing.stable) or (wanted_canary and (wanted_canary.version, wanted_canary.weight) != (existing.canary, existing.canary_weight)):
        plan = replace(existing, stable=pinned or existing.stable, canary=None, canary_weight=0, previous=None, revision=existing.revision + 1, action="deploy", updated_by=who, updated_at=now)
    else:
        return existing
    if wanted_canary:
        plan = replace(plan, canary=wanted_canary.version, canary_weight=wanted_canary.weight)
    return plan


def _latest(config: MaasConfig) -> str:
    return open_store(config.store_root()).resolve(config.model.name, "latest").version


def planned_versions(config: MaasConfig) -> list[str]:
    """The versions a deploy of `config` would serve (the live plan, or the config's), without writing anything."""
    return plan_from_config(config, traffic_file(config).load(), _latest(config), "plan", 0.0).deployed()


def ensure_plan(config: MaasConfig, who: str = "deploy") -> TrafficPlan:
    """Create or update the live plan from the config (see `plan_from_config`); every version in it must exist."""
    latest = _latest(config)

    def change(current: TrafficPlan | None) -> TrafficPlan:
        plan = plan_from_config(config, current, latest, who, time.time())
        check_versions(config, plan)
        return plan

    before, after = traffic_file(config).update(change)
    if before != after:
        logger.info("traffic plan for %s: %s", config.model.name, after.weights())
    return after


def tokenizer_fingerprint(path) -> str:
    digest = hashlib.sha256()
    for name in TOKENIZER_FILES:
        f = path / name
        if f.exists():
            data = json.loads(f.read_text()) if f.suffix == ".json" else f.read_text()
            if isinstance(data, dict):  # ignore bookkeeping that save_pretrained may rewrite
                data = {k: v for k, v in data.items() if k not in ("name_or_path", "tokenizer_file")}
            digest.update(name.encode() + json.dumps(data, sort_keys=True).encode())
    return digest.hexdigest()


def check_versions(config: MaasConfig, plan: TrafficPlan) -> None:
    """Every version exists, has a price when billing is on, and shares the stable version's tokenizer and chat template."""
    store = open_store(config.store_root())
    stable = store.resolve(plan.model, plan.stable)
    expected = tokenizer_fingerprint(stable.path)
    for version in plan.deployed():
        mv = store.resolve(plan.model, version)
        if config.billing.enabled:
            config.billing.price_book.price_for(plan.model, version)
        if tokenizer_fingerprint(mv.path) != expected:
            raise TrafficError(
                f"{plan.model} {version} has a different tokenizer or chat template from {plan.stable}; "
                "versions of one public model must share them (publish it under another model name)."
            )


def _running_apps() -> dict[str, str]:
    from ray import serve

    return {name: str(getattr(s.status, "value", s.status)) for name, s in serve.status().applications.items()}


def deploy_versions(config: MaasConfig, versions: list[str], timeout_s: float = 900) -> None:
    """Deploy each version's application unless it already runs; wait until all are RUNNING."""
    from ray import serve

    apps = _running_apps()
    targets = [
        serve.RunTarget(build_version_app(config, v), name=version_app_name(config.app_name, config.model.name, v), route_prefix=None)
        for v in versions
        if version_app_name(config.app_name, config.model.name, v) not in apps
    ]
    if targets:
        logger.info("deploying %s", ", ".join(t.name for t in targets))
        serve.run_many(targets, wait_for_applications_running=False)
    names = [version_app_name(config.app_name, config.model.name, v) for v in versions]
    deadline = time.monotonic() + timeout_s
    while True:
        apps = _running_apps()
        failed = [n for n in names if apps.get(n) in ("DEPLOY_FAILED", "UNHEALTHY")]
        if failed:
            raise RuntimeError(f"Serve could not start {', '.join(failed)} (see `serve status`).")
        if all(apps.get(n) == "RUNNING" for n in names):
            return
        if time.monotonic() > deadline:
            raise TimeoutError(f"versions not RUNNING within {timeout_s}s: { {n: apps.get(n) for n in names} }")
        time.sleep(1.0)


def retire_versions(config: MaasConfig, keep: list[str]) -> list[str]:
    """Delete (draining) the version applications of this model that `keep` does not list."""
    from ray import serve

    prefix = version_app_name(config.app_name, config.model.name, "")
    wanted = {version_app_name(config.app_name, config.model.name, v) for v in keep}
    gone = [name for name in _running_apps() if name.startswith(prefix) and name not in wanted]
    for name in gone:
        logger.info("retiring %s (in-flight requests finish first)", name)
        serve.delete(name, _blocking=False)
    return gone


def apply_change(config: MaasConfig, change: Callable[[TrafficPlan], TrafficPlan], who: str, timeout_s: float = 900) -> tuple[TrafficPlan, TrafficPlan]:
    """Steps 1-4 of the module docstring for one change; returns (before, after)."""
    tf = traffic_file(config)
    current = tf.load()
    if current is None:
        raise TrafficError(f"{config.model.name} is not deployed in application {config.app_name!r} (no traffic plan).")
    planned = change(current)
    check_versions(config, planned)
    deploy_versions(config, planned.deployed(), timeout_s)

    def swap(live: TrafficPlan | None) -> TrafficPlan:
        if live != current:
            raise TrafficError("The traffic plan changed meanwhile (another operator?); run the command again.")
        return planned

    tf.update(swap)
    logger.info("%s: %s -> %s", planned.action, current.weights(), planned.weights())
    _audit(config, who, planned, current)
    time.sleep(2 * config.model.traffic_poll_s + SWITCH_GRACE_S)
    retire_versions(config, planned.deployed())
    return current, planned


def deploy_all(config: MaasConfig, who: str = "deploy", timeout_s: float = 900) -> TrafficPlan:
    """A full deploy: the plan from the config, its versions, then the front application (used by `maas serve`/`up`)."""
    from ray import serve

    before = traffic_file(config).load()
    plan = ensure_plan(config, who)
    if before != plan:
        _audit(config, who, plan, before)
    deploy_versions(config, plan.deployed(), timeout_s)
    serve.run(build_app(config, plan.stable), name=config.app_name, route_prefix=config.route_prefix)
    retire_versions(config, plan.deployed())
    return plan


def _audit(config: MaasConfig, who: str, plan: TrafficPlan, before: TrafficPlan | None) -> None:
    if not config.billing.enabled:
        return
    from billing import actor
    from billing.admin import wait

    detail = json.dumps({"before": before.weights() if before else None, "after": plan.weights(), "previous": plan.previous, "revision": plan.revision})
    try:
        wait(actor.admin_client(actor.get_or_create(config.billing)).record_audit(who, f"model.{plan.action}", plan.model, detail), timeout_s=30)
    except Exception:
        logger.exception("could not write the audit entry for %s", plan.action)


def do_canary(config: MaasConfig, version: str, weight: int, who: str) -> TrafficPlan:
    return apply_change(config, lambda p: canary(p, version, weight, who, time.time()), who)[1]


def do_promote(config: MaasConfig, version: str | None, who: str) -> TrafficPlan:
    return apply_change(config, lambda p: promote(p, version, who, time.time()), who)[1]


def do_rollback(config: MaasConfig, who: str) -> TrafficPlan:
    return apply_change(config, lambda p: rollback(p, who, time.time()), who)[1]
