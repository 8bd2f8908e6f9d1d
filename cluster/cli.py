"""The `maas` command line: serve locally, manage the model store and live versions, fine-tune, keys, usage, invoices."""

from __future__ import annotations

import getpass
import json
import logging
import os
import signal
import sys
import threading
import time
from pathlib import Path

import click
import yaml

from cluster import envs
from cluster.config import load_config
from cluster.model_store import DEFAULT_MODEL_NAME, ensure_default_model, open_store

logger = logging.getLogger("maas")


def _setup_logging() -> None:
    logging.basicConfig(level=envs.MAAS_LOG_LEVEL, format="%(asctime)s %(levelname)s %(name)s: %(message)s")


@click.group()
@click.option("--config", "config_path", type=click.Path(exists=True, dir_okay=False, path_type=Path), default=None, help="YAML config (default: MAAS_CONFIG or cluster/configs/default.yaml).")
@click.pass_context
def main(ctx: click.Context, config_path: Path | None) -> None:
    """ray-maas: an OpenAI-compatible model service on Ray."""
    from cluster.local import LOCAL_ENV

    # Before Ray is imported anywhere: loopback-only addressing, offline models, no usage stats.
    os.environ.update({k: v for k, v in LOCAL_ENV.items() if k not in os.environ})
    _setup_logging()
    ctx.obj = config_path


def _config(ctx: click.Context):
    try:
        return load_config(ctx.obj)
    except Exception as exc:
        raise click.ClickException(f"Invalid configuration: {exc}") from exc


@main.command()
@click.option("--port", type=int, default=None, help="HTTP port (default: config http.port).")
@click.pass_context
def serve(ctx: click.Context, port: int | None) -> None:
    """Start a local Ray cluster, serve the configured model, and block until Ctrl-C."""
    from cluster import local

    config = _config(ctx)
    if port:
        config = config.model_copy(update={"http": config.http.model_copy(update={"port": port})})
    store, model = _resolve_model(config)
    click.echo(f"Model: {model.name} ({model.version}) from {store.root}")
    click.echo("Starting a local Ray cluster and the serving graph (the engine takes about a minute to load)...")
    dashboard = local.start_ray()
    stop = threading.Event()
    try:
        base = local.deploy(config)
        for sig in (signal.SIGINT, signal.SIGTERM):  # SIGINT too: background jobs start with it ignored
            signal.signal(sig, lambda *_: stop.set())
        key_line, key = _first_key(config)
        click.echo(_banner(config, base, dashboard, key_line, key) + "\nPress Ctrl-C to stop.")
        stop.wait()
    except KeyboardInterrupt:
        pass
    finally:
        click.echo("Stopping...")
        local.stop()


def _banner(config, base: str, dashboard: str | None, key_line: str, key: str) -> str:
    return (
        f"\nray-maas is serving {config.model.name} at {base}\n"
        f"Ray dashboard: {dashboard or 'disabled'}\n{key_line}\n"
        f"  curl {base}/chat/completions -H \"Authorization: Bearer {key}\" -H 'Content-Type: application/json' \\\n"
        f"    -d '{{\"model\": \"{config.model.name}\", \"messages\": [{{\"role\": \"user\", \"content\": \"Hello!\"}}]}}'\n\n"
        f"  python -c \"from openai import OpenAI; c = OpenAI(base_url='{base}', api_key='{key}'); "
        f"print(c.chat.completions.create(model='{config.model.name}', messages=[{{'role': 'user', 'content': 'Hello!'}}]).choices[0].message.content)\"\n\n"
        "Keys, usage and invoices: `maas keys --help`, `maas usage`, `maas invoice --month YYYY-MM` (in another shell)."
    )


def _resolve_model(config):
    store = open_store(config.store_root())
    if config.model.name == DEFAULT_MODEL_NAME:
        ensure_default_model(store, config.model.name)  # one-time conversion of the packaged GGUF
    try:
        return store, store.resolve(config.model.name, config.model.version)
    except Exception as exc:
        raise click.ClickException(str(exc)) from exc


