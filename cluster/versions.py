"""Deploys from a config: the traffic plan a deploy starts from, and a full deploy of the front and version applications.

The version lifecycle itself (canary, promote, rollback; deploy, switch, retire) is
`deployments.fleet`, re-exported here for the CLI.  Needs a connected Ray.
"""

from __future__ import annotations

import logging
import time
from dataclasses import replace

from common.config import MaasConfig
from common.model_store import open_store
from deployments.app import build_app
from deployments.core.traffic import TrafficPlan
from deployments.fleet import audit_change, check_versions, deploy_versions, do_canary, do_promote, do_rollback, retire_versions, traffic_file, version_targets

__all__ = ["deploy_all", "do_canary", "do_promote", "do_rollback", "ensure_plan", "plan_from_config", "planned_versions", "check_versions", "traffic_file"]

logger = logging.getLogger(__name__)


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


def deploy_all(config: MaasConfig, who: str = "deploy", timeout_s: float = 900) -> TrafficPlan:
    """A full deploy: each served model's plan from the config, its versions, then the front application (used by
    `maas serve`/`up`); returns the chat model's plan.

    When the front application is not running yet there is no traffic to protect, so it starts beside the versions
    rather than after them (it answers 503 until the stable version's engine is ready): a fresh start is shorter
    by the front's own start-up.  A redeploy keeps the order, so the front never routes to a version not yet up.
    The other models' versions start beside the main chat model's; one scaled to zero starts no replica."""
    from ray import serve

    views = config.served()
    plans = []
    for view in views:
        before = traffic_file(view).load()
        plan = ensure_plan(view, who)
        if before != plan:
            audit_change(view, who, plan, before)
        plans.append(plan)
    others = [t for view, plan in zip(views[1:], plans[1:]) for t in version_targets(view, plan.deployed())]
    stables = {view.model.name: plan.stable for view, plan in zip(views[1:], plans[1:])}
    front = serve.RunTarget(build_app(config, plans[0].stable, stables), name=config.app_name, route_prefix=config.route_prefix)
    if config.app_name not in serve.status().applications:
        deploy_versions(config, plans[0].deployed(), timeout_s, beside=[front, *others])
    else:
        deploy_versions(config, plans[0].deployed(), timeout_s, beside=others)
        serve.run(front.target, name=front.name, route_prefix=front.route_prefix)
    for view, plan in zip(views, plans):
        retire_versions(view, plan.deployed())
    return plans[0]
