"""``audit watch``: replay lost tasks by policy, every ``--interval`` seconds (or ``--once``)."""

from __future__ import annotations

import json
import logging
import signal
import threading
from typing import Any

import click

from otel_celery_publish import audit as api
from otel_celery_publish.audit._watch import ACTIONS
from otel_celery_publish.cli._options import (
    MAX_LIMIT,
    FiniteRange,
    app_of,
    as_duration,
    common_options,
    settings_from,
)
from otel_celery_publish.cli._output import print_table, to_json

MIN_INTERVAL, MAX_INTERVAL = 0.1, 86400.0


@click.command()
@common_options
@click.option(
    "--interval",
    type=FiniteRange(MIN_INTERVAL, MAX_INTERVAL),
    default=60.0,
    show_default=True,
    help="Seconds between cycles.",
)
@click.option("--once", is_flag=True, help="Run one cycle and exit.")
@click.option("--dry-run", is_flag=True, help="Report what would be done; send nothing.")
@click.option(
    "--since",
    callback=as_duration,
    default="1d",
    show_default=True,
    help="Look at tasks published this long ago at most.",
)
@click.option(
    "--limit",
    type=click.IntRange(1, MAX_LIMIT),
    default=100,
    show_default=True,
    help="At most this many tasks acted on per cycle.",
)
@click.option("--check-results", is_flag=True, help="Leave tasks the result backend saw finish.")
@click.pass_context
def watch(
    ctx: click.Context,
    /,
    *,
    audit_url: str | None,
    table: str | None,
    as_json: bool,
    interval: float,
    once: bool,
    dry_run: bool,
    since: Any,
    limit: int,
    check_results: bool,
) -> None:
    """Replay lost tasks by policy (OTEL_CELERY_PUBLISH_AUTOREPLAY, the task option
    audit_autoreplay), every --interval seconds; dead-letter those that keep getting lost.

    Nothing is replayed unless a rule allows it. Each cycle that acts prints its actions;
    with --json, one JSON line per cycle.
    """
    app = app_of(ctx)
    settings = settings_from(audit_url, table)
    dog = api.Watchdog(
        app, settings=settings, check_results=check_results, since=since, limit=limit
    )
    if not logging.getLogger().handlers:  # the action lines (replayed, dead-lettered...)
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    if once:
        _print(dog.run_once(dry_run=dry_run), as_json)
        return
    if not settings.autoreplay:
        click.echo(
            "Warning: no OTEL_CELERY_PUBLISH_AUTOREPLAY rule: only tasks with the "
            "audit_autoreplay option are replayed",
            err=True,
        )
    stop = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: stop.set())
    # A cycle that did nothing prints nothing (one JSON line each with --json, though).
    dog.run_forever(
        interval,
        dry_run=dry_run,
        stop=stop,
        on_report=lambda r: _print(r, as_json) if r.actions or as_json else None,
    )


def _print(report: api.WatchReport, as_json: bool) -> None:
    if as_json:
        click.echo(json.dumps(to_json(report)))
        return
    print_table(
        ["TASK ID", "TASK", "REASON", "ACTION", "RULE", "AUTO", "QUEUE", "NEW TASK ID", "DETAIL"],
        [
            [
                a.task_id,
                a.task_name,
                a.reason,
                a.action.replace("_", " "),
                a.rule,
                a.auto_replays,
                a.queue,
                a.new_task_id,
                a.detail,
            ]
            for a in report.actions
        ],
    )
    counts = ", ".join(f"{a.replace('_', ' ')} {report.count(a)}" for a in ACTIONS)
    prefix = "dry run: " if report.dry_run else ""
    click.echo(f"{prefix}lost {report.lost} (dead-lettered {report.dead_lettered}); {counts}")
