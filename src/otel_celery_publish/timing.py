"""When a task waited: the edges of its lifecycle, one definition for spans, ``stats``, ``lost``
and ``show``.

An attempt's edges, wall-clock seconds from different machines' clocks, each clamped to the next
(clamped only by what is known: an attempt not started yet has no upper bound)::

    ready    = max(published_at, eta)     runnable: an ETA/countdown task waits from its ETA
    received = max(received_at, ready)    taken by a worker: one held until its ETA is not waiting
    started  = started_at                 ready and received are never later than this
    finished = finished_at

    broker wait = received - ready        worker wait = started - received
    queue wait  = started - ready         end to end  = finished - ready (negative counts as 0)

A publisher clock ahead of the worker's would make waits negative: the clamps make them 0, and
:attr:`Edges.skew_s` says by how much, never hidden.

The same definition three ways, side by side: :func:`queue_waits` (the worker's queue-wait spans,
when the task starts), :func:`edges` (any attempt, e.g. ``show``) and :func:`edges_sql` (the
same in SQL, for ``stats`` and ``lost``; a test checks they agree on SQLite and PostgreSQL).

Pure: imports nothing of ours (SQLAlchemy only builds expressions here).
"""

from __future__ import annotations

from typing import Any, NamedTuple

from sqlalchemy import ColumnElement, case, func, literal
from sqlalchemy.ext.compiler import compiles
from sqlalchemy.sql.compiler import SQLCompiler
from sqlalchemy.sql.functions import ReturnTypeFromArgs


class Edges(NamedTuple):
    """An attempt's lifecycle edges (module docstring); None where not reached (yet)."""

    ready: float
    """When the task became runnable: ``max(published_at, eta)``, no later than ``started``."""
    received: float | None
    """When a worker took the message, no earlier than ``ready`` (None if unknown)."""
    started: float | None
    finished: float | None
    skew_s: float
    """How far the publisher's clock was ahead of the worker's (0 when consistent)."""

    @property
    def broker_wait(self) -> float | None:
        return None if self.received is None else self.received - self.ready

    @property
    def worker_wait(self) -> float | None:
        if self.received is None or self.started is None:
            return None
        return self.started - self.received

    @property
    def end_to_end(self) -> float | None:
        return None if self.finished is None else max(0.0, self.finished - self.ready)


def edges(
    published_at: float,
    eta: float | None,
    received_at: float | None,
    started_at: float | None = None,
    finished_at: float | None = None,
) -> Edges:
    """The edges of one attempt from its recorded times (epoch seconds)."""
    seen = [t for t in (received_at, started_at) if t is not None]
    skew = max(0.0, published_at - min(seen)) if seen else 0.0
    ready = max(published_at, published_at if eta is None else eta)
    received = None if received_at is None else max(received_at, ready)
    if started_at is not None:
        ready = min(ready, started_at)
        received = None if received is None else min(received, started_at)
    return Edges(ready, received, started_at, finished_at, skew)


class Waits(NamedTuple):
    """Edges of the queue wait, clamped so that ``ready <= received <= started``."""

    ready: float
    """When the task became runnable: ``max(published_at, eta)``."""
    received: float | None
    """When the worker took the message from the broker (None if unknown)."""
    started: float
    skew_s: float
    """How far the publisher's clock was ahead of ours (0 when consistent)."""

    @property
    def total(self) -> float:
        return self.started - self.ready


def queue_waits(
    published_at: float, eta: float | None, received_at: float | None, started_at: float
) -> Waits:
    """Split the wait into broker wait (ready -> received) and worker wait (received -> started).

    ETA/countdown tasks wait from their ETA, not from the publish, like celery-exporter's
    ``started - max(sent, eta)``. A publisher clock ahead of the worker's would make waits
    negative: every edge is clamped to the next one and the skew is reported, never hidden.
    """
    found = edges(published_at, eta, received_at, started_at)
    return Waits(found.ready, found.received, started_at, found.skew_s)


