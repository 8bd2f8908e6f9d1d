"""The `maas` command line: serve the default model locally, manage the model store, emit the Serve config."""

from __future__ import annotations

import json
import logging
import signal
import sys
import threading
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
    store = open_store(config.store_root())
    if config.model.name == DEFAULT_MODEL_NAME:
        ensure_default_model(store, config.model.name)  # one-time conversion of the packaged GGUF
    try:
        model = store.resolve(config.model.name, config.model.version)
    except Exception as exc:
        raise click.ClickException(str(exc)) from exc
    click.echo(f"Model: {model.name} ({model.version}) from {store.root}")
    click.echo("Starting a local Ray cluster and the serving graph (the engine takes about a minute to load)...")
    dashboard = local.start_ray()
    stop = threading.Event()
    try:
        base = local.deploy(config)
        for sig in (signal.SIGINT, signal.SIGTERM):  # SIGINT too: background jobs start with it ignored
            signal.signal(sig, lambda *_: stop.set())
        click.echo(
            f"\nray-maas is serving {config.model.name} at {base}\n"
            f"Ray dashboard: {dashboard or 'disabled'}\n\n"
            f"  curl {base}/chat/completions -H 'Content-Type: application/json' \\\n"
            f"    -d '{{\"model\": \"{config.model.name}\", \"messages\": [{{\"role\": \"user\", \"content\": \"Hello!\"}}]}}'\n\n"
            f"  python -c \"from openai import OpenAI; c = OpenAI(base_url='{base}', api_key='none'); "
            f"print(c.chat.completions.create(model='{config.model.name}', messages=[{{'role': 'user', 'content': 'Hello!'}}]).choices[0].message.content)\"\n\n"
            "Press Ctrl-C to stop."
        )
        stop.wait()
    except KeyboardInterrupt:
        pass
    finally:
        click.echo("Stopping...")
        local.stop()


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
@click.pass_context
def list_models(ctx: click.Context) -> None:
    """Models and versions in the store."""
    store = open_store(_config(ctx.parent).store_root())  # type: ignore[arg-type]
    for name in store.models():
        for mv in store.versions(name):
            click.echo(f"{name}\t{mv.version}\t{mv.metadata.get('created_at', '')}\t{json.dumps(mv.metadata.get('source', {}))}")


@main.command("serve-config")
@click.option("--working-dir", default=None, help="Ship the code with the app: a remote URI (zip) or local:// path present on every node.")
@click.pass_context
def serve_config(ctx: click.Context, working_dir: str | None) -> None:
    """Print a Serve config file for `serve deploy` built from the maas config."""
    from cluster.serve_config import serve_config_for

    config = _config(ctx)
    sys.stdout.write(yaml.safe_dump(serve_config_for(config, ctx.obj, working_dir), sort_keys=False))


if __name__ == "__main__":
    main()