@main.command()
@click.option("--port", type=int, default=None, help="HTTP port (default: config http.port).")
@click.option("--num-cpus", type=int, default=None, help="CPUs the head offers Ray (default: all).")
@click.option("--dashboard-port", type=int, default=8265, show_default=True)
@click.option("--metrics-port", type=int, default=8080, show_default=True, help="Ray's Prometheus metrics endpoint.")
@click.pass_context
def up(ctx: click.Context, port: int | None, num_cpus: int | None, dashboard_port: int, metrics_port: int) -> None:
    """Start a local Ray head (loopback only), deploy the app, print the URL, dashboard and a first key, and return.

    The cluster keeps running in the background; `maas status` shows it, `maas down` stops it."""
    import ray

    from cluster import local, up as upmod

    config = _config(ctx)
    if port:
        config = config.model_copy(update={"http": config.http.model_copy(update={"port": port})})
    state = upmod.load_state()
    if state is not None and upmod.pid_alive(state.pid):
        raise click.ClickException(f"A cluster started by `maas up` is already running (API {state.api_url}); `maas down` stops it.")
    for what, p in (("API", config.http.port), ("dashboard", dashboard_port), ("metrics", metrics_port)):
        if upmod.port_open(f"127.0.0.1:{p}", 0.3):
            raise click.ClickException(f"Port {p} ({what}) is already in use; pick another with --{'port' if what == 'API' else what + '-port'}.")
    store, model = _resolve_model(config)
    click.echo(f"Model: {model.name} ({model.version}) from {store.root}")
    log_path = envs.MAAS_STATE_DIR / "up-ray.log"
    try:
        with _progress("Starting the Ray head on 127.0.0.1"):
            pid, address = upmod.start_head(num_cpus, dashboard_port, metrics_port, log_path)
    except upmod.ClusterError as exc:
        raise click.ClickException(str(exc)) from exc
    ctx_info = ray.init(address=address, _node_ip_address="127.0.0.1", namespace=config.billing.namespace, logging_level=logging.WARNING, log_to_driver=False)
    session_dir = ray._private.worker._global_node.get_session_dir_path()
    dashboard = f"http://{ctx_info.dashboard_url}" if getattr(ctx_info, "dashboard_url", None) else f"http://127.0.0.1:{dashboard_port}"
    base = f"http://{config.http.host}:{config.http.port}/v1"
    upmod.save_state(
        upmod.UpState(pid, address, dashboard, f"http://127.0.0.1:{metrics_port}/metrics", base, session_dir, str(log_path), str(ctx.obj) if ctx.obj else None, time.time())
    )
    try:
        with _progress("Deploying the serving graph (the engine takes about a minute to load)"):
            local.deploy(config, who="maas up")
        key_line, key = _first_key(config)
    except BaseException as exc:
        click.echo(f"Deploy failed ({exc}); stopping the head.", err=True)
        ray.shutdown()
        upmod.stop_head(pid, Path(session_dir).name)
        upmod.clear_state()
        raise click.ClickException(f"Deploy failed: {exc}") from exc
    ray.shutdown()
    click.echo(_banner(config, base, dashboard, key_line, key))
    click.echo(f"Metrics: http://127.0.0.1:{metrics_port}/metrics\nStatus: `maas status`; stop everything: `maas down`.")


@main.command()
@click.pass_context
def down(ctx: click.Context) -> None:
    """Stop what `maas up` started: Serve (streams drain), then every Ray process of that head."""
    import ray
    from ray import serve

    from cluster import up as upmod

    state = upmod.load_state()
    if state is None:
        raise click.ClickException(f"Nothing to stop: no cluster started by `maas up` ({upmod.state_path()} is absent).")
    session = Path(state.session_dir).name
    if upmod.pid_alive(state.pid) and upmod.port_open(state.gcs_address):
        with _progress("Shutting Serve down"):
            try:
                ray.init(address=state.gcs_address, _node_ip_address="127.0.0.1", logging_level=logging.WARNING, log_to_driver=False)
                serve.shutdown()
                _stop_billing_actor(_config(ctx))  # its ledger is durable; the node can then drain at once
            except Exception as exc:  # stop the head anyway
                click.echo(f"  Serve shutdown failed ({exc}); stopping the head anyway.", err=True)
            finally:
                ray.shutdown()
    with _progress(f"Stopping the Ray head (pid {state.pid})"):
        killed = upmod.stop_head(state.pid, session)
    if killed:
        click.echo(f"  {len(killed)} process(es) did not stop in time and were killed: {killed}", err=True)
    upmod.clear_state()
    click.echo("Stopped. No Ray processes of that cluster are left.")


