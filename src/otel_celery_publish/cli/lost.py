"""``audit lost`` (stuck attempts, each with a reason) and ``audit replay`` (re-publish them, on
the record); ``replay --lost`` takes the same filters as ``lost``."""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any

import click

from otel_celery_publish import audit as api
from otel_celery_publish.audit._replay import STATUSES, Status, dry_run_report
from otel_celery_publish.cli._options import (
    MAX_LIMIT,
    MAX_RATE,
    MIN_RATE,
    F,
    FiniteRange,
    app_of,
    as_duration,
    as_names,
    as_when,
    common_options,
    now,
    resolve_window,
    settings_from,
)
from otel_celery_publish.cli._output import clip, print_json, print_table, utc_time
from otel_celery_publish.config import Settings
from otel_celery_publish.schema.table import LOST_REASONS
from otel_celery_publish.timeline import duration


def lost_filters(queue_flag: str) -> Callable[[F], F]:
    """The options that select lost tasks; ``queue_flag`` names the queue filter's option."""

    def decorate(func: F) -> F:
        options = [
            click.option(
                "--older-than",
                callback=as_duration,
                default="10m",
                show_default=True,
                help="Stuck for longer than this.",
            ),
            click.option(
                "--since",
                callback=as_when,
                default="1d",
                show_default=True,
                help="Published at or after (ISO time, or duration ago).",
            ),
            click.option("--until", callback=as_when, help="Published before (ISO time or ago)."),
            click.option("--task", callback=as_names, help="Task name glob, e.g. 'proj.email.*'."),
            click.option(
                queue_flag,
                "queue_filter",
                callback=as_names,
                help="Only tasks routed to this queue.",
            ),
            click.option(
                "--limit",
                type=click.IntRange(1, MAX_LIMIT),
                default=100,
                show_default=True,
                help="At most this many tasks.",
            ),
        ]
        for option in reversed(options):
            func = option(func)
        return func

    return decorate


def find_lost(settings: Settings, filters: dict[str, Any]) -> list[api.LostTask]:
    """:func:`api.lost` with the options of :func:`lost_filters`."""
    at = now()
    since, until = resolve_window(filters["since"], filters["until"], at)
    return api.lost(
        settings=settings,
        older_than=filters["older_than"],
        since=since,
        until=until,
        task=filters["task"],
        queue=filters["queue_filter"],
        limit=filters["limit"],
        now=at,
    )


@click.command()
@common_options
@lost_filters("--queue")
@click.option("--check-results", is_flag=True, help="Drop tasks the result backend saw finish.")
@click.pass_context
def lost(
    ctx: click.Context,
    /,
    *,
    audit_url: str | None,
    table: str | None,
    as_json: bool,
    check_results: bool,
    **filters: Any,
) -> None:
    """Tasks published but never received, or received and never finished."""
    # The app first: its task modules (and Django) loaded before the settings are read.
    app = app_of(ctx) if check_results else None
    tasks = find_lost(settings_from(audit_url, table), filters)
    if app is not None:
        tasks = api.check_results(app, tasks)
    if as_json:
        print_json(tasks)
        return
    at = now()
    print_table(
        ["TASK ID", "TASK", "QUEUE", "ATTEMPT", "REASON", "PUBLISHED (UTC)", "AGE", "WORKER"],
        [
            [
                t.task_id,
                t.task_name,
                t.queue,
                t.attempt,
                LOST_REASONS[t.reason]
                + (f" [{t.result_state}]" if t.result_state else "")
                + (" [dead-lettered]" if t.dead_lettered_at else ""),
                utc_time(t.published_at),
                duration((at - t.published_at).total_seconds()),
                t.worker,
            ]
            for t in tasks
        ],
    )
    click.echo(f"{len(tasks)} lost task(s)" if tasks else "no lost tasks")


