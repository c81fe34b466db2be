"""Latency statistics over a time window, computed in the database (rows never reach Python).

Per publish attempt (row), in seconds, over the lifecycle edges of
:mod:`otel_celery_publish.timing` (the queue-wait spans' edges; ``ready = max(published_at, eta)``,
``received = max(received_at, ready)``, each no later than ``started_at``):

* ``broker_wait`` = ``received - ready``;
* ``worker_wait`` = ``started_at - received``: prefetched, waiting for a pool process; an ETA
  task held by the worker until its ETA does not count as waiting;
* ``run_time`` = ``runtime_s`` (measured on the worker), else ``finished_at - started_at``;
* ``end_to_end`` = ``finished_at - ready``.

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
    ColumnElement,
    Float,
    Integer,
    Select,
    case,
    cast,
    func,
    select,
)

from otel_celery_publish import timing
from otel_celery_publish.audit import _db
from otel_celery_publish.audit._db import TableAccess, filters, open_db, utc
from otel_celery_publish.config import Settings

METRICS = ("broker_wait", "worker_wait", "run_time", "end_to_end")
PERCENTILES = {"p50": 0.5, "p95": 0.95, "p99": 0.99}
UNFINISHED = "unfinished"


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
class Stats:
    """Attempts published in ``[since, until)``: totals, per task and queue, the slowest."""

    since: dt.datetime
    until: dt.datetime
    count: int
    outcomes: dict[str, int]
    groups: list[GroupStats]
    slowest: list[SlowTask]


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
    return Stats(start, end, sum(totals.values()), dict(sorted(totals.items())), groups, slow)


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
    """The three SELECTs behind :func:`stats` (also EXPLAINed by the scale benchmark)."""
    c = db.table.c
    window = (c.published_at >= start, c.published_at < end, *filters(db.table, task, queue))
    outcome = func.coalesce(c.outcome, UNFINISHED)
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
    }


def epoch(db: TableAccess, column: Any) -> ColumnElement[float]:
    """A timestamp column as epoch seconds (float), exact to the microsecond."""
    if db.dialect == "postgresql":
        # date_part is double precision; EXTRACT is numeric (slower) since PostgreSQL 14.
        return func.date_part("epoch", column, type_=Float)
    # SQLAlchemy stores DateTime in SQLite as 'YYYY-MM-DD HH:MM:SS.ffffff' (UTC here): whole
    # seconds from strftime, the fraction from the text (julianday would lose ~50 us).
    return cast(func.strftime("%s", column), Float) + cast(func.substr(column, 20), Float)


def samples(db: TableAccess, window: Sequence[ColumnElement[bool]], *, materialized: bool) -> CTE:
    """One row per attempt in the window with its four metrics (NULL where unknown).

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