@main.command()
@click.pass_context
def status(ctx: click.Context) -> None:
    """The running cluster: nodes, every Serve application and deployment with its replicas, and the traffic plan."""
    import ray
    from ray import serve

    from cluster import up as upmod
    from cluster.versions import traffic_file

    config = _config(ctx)
    _connect(config)
    state = upmod.load_state()
    if state is not None and upmod.pid_alive(state.pid):
        click.echo(f"Cluster: started by `maas up` (pid {state.pid}), GCS {state.gcs_address}\nAPI: {state.api_url}\nDashboard: {state.dashboard_url}\nMetrics: {state.metrics_url}")
    nodes = [n for n in ray.nodes() if n["Alive"]]
    click.echo(f"\nNodes ({len(nodes)}):")
    for n in nodes:
        res = ", ".join(f"{k} {v:g}" for k, v in sorted(n["Resources"].items()) if not k.startswith("node:") and k not in ("memory", "object_store_memory"))
        click.echo(f"  {n['NodeManagerAddress']:<15} {'head' if n['Resources'].get('node:__internal_head__') else 'worker':<7} {res}")
    try:
        st = serve.status()
    except Exception as exc:
        raise click.ClickException(f"Serve is not running on this cluster ({exc}); deploy with `maas deploy`.") from exc
    click.echo("\nApplications:")
    if not st.applications:
        click.echo("  none (deploy with `maas deploy`)")
    for name, app in st.applications.items():
        click.echo(f"  {name:<40} {_enum(app.status)}{'  ' + app.message.splitlines()[0] if app.message else ''}")
        for dname, dep in app.deployments.items():
            replicas = ", ".join(f"{_enum(k)} {v}" for k, v in sorted(dep.replica_states.items())) or "no replicas"
            click.echo(f"    {dname:<16} {_enum(dep.status):<10} {replicas}")
    plan = traffic_file(config).load()
    if plan is not None:
        click.echo(f"\nTraffic: {_traffic_line(plan)}")


def _stop_billing_actor(config) -> None:
    import ray

    try:
        ray.kill(ray.get_actor(config.billing.actor_name, namespace=config.billing.namespace), no_restart=True)
    except ValueError:  # billing off, or never started
        pass


def _enum(value) -> str:
    return str(getattr(value, "value", value))


@main.command()
@click.pass_context
def deploy(ctx: click.Context) -> None:
    """Deploy (or update) this config's applications on the running cluster and wait until the API answers."""
    from cluster import local

    config = _config(ctx)
    _resolve_model(config)
    _connect(config)
    try:
        with _progress(f"Deploying {config.model.name} as application `{config.app_name}`"):
            base = local.deploy(config, who=f"cli:{getpass.getuser()}")
    except Exception as exc:
        raise click.ClickException(f"Deploy failed: {exc}") from exc
    click.echo(f"Serving at {base} (`maas status` shows every deployment).")


def _first_key(config) -> tuple[str, str]:
    """On a ledger with no keys yet, create a first tenant key and an admin key and show them (once)."""
    if not config.billing.enabled:
        return "Billing is off: any key is accepted.\n", "none"
    import ray

    from billing import actor

    handle = actor.get(config.billing)
    if ray.get(handle.call.remote("list_keys", None)):
        return "API keys: existing ones (`maas keys list`), or create one with `maas keys create --tenant NAME`.\n", "$MAAS_API_KEY"
    key, _ = ray.get(handle.call.remote("create_key", "local", None, "tenant", None, "first key", "maas serve"))
    admin, _ = ray.get(handle.call.remote("create_key", "operators", None, "admin", None, "first admin key", "maas serve"))
    return f"\nFirst API key (tenant `local`, plan `{config.billing.default_plan}`), shown only now:\n  {key}\nAdmin key for /admin/*:\n  {admin}\n", key


