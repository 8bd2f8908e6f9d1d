"""`maas models ...` and `maas train`: the model store, live versions (canary, promote, rollback) and fine-tuning."""

from __future__ import annotations

import getpass
import json
import re
from typing import Any

import click

from cluster.cli.common import billing_admin, config_of, connect, import_default_model, progress, run, traffic_line, watch_serve
from common.model_store import DEFAULT_EMBEDDING_MODEL_NAME, open_store


@click.group()
def models() -> None:
    """The model store and the versions being served."""


@models.command("import-default")
@click.pass_context
def import_default(ctx: click.Context) -> None:
    """Import the packaged models into the store (once): SmolLM2 (its GGUF converted) and all-MiniLM-L6-v2 for embeddings."""
    config = config_of(ctx)
    store = open_store(config.store_root())
    for mv in [import_default_model(store, config.model.name), *(import_default_model(store, m.name, embedding=True) for m in config.models if m.name == DEFAULT_EMBEDDING_MODEL_NAME)]:
        click.echo(f"{mv.name}/{mv.version} at {mv.path}")


@models.command("list")
@click.option("--name", default=None, help="One model (default: all).")
@click.pass_context
def list_models(ctx: click.Context, name: str | None) -> None:
    """Models and versions in the store, with lineage and eval metrics."""
    store = open_store(config_of(ctx).store_root())
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
        mv = open_store(config_of(ctx).store_root()).resolve(name, version)
    except Exception as exc:
        raise click.ClickException(str(exc)) from exc
    click.echo(json.dumps({"path": str(mv.path), **mv.metadata}, indent=2, default=str))


@models.command("traffic")
@click.pass_context
def traffic(ctx: click.Context) -> None:
    """The live traffic plan of each served model: versions and their share of requests."""
    from cluster.versions import traffic_file

    for view in config_of(ctx).served():
        plan = traffic_file(view).load()
        click.echo(traffic_line(plan) if plan else f"{view.model.name}: no traffic plan yet (not deployed).")


@models.command("canary")
@click.argument("model")
@click.argument("version")
@click.option("--weight", type=click.IntRange(1, 100), default=10, show_default=True, help="Percent of requests sent to VERSION.")
@click.pass_context
def models_canary(ctx: click.Context, model: str, version: str, weight: int) -> None:
    """Deploy VERSION of MODEL beside the stable one and send it --weight percent of requests."""
    from cluster.versions import do_canary

    with progress(f"Deploying {model} {version} and shifting {weight}% of traffic") as note, watch_serve(note):
        _change(ctx, model, do_canary, version, weight)


@models.command("promote")
@click.argument("model")
@click.argument("version", required=False)
@click.pass_context
def models_promote(ctx: click.Context, model: str, version: str | None) -> None:
    """Make VERSION (default: the canary) take all traffic; the old stable stays up for a rollback."""
    from cluster.versions import do_promote

    with progress(f"Promoting {model} {version or '(canary)'}"):
        _change(ctx, model, do_promote, version)


@models.command("rollback")
@click.argument("model")
@click.pass_context
def models_rollback(ctx: click.Context, model: str) -> None:
    """Stop the canary, or return to the version before the last promote."""
    from cluster.versions import do_rollback

    with progress(f"Rolling back {model}"):
        _change(ctx, model, do_rollback)


def _change(ctx: click.Context, model: str, op, *args) -> None:
    from common.errors import as_maas_error

    config = config_of(ctx)
    names = [view.model.name for view in config.served()]
    if model not in names:
        raise click.ClickException(f"This configuration serves {', '.join(names)}, not {model} (pass --config).")
    connect(config)
    try:
        plan = op(config.for_model(model), *args, who=f"cli:{getpass.getuser()}")
    except Exception as exc:
        err = as_maas_error(exc)
        raise click.ClickException(err.message if err else str(exc)) from exc
    click.echo(traffic_line(plan))


_STEP = re.compile(r"step (\d+)/(\d+)\s+loss ([0-9.]+)")


def training_step(line: str) -> tuple[int, int, float] | None:
    """(step, max steps, loss) from a training log line (`training.loop`'s "step 12/50  loss 2.3456 ..."), else None."""
    m = _STEP.search(line)
    return (int(m.group(1)), int(m.group(2)), float(m.group(3))) if m else None


async def _follow(chunks: Any) -> None:
    """A job's log lines; on a terminal, its steps as a progress bar with the latest loss (rich) above which the lines scroll."""
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    console = Console(stderr=True)
    if not console.is_terminal:
        async for chunk in chunks:
            click.echo(chunk, nl=False)
        return
    columns = (TextColumn("training"), BarColumn(), MofNCompleteColumn(), TextColumn("loss {task.fields[loss]}"), TimeElapsedColumn())
    with Progress(*columns, console=console) as bar:
        task = bar.add_task("steps", total=None, loss="-")
        async for chunk in chunks:
            for line in chunk.splitlines():
                bar.console.print(line, markup=False, highlight=False)
                step = training_step(line)
                if step is not None:
                    bar.update(task, completed=step[0], total=step[1], loss=f"{step[2]:.4f}")