@click.command()
@common_options
@click.argument("task_ids", nargs=-1, callback=as_names)
@click.option("--lost", "from_lost", is_flag=True, help="Replay what `lost` reports.")
@lost_filters("--from-queue")
@click.option(
    "--queue",
    callback=as_names,
    help="Route the replays to this queue instead of the original one.",
)
@click.option("--keep-id", is_flag=True, help="Re-send under the original task id.")
@click.option("--force", is_flag=True, help="Also replay succeeded, replayed or expired tasks.")
@click.option("--allow-unregistered", is_flag=True, help="Send task names this app lacks.")
@click.option("--allow-redacted", is_flag=True, help="Send payloads redacted at publish.")
@click.option("--dry-run", is_flag=True, help="Show what would be sent; send nothing.")
@click.option("--yes", "-y", is_flag=True, help="Do not ask for confirmation.")
@click.option(
    "--rate",
    type=FiniteRange(MIN_RATE, MAX_RATE),
    help=f"At most this many per second ({MIN_RATE:g} to {MAX_RATE:g}).",
)
@click.pass_context
def replay(
    ctx: click.Context,
    /,
    *,
    audit_url: str | None,
    table: str | None,
    as_json: bool,
    task_ids: tuple[str, ...],
    from_lost: bool,
    queue: str | None,
    keep_id: bool,
    force: bool,
    allow_unregistered: bool,
    allow_redacted: bool,
    dry_run: bool,
    yes: bool,
    rate: float | None,
    **filters: Any,
) -> None:
    """Re-publish TASK_IDS (their latest attempt), or with --lost what `lost` reports."""
    if bool(task_ids) == from_lost:
        raise click.UsageError("give either TASK_IDS or --lost (with its filters)")
    app = app_of(ctx)
    settings = settings_from(audit_url, table)
    publish_ids = [t.publish_id for t in find_lost(settings, filters)] if from_lost else []
    policy = api.Policy(queue, keep_id, force, allow_unregistered, allow_redacted)
    planned = api.plan_replay(
        app, task_ids, publish_ids=publish_ids, policy=policy, settings=settings
    )
    sendable = sum(1 for p in planned if p.refused is None)
    if dry_run:
        report = dry_run_report(planned)
    else:
        if sendable and not yes:
            _print_replays(dry_run_report(planned), err=True)
            click.confirm(f"Re-send {sendable} task(s)?", abort=True, err=True)
        report = _send_with_progress(app, planned, settings, rate, show=not as_json)
    if as_json:
        print_json(
            {
                "dry_run": report.dry_run,
                **{s: report.count(s) for s in STATUSES},
                "results": report.results,
            }
        )
    else:
        _print_replays(report)
    if not report.ok:
        ctx.exit(1)


def _send_with_progress(
    app: Any, planned: list[api.Planned], settings: Settings, rate: float | None, show: bool
) -> api.ReplayReport:
    if not show or len(planned) < 2 or not sys.stderr.isatty():
        return api.send_replay(app, planned, settings=settings, rate=rate)
    with click.progressbar(length=len(planned), label="replaying", file=sys.stderr) as bar:
        return api.send_replay(
            app, planned, settings=settings, rate=rate, on_done=lambda _: bar.update(1)
        )


def _print_replays(report: api.ReplayReport, err: bool = False) -> None:
    print_table(
        ["TASK ID", "TASK", "STATUS", "NEW TASK ID", "QUEUE", "ARGS", "KWARGS", "REASON"],
        [
            [
                r.task_id,
                r.task_name,
                r.status.replace("_", " "),
                r.new_task_id,
                r.queue,
                clip(r.args_repr),
                clip(r.kwargs_repr),
                r.reason,
            ]
            for r in report.results
        ],
        err=err,
    )
    counts: tuple[Status, ...] = (
        ("would_send", "refused") if report.dry_run else ("sent", "refused", "failed")
    )
    summary = ", ".join(f"{status.replace('_', ' ')} {report.count(status)}" for status in counts)
    click.echo(("dry run: " if report.dry_run else "") + summary, err=err)