@main.group()
def models() -> None:
    """The model store."""


@models.command("import-default")
@click.pass_context
def import_default(ctx: click.Context) -> None:
    """Convert the packaged SmolLM2 GGUF into the store (once)."""
    config = _config(ctx.parent)  # type: ignore[arg-type]
    mv = ensure_default_model(open_store(config.store_root()), config.model.name)
    click.echo(f"{mv.name}/{mv.version} at {mv.path}")


@models.command("list")
@click.option("--name", default=None, help="One model (default: all).")
@click.pass_context
def list_models(ctx: click.Context, name: str | None) -> None:
    """Models and versions in the store, with lineage and eval metrics."""
    store = open_store(_config(_root(ctx)).store_root())
    click.echo(f"{'MODEL':<28} {'VER':<5} {'CREATED':<20} {'SOURCE':<10} {'BASE':<8} {'EVAL LOSS':<17} RUN")
    for model in [name] if name else store.models():
        for mv in store.versions(model):
            meta = mv.metadata
            base = meta.get("lineage", {}).get("base", {})
            ev = meta.get("eval", {})
            loss = f"{ev['eval_loss_before']:.3f}->{ev['eval_loss']:.3f}" if "eval_loss" in ev and "eval_loss_before" in ev else "-"
            click.echo(
                f"{model:<28} {mv.version:<5} {meta.get('created_at', '')[:19]:<20} {meta.get('source', {}).get('kind', '-'):<10} "
                f"{base.get('version', '-'):<8} {loss:<17} {meta.get('lineage', {}).get('run', {}).get('name') or '-'}"
            )


@models.command("show")
@click.argument("name")
@click.argument("version", default="latest")
@click.pass_context
def show_model(ctx: click.Context, name: str, version: str) -> None:
    """One version's metadata: lineage (base, dataset hash, run, config) and eval metrics."""
    try:
        mv = open_store(_config(_root(ctx)).store_root()).resolve(name, version)
    except Exception as exc:
        raise click.ClickException(str(exc)) from exc
    click.echo(json.dumps({"path": str(mv.path), **mv.metadata}, indent=2, default=str))


def _connect(config) -> None:
    """Join the running Ray cluster (RAY_ADDRESS, the one `maas up` started, or the local one), failing fast when there is none."""
    import ray

    from cluster.local import LOCAL_ENV
    from cluster.up import ClusterError, find_cluster

    if ray.is_initialized():
        return
    os.environ.update({k: v for k, v in LOCAL_ENV.items() if k not in os.environ})
    try:
        address = find_cluster()
        ray.init(address=address, namespace=config.billing.namespace, logging_level=logging.WARNING, log_to_driver=False)
    except ClusterError as exc:
        raise click.ClickException(str(exc)) from exc
    except (ConnectionError, RuntimeError) as exc:
        raise click.ClickException(f"Could not join the Ray cluster ({exc}). Start one with `maas up`, or set RAY_ADDRESS.") from exc


def _traffic_line(plan) -> str:
    weights = ", ".join(f"{v} {w}%" for v, w in plan.weights().items())
    standby = f"; rollback target {plan.previous} (kept running)" if plan.previous else ""
    return f"{plan.model}: {weights}{standby}  [revision {plan.revision}, {plan.action} by {plan.updated_by or '-'}]"


def _change(ctx: click.Context, op, *args) -> None:
    from cluster.traffic import TrafficError

    config = _config(_root(ctx))
    if ctx.params["model"] != config.model.name:
        raise click.ClickException(f"This configuration serves {config.model.name}, not {ctx.params['model']} (pass --config).")
    _connect(config)
    try:
        plan = op(config, *args, who=f"cli:{getpass.getuser()}")
    except TrafficError as exc:
        raise click.ClickException(exc.message) from exc
    except Exception as exc:
        from deployments.core.errors import as_maas_error

        err = as_maas_error(exc)
        raise click.ClickException(err.message if err else str(exc)) from exc
    click.echo(_traffic_line(plan))


