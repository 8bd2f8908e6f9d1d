"""`maas keys ... | usage | audit | invoice`: tenants' keys, usage, the audit log and invoices, through the billing actor."""

from __future__ import annotations

import re
import time
from datetime import datetime, timezone
from pathlib import Path

import click

from billing.quota import period_of
from cluster.cli.common import billing_admin, run


def _when(ts: float | None, fmt: str = "%Y-%m-%d %H:%M") -> str:
    return datetime.fromtimestamp(ts, timezone.utc).strftime(fmt) if ts else "-"


def _duration_s(text: str | None) -> float | None:
    if not text:
        return None
    units = {"s": 1, "m": 60, "h": 3600, "d": 86400}
    try:
        return float(text[:-1]) * units[text[-1]] if text[-1] in units else float(text)
    except (ValueError, KeyError) as exc:
        raise click.BadParameter(f"{text!r}: use e.g. 30s, 15m, 12h or 90d") from exc


def _month(value: str | None) -> str:
    if value is None:
        return period_of(time.time())
    if not re.fullmatch(r"\d{4}-(0[1-9]|1[0-2])", value):
        raise click.BadParameter(f"{value!r}: use YYYY-MM")
    return value


@click.group()
def keys() -> None:
    """API keys: create (shown once), list, update, revoke."""


def _metadata(pairs: tuple[str, ...]) -> dict[str, str]:
    split = [m.partition("=") for m in pairs]
    if any(not k or not sep for k, sep, _ in split):
        raise click.BadParameter("use KEY=VALUE", param_hint="--metadata")
    return {k: v for k, _, v in split}


def _policy_line(record) -> str:
    limits = [f"models {', '.join(record.models)}" if record.models else "", f"budget {record.monthly_budget}/month" if record.monthly_budget is not None else "",
              f"{record.rpm} RPM" if record.rpm else "", f"{record.tpm} TPM" if record.tpm else ""]  # fmt: skip
    return "; ".join(x for x in limits if x)


@keys.command("create")
@click.option("--tenant", required=True, help="Tenant the key bills to (created if new).")
@click.option("--plan", default=None, help="Set the tenant's plan (default: kept, or billing.default_plan for a new tenant).")
@click.option("--admin", is_flag=True, help="An operator key for /admin/* instead of a tenant key.")
@click.option("--expires-in", default=None, help="Lifetime, e.g. 30d or 12h (default: never expires).")
@click.option("--name", default="", help="A note to recognise the key by.")
@click.option("--model", "models", multiple=True, help="A model the key may call (repeat for several; default: all). Others get 403 model_not_allowed.")
@click.option("--budget", default=None, help="The key's own monthly budget, inside its tenant's (e.g. 25.00).")
@click.option("--rpm", type=click.IntRange(min=1), default=None, help="The key's own requests per minute, inside its tenant's.")
@click.option("--tpm", type=click.IntRange(min=1), default=None, help="The key's own tokens per minute, inside its tenant's.")
@click.option("--metadata", "metadata", multiple=True, help="KEY=VALUE kept with the key (repeat for several).")
@click.pass_context
def keys_create(
    ctx: click.Context, tenant: str, plan: str | None, admin: bool, expires_in: str | None, name: str,
    models: tuple[str, ...], budget: str | None, rpm: int | None, tpm: int | None, metadata: tuple[str, ...],
) -> None:  # fmt: skip
    policy = {"models": list(models) or None, "monthly_budget": budget, "rpm": rpm, "tpm": tpm, "metadata": _metadata(metadata) or None}
    _, billing = billing_admin(ctx)
    key, record = run(billing.create_key(tenant, plan, "admin" if admin else "tenant", _duration_s(expires_in), name, "cli", policy))
    click.echo(f"Created {record.role} key {record.key_id}… for tenant {record.tenant}. It is shown only now:\n\n  {key}\n")
    if _policy_line(record):
        click.echo("Its own policy, inside the tenant's: " + _policy_line(record))


CLEARABLE = {"models": "models", "budget": "monthly_budget", "rpm": "rpm", "tpm": "tpm", "metadata": "metadata"}


