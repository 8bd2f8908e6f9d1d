"""What every `maas` command module shares: the config, the one connection to a running cluster, the billing
admin client, progress lines and the error translation to a one-line message."""

from __future__ import annotations

import logging
import time
from typing import Any, Awaitable, TypeVar

import click

from common.config import MaasConfig, load_config
from common.runtime import use_local_env

T = TypeVar("T")


def root(ctx: click.Context) -> click.Context:
    """The top-level context (it holds `--config`)."""
    while ctx.parent is not None:
        ctx = ctx.parent
    return ctx


def config_of(ctx: click.Context) -> MaasConfig:
    """The config named by `maas --config` (or MAAS_CONFIG / the shipped default), as a click error when invalid."""
    try:
        return load_config(root(ctx).obj)
    except Exception as exc:
        raise click.ClickException(f"Invalid configuration: {exc}") from exc


def with_port(config: MaasConfig, port: int | None) -> MaasConfig:
    return config.model_copy(update={"http": config.http.model_copy(update={"port": port})}) if port else config


def connect(config: MaasConfig) -> None:
    """Join the running Ray cluster (RAY_ADDRESS, the one `maas up` started, or the local one), failing fast when there is none."""
    import ray

    from cluster.up import ClusterError, find_cluster

    if ray.is_initialized():
        return
    use_local_env()
    try:
        address = find_cluster()
        ray.init(address=address, namespace=config.billing.namespace, logging_level=logging.WARNING, log_to_driver=False)
    except ClusterError as exc:
        raise click.ClickException(str(exc)) from exc
    except (ConnectionError, RuntimeError) as exc:
        raise click.ClickException(f"Could not join the Ray cluster ({exc}). Start one with `maas up`, or set RAY_ADDRESS.") from exc


def billing_admin(ctx: click.Context):
    """The config and the typed admin client of the running cluster's billing actor (connecting first)."""
    from billing import actor

    config = config_of(ctx)
    if not config.billing.enabled:
        raise click.ClickException("Billing is disabled in this configuration (billing.enabled: false).")
    connect(config)
    return config, actor.admin_client(actor.get_or_create(config.billing))


def run(call: Awaitable[T], timeout_s: float = 60.0) -> T:
    """Wait for one call to the cluster; its error becomes a one-line click error (the API's message, no traceback)."""
    from billing.admin import wait
    from common.errors import as_maas_error

    try:
        return wait(call, timeout_s)
    except Exception as exc:
        err = as_maas_error(exc)
        raise click.ClickException(err.message if err else str(exc)) from exc


def enum_text(value: Any) -> str:
    return str(getattr(value, "value", value))


def traffic_line(plan: Any) -> str:
    weights = ", ".join(f"{v} {w}%" for v, w in plan.weights().items())
    standby = f"; rollback target {plan.previous} (kept running)" if plan.previous else ""
    return f"{plan.model}: {weights}{standby}  [revision {plan.revision}, {plan.action} by {plan.updated_by or '-'}]"


class progress:
    """A long step's progress on stderr: on a terminal a live line (rich: spinner, elapsed seconds, the latest
    news from `update`), otherwise one plain line per change of news; the elapsed time at the end."""

    def __init__(self, text: str):
        self.text = text
        self._news = ""
        self._status: Any = None

    def __enter__(self) -> "progress":
        from rich.console import Console

        self.t0 = time.monotonic()
        console = Console(stderr=True)
        if console.is_terminal:
            self._status = console.status(f"{self.text} ...")
            self._status.start()
        else:
            click.echo(f"{self.text} ...", err=True)
        return self

    def update(self, news: str) -> None:
        """What the step is doing now (thread-safe enough for a watcher thread: one assignment and a redraw)."""
        if news == self._news:
            return
        self._news = news
        if self._status is not None:
            self._status.update(f"{self.text} ... {news}  [{time.monotonic() - self.t0:.0f}s]")
        else:
            click.echo(f"  {news}", err=True)

    def __exit__(self, exc_type, *_: Any) -> None:
        if self._status is not None:
            self._status.stop()
        if exc_type is None:
            click.echo(f"{self.text}: done in {time.monotonic() - self.t0:.1f}s" if self._status is not None else f"  done in {time.monotonic() - self.t0:.1f}s", err=True)


def import_default_model(store: Any, name: str, embedding: bool = False) -> Any:
    """The packaged default model's store version (`embedding`: the packaged embedding model's), importing it first
    (with progress) when the store lacks it."""
    from common.model_store import ensure_default_embedding_model, ensure_default_model

    note: progress | None = None

    def step(news: str) -> None:
        nonlocal note
        if note is None:
            note = progress(f"Importing {name} into the model store").__enter__()
        note.update(news)

    try:
        return (ensure_default_embedding_model if embedding else ensure_default_model)(store, name, step)
    finally:
        if note is not None:
            note.__exit__(None, None, None)


class watch_serve:
    """While a deploy runs: report every Serve deployment's status and replica states to a `progress` each second."""

    def __init__(self, note: progress, interval_s: float = 1.0):
        self._note, self._interval = note, interval_s
        self._stop: Any = None

    def __enter__(self) -> "watch_serve":
        import threading

        self._stop = threading.Event()
        threading.Thread(target=self._run, daemon=True).start()
        return self

    def _run(self) -> None:
        from ray import serve

        while not self._stop.wait(self._interval):
            try:
                apps = serve.status().applications
            except Exception:  # Serve not up yet
                continue
            parts = []
            for app in apps.values():
                for name, dep in app.deployments.items():
                    states = ",".join(f"{enum_text(k).lower()} {v}" for k, v in sorted(dep.replica_states.items()))
                    if enum_text(dep.status) != "HEALTHY":
                        parts.append(f"{name} {enum_text(dep.status).lower()}" + (f" ({states})" if states else ""))
            self._note.update("; ".join(parts) or "every deployment healthy; waiting for the API to answer")

    def __exit__(self, *_: Any) -> None:
        self._stop.set()