# -- the same in SQL ------------------------------------------------------------------------


class SqlEdges(NamedTuple):
    """:class:`Edges` as SQL expressions (NULL where not reached); see :func:`edges_sql`.

    The edges work over timestamp columns and epoch seconds alike; the durations need epoch
    seconds (numbers), as ``stats`` computes them.
    """

    ready: ColumnElement[Any]
    received: ColumnElement[Any]
    started: ColumnElement[Any]
    finished: ColumnElement[Any]

    @property
    def broker_wait(self) -> ColumnElement[Any]:
        return self.received - self.ready

    @property
    def worker_wait(self) -> ColumnElement[Any]:
        return self.started - self.received

    @property
    def end_to_end(self) -> ColumnElement[Any]:
        return not_negative(self.finished - self.ready)


def edges_sql(
    published_at: ColumnElement[Any],
    eta: ColumnElement[Any],
    received_at: ColumnElement[Any],
    started_at: ColumnElement[Any],
    finished_at: ColumnElement[Any],
) -> SqlEdges:
    """:func:`edges` in SQL, over one row's columns (``published_at`` is never NULL)."""
    ready = ready_sql(published_at, eta, started_at)
    return SqlEdges(ready, received_sql(received_at, ready, started_at), started_at, finished_at)


def ready_sql(
    enqueued: ColumnElement[Any],
    eta: ColumnElement[Any],
    started_at: ColumnElement[Any] | None = None,
) -> ColumnElement[Any]:
    """``max(enqueued, eta)``, no later than ``started_at`` when that is known (never NULL:
    ``enqueued`` is not). ``enqueued`` is the publish, or when a message went back to the
    broker (``lost``'s ``returned``)."""
    ready = _Greatest(enqueued, func.coalesce(eta, enqueued))
    return ready if started_at is None else _at_most(ready, started_at)


def received_sql(
    received_at: ColumnElement[Any],
    ready: ColumnElement[Any],
    started_at: ColumnElement[Any] | None = None,
) -> ColumnElement[Any]:
    """``max(received_at, ready)``, no later than ``started_at`` when known; NULL when
    ``received_at`` is. ``ready`` is already no later than ``started_at``, so capping
    ``received_at`` first is the same and repeats ``ready`` once, not twice."""
    received = received_at if started_at is None else _at_most(received_at, started_at)
    return case((received_at.is_not(None), _Greatest(received, ready)))


def not_negative(value: ColumnElement[Any]) -> ColumnElement[Any]:
    """Negative (clock skew) -> 0; NULL stays NULL."""
    return case((value < 0, literal(0.0)), else_=value)


def _at_most(value: ColumnElement[Any], bound: ColumnElement[Any]) -> ColumnElement[Any]:
    """``min(value, bound)``, or ``value`` where ``bound`` is NULL (``value`` is never NULL)."""
    return _Least(value, func.coalesce(bound, value))


class _Greatest(ReturnTypeFromArgs[Any]):
    """``greatest()`` (PostgreSQL) / multi-argument ``max()`` (SQLite), of the arguments' type.

    Given only arguments that are not NULL: there the two agree (PostgreSQL's ignores NULLs,
    SQLite's returns NULL).
    """

    name = "greatest"
    inherit_cache = True
    _register = False


class _Least(ReturnTypeFromArgs[Any]):
    """``least()`` (PostgreSQL) / multi-argument ``min()`` (SQLite); arguments never NULL."""

    name = "least"
    inherit_cache = True
    _register = False


@compiles(_Greatest, "sqlite")
def _greatest_sqlite(element: _Greatest, compiler: SQLCompiler, **kw: Any) -> str:
    return f"max({compiler.process(element.clauses, **kw)})"


@compiles(_Least, "sqlite")
def _least_sqlite(element: _Least, compiler: SQLCompiler, **kw: Any) -> str:
    return f"min({compiler.process(element.clauses, **kw)})"
