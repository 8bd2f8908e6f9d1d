"""The version lifecycle on a running cluster: deploy the versions a plan needs, switch traffic, retire the rest.

Every change follows the same order, so no request is dropped:

1. the new plan is computed (pure, `deployments.core.traffic`) and checked against the store;
2. every version it needs is deployed as its own Serve application and is RUNNING;
3. the plan file is replaced (ingress replicas follow it within `model.traffic_poll_s`);
4. after the replicas have switched (plus a grace period), versions no longer needed are
   deleted; Serve drains them, so requests already streaming finish on the version they
   started on (up to `model.drain_timeout_s`).

Each change is written to the audit log when billing is on.  Needs a connected Ray: the
`maas models` CLI (a driver) and the ingress (for the console's traffic actions) both use it.
`health()` is Serve's status of every application, as operators read it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from typing import Any, Callable, Sequence

from common.config import MaasConfig
from common.model_store import open_store
from deployments.core.traffic import TrafficError, TrafficFile, TrafficPlan, plan_change, version_app_name
from deployments.version_app import build_version_app

logger = logging.getLogger(__name__)

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja")
SWITCH_GRACE_S = 5.0  # beyond the poll interval, before a retired version is deleted


def traffic_file(config: MaasConfig) -> TrafficFile:
    return TrafficFile(config.store_root(), config.app_name, config.model.name)


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


def version_targets(config: MaasConfig, versions: list[str]) -> list[Any]:
    """`serve.RunTarget`s of the versions of `config`'s model not running yet."""
    from ray import serve

    apps = _running_apps()
    names = {v: version_app_name(config.app_name, config.model.name, v) for v in versions}
    return [serve.RunTarget(build_version_app(config, v), name=name, route_prefix=None) for v, name in names.items() if name not in apps]


def deploy_versions(config: MaasConfig, versions: list[str], timeout_s: float = 900, beside: Sequence[Any] = ()) -> None:
    """Deploy each version's application unless it already runs; wait until all are RUNNING.

    `beside`: more `serve.RunTarget`s to start together with them and wait for (a fresh deploy's front app)."""
    from ray import serve

    targets = version_targets(config, versions) + list(beside)
    if targets:
        logger.info("deploying %s", ", ".join(t.name for t in targets))
        serve.run_many(targets, wait_for_applications_running=False)
    names = [version_app_name(config.app_name, config.model.name, v) for v in versions] + [t.name for t in beside]
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


def adapters_served(config: MaasConfig, timeout_s: float = 30) -> bool:
    """True when every deployed version of the model serves LoRA adapters (`engine.enable_lora: auto` starts engines
    without it while the model has no adapter). Otherwise starts what makes it so, without waiting: each version
    application whose generators lack it is deployed again, now resolved with it, and Serve rolls its generators,
    draining the old ones as a version change does; False until all of them serve adapters. Ask again to follow it."""
    if config.engine.enable_lora != "auto":
        return config.engine.enable_lora is True
    from ray import serve

    plan = traffic_file(config).load()
    if plan is None:  # nothing deployed: the next deploy resolves `auto` from the store
        return True
    apps, ready, rolls = _running_apps(), True, []
    for version in plan.deployed():
        name = version_app_name(config.app_name, config.model.name, version)
        if apps.get(name) != "RUNNING":  # rolling or deploying: look again later
            ready = False
        elif not _generator_stats(name, timeout_s).get("adapters"):
            rolls.append(serve.RunTarget(build_version_app(config, version), name=name, route_prefix=None))
    if rolls:
        logger.info("turning on LoRA adapters: rolling the generators of %s", ", ".join(t.name for t in rolls))
        serve.run_many(rolls, wait_for_applications_running=False)
    return ready and not rolls


def _generator_stats(app: str, timeout_s: float) -> dict:
    """A generator replica's `stats()`, from any thread: the handle runs its router on Serve's own loop (the
    throughput-optimized default runs it on the caller's, which a plain thread such as the fine-tuning queue's has not)."""
    from ray import serve

    handle = serve.get_deployment_handle("Generator", app)  # Serve hands out one handle per deployment and caller
    if not handle.is_initialized:
        handle._init(_run_router_in_separate_loop=True)
    return handle.stats.remote().result(timeout_s=timeout_s)


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


