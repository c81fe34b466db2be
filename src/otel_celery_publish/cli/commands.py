"""``celery -A proj audit ...``: a thin click layer over :mod:`otel_celery_publish.audit`.

Parses, calls the API, prints: a table by default, the documented JSON with ``--json``
(docs/audit.md). Every error is one ``Error: ...`` line on stderr, never a traceback: exit code 2
for a usage error (an option out of range, a bad ``OTEL_CELERY_PUBLISH_*`` variable, named),
1 for a runtime one (database unreachable, table not migrated...) and for a replay that did not
send everything it was asked to. The Celery app (``-A``) is only needed by ``replay`` and
``lost --check-results``.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
import math
import re
import sys
from collections.abc import Callable, Iterable, Sequence
from typing import Any, TypeVar

import click

from otel_celery_publish import audit as api
from otel_celery_publish.audit import _store
from otel_celery_publish.audit._replay import STATUSES, Status, dry_run_report
from otel_celery_publish.audit._stats import METRICS
from otel_celery_publish.cli.timeline import Bar, duration, render
from otel_celery_publish.config import Settings, SettingsError
from otel_celery_publish.schema import migrate as migrations
from otel_celery_publish.schema.table import LOST_REASONS

F = TypeVar("F", bound=Callable[..., Any])
UTC = dt.timezone.utc
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}
_DURATION = re.compile(r"(\d+(?:\.\d+)?)([smhdw])")
# Longer durations reach before the year 1 of a datetime (OverflowError), and a typo such as
# 3000000d is then a clear usage error rather than a traceback.
MAX_DURATION = dt.timedelta(days=36525)
DURATION_HELP = "a duration from 0 to 100 years, like 90s, 10m, 1h30m, 30d, 2w (bare: seconds)"
# Bounds of the counting options: past them a query holds the table or the memory too long.
MAX_LIMIT = 1_000_000
MAX_SLOWEST = 1000
MAX_BATCH_SIZE = 100_000
MIN_RATE, MAX_RATE = 0.001, 100_000.0
MAX_NAME = 255  # the audit table's task id, task name and queue columns
FAILED_OUTCOMES = frozenset({"failed", "revoked", "rejected"})


def parse_duration(text: str) -> dt.timedelta:
    """``90s``, ``10m``, ``1h30m``, ``30d``, ``2w``; a bare number is seconds; 0 to 100 years."""
    text = text.strip().lower()
    try:
        seconds = float(text)
    except ValueError:
        parts = _DURATION.findall(text)
        if not parts or "".join(n + u for n, u in parts) != text:
            raise click.BadParameter(f"{text!r} is not {DURATION_HELP}") from None
        seconds = sum(float(n) * _UNITS[u] for n, u in parts)
    if not (math.isfinite(seconds) and 0 <= seconds <= MAX_DURATION.total_seconds()):
        raise click.BadParameter(f"{text!r} is not {DURATION_HELP}")
    return dt.timedelta(seconds=seconds)


def parse_when(text: str) -> dt.datetime | dt.timedelta:
    """A time: ISO-8601 (naive means UTC; returned in UTC), or a duration meaning that long ago."""
    try:
        parsed = dt.datetime.fromisoformat(text.strip().replace("Z", "+00:00"))
    except ValueError:
        return parse_duration(text)
    try:
        return parsed.replace(tzinfo=UTC) if parsed.tzinfo is None else parsed.astimezone(UTC)
    except OverflowError:  # e.g. 0001-01-01T00:00+01:00 is before the year 1 in UTC
        raise click.BadParameter(f"{text.strip()!r} is out of range in UTC") from None


def resolve_window(
    since: dt.datetime | dt.timedelta,
    until: dt.datetime | dt.timedelta | None,
    now: dt.datetime,
) -> tuple[dt.datetime, dt.datetime | None]:
    """``--since``/``--until`` as times (a duration is that long before ``now``): ``since`` not
    in the future, ``until`` after ``since``; else a usage error naming the option."""
    start = now - since if isinstance(since, dt.timedelta) else since
    end = now - until if isinstance(until, dt.timedelta) else until
    if start > now:
        raise click.BadParameter(f"{_time(start)} is in the future", param_hint="'--since'")
    if end is not None and end <= start:
        raise click.BadParameter(
            f"{_time(end)} is not after --since ({_time(start)})", param_hint="'--until'"
        )
    return start, end


def _duration(_ctx: click.Context, _param: click.Parameter, value: str | None) -> Any:
    return None if value is None else parse_duration(value)


def _when(_ctx: click.Context, _param: click.Parameter, value: str | None) -> Any:
    return None if value is None else parse_when(value)


def _names(_ctx: click.Context, param: click.Parameter, value: Any) -> Any:
    """A task id, task name glob or queue (or a tuple of them): 1 to 255 printable characters."""
    for text in value if isinstance(value, tuple) else () if value is None else (value,):
        if not text or len(text) > MAX_NAME or not text.isprintable():
            raise click.BadParameter(
                f"{_short(text)} is not 1 to {MAX_NAME} printable characters", param=param
            )
    return value


class FiniteRange(click.FloatRange):
    """A FloatRange that also refuses ``nan`` (which compares false with both bounds)."""

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        number = super().convert(value, param, ctx)
        if not math.isfinite(number):
            self.fail(f"{value!r} is not a finite number", param, ctx)
        return number


class UsageLine(click.UsageError):
    """A usage error printed as one ``Error:`` line (exit code 2), without the usage text."""

    def show(self, file: Any = None) -> None:
        click.ClickException.show(self, file)


class _AuditGroup(click.Group):
    """Every subcommand's failure becomes one line: exit code 2 for a usage error (click's own
    and a bad setting), 1 for an operator-facing runtime failure (:class:`api.AuditError`)."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except UsageLine:
            raise
        except click.UsageError as exc:
            raise UsageLine(_one_line(exc.format_message()), exc.ctx) from None
        except SettingsError as exc:
            raise UsageLine(_one_line(str(exc)), ctx) from None
        except api.AuditError as exc:
            raise click.ClickException(_one_line(str(exc))) from None