@keys.command("update")
@click.argument("key_id")
@click.option("--name", default=None, help="A new note to recognise the key by.")
@click.option("--model", "models", multiple=True, help="The models the key may call from now on (repeat for several; replaces its list).")
@click.option("--budget", default=None, help="The key's own monthly budget, inside its tenant's (e.g. 25.00).")
@click.option("--rpm", type=click.IntRange(min=1), default=None, help="The key's own requests per minute, inside its tenant's.")
@click.option("--tpm", type=click.IntRange(min=1), default=None, help="The key's own tokens per minute, inside its tenant's.")
@click.option("--metadata", "metadata", multiple=True, help="KEY=VALUE kept with the key (repeat for several; replaces its metadata).")
@click.option("--clear", "clear", multiple=True, type=click.Choice(sorted(CLEARABLE)), help="Remove one of the key's own limits (repeat for several): models means all models.")
@click.pass_context
def keys_update(
    ctx: click.Context, key_id: str, name: str | None, models: tuple[str, ...], budget: str | None, rpm: int | None, tpm: int | None,
    metadata: tuple[str, ...], clear: tuple[str, ...],
) -> None:  # fmt: skip
    """Change a key's name, models or own limits in place (the same secret); what is not named stays."""
    changes = {k: v for k, v in (("name", name), ("models", list(models) or None), ("monthly_budget", budget), ("rpm", rpm), ("tpm", tpm), ("metadata", _metadata(metadata) or None)) if v is not None}
    both = sorted(f for f in clear if CLEARABLE[f] in changes)
    if both:
        raise click.UsageError(f"--clear {both[0]} and a new value for it at once: give one or the other.")
    changes.update({CLEARABLE[f]: None for f in clear})
    if not changes:
        raise click.UsageError("Nothing to change: give --name, --model, --budget, --rpm, --tpm, --metadata or --clear.")
    _, billing = billing_admin(ctx)
    record = run(billing.update_key(key_id.rstrip("…"), changes, "cli"))
    click.echo(f"Updated {record.key_id}… (tenant {record.tenant}); every ingress replica applies it within a second.")
    click.echo("Its own policy, inside the tenant's: " + (_policy_line(record) or "none (the tenant's plan alone)"))


@keys.command("list")
@click.option("--tenant", default=None)
@click.pass_context
def keys_list(ctx: click.Context, tenant: str | None) -> None:
    _, billing = billing_admin(ctx)
    click.echo(f"{'KEY ID':<20} {'TENANT':<16} {'ROLE':<7} {'CREATED':<17} {'EXPIRES':<17} {'REVOKED':<17} {'NAME':<16} POLICY")
    for k in run(billing.list_keys(tenant)):
        policy = " ".join(x for x in (",".join(k.models), f"budget={k.monthly_budget}" if k.monthly_budget is not None else "", f"rpm={k.rpm}" if k.rpm else "", f"tpm={k.tpm}" if k.tpm else "", k.metadata) if x)
        click.echo(f"{k.key_id:<20} {k.tenant:<16} {k.role:<7} {_when(k.created_at):<17} {_when(k.expires_at):<17} {_when(k.revoked_at):<17} {k.name:<16} {policy}")


@keys.command("revoke")
@click.argument("key_id")
@click.pass_context
def keys_revoke(ctx: click.Context, key_id: str) -> None:
    _, billing = billing_admin(ctx)
    record = run(billing.revoke_key(key_id.rstrip("…"), "cli"))
    click.echo(f"Revoked {record.key_id} (tenant {record.tenant}); every ingress replica refuses it within a second.")


@click.command()
@click.option("--tenant", default=None, help="One tenant (default: all).")
@click.option("--month", default=None, help="YYYY-MM (default: this month, UTC).")
@click.pass_context
def usage(ctx: click.Context, tenant: str | None, month: str | None) -> None:
    """Usage by tenant, day, model and version, from the ledger."""
    from billing.reports import usage_report

    config, billing = billing_admin(ctx)
    period = _month(month)
    report = usage_report(run(billing.spend_rows(period, tenant, by_day=True)), period, config.billing.price_book.currency, tenant)
    for line in usage_table(report):
        click.echo(line)


