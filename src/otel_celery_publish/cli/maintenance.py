"""Keeping the audit table: ``audit migrate`` (create, adopt, upgrade; or print the DDL),
``audit prune`` (retention, after a confirmation), ``audit drain`` (ship the local spool
now; list the quarantine) and ``audit ship`` (the host's sidecar shipper)."""

from __future__ import annotations

import datetime as dt
import logging
import signal
import threading

import click

from otel_celery_publish import audit as api
from otel_celery_publish.cli._options import (
    MAX_BATCH_SIZE,
    FiniteRange,
    as_duration,
    common_options,
    now,
    settings_from,
)
from otel_celery_publish.cli._output import print_json, print_table, utc_time
from otel_celery_publish.schema import migrate as migrations


@click.command()
@common_options
@click.option("--sql", is_flag=True, help="Print the DDL for an empty database; run nothing.")
def migrate(*, audit_url: str | None, table: str | None, as_json: bool, sql: bool) -> None:
    """Create, adopt or upgrade the audit table (Alembic; own version table)."""
    settings = settings_from(audit_url, table, driver=not sql)
    if sql:
        if as_json:
            raise click.UsageError("--sql prints SQL; it has no --json form")
        dialect = migrations.dialect_of(settings.audit_url)
        click.echo(migrations.upgrade_sql(dialect, settings.table_name))
        return
    result = api.migrate_schema(settings=settings)
    if as_json:
        print_json(result)
        return
    click.echo(
        f"audit table {result.table!r}: {result.action}, at revision {result.to_revision} "
        f"(was {result.from_revision or 'unversioned'}; versions in {result.version_table})"
    )


@click.command()
@common_options
@click.option("--older-than", callback=as_duration, default="30d", show_default=True)
@click.option(
    "--batch-size", type=click.IntRange(1, MAX_BATCH_SIZE), default=5000, show_default=True
)
@click.option("--yes", "-y", is_flag=True, help="Do not ask for confirmation.")
def prune(
    *,
    audit_url: str | None,
    table: str | None,
    as_json: bool,
    older_than: dt.timedelta,
    batch_size: int,
    yes: bool,
) -> None:
    """Delete audit rows published before now minus --older-than, in short batches."""
    settings = settings_from(audit_url, table)
    at = now()
    if not yes:
        click.confirm(
            f"Delete every row of {settings.table_name!r} published before "
            f"{utc_time(at - older_than)}?",
            abort=True,
            err=True,
        )
    result = api.prune(settings=settings, older_than=older_than, batch_size=batch_size, now=at)
    if as_json:
        print_json(result)
        return
    click.echo(
        f"deleted {result.deleted} row(s) published before {utc_time(result.cutoff)} "
        f"in {result.batches} batch(es)"
    )


@click.command()
@common_options
def drain(*, audit_url: str | None, table: str | None, as_json: bool) -> None:
    """Ship what dead processes left in the local spool now; list the quarantined records
    (refused by the database even after repair, kept on disk)."""
    settings = settings_from(audit_url, table)
    shipped = api.drain(settings=settings)
    held = api.quarantined(settings=settings)
    if as_json:
        print_json(
            {
                "shipped": shipped,
                "quarantined": [
                    {k: getattr(q, k) for k in ("publish_id", "task_id", "reason", "path")}
                    | {"quarantined_at": q.quarantined_at}
                    for q in held
                ],
            }
        )
        return
    click.echo(f"shipped {shipped} spooled record(s)")
    if held:
        click.echo(f"\n{len(held)} record(s) in quarantine: the database refused them")
        print_table(
            ["PUBLISH ID", "TASK ID", "QUARANTINED (UTC)", "REASON", "FILE"],
            [[q.publish_id, q.task_id, utc_time(q.quarantined_at), q.reason, q.path] for q in held],
        )


@click.command()
@common_options
@click.option("--follow", is_flag=True, help="Keep shipping until SIGTERM (the sidecar).")
@click.option(
    "--interval",
    type=FiniteRange(0.05, 3600.0),
    default=0.5,
    show_default=True,
    help="Seconds between shipping cycles with --follow.",
)
def ship(
    *, audit_url: str | None, table: str | None, as_json: bool, follow: bool, interval: float
) -> None:
    """Ship every spool segment on this host, live ones too. With --follow, run as the host's
    sidecar shipper: the publishing processes then only append to their spool (one per host
    and spool directory; a second one stands by)."""
    settings = settings_from(audit_url, table)
    stop = threading.Event()
    if follow:
        for signum in (signal.SIGTERM, signal.SIGINT):
            signal.signal(signum, lambda *_: stop.set())
        if not logging.getLogger().handlers:
            logging.basicConfig(format="%(asctime)s %(levelname)s %(message)s")
        logging.getLogger("otel_celery_publish").setLevel(logging.INFO)  # standing by, taking over
    shipped = api.ship(settings=settings, follow=follow, interval=interval, stop=stop)
    if as_json:
        print_json({"shipped": shipped})
        return
    click.echo(f"shipped {shipped} spooled record(s)")
