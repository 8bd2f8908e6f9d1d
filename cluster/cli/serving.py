"""`maas serve | up | down | status | deploy`: run the service locally and operate the cluster it runs on."""

from __future__ import annotations

import getpass
import logging
import os
import signal
import threading
import time
from pathlib import Path

import click

from cluster.cli.common import billing_admin, config_of, connect, enum_text, import_default_model, progress, run, traffic_line, watch_serve, with_port
from common import envs
from common.config import MaasConfig
from common.model_store import DEFAULT_EMBEDDING_MODEL_NAME, DEFAULT_MODEL_NAME, open_store
from common.runtime import port_open


@click.command()
@click.option("--port", type=int, default=None, help="HTTP port (default: config http.port).")
@click.pass_context
def serve(ctx: click.Context, port: int | None) -> None:
    """Start a local Ray cluster, serve the configured model, and block until Ctrl-C."""
    from cluster import local

    config = with_port(config_of(ctx), port)
    store, model = resolve_model(config)
    click.echo(f"Model: {model.name} ({model.version}) from {store.root}")
    click.echo("Starting a local Ray cluster and the serving graph (the engine takes about a minute to load)...")
    dashboard = local.start_ray(config=config)
    stop = threading.Event()
    try:
        base = local.deploy(config)
        for sig in (signal.SIGINT, signal.SIGTERM):  # SIGINT too: background jobs start with it ignored
            signal.signal(sig, lambda *_: stop.set())
        key_line, key = first_key(ctx, config)
        click.echo(banner(config, base, dashboard, key_line, key) + "\nPress Ctrl-C to stop.")
        stop.wait()
    except KeyboardInterrupt:
        pass
    finally:
        click.echo("Stopping...")
        local.stop()


@click.command()
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
    from deployments.network import front_door_env

    config = with_port(config_of(ctx), port)
    state = upmod.load_state()
    if state is not None and upmod.pid_alive(state.pid):
        raise click.ClickException(f"A cluster started by `maas up` is already running (API {state.api_url}); `maas down` stops it.")
    for what, p in (("API", config.http.port), ("dashboard", dashboard_port), ("metrics", metrics_port)):
        if port_open(f"127.0.0.1:{p}", 0.3):
            raise click.ClickException(f"Port {p} ({what}) is already in use; pick another with --{'port' if what == 'API' else what + '-port'}.")
    store, model = resolve_model(config)
    click.echo(f"Model: {model.name} ({model.version}) from {store.root}")
    log_path = envs.MAAS_STATE_DIR / "up-ray.log"
    os.environ.update(front_door_env(config, num_cpus))  # the head's processes inherit it; so does this driver's Serve
    try:
        with progress("Starting the Ray head on 127.0.0.1"):
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
        with progress("Deploying the serving graph (the engine takes about a minute to load)") as note, watch_serve(note):
            local.deploy(config, who="maas up")
        key_line, key = first_key(ctx, config)
    except BaseException as exc:
        click.echo(f"Deploy failed ({exc}); stopping the head.", err=True)
        ray.shutdown()
        upmod.stop_head(pid, Path(session_dir).name)
        upmod.forget_current_cluster(address)
        upmod.clear_state()
        raise click.ClickException(f"Deploy failed: {exc}") from exc
    ray.shutdown()
    click.echo(banner(config, base, dashboard, key_line, key))
    click.echo(f"Metrics: http://127.0.0.1:{metrics_port}/metrics\nStatus: `maas status`; stop everything: `maas down`.")


@click.command()
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
    if upmod.pid_alive(state.pid) and port_open(state.gcs_address):
        with progress("Shutting Serve down"):
            try:
                ray.init(address=state.gcs_address, _node_ip_address="127.0.0.1", logging_level=logging.WARNING, log_to_driver=False)
                serve.shutdown()
                _stop_billing_actor(config_of(ctx))  # its ledger is durable; the node can then drain at once
            except Exception as exc:  # stop the head anyway
                click.echo(f"  Serve shutdown failed ({exc}); stopping the head anyway.", err=True)
            finally:
                ray.shutdown()
    with progress(f"Stopping the Ray head (pid {state.pid})"):
        killed = upmod.stop_head(state.pid, session)
    if killed:
        click.echo(f"  {len(killed)} process(es) did not stop in time and were killed: {killed}", err=True)
    upmod.forget_current_cluster(state.gcs_address)
    upmod.clear_state()
    click.echo("Stopped. No Ray processes of that cluster are left.")