def _one_line(text: str) -> str:
    return " ".join(text.split())


@click.group(cls=_AuditGroup)
def audit() -> None:
    """Find lost tasks, replay them, report latency (otel-celery-publish).

    The audit database and table come from OTEL_CELERY_PUBLISH_AUDIT_URL and
    OTEL_CELERY_PUBLISH_TABLE_NAME, or --audit-url and --table.
    """


def _common(func: F) -> F:
    options = [
        click.option(
            "--audit-url", help="SQLAlchemy URL of the audit database (postgresql or sqlite)."
        ),
        click.option("--table", help="Audit table name."),
        click.option("--json", "as_json", is_flag=True, help="JSON output (docs/audit.md)."),
    ]
    for option in reversed(options):
        func = option(func)
    return func


_OPTIONS = {"audit_url": "'--audit-url'", "table_name": "'--table'"}


def _settings(audit_url: str | None, table: str | None, *, driver: bool = True) -> Settings:
    """The environment's settings with the options applied. A bad option is a usage error
    naming it, a bad variable one naming the variable; ``driver``: the database driver must
    be importable (not for ``migrate --sql``, which connects nowhere)."""
    try:
        settings = Settings.from_env(audit_url=audit_url, table_name=table)
    except SettingsError as exc:
        if exc.source.startswith("keyword ") and exc.field in _OPTIONS:
            raise click.BadParameter(exc.problem, param_hint=_OPTIONS[exc.field]) from None
        raise
    if driver:
        from sqlalchemy.engine import make_url  # noqa: PLC0415 - the CLI's own check

        try:
            make_url(settings.audit_url).get_dialect().import_dbapi()
        except ImportError as exc:
            raise api.AuditError(
                f"the driver for {_store.safe_url(settings.audit_url)} is not installed: {exc}"
            ) from None
    return settings


def _app(ctx: click.Context) -> Any:
    return ctx.find_root().obj.app


# -- migrate --------------------------------------------------------------------------------