@models.command("traffic")
@click.pass_context
def traffic(ctx: click.Context) -> None:
    """The live traffic plan of the served model: versions and their share of requests."""
    from cluster.versions import traffic_file

    plan = traffic_file(_config(_root(ctx))).load()
    click.echo(_traffic_line(plan) if plan else "No traffic plan yet: the model has not been deployed.")


@models.command("canary")
@click.argument("model")
@click.argument("version")
@click.option("--weight", type=click.IntRange(1, 100), default=10, show_default=True, help="Percent of requests sent to VERSION.")
@click.pass_context
def models_canary(ctx: click.Context, model: str, version: str, weight: int) -> None:
    """Deploy VERSION of MODEL beside the stable one and send it --weight percent of requests."""
    from cluster.versions import do_canary

    with _progress(f"Deploying {model} {version} and shifting {weight}% of traffic"):
        _change(ctx, do_canary, version, weight)


@models.command("promote")
@click.argument("model")
@click.argument("version", required=False)
@click.pass_context
def models_promote(ctx: click.Context, model: str, version: str | None) -> None:
    """Make VERSION (default: the canary) take all traffic; the old stable stays up for a rollback."""
    from cluster.versions import do_promote

    with _progress(f"Promoting {model} {version or '(canary)'}"):
        _change(ctx, do_promote, version)


@models.command("rollback")
@click.argument("model")
@click.pass_context
def models_rollback(ctx: click.Context, model: str) -> None:
    """Stop the canary, or return to the version before the last promote."""
    from cluster.versions import do_rollback

    with _progress(f"Rolling back {model}"):
        _change(ctx, do_rollback)


class _progress:
    """A one-line spinner-free progress note for long steps (elapsed time on completion)."""

    def __init__(self, text: str):
        self.text = text

    def __enter__(self):
        self.t0 = time.monotonic()
        click.echo(f"{self.text} ...", err=True)

    def __exit__(self, exc_type, *_):
        if exc_type is None:
            click.echo(f"  done in {time.monotonic() - self.t0:.1f}s", err=True)


@main.command()
@click.argument("config_file", type=click.Path(exists=True, dir_okay=False))
@click.option("--address", default=None, help="Ray dashboard URL of a running cluster (e.g. http://127.0.0.1:8265): submit as a Ray job. Default: run here.")
@click.option("--set", "sets", multiple=True, metavar="KEY=VALUE", help="Override a training config field, e.g. --set optim.max_steps=10.")
@click.option("--no-wait", is_flag=True, help="With --address: print the job id and return.")
def train(config_file: str, address: str | None, sets: tuple[str, ...], no_wait: bool) -> None:
    """Fine-tune with Ray Train (a shortcut for `ray job submit ... -- python -m training.finetune`)."""
    import shlex

    entry = ["python", "-m", "training.finetune", "--config", config_file, *[a for kv in sets for a in ("--set", kv)]]
    if address is None:
        from training.finetune import main as finetune

        raise SystemExit(finetune(entry[3:]))
    from ray.job_submission import JobStatus, JobSubmissionClient

    from cluster.serve_config import REPO_ROOT

    client = JobSubmissionClient(address)
    job_id = client.submit_job(
        entrypoint=" ".join(shlex.quote(a) for a in entry),
        runtime_env={"working_dir": str(REPO_ROOT), "excludes": [".venv", ".git", "bench/out"], "env_vars": {k: v for k, v in os.environ.items() if k.startswith("MAAS_")}},
    )
    click.echo(f"Submitted {job_id}: follow it with `ray job logs -f {job_id} --address {address}` or in the dashboard.")
    if no_wait:
        return
    import asyncio

    async def tail() -> None:
        async for lines in client.tail_job_logs(job_id):
            click.echo(lines, nl=False)

    asyncio.run(tail())
    status = client.get_job_status(job_id)
    click.echo(f"Job {job_id}: {status}")
    if status != JobStatus.SUCCEEDED:
        raise SystemExit(1)


