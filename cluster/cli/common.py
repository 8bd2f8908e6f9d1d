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
    """A one-line, spinner-free progress note for long steps (elapsed time on completion)."""

    def __init__(self, text: str):
        self.text = text

    def __enter__(self) -> None:
        self.t0 = time.monotonic()
        click.echo(f"{self.text} ...", err=True)

    def __exit__(self, exc_type, *_: Any) -> None:
        if exc_type is None:
            click.echo(f"  done in {time.monotonic() - self.t0:.1f}s", err=True)