@click.command()
@click.pass_context
def status(ctx: click.Context) -> None:
    """The running cluster: nodes, every Serve application and deployment with its replicas, and the traffic plan."""
    import ray
    from ray import serve

    from cluster import up as upmod
    from cluster.versions import traffic_file
    from deployments.fleet import shown_status

    config = config_of(ctx)
    connect(config)
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
        click.echo(f"  {name:<40} {enum_text(app.status)}{'  ' + app.message.splitlines()[0] if app.message else ''}")
        for dname, dep in app.deployments.items():
            replicas = ", ".join(f"{enum_text(k)} {v}" for k, v in sorted(dep.replica_states.items()) if v) or "no replicas"
            shown = shown_status(enum_text(dep.status), dep.replica_states)
            click.echo(f"    {dname:<16} {shown:<10} {replicas}{'  (scaled to zero: its next request starts it)' if shown == 'IDLE' else ''}")
    for view in config.served():
        plan = traffic_file(view).load()
        if plan is not None:
            click.echo(f"\nTraffic ({view.model.name}): {traffic_line(plan)}")


@click.command()
@click.pass_context
def deploy(ctx: click.Context) -> None:
    """Deploy (or update) this config's applications on the running cluster and wait until the API answers."""
    from cluster import local

    config = config_of(ctx)
    resolve_model(config)
    connect(config)
    try:
        with progress(f"Deploying {config.model.name} as application `{config.app_name}`") as note, watch_serve(note):
            base = local.deploy(config, who=f"cli:{getpass.getuser()}")
    except Exception as exc:
        raise click.ClickException(f"Deploy failed: {exc}") from exc
    click.echo(f"Serving at {base} (`maas status` shows every deployment).")


COMMANDS = [serve, up, down, status, deploy]


def resolve_model(config: MaasConfig):
    """The store and the version the config serves (the packaged default model is imported once, first)."""
    store = open_store(config.store_root())
    if config.model.name == DEFAULT_MODEL_NAME:
        import_default_model(store, config.model.name)  # one-time conversion of the packaged GGUF
    for m in config.models:
        if m.name == DEFAULT_EMBEDDING_MODEL_NAME:
            import_default_model(store, m.name, embedding=True)
    try:
        for m in config.models:  # each served model must be in the store before anything starts
            store.resolve(m.name, m.version)
        return store, store.resolve(config.model.name, config.model.version)
    except Exception as exc:
        raise click.ClickException(str(exc)) from exc


def banner(config: MaasConfig, base: str, dashboard: str | None, key_line: str, key: str) -> str:
    return (
        f"\nray-maas is serving {config.model.name} at {base}\n"
        f"Ray dashboard: {dashboard or 'disabled'}{ray_auth_hint()}\n{key_line}\n"
        f"  curl {base}/chat/completions -H \"Authorization: Bearer {key}\" -H 'Content-Type: application/json' \\\n"
        f"    -d '{{\"model\": \"{config.model.name}\", \"messages\": [{{\"role\": \"user\", \"content\": \"Hello!\"}}]}}'\n\n"
        f"  python -c \"from openai import OpenAI; c = OpenAI(base_url='{base}', api_key='{key}'); "
        f"print(c.chat.completions.create(model='{config.model.name}', messages=[{{'role': 'user', 'content': 'Hello!'}}]).choices[0].message.content)\"\n\n"
        "Keys, usage and invoices: `maas keys --help`, `maas usage`, `maas invoice --month YYYY-MM` (in another shell)."
    )


def ray_auth_hint() -> str:
    """How a shell reaches a cluster that requires Ray's token (the dashboard's pages ask for it too)."""
    if os.environ.get("RAY_AUTH_MODE") != "token":
        return ""
    where = os.environ.get("RAY_AUTH_TOKEN_PATH") or "~/.ray/auth_token"
    return f" (Ray's token authentication is on: its token is in {where}; for `ray job submit` and the like: export RAY_AUTH_MODE=token RAY_AUTH_TOKEN_PATH={where})"


def first_key(ctx: click.Context, config: MaasConfig) -> tuple[str, str]:
    """On a ledger with no keys yet, create a first tenant key and an admin key and show them (once)."""
    if not config.billing.enabled:
        return "Billing is off: any key is accepted.\n", "none"
    _, admin = billing_admin(ctx)
    if run(admin.list_keys()):
        return "API keys: existing ones (`maas keys list`), or create one with `maas keys create --tenant NAME`.\n", "$MAAS_API_KEY"
    key, _ = run(admin.create_key("local", None, "tenant", None, "first key", "maas serve"))
    admin_key, _ = run(admin.create_key("operators", None, "admin", None, "first admin key", "maas serve"))
    return f"\nFirst API key (tenant `local`, plan `{config.billing.default_plan}`), shown only now:\n  {key}\nAdmin key for /admin/*:\n  {admin_key}\n", key


def _stop_billing_actor(config: MaasConfig) -> None:
    import ray

    try:
        ray.kill(ray.get_actor(config.billing.actor_name, namespace=config.billing.namespace), no_restart=True)
    except ValueError:  # billing off, or never started
        pass