@main.command("serve-config")
@click.option("--working-dir", default=None, help="Ship the code with the app: a remote URI (zip) or local:// path present on every node.")
@click.pass_context
def serve_config(ctx: click.Context, working_dir: str | None) -> None:
    """Print a Serve config file for `serve deploy`: the front app and one app per version the traffic plan serves."""
    from cluster.serve_config import serve_config_for
    from cluster.versions import planned_versions

    config = _config(ctx)
    try:
        versions = planned_versions(config)
    except Exception as exc:
        raise click.ClickException(str(exc)) from exc
    sys.stdout.write(yaml.safe_dump(serve_config_for(config, ctx.obj, working_dir, versions), sort_keys=False))


@main.command()
@click.option("--versions", default=None, help="Comma-separated model versions to serve (default: the live plan, or the config's).")
@click.option("--name", default="ray-maas", show_default=True, help="metadata.name of the RayService.")
@click.pass_context
def kuberay(ctx: click.Context, versions: str | None, name: str) -> None:
    """Print a KubeRay RayService manifest: this config's Serve apps on the node types of cluster.yaml."""
    from cluster.kuberay import load_launcher, rayservice_for, render
    from cluster.versions import planned_versions

    config = _config(ctx)
    try:
        served = versions.split(",") if versions else planned_versions(config)
    except Exception as exc:
        raise click.ClickException(f"{exc} (pass --versions v1,...)") from exc
    sys.stdout.write(render(rayservice_for(config, ctx.obj, load_launcher(), served, name)))


# ---- billing: keys, usage, invoices (through the billing actor of a running cluster) -------------


def _billing(ctx: click.Context):
    """The config and the billing actor's handle, connecting to the running Ray cluster if needed."""
    from billing import actor

    config = _config(ctx)
    if not config.billing.enabled:
        raise click.ClickException("Billing is disabled in this configuration (billing.enabled: false).")
    _connect(config)
    return config, actor.get_or_create(config.billing)


def _call(handle, method: str, *args):
    import ray

    from deployments.core.errors import as_maas_error

    try:
        return ray.get(handle.call.remote(method, *args), timeout=60)
    except Exception as exc:
        err = as_maas_error(exc)
        raise click.ClickException(err.message if err else str(exc)) from exc


def _root(ctx: click.Context) -> click.Context:
    while ctx.parent is not None:
        ctx = ctx.parent
    return ctx


def _duration_s(text: str | None) -> float | None:
    if not text:
        return None
    units = {"s": 1, "m": 60, "h": 3600, "d": 86400}
    try:
        return float(text[:-1]) * units[text[-1]] if text[-1] in units else float(text)
    except (ValueError, KeyError) as exc:
        raise click.BadParameter(f"{text!r}: use e.g. 30s, 15m, 12h or 90d") from exc


@main.group()
def keys() -> None:
    """API keys: create (shown once), list, revoke."""


@keys.command("create")
@click.option("--tenant", required=True, help="Tenant the key bills to (created if new).")
@click.option("--plan", default=None, help="Set the tenant's plan (default: kept, or billing.default_plan for a new tenant).")
@click.option("--admin", is_flag=True, help="An operator key for /admin/* instead of a tenant key.")
@click.option("--expires-in", default=None, help="Lifetime, e.g. 30d or 12h (default: never expires).")
@click.option("--name", default="", help="A note to recognise the key by.")
@click.pass_context
def keys_create(ctx: click.Context, tenant: str, plan: str | None, admin: bool, expires_in: str | None, name: str) -> None:
    _, handle = _billing(_root(ctx))
    key, record = _call(handle, "create_key", tenant, plan, "admin" if admin else "tenant", _duration_s(expires_in), name, "cli")
    click.echo(f"Created {record.role} key {record.key_id}… for tenant {record.tenant}. It is shown only now:\n\n  {key}\n")


@keys.command("list")
@click.option("--tenant", default=None)
@click.pass_context
def keys_list(ctx: click.Context, tenant: str | None) -> None:
    from datetime import datetime, timezone

    _, handle = _billing(_root(ctx))
    fmt = lambda ts: datetime.fromtimestamp(ts, timezone.utc).strftime("%Y-%m-%d %H:%M") if ts else "-"  # noqa: E731
    click.echo(f"{'KEY ID':<20} {'TENANT':<16} {'ROLE':<7} {'CREATED':<17} {'EXPIRES':<17} {'REVOKED':<17} NAME")
    for k in _call(handle, "list_keys", tenant):
        click.echo(f"{k.key_id:<20} {k.tenant:<16} {k.role:<7} {fmt(k.created_at):<17} {fmt(k.expires_at):<17} {fmt(k.revoked_at):<17} {k.name}")


