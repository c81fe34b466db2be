"""Latency statistics over a time window, computed in the database (rows never reach Python).

Per publish attempt (row), in seconds, over the lifecycle edges of
:mod:`otel_celery_publish.timing` (the queue-wait spans' edges; ``ready = max(published_at, eta)``,
``received = max(received_at, ready)``, each no later than ``started_at``):

* ``scheduled_delay`` = ``ready - published_at``, only for attempts published with an ETA or
  countdown: the delay the publisher asked for, which is no one's wait, so no other metric
  counts it;
* ``broker_wait`` = ``received - ready``;
* ``worker_wait`` = ``started_at - received``: prefetched, waiting for a pool process; an ETA
  task held by the worker until its ETA does not count as waiting;
* ``run_time`` = ``runtime_s`` (measured on the worker), else ``finished_at - started_at``;
* ``end_to_end`` = ``finished_at - ready``: from when the task was due, so a countdown of 60 s
  does not show as 60 s end to end (``scheduled_delay`` reports it).

Outcomes are the row's own, else ``replayed`` (no outcome, but ``audit replay`` re-sent it: the
replay carries on, on its own row) or ``unfinished`` (no outcome and not replayed), as
``show`` names an attempt.

Per queue, the attempts ``published`` and ``processed`` in the window, in total and per minute
(what a queue dashboard shows as published vs processed, exactly rather than sampled):
``published`` counts by the minute of ``published_at``; ``processed`` counts the attempts that
finished (``finished_at`` set, whatever the outcome) within ``[since, until)``, by the minute of
``finished_at``, *among the attempts published in the window*. So the window is read through the
``published_at`` index only: a task published before ``since`` and finished inside the window is
not counted, and in the first minutes of a window ``processed`` reads low by the tasks that were
already waiting. Minutes are UTC, listed only when something was published or processed in them.

Edges come from different machines' clocks: the clamps make a negative difference (clock skew)
count as 0. A metric whose edges are missing (not received yet, never started...) leaves the row
out of that metric only. Percentiles are continuous (linear interpolation between the two nearest
ranks): ``percentile_cont`` on PostgreSQL, the same formula with window functions on SQLite.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
from collections.abc import Sequence
from typing import Any

from sqlalchemy import (
    CTE,
    BigInteger,
    ColumnElement,
    Float,
    Integer,
    Select,
    case,
    cast,
    func,
    literal_column,
    select,
    union_all,
)

from otel_celery_publish import timing
from otel_celery_publish.audit import _db
from otel_celery_publish.audit._db import TableAccess, filters, open_db, utc
from otel_celery_publish.config import Settings

METRICS = ("scheduled_delay", "broker_wait", "worker_wait", "run_time", "end_to_end")
PERCENTILES = {"p50": 0.5, "p95": 0.95, "p99": 0.99}
UNFINISHED = "unfinished"
REPLAYED = "replayed"


@dataclasses.dataclass(frozen=True)
class Distribution:
    """Samples and their percentiles, in seconds."""

    count: int
    p50: float
    p95: float
    p99: float
    max: float


@dataclasses.dataclass(frozen=True)
class GroupStats:
    """One task name on one queue."""

    task_name: str
    queue: str | None
    count: int
    outcomes: dict[str, int]
    scheduled_delay: Distribution | None
    """Over the attempts published with an ETA or countdown only (None: there were none)."""
    broker_wait: Distribution | None
    worker_wait: Distribution | None
    run_time: Distribution | None
    end_to_end: Distribution | None


@dataclasses.dataclass(frozen=True)
class SlowTask:
    task_id: str
    task_name: str
    queue: str | None
    publish_id: str
    published_at: dt.datetime
    outcome: str | None
    run_time: float
    end_to_end: float | None


@dataclasses.dataclass(frozen=True)
class Minute:
    """One UTC minute of one queue: attempts published in it, attempts that finished in it."""

    minute: dt.datetime
    published: int
    processed: int


@dataclasses.dataclass(frozen=True)
class QueueStats:
    """One queue over the window: published vs processed, in total and per minute (module
    docstring: ``processed`` is among the attempts published in the window)."""

    queue: str | None
    published: int
    processed: int
    minutes: list[Minute]
    """Oldest first; only the minutes in which something was published or processed."""


@dataclasses.dataclass(frozen=True)
class Stats:
    """Attempts published in ``[since, until)``: totals, per task and queue, the slowest, and
    published vs processed per queue."""

    since: dt.datetime
    until: dt.datetime
    count: int
    outcomes: dict[str, int]
    groups: list[GroupStats]
    slowest: list[SlowTask]
    queues: list[QueueStats]


def stats(
    *,
    settings: Settings | None = None,
    since: dt.datetime | dt.timedelta = dt.timedelta(hours=1),
    until: dt.datetime | None = None,
    task: str | None = None,
    queue: str | None = None,
    slowest: int = 10,
    now: dt.datetime | None = None,
) -> Stats:
    """Latency percentiles per task name and queue, outcome counts and the ``slowest`` runs
    for attempts published in the window (``since`` may be a datetime or a time before now)."""
    now = now or _db.now_utc()
    start = now - since if isinstance(since, dt.timedelta) else since
    end = until or now
    with open_db(settings) as db:
        query = queries(db, start, end, task=task, queue=queue, slowest=slowest)
        percentiles = {
            (row.task_name, row.queue): _distributions(row._mapping)
            for row in db.rows(query["percentiles"])
        }
        outcomes: dict[tuple[str, str | None], dict[str, int]] = {}
        for row in db.rows(query["outcomes"]):
            key = (row.task_name, row.queue)
            outcomes.setdefault(key, {})[row.outcome] = int(row.n)
        slow = [
            SlowTask(
                task_id=r.task_id,
                task_name=r.task_name,
                queue=r.queue,
                publish_id=r.publish_id,
                published_at=utc(r.published_at),  # type: ignore[arg-type]
                outcome=r.outcome,
                run_time=float(r.run_time),
                end_to_end=None if r.end_to_end is None else float(r.end_to_end),
            )
            for r in db.rows(query["slowest"])
        ]
        queues = _queues(db.rows(query["throughput"]))
    groups = [
        GroupStats(
            task_name=key[0],
            queue=key[1],
            count=sum(counts.values()),
            outcomes=dict(sorted(counts.items())),
            **{metric: percentiles.get(key, {}).get(metric) for metric in METRICS},
        )
        for key, counts in outcomes.items()
    ]
    groups.sort(key=lambda g: (-g.count, g.task_name, g.queue or ""))
    totals: dict[str, int] = {}
    for group in groups:
        for outcome, count in group.outcomes.items():
            totals[outcome] = totals.get(outcome, 0) + count
    return Stats(
        start, end, sum(totals.values()), dict(sorted(totals.items())), groups, slow, queues
    )


def _queues(rows: Sequence[Any]) -> list[QueueStats]:
    """``throughput`` rows (queue, minute epoch, published, processed) as :class:`QueueStats`,
    busiest queue first."""
    minutes: dict[str | None, list[Minute]] = {}
    for r in rows:
        at = dt.datetime.fromtimestamp(int(r.minute), tz=dt.timezone.utc)
        minutes.setdefault(r.queue, []).append(Minute(at, int(r.published), int(r.processed)))
    queues = [
        QueueStats(
            queue=queue,
            published=sum(m.published for m in found),
            processed=sum(m.processed for m in found),
            minutes=sorted(found, key=lambda m: m.minute),
        )
        for queue, found in minutes.items()
    ]
    queues.sort(key=lambda q: (-q.published, q.queue or ""))
    return queues


def _distributions(row: Any) -> dict[str, Distribution | None]:
    """The ``{metric}_{n,p50,p95,p99,max}`` columns of one group as distributions."""
    return {
        metric: Distribution(
            count=int(row[f"{metric}_n"]),
            **{name: float(row[f"{metric}_{name}"]) for name in (*PERCENTILES, "max")},
        )
        if row[f"{metric}_n"]
        else None
        for metric in METRICS
    }


def queries(
    db: TableAccess,
    start: dt.datetime,
    end: dt.datetime,
    *,
    task: str | None = None,
    queue: str | None = None,
    slowest: int = 10,
) -> dict[str, Select[Any]]:
    """The four SELECTs behind :func:`stats` (also EXPLAINed by the scale benchmark)."""
    c = db.table.c
    window = (c.published_at >= start, c.published_at < end, *filters(db.table, task, queue))
    outcome = case(
        (c.outcome.is_not(None), c.outcome),
        (c.replayed_at.is_not(None), REPLAYED),
        else_=UNFINISHED,
    )
    running = samples(db, window, materialized=False)
    return {
        "percentiles": _percentile_query(db, samples(db, window, materialized=True)),
        "outcomes": select(c.task_name, c.queue, outcome.label("outcome"), func.count().label("n"))
        .where(*window)
        .group_by(c.task_name, c.queue, outcome),
        "slowest": select(running)
        .where(running.c.run_time.is_not(None))
        .order_by(running.c.run_time.desc(), running.c.publish_id)
        .limit(slowest),
        "throughput": _throughput_query(db, window, start, end),
    }


def _throughput_query(
    db: TableAccess, window: Sequence[ColumnElement[bool]], start: dt.datetime, end: dt.datetime
) -> Select[Any]:
    """Per queue and UTC minute (epoch seconds of its start): attempts published in it, and
    attempts published in the window that finished in it. Both halves read the window's rows
    through the ``published_at`` index; ``finished_at`` is only filtered and bucketed."""
    c = db.table.c
    published_minute = minute(db, c.published_at)
    finished_minute = minute(db, c.finished_at)
    published = (
        select(
            c.queue,
            published_minute.label("minute"),
            func.count().label("published"),
            literal_column("0", Integer).label("processed"),
        )
        .where(*window)
        .group_by(c.queue, published_minute)
    )
    processed = (
        select(c.queue, finished_minute, literal_column("0", Integer), func.count())
        .where(*window, c.finished_at >= start, c.finished_at < end)
        .group_by(c.queue, finished_minute)
    )
    both = union_all(published, processed).subquery("throughput")
    return (
        select(
            both.c.queue,
            both.c.minute,
            func.sum(both.c.published).label("published"),
            func.sum(both.c.processed).label("processed"),
        )
        .group_by(both.c.queue, both.c.minute)
        .order_by(both.c.queue, both.c.minute)
    )


def minute(db: TableAccess, column: Any) -> ColumnElement[int]:
    """The UTC minute a timestamp column falls in, as the epoch seconds of its start (an exact
    integer: no time zone setting of the session plays a part)."""
    # Constants as SQL text, not bound parameters: GROUP BY must repeat the SELECT's expression
    # exactly, and PostgreSQL sees two parameters as two different expressions.
    sixty = literal_column("60", Integer)
    if db.dialect == "postgresql":
        minutes = func.floor(func.date_part("epoch", column, type_=Float) / sixty)
        return cast(minutes, BigInteger) * sixty
    # 'YYYY-MM-DD HH:MM:SS.ffffff' (UTC, see epoch) cut to the minute, then converted: SQLite's
    # date functions round to the millisecond, so 12:00:59.9996 would read as 12:01.
    return cast(func.strftime("%s", func.substr(column, 1, 16)), BigInteger)


def epoch(db: TableAccess, column: Any) -> ColumnElement[float]:
    """A timestamp column as epoch seconds (float), exact to the microsecond."""
    if db.dialect == "postgresql":
        # date_part is double precision; EXTRACT is numeric (slower) since PostgreSQL 14.
        return func.date_part("epoch", column, type_=Float)
    # SQLAlchemy stores DateTime in SQLite as 'YYYY-MM-DD HH:MM:SS.ffffff' (UTC here): whole
    # seconds from strftime, the fraction from the text (julianday would lose ~50 us).
    return cast(func.strftime("%s", column), Float) + cast(func.substr(column, 20), Float)


def samples(db: TableAccess, window: Sequence[ColumnElement[bool]], *, materialized: bool) -> CTE:
    """One row per attempt in the window with its metrics (NULL where unknown).

    The metrics are :class:`~otel_celery_publish.timing.SqlEdges`' over the epoch seconds of
    the row's times. ``materialized``: convert each timestamp once per row, for queries that use
    every metric. Inlined, each use repeats the conversions (a clamp repeats its argument, and
    the edges nest: ``ready`` is inside ``received``, both inside the waits): several times the
    cost of the whole query on PostgreSQL.
    """
    c = db.table.c
    edges = (
        select(
            c.publish_id,
            c.task_id,
            c.task_name,
            c.queue,
            c.published_at,
            c.outcome,
            c.runtime_s,
            epoch(db, c.published_at).label("published"),
            epoch(db, c.eta).label("eta"),
            epoch(db, c.received_at).label("received"),
            epoch(db, c.started_at).label("started"),
            epoch(db, c.finished_at).label("finished"),
        )
        .where(*window)
        .cte("edges")
    )
    if materialized and db.dialect == "postgresql":
        edges = edges.prefix_with("MATERIALIZED")
    e = edges.c
    waits = timing.edges_sql(e.published, e.eta, e.received, e.started, e.finished)
    return select(
        e.publish_id,
        e.task_id,
        e.task_name,
        e.queue,
        e.published_at,
        e.outcome,
        # ready, not eta: the same edge the waits start from (no later than the start).
        case((e.eta.is_not(None), timing.not_negative(waits.ready - e.published))).label(
            "scheduled_delay"
        ),
        waits.broker_wait.label("broker_wait"),
        waits.worker_wait.label("worker_wait"),
        func.coalesce(e.runtime_s, timing.not_negative(e.finished - e.started)).label("run_time"),
        waits.end_to_end.label("end_to_end"),
    ).cte("base")


def _percentile_query(db: TableAccess, base: CTE) -> Select[Any]:
    """One row per task name and queue: ``{metric}_n``, ``_p50``, ``_p95``, ``_p99``, ``_max``.

    PostgreSQL: ``percentile_cont`` (an ordered-set aggregate, NULLs ignored). SQLite: each
    metric ranked per group by a window function, then interpolated by :func:`_interpolated`.
    """
    keys = (base.c.task_name, base.c.queue)
    if db.dialect == "postgresql":
        columns = [
            column
            for metric in METRICS
            for column in (
                func.count(base.c[metric]).label(f"{metric}_n"),
                *(
                    func.percentile_cont(p).within_group(base.c[metric]).label(f"{metric}_{name}")
                    for name, p in PERCENTILES.items()
                ),
                func.max(base.c[metric]).label(f"{metric}_max"),
            )
        ]
        return select(*keys, *columns).group_by(*keys)
    ranked = select(
        *keys,
        *(base.c[metric] for metric in METRICS),
        *(
            # NULLs (no sample) rank last, so ranks 1..n are the samples in order.
            func.row_number()
            .over(partition_by=keys, order_by=(base.c[metric].is_(None), base.c[metric]))
            .label(f"{metric}_rank")
            for metric in METRICS
        ),
        *(
            func.count(base.c[metric]).over(partition_by=keys).label(f"{metric}_n")
            for metric in METRICS
        ),
    ).cte("ranked")
    r = ranked.c
    columns = [
        column
        for metric in METRICS
        for column in (
            func.max(r[f"{metric}_n"]).label(f"{metric}_n"),
            *(
                _interpolated(r[metric], r[f"{metric}_rank"], r[f"{metric}_n"], p).label(
                    f"{metric}_{name}"
                )
                for name, p in PERCENTILES.items()
            ),
            func.max(r[metric]).label(f"{metric}_max"),
        )
    ]
    return select(r.task_name, r.queue, *columns).group_by(r.task_name, r.queue)


def _interpolated(value: Any, rank: Any, n: Any, p: float) -> ColumnElement[float]:
    """percentile_cont(p) over ranked rows: the value at 1-based position ``1 + p (n - 1)``,
    interpolated between the ranks below and above it (as PostgreSQL computes it)."""
    position = 1 + p * (n - 1)
    below = cast(position, Integer)  # truncation == floor: position >= 1
    low = func.max(case((rank == below, value)))
    high = func.max(case((rank == below + 1, value)))
    fraction = func.max(position - below)
    return low + func.coalesce(fraction * (high - low), 0.0)