def usage_table(report: dict) -> list[str]:
    """`maas usage`'s lines for a usage report: a row per tenant, day, model and version, then the total.

    Text columns are as wide as their longest entry: a fine-tune's id (`ft:<base>:<tenant>:<suffix>:<job>`)
    and its `training` line are longer than any base model's."""
    rows = report["data"]
    tw, mw, vw = (max([len(head), *(len(str(r[k])) for r in rows)]) for k, head in (("tenant", "TENANT"), ("model", "MODEL"), ("version", "VER")))
    t = report["total"]
    return [
        f"{'TENANT':<{tw}} {'DAY':<10} {'MODEL':<{mw}} {'VER':<{vw}} {'REQS':>7} {'PROMPT':>10} {'CACHED':>10} {'COMPLETION':>10} {'COST':>14}",
        *(
            f"{r['tenant']:<{tw}} {r['day']:<10} {r['model']:<{mw}} {r['version']:<{vw}} {r['requests']:>7} {r['prompt_tokens']:>10} {r['cached_tokens']:>10} "
            f"{r['completion_tokens']:>10} {r['cost']:>14}"
            for r in rows
        ),
        f"{'TOTAL':<{tw + 1 + 10 + 1 + mw + 1 + vw}} {t['requests']:>7} {t['prompt_tokens']:>10} {t['cached_tokens']:>10} {t['completion_tokens']:>10} {t['cost']:>14} {report['currency']}",
    ]


@click.command()
@click.option("--limit", type=int, default=50, show_default=True)
@click.pass_context
def audit(ctx: click.Context, limit: int) -> None:
    """Who did what to keys, plans and prices, newest first (from the ledger database)."""
    _, billing = billing_admin(ctx)
    for a in run(billing.audit_log(limit)):
        click.echo(f"{_when(a['ts'], '%Y-%m-%d %H:%M:%S')}  {a['who']:<20} {a['action']:<18} {a['target']:<24} {a['detail'][:120]}")


@click.command()
@click.option("--month", required=True, help="YYYY-MM (UTC calendar month).")
@click.option("--tenant", default=None, help="One tenant (default: every tenant with usage).")
@click.option("--format", "fmt", type=click.Choice(["csv", "parquet"]), default="csv")
@click.option("--out", "out_dir", type=click.Path(file_okay=False, path_type=Path), default=Path("invoices"), help="Folder for the files.")
@click.pass_context
def invoice(ctx: click.Context, month: str, tenant: str | None, fmt: str, out_dir: Path) -> None:
    """Monthly invoices (one file per tenant), built with pandas from the ledger, exact to the cent."""
    from billing.invoice import build_invoices, write_invoice

    config, billing = billing_admin(ctx)
    period = _month(month)
    invoices = build_invoices(run(billing.spend_rows(period, tenant)), period, config.billing.price_book.currency, tenant)
    if not invoices:
        click.echo(f"No usage in {period}.")
    for inv in invoices:
        path = write_invoice(inv, out_dir / f"invoice-{inv.tenant}-{period}.{fmt}", fmt)
        click.echo(f"{inv.tenant}: {len(inv.lines)} lines, total {inv.total} {inv.currency} -> {path}")


@click.group()
def alerts() -> None:
    """Budget alerts (signed webhooks)."""


@alerts.command("secret")
@click.option("--tenant", required=True, help="The tenant whose receiver verifies the deliveries.")
def alerts_secret(tenant: str) -> None:
    """The secret that signs this tenant's alerts, for its receiver (derived from MAAS_WEBHOOK_SECRET; one tenant's cannot sign another's)."""
    from billing.alerts import tenant_secret
    from billing.keys import check_tenant
    from common import envs

    master = envs.MAAS_WEBHOOK_SECRET
    if master is None:
        raise click.ClickException("MAAS_WEBHOOK_SECRET is not set: set it as the billing actor's is.")
    click.echo(tenant_secret(master, check_tenant(tenant)))


COMMANDS = [keys, usage, audit, invoice, alerts]
