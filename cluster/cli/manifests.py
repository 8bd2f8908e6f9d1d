"""`maas serve-config | kuberay`: the files that deploy this config elsewhere (Serve's `serve deploy`, KubeRay)."""

from __future__ import annotations

import sys

import click
import yaml

from cluster.cli.common import config_of, root


@click.command("serve-config")
@click.option("--working-dir", default=None, help="Ship the code with the app: a remote URI (zip) or local:// path present on every node.")
@click.pass_context
def serve_config(ctx: click.Context, working_dir: str | None) -> None:
    """Print a Serve config file for `serve deploy`: the front app and one app per version the traffic plan serves."""
    from cluster.serve_config import serve_config_for
    from cluster.versions import planned_versions

    config = config_of(ctx)
    try:
        versions = planned_versions(config)
        others = {view.model.name: planned_versions(view) for view in config.served()[1:]}
    except Exception as exc:
        raise click.ClickException(str(exc)) from exc
    sys.stdout.write(yaml.safe_dump(serve_config_for(config, root(ctx).obj, working_dir, versions, others), sort_keys=False))


@click.command()
@click.option("--versions", default=None, help="Comma-separated model versions to serve (default: the live plan, or the config's).")
@click.option("--name", default="ray-maas", show_default=True, help="metadata.name of the RayService.")
@click.pass_context
def kuberay(ctx: click.Context, versions: str | None, name: str) -> None:
    """Print a KubeRay RayService manifest: this config's Serve apps on the node types of cluster.yaml."""
    from cluster.kuberay import load_launcher, rayservice_for, render
    from cluster.versions import planned_versions

    config = config_of(ctx)
    try:
        served = versions.split(",") if versions else planned_versions(config)
    except Exception as exc:
        raise click.ClickException(f"{exc} (pass --versions v1,...)") from exc
    sys.stdout.write(render(rayservice_for(config, root(ctx).obj, load_launcher(), served, name)))


COMMANDS = [serve_config, kuberay]