@audit.command()
@_common
@click.option("--sql", is_flag=True, help="Print the DDL for an empty database; run nothing.")
def migrate(*, audit_url: str | None, table: str | None, as_json: bool, sql: bool) -> None:
    """Create, adopt or upgrade the audit table (Alembic; own version table)."""
    settings = _settings(audit_url, table, driver=not sql)
    if sql:
        if as_json:
            raise click.UsageError("--sql prints SQL; it has no --json form")
        dialect = migrations.dialect_of(settings.audit_url)
        click.echo(migrations.upgrade_sql(dialect, settings.table_name))
        return
    result = api.migrate_schema(settings=settings)
    if as_json:
        _print_json(result)
        return
    click.echo(
        f"audit table {result.table!r}: {result.action}, at revision {result.to_revision} "
        f"(was {result.from_revision or 'unversioned'}; versions in {result.version_table})"
    )


# -- lost -----------------------------------------------------------------------------------


def _lost_filters(queue_flag: str) -> Callable[[F], F]:
    def decorate(func: F) -> F:
        options = [
            click.option(
                "--older-than",
                callback=_duration,
                default="10m",
                show_default=True,
                help="Stuck for longer than this.",
            ),
            click.option(
                "--since",
                callback=_when,
                default="1d",
                show_default=True,
                help="Published at or after (ISO time, or duration ago).",
            ),
            click.option("--until", callback=_when, help="Published before (ISO time or ago)."),
            click.option("--task", callback=_names, help="Task name glob, e.g. 'proj.email.*'."),
            click.option(
                queue_flag, "queue_filter", callback=_names, help="Only tasks routed to this queue."
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


def _find_lost(settings: Settings, filters: dict[str, Any]) -> list[api.LostTask]:
    now = _store.now_utc()
    since, until = resolve_window(filters["since"], filters["until"], now)
    return api.lost(
        settings=settings,
        older_than=filters["older_than"],
        since=since,
        until=until,
        task=filters["task"],
        queue=filters["queue_filter"],
        limit=filters["limit"],
        now=now,
    )


@audit.command()
@_common
@_lost_filters("--queue")
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
    tasks = _find_lost(_settings(audit_url, table), filters)
    if check_results:
        tasks = api.check_results(_app(ctx), tasks)
    if as_json:
        _print_json(tasks)
        return
    now = _store.now_utc()
    _print_table(
        ["TASK ID", "TASK", "QUEUE", "ATTEMPT", "REASON", "PUBLISHED (UTC)", "AGE", "WORKER"],
        [
            [
                t.task_id,
                t.task_name,
                t.queue,
                t.attempt,
                LOST_REASONS[t.reason] + (f" [{t.result_state}]" if t.result_state else ""),
                _time(t.published_at),
                duration((now - t.published_at).total_seconds()),
                t.worker,
            ]
            for t in tasks
        ],
    )
    click.echo(f"{len(tasks)} lost task(s)" if tasks else "no lost tasks")


# -- replay ---------------------------------------------------------------------------------


@audit.command()
@_common
@click.argument("task_ids", nargs=-1, callback=_names)
@click.option("--lost", "from_lost", is_flag=True, help="Replay what `lost` reports.")
@_lost_filters("--from-queue")
@click.option(
    "--queue", callback=_names, help="Route the replays to this queue instead of the original one."
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
    settings = _settings(audit_url, table)
    app = _app(ctx)
    publish_ids = [t.publish_id for t in _find_lost(settings, filters)] if from_lost else []
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
        _print_json(
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
    _print_table(
        ["TASK ID", "TASK", "STATUS", "NEW TASK ID", "QUEUE", "ARGS", "KWARGS", "REASON"],
        [
            [
                r.task_id,
                r.task_name,
                r.status.replace("_", " "),
                r.new_task_id,
                r.queue,
                _clip(r.args_repr),
                _clip(r.kwargs_repr),
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


# -- stats ----------------------------------------------------------------------------------


@audit.command()
@_common
@click.option("--since", callback=_when, default="1h", show_default=True, help="ISO time or ago.")
@click.option("--until", callback=_when, help="ISO time or ago (default: now).")
@click.option("--task", callback=_names, help="Task name glob.")
@click.option("--queue", callback=_names, help="Only this queue.")
@click.option("--slowest", type=click.IntRange(0, MAX_SLOWEST), default=10, show_default=True)
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
) -> None:
    """Latency percentiles per task and queue, outcome counts, slowest runs."""
    settings = _settings(audit_url, table)
    now = _store.now_utc()
    start, end = resolve_window(since, until, now)
    result = api.stats(
        settings=settings,
        since=start,
        until=end,
        task=task,
        queue=queue,
        slowest=slowest,
        now=now,
    )
    if as_json:
        _print_json(result)
        return
    outcomes = ", ".join(f"{name} {count}" for name, count in result.outcomes.items())
    click.echo(
        f"{result.count} attempt(s) published {_time(result.since)} .. {_time(result.until)}"
        + (f": {outcomes}" if outcomes else "")
    )
    rows = []
    for g in result.groups:
        for metric in METRICS:
            d: api.Distribution | None = getattr(g, metric)
            if d is not None:
                cells = [duration(v) for v in (d.p50, d.p95, d.p99, d.max)]
                rows.append([g.task_name, g.queue, metric.replace("_", " "), d.count, *cells])
    if rows:
        click.echo()
        _print_table(["TASK", "QUEUE", "METRIC", "N", "P50", "P95", "P99", "MAX"], rows)
    if result.slowest:
        click.echo("\nslowest runs")
        _print_table(
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
                for s in result.slowest
            ],
        )


# -- show -----------------------------------------------------------------------------------


@audit.command()
@_common
@click.argument("task_id", callback=_names)
def show(*, audit_url: str | None, table: str | None, as_json: bool, task_id: str) -> None:
    """Every attempt and replay of TASK_ID: lifecycle, arguments, trace, timeline."""
    history = api.show(task_id, settings=_settings(audit_url, table))
    if as_json:
        _print_json(history)
        return
    now = _store.now_utc().timestamp()
    for number, a in enumerate(history.attempts):
        if number:
            click.echo()
        outcome = a.outcome or ("replayed" if a.replayed_at else "unfinished")
        click.echo(f"{a.task_name}[{a.task_id}] attempt {a.attempt}: {outcome}")
        for label, value in _attempt_fields(a):
            if value not in (None, ""):
                click.echo(f"  {label:<14} {value}")
        click.echo("\n".join(render(lifecycle_bars(a), now=now)))


def _attempt_fields(a: api.Attempt) -> list[tuple[str, Any]]:
    exception = f"{a.exception_type}: {a.exception_message}" if a.exception_type else None
    payload = ("none" if a.payload_bytes is None else f"{a.payload_bytes} bytes") + (
        " (redacted)" if a.payload_redacted else ""
    )
    return [
        ("publish id", a.publish_id),
        ("queue", a.queue),
        ("args", a.args_repr),
        ("kwargs", a.kwargs_repr),
        ("payload", payload),
        ("error", a.error),
        ("eta", _time(a.eta)),
        ("expires", _time(a.expires)),
        ("published", _time(a.published_at)),
        ("sent", _time(a.sent_at)),
        ("received", _time(a.received_at)),
        ("started", _time(a.started_at)),
        ("finished", _time(a.finished_at)),
        ("worker", a.worker),
        ("runtime", None if a.runtime_s is None else duration(a.runtime_s)),
        ("exception", exception),
        ("publisher", f"{a.publisher_host} pid {a.publisher_pid}" if a.publisher_host else None),
        ("trace id", a.trace_id),
        ("trace", a.trace_url),
        ("replay of", a.replay_of),
        ("replayed", f"{_time(a.replayed_at)} as {a.replayed_as}" if a.replayed_at else None),
    ]


def lifecycle_bars(a: api.Attempt) -> list[Bar]:
    """One attempt as timeline bars: the attempt, then its stages with the edges ``stats``
    uses: send (published -> sent), broker wait (ready -> received), worker wait
    (max(received, ready) -> started), run (-> finished). Where an unfinished attempt is stuck,
    the stage is an open bar."""

    def ts(value: dt.datetime | None) -> float | None:
        return None if value is None else value.timestamp()

    published = a.published_at.timestamp()
    sent, received, started, finished = map(
        ts, (a.sent_at, a.received_at, a.started_at, a.finished_at)
    )
    ready = max(sent or published, ts(a.eta) or published)
    picked_up = ready if received is None else max(received, ready)
    stages = [
        ("send", published, sent),
        ("broker wait", ready, received),
        ("worker wait", picked_up, started),
        ("run", started, finished) if started else (a.outcome or "finished", picked_up, finished),
    ]
    last_known = max((i for i, (*_, end) in enumerate(stages) if end is not None), default=-1)
    bars = [
        Bar(
            f"attempt {a.attempt} {a.task_name}",
            published,
            finished,
            error=a.outcome in FAILED_OUTCOMES,
            note=a.outcome or "",
        )
    ]
    for i, (label, begin, end) in enumerate(stages):
        if end is not None:
            bars.append(Bar(label, min(begin or end, end), end, 1))
        elif i > last_known:
            bars.append(Bar(label, begin or published, None, 1))  # where it is stuck
            break
    return bars


# -- prune, drain ---------------------------------------------------------------------------


@audit.command()
@_common
@click.option("--older-than", callback=_duration, default="30d", show_default=True)
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
    settings = _settings(audit_url, table)
    now = _store.now_utc()
    if not yes:
        click.confirm(
            f"Delete every row of {settings.table_name!r} published before "
            f"{_time(now - older_than)}?",
            abort=True,
            err=True,
        )
    result = api.prune(settings=settings, older_than=older_than, batch_size=batch_size, now=now)
    if as_json:
        _print_json(result)
        return
    click.echo(
        f"deleted {result.deleted} row(s) published before {_time(result.cutoff)} "
        f"in {result.batches} batch(es)"
    )


@audit.command()
@_common
def drain(*, audit_url: str | None, table: str | None, as_json: bool) -> None:
    """Ship what dead processes left in the local spool now; list the quarantined records
    (refused by the database even after repair, kept on disk)."""
    settings = _settings(audit_url, table)
    shipped = api.drain(settings=settings)
    held = api.quarantined(settings=settings)
    if as_json:
        _print_json(
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
        _print_table(
            ["PUBLISH ID", "TASK ID", "QUARANTINED (UTC)", "REASON", "FILE"],
            [[q.publish_id, q.task_id, _time(q.quarantined_at), q.reason, q.path] for q in held],
        )


# -- output ---------------------------------------------------------------------------------


def jsonable(value: Any) -> Any:
    """Dataclasses as objects, times as ISO-8601 UTC strings, everything else as JSON has it."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: jsonable(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if isinstance(value, dt.datetime):
        aware = value if value.tzinfo else value.replace(tzinfo=UTC)
        return aware.astimezone(UTC).isoformat()
    return value


def _print_json(value: Any) -> None:
    click.echo(json.dumps(jsonable(value), indent=2))


def _time(value: dt.datetime | None) -> str | None:
    # isoformat, not strftime: %Y does not pad the years before 1000.
    utc = None if value is None else value.astimezone(UTC).replace(tzinfo=None)
    return None if utc is None else utc.isoformat(" ", "milliseconds")


def _short(text: str, width: int = 40) -> str:
    shown = repr(text)
    return shown if len(shown) <= width else shown[: width - 4] + "...'"


def _clip(text: str | None, width: int = 40) -> str | None:
    return text if text is None or len(text) <= width else text[: width - 1] + "…"


def _print_table(headers: Sequence[str], rows: Iterable[Sequence[Any]], err: bool = False) -> None:
    cells = [["" if v is None else str(v) for v in row] for row in rows]
    if not cells:
        return
    widths = [max(len(h), *(len(row[i]) for row in cells)) for i, h in enumerate(headers)]
    for row in [list(headers), *cells]:
        click.echo(
            "  ".join(v.ljust(w) for v, w in zip(row, widths, strict=True)).rstrip(), err=err
        )