def switch_traffic(config: MaasConfig, change: Callable[[TrafficPlan], TrafficPlan], who: str, timeout_s: float = 900) -> tuple[TrafficPlan, TrafficPlan]:
    """Steps 1-3 of the module docstring for one change, audited; returns (before, after). Retiring is `settle`'s."""
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
    audit_change(config, who, planned, current)
    return current, planned


def settle(config: MaasConfig, plan: TrafficPlan) -> list[str]:
    """Step 4: once every ingress replica has followed `plan` (two polls and a grace period), retire what it no longer needs."""
    time.sleep(2 * config.model.traffic_poll_s + SWITCH_GRACE_S)
    live = traffic_file(config).load()
    if live is not None and live.revision != plan.revision:  # a later change settles itself
        return []
    return retire_versions(config, plan.deployed())


def apply_change(config: MaasConfig, change: Callable[[TrafficPlan], TrafficPlan], who: str, timeout_s: float = 900) -> tuple[TrafficPlan, TrafficPlan]:
    """Steps 1-4 of the module docstring for one change; returns (before, after)."""
    current, planned = switch_traffic(config, change, who, timeout_s)
    settle(config, planned)
    return current, planned


def audit_change(config: MaasConfig, who: str, plan: TrafficPlan, before: TrafficPlan | None) -> None:
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
    return apply_change(config, plan_change("canary", version, weight, who), who)[1]


def do_promote(config: MaasConfig, version: str | None, who: str) -> TrafficPlan:
    return apply_change(config, plan_change("promote", version, None, who), who)[1]


def do_rollback(config: MaasConfig, who: str) -> TrafficPlan:
    return apply_change(config, plan_change("rollback", None, None, who), who)[1]


def shown_status(status: str, replicas: dict[str, int]) -> str:
    """A deployment's status as operators read it: `IDLE` for one scaled to zero (healthy, no replica: its next
    request starts one), not a failure; otherwise Serve's own."""
    return "IDLE" if status == "HEALTHY" and not any(replicas.values()) else status


def health() -> dict:
    """Serve's status of every application and deployment: status (`shown_status`), message and replica states (what the console shows)."""
    from ray import serve

    status = serve.status()
    apps = {}
    for name, app in status.applications.items():
        apps[name] = {
            "status": str(getattr(app.status, "value", app.status)),
            "message": app.message,
            "deployments": {
                d_name: {
                    "status": shown_status(str(getattr(d.status, "value", d.status)), d.replica_states),
                    "message": d.message,
                    "replicas": {str(getattr(k, "value", k)): v for k, v in d.replica_states.items()},
                }
                for d_name, d in app.deployments.items()
            },
        }
    proxies = {node: str(getattr(s, "value", s)) for node, s in status.proxies.items()}
    return {"applications": apps, "proxies": proxies}


class ServeFleet:
    """The console's operations (`deployments.openai.operations.Fleet`) over this module, for one config. Blocking: call in a thread."""

    def __init__(self, config: MaasConfig):
        self._config = config

    def plan(self) -> dict | None:
        plan = traffic_file(self._config).load()
        return None if plan is None else {**plan.to_json(), "weights": plan.weights(), "deployed": plan.deployed()}

    def versions(self) -> list[dict]:
        store = open_store(self._config.store_root())
        return [{"version": mv.version, "created_at": mv.metadata.get("created_at"), "base": (mv.metadata.get("lineage") or {}).get("base"), "eval_loss": (mv.metadata.get("eval") or {}).get("eval_loss")} for mv in store.versions(self._config.model.name)]

    def change(self, action: str, version: str | None, weight: int | None, who: str) -> dict:
        _, planned = switch_traffic(self._config, plan_change(action, version, weight, who), who)
        return {**planned.to_json(), "weights": planned.weights(), "deployed": planned.deployed()}

    def settle(self) -> list[str]:
        plan = traffic_file(self._config).load()
        return [] if plan is None else settle(self._config, plan)

    def health(self) -> dict:
        return health()