@click.command()
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

    from common import envs
    from common.runtime import REPO_ROOT, RUNTIME_EXCLUDES

    client = JobSubmissionClient(address)
    job_id = client.submit_job(
        entrypoint=" ".join(shlex.quote(a) for a in entry),
        runtime_env={"working_dir": str(REPO_ROOT), "excludes": RUNTIME_EXCLUDES, "env_vars": envs.job_env()},
    )
    click.echo(f"Submitted {job_id}: follow it with `ray job logs -f {job_id} --address {address}` or in the dashboard.")
    if no_wait:
        return
    import asyncio

    asyncio.run(_follow(client.tail_job_logs(job_id)))
    status = client.get_job_status(job_id)
    click.echo(f"Job {job_id}: {status}")
    if status != JobStatus.SUCCEEDED:
        raise SystemExit(1)


@click.group("fine-tunes")
def fine_tunes() -> None:
    """Tenants' fine-tuning jobs (OpenAI's fine-tuning API): list, show, cancel."""


def _actor(ctx: click.Context, kind: str) -> Any:
    """The fine-tuning actor (`fine-tunes`) or the batch actor (`batches`)."""
    import ray

    config = config_of(ctx)
    connect(config)
    name = config.fine_tuning.actor_name if kind == "fine-tunes" else config.batches.actor_name
    try:
        return ray.get_actor(name, namespace=config.billing.namespace)
    except ValueError as exc:
        what = "fine-tuning job" if kind == "fine-tunes" else "batch"
        raise click.ClickException(f"No {what} has been created on this cluster yet (its actor is not running).") from exc


def _call(ctx: click.Context, method: str, *args: Any, kind: str = "fine-tunes") -> Any:
    import ray

    from common.errors import as_maas_error

    try:
        return ray.get(getattr(_actor(ctx, kind), method).remote(*args), timeout=60)
    except Exception as exc:
        err = as_maas_error(exc)
        if err is None:
            raise
        raise click.ClickException(err.message) from exc


@fine_tunes.command("list")
@click.option("--tenant", default=None, help="Only this tenant's jobs.")
@click.option("--limit", type=click.IntRange(1, 1000), default=50, show_default=True)
@click.pass_context
def fine_tunes_list(ctx: click.Context, tenant: str | None, limit: int) -> None:
    """Jobs, newest first: status, tenant, trained tokens, the model each made, and why a queued one waits."""
    jobs = _call(ctx, "list", tenant, None, limit)["data"]
    if not jobs:
        click.echo("No fine-tuning jobs.")
    for j in jobs:
        made = j["fine_tuned_model"] or "-"
        click.echo(f"{j['id']}  {j['status']:<9}  {j['organization_id']:<16}  {j['trained_tokens'] or 0:>8} tokens  {made}")
        if j.get("queue_reason"):
            click.echo(f"    {j['queue_reason']}")


@fine_tunes.command("show")
@click.argument("job_id")
@click.option("--events", "n_events", type=click.IntRange(0, 1000), default=20, show_default=True, help="Latest events to print.")
@click.pass_context
def fine_tunes_show(ctx: click.Context, job_id: str, n_events: int) -> None:
    """One job and its latest events (steps with their loss, held-out loss, the queue's messages)."""
    click.echo(json.dumps(_call(ctx, "get", None, job_id), indent=2))
    for e in reversed(_call(ctx, "events", None, job_id, None, n_events)["data"]):
        click.echo(f"{e['created_at']}  {e['level']:<5}  {e['message']}")


@fine_tunes.command("cancel")
@click.argument("job_id")
@click.pass_context
def fine_tunes_cancel(ctx: click.Context, job_id: str) -> None:
    """Stop a job: a queued one is never billed, a running one is billed for the tokens it trained."""
    job = _call(ctx, "cancel", None, job_id)
    click.echo(f"{job['id']}: {job['status']}{' (stopping)' if job['status'] == 'running' else ''}")


@click.group("batches")
def batches() -> None:
    """Tenants' batches (OpenAI's Batch API): list, show, cancel."""


@batches.command("list")
@click.option("--tenant", default=None, help="Only this tenant's batches.")
@click.option("--limit", type=click.IntRange(1, 1000), default=50, show_default=True)
@click.pass_context
def batches_list(ctx: click.Context, tenant: str | None, limit: int) -> None:
    """Batches, newest first: status, tenant, requests done of all, endpoint."""
    page = _call(ctx, "list", tenant, None, limit, kind="batches")["data"]
    if not page:
        click.echo("No batches.")
    for b in page:
        counts = b["request_counts"]
        click.echo(f"{b['id']}  {b['status']:<11}  {b.get('tenant', tenant) or '-':<16}  {counts['completed']}+{counts['failed']} failed of {counts['total']}  {b['endpoint']}")


@batches.command("show")
@click.argument("batch_id")
@click.pass_context
def batches_show(ctx: click.Context, batch_id: str) -> None:
    """One batch, as its tenant reads it (`GET /v1/batches/{id}`)."""
    click.echo(json.dumps(_call(ctx, "get", None, batch_id, kind="batches"), indent=2))


@batches.command("cancel")
@click.argument("batch_id")
@click.pass_context
def batches_cancel(ctx: click.Context, batch_id: str) -> None:
    """Stop starting its lines: the running ones finish and are billed, then it is cancelled with their results (audited)."""
    batch = _call(ctx, "cancel", None, batch_id, kind="batches")
    run(billing_admin(ctx).record_audit("cli", "batch.cancel", batch_id, f"status={batch['status']}"))
    click.echo(f"{batch['id']}: {batch['status']}")


COMMANDS = [models, train, fine_tunes, batches]
