"""``audit stats``: latency percentiles per task and queue (computed in the database), outcome
counts, the slowest runs and published vs processed per queue (per minute with
``--per-minute``) of a time window."""

from __future__ import annotations

import datetime as dt

import click

from otel_celery_publish import audit as api
from otel_celery_publish.audit._stats import METRICS, QueueStats
from otel_celery_publish.cli._options import (
    MAX_SLOWEST,
    as_names,
    as_when,
    common_options,
    now,
    resolve_window,
    settings_from,
)
from otel_celery_publish.cli._output import print_json, print_table, utc_time
from otel_celery_publish.timeline import duration

DUE_NOTE = (
    "waits and end to end count from when a task was due (its ETA or countdown, else its "
    "publish); scheduled delay is ETA - publish, over the tasks that had one"
)
"""Under the table: a countdown is not latency, and the reader should not have to guess that."""
PROCESSED_NOTE = (
    "processed: finished (any outcome) in the window, among the attempts published in it"
)
"""Under the queue table: which attempts ``processed`` counts (audit/_stats.py)."""


@click.command()
@common_options
@click.option("--since", callback=as_when, default="1h", show_default=True, help="ISO time or ago.")
@click.option("--until", callback=as_when, help="ISO time or ago (default: now).")
@click.option("--task", callback=as_names, help="Task name glob.")
@click.option("--queue", callback=as_names, help="Only this queue.")
@click.option("--slowest", type=click.IntRange(0, MAX_SLOWEST), default=10, show_default=True)
@click.option(
    "--per-minute",
    is_flag=True,
    help="Also print published vs processed per queue and minute (--json always has them).",
)
def stats(
    *,
    audit_url: str | None,
    table: str | None,
    as_json: bool,
    since: dt.datetime | dt.timedelta,
    until: dt.datetime | dt.timedelta | None,
    task: str | None,
    queue: str | None,
    slowest: int,
    per_minute: bool,
) -> None:
    """Latency percentiles per task and queue, outcome counts, slowest runs, and published vs
    processed per queue.

    Waits and end to end count from when a task was due (an ETA or countdown task from its
    ETA); the countdown itself is the separate "scheduled delay". Processed counts the
    attempts published in the window that finished in it, whatever their outcome.
    """
    settings = settings_from(audit_url, table)
    at = now()
    start, end = resolve_window(since, until, at)
    result = api.stats(
        settings=settings,
        since=start,
        until=end,
        task=task,
        queue=queue,
        slowest=slowest,
        now=at,
    )
    if as_json:
        print_json(result)
        return
    outcomes = ", ".join(f"{name} {count}" for name, count in result.outcomes.items())
    click.echo(
        f"{result.count} attempt(s) published {utc_time(result.since)} .. {utc_time(result.until)}"
        + (f": {outcomes}" if outcomes else "")
    )
    _print_groups(result.groups)
    _print_queues(result.queues, (result.until - result.since).total_seconds() / 60)
    if per_minute:
        _print_minutes(result.queues)
    _print_slowest(result.slowest)


def _print_groups(groups: list[api.GroupStats]) -> None:
    rows = []
    for g in groups:
        for metric in METRICS:
            d: api.Distribution | None = getattr(g, metric)
            if d is not None:
                cells = [duration(v) for v in (d.p50, d.p95, d.p99, d.max)]
                rows.append([g.task_name, g.queue, metric.replace("_", " "), d.count, *cells])
    if rows:
        click.echo()
        print_table(["TASK", "QUEUE", "METRIC", "N", "P50", "P95", "P99", "MAX"], rows)
        click.echo(DUE_NOTE)


def _print_queues(queues: list[QueueStats], minutes: float) -> None:
    if not queues:
        return
    click.echo("\npublished vs processed per queue")
    print_table(
        ["QUEUE", "PUBLISHED", "PROCESSED", "PUBLISHED/MIN", "PROCESSED/MIN"],
        [
            [
                q.queue,
                q.published,
                q.processed,
                *(_rate(n, minutes) for n in (q.published, q.processed)),
            ]
            for q in queues
        ],
    )
    click.echo(PROCESSED_NOTE)


def _rate(count: int, minutes: float) -> str:
    return f"{count / minutes:.1f}" if minutes > 0 else ""


def _print_minutes(queues: list[QueueStats]) -> None:
    rows = [
        [
            q.queue,
            m.minute.astimezone(dt.timezone.utc).strftime("%Y-%m-%d %H:%M"),
            m.published,
            m.processed,
        ]
        for q in queues
        for m in q.minutes
    ]
    if rows:
        click.echo("\nper minute (UTC; minutes with nothing published or processed are left out)")
        print_table(["QUEUE", "MINUTE", "PUBLISHED", "PROCESSED"], rows)


def _print_slowest(slowest: list[api.SlowTask]) -> None:
    if not slowest:
        return
    click.echo("\nslowest runs")
    print_table(
        ["TASK ID", "TASK", "QUEUE", "RUN", "END TO END", "OUTCOME"],
        [
            [
                s.task_id,
                s.task_name,
                s.queue,
                duration(s.run_time),
                None if s.end_to_end is None else duration(s.end_to_end),
                s.outcome,
            ]
            for s in slowest
        ],
    )