@keys.command("revoke")
@click.argument("key_id")
@click.pass_context
def keys_revoke(ctx: click.Context, key_id: str) -> None:
    _, handle = _billing(_root(ctx))
    record = _call(handle, "revoke_key", key_id.rstrip("…"), "cli")
    click.echo(f"Revoked {record.key_id} (tenant {record.tenant}); every ingress replica refuses it within a second.")


def _month(value: str | None) -> str:
    import re

    from billing.quota import period_of

    if value is None:
        return period_of(__import__("time").time())
    if not re.fullmatch(r"\d{4}-(0[1-9]|1[0-2])", value):
        raise click.BadParameter(f"{value!r}: use YYYY-MM")
    return value


@main.command()
@click.option("--tenant", default=None, help="One tenant (default: all).")
@click.option("--month", default=None, help="YYYY-MM (default: this month, UTC).")
@click.pass_context
def usage(ctx: click.Context, tenant: str | None, month: str | None) -> None:
    """Usage by tenant, day, model and version, from the ledger."""
    from billing.reports import usage_report

    config, handle = _billing(ctx)
    period = _month(month)
    report = usage_report(_call(handle, "spend_rows", period, tenant, True), period, config.billing.price_book.currency, tenant)
    click.echo(f"{'TENANT':<16} {'DAY':<10} {'MODEL':<24} {'VER':<5} {'REQS':>7} {'PROMPT':>10} {'COMPLETION':>10} {'COST':>14}")
    for r in report["data"]:
        click.echo(f"{r['tenant']:<16} {r['day']:<10} {r['model']:<24} {r['version']:<5} {r['requests']:>7} {r['prompt_tokens']:>10} {r['completion_tokens']:>10} {r['cost']:>14}")
    t = report["total"]
    click.echo(f"{'TOTAL':<58} {t['requests']:>7} {t['prompt_tokens']:>10} {t['completion_tokens']:>10} {t['cost']:>14} {report['currency']}")


@main.command()
@click.option("--limit", type=int, default=50, show_default=True)
@click.pass_context
def audit(ctx: click.Context, limit: int) -> None:
    """Who did what to keys, plans and prices, newest first (from the ledger database)."""
    from datetime import datetime, timezone

    _, handle = _billing(ctx)
    for a in _call(handle, "audit_log", limit):
        when = datetime.fromtimestamp(a["ts"], timezone.utc).strftime("%Y-%m-%d %H:%M:%S")
        click.echo(f"{when}  {a['who']:<20} {a['action']:<18} {a['target']:<24} {a['detail'][:120]}")


@main.command()
@click.option("--month", required=True, help="YYYY-MM (UTC calendar month).")
@click.option("--tenant", default=None, help="One tenant (default: every tenant with usage).")
@click.option("--format", "fmt", type=click.Choice(["csv", "parquet"]), default="csv")
@click.option("--out", "out_dir", type=click.Path(file_okay=False, path_type=Path), default=Path("invoices"), help="Folder for the files.")
@click.pass_context
def invoice(ctx: click.Context, month: str, tenant: str | None, fmt: str, out_dir: Path) -> None:
    """Monthly invoices (one file per tenant), built with pandas from the ledger, exact to the cent."""
    from billing.invoice import build_invoices, write_invoice

    config, handle = _billing(ctx)
    period = _month(month)
    invoices = build_invoices(_call(handle, "spend_rows", period, tenant), period, config.billing.price_book.currency, tenant)
    if not invoices:
        click.echo(f"No usage in {period}.")
    for inv in invoices:
        path = write_invoice(inv, out_dir / f"invoice-{inv.tenant}-{period}.{fmt}", fmt)
        click.echo(f"{inv.tenant}: {len(inv.lines)} lines, total {inv.total} {inv.currency} -> {path}")


if __name__ == "__main__":
    main()
