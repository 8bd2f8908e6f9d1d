"""The `maas` command line, one module per audience sharing `common` (config, connection, admin client, progress):

* `serving`: run and operate the service (`serve`, `up`, `down`, `status`, `deploy`);
* `models`: the model store, live versions and fine-tuning (`models ...`, `train`);
* `accounts`: tenants' keys, usage, audit and invoices (`keys ...`, `usage`, `audit`, `invoice`);
* `manifests`: files that deploy the config elsewhere (`serve-config`, `kuberay`).
"""

from __future__ import annotations

import logging
from pathlib import Path

import click

from cluster.cli import accounts, manifests, models, serving
from common import envs
from common.runtime import use_local_env


@click.group()
@click.option("--config", "config_path", type=click.Path(exists=True, dir_okay=False, path_type=Path), default=None, help="YAML config (default: MAAS_CONFIG or cluster/configs/default.yaml).")
@click.pass_context
def main(ctx: click.Context, config_path: Path | None) -> None:
    """ray-maas: an OpenAI-compatible model service on Ray."""
    use_local_env()  # before Ray is imported anywhere: loopback-only addressing, offline models, no usage stats
    logging.basicConfig(level=envs.MAAS_LOG_LEVEL, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("alembic").setLevel(logging.WARNING)  # its plugin set-up logs 7 INFO lines per ledger opened; our own migration line stays
    ctx.obj = config_path


for _module in (serving, models, accounts, manifests):
    for _command in _module.COMMANDS:
        main.add_command(_command)
