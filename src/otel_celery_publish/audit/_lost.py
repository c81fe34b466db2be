"""``lost``: the attempts that should have finished by now and did not, with where they stopped.

One SELECT over the partial index ``ix_<table>_unfinished`` (:func:`lost_query`), joined to the
worker heartbeat table; each row gets a :data:`~otel_celery_publish.schema.table.LostReason`.
Waits are counted from the lifecycle edges of :mod:`otel_celery_publish.timing`, as the
queue-wait spans and ``stats`` count them. :func:`check_results` cross-checks with the result
backend, for workers that are not instrumented.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
from collections.abc import Iterable
from typing import Any

from sqlalchemy import (
    ColumnElement,
    FromClause,
    Row,
    Select,
    Table,
    and_,
    case,
    exists,
    func,
    literal,
    or_,
    select,
)

from otel_celery_publish import timing
from otel_celery_publish.audit import _db
from otel_celery_publish.audit._claims import replay_sent
from otel_celery_publish.audit._db import AuditError, TableAccess, filters, first_line, open_db
from otel_celery_publish.config import Settings
from otel_celery_publish.schema.table import LostReason, unfinished_predicate, workers_table


@dataclasses.dataclass(frozen=True)
class LostTask:
    """An attempt that should have finished by now but did not (see :func:`lost`)."""

    task_id: str
    task_name: str
    publish_id: str
    attempt: int
    queue: str | None
    reason: LostReason
    published_at: dt.datetime
    sent_at: dt.datetime | None
    received_at: dt.datetime | None
    started_at: dt.datetime | None
    eta: dt.datetime | None
    expires: dt.datetime | None
    worker: str | None
    trace_id: str | None
    error: str | None
    exception_type: str | None = None
    exception_message: str | None = None
    result_state: str | None = None
    #: When ``audit watch`` gave up on it (its automatic replays used up): still lost, never
    #: replayed automatically again; a person can still ``audit replay`` it.
    dead_lettered_at: dt.datetime | None = None


def lost(
    *,
    settings: Settings | None = None,
    older_than: dt.timedelta = dt.timedelta(minutes=10),
    since: dt.datetime | dt.timedelta = dt.timedelta(days=1),
    until: dt.datetime | None = None,
    task: str | None = None,
    queue: str | None = None,
    limit: int | None = 100,
    now: dt.datetime | None = None,
) -> list[LostTask]:
    """Attempts published in ``[since, until)`` that are stuck for longer than ``older_than``.

    ``reason`` says where each one stopped:

    * ``not_sent``: the publish never completed (broker down, unserializable arguments; the
      row's ``error`` may say more) or the publisher died before recording the send;
    * ``not_received`` / ``expired``: on the broker and never taken by a worker, counted from
      when it became ready, ``max(published_at, eta)``; ``expired`` when its ``expires`` has
      passed, so no worker will run it any more;
    * ``not_started``: a worker took it (counted from ``max(received_at, eta)``) and never ran it;
    * ``not_finished``: started and never finished, on a worker that does not heartbeat (an
      older version) or that stopped cleanly since;
    * ``worker_dead``: its worker instance stopped heartbeating without a clean shutdown (killed,
      OOM, machine lost). Reported as soon as the heartbeat is stale for a task that started and
      whose message was acked at start; a task only received, or one that acks late, is
      redelivered by the broker, so it waits for ``older_than`` like the age rules;
    * ``worker_lost``: the pool process running it died (OOM killer, SIGKILL): the worker
      recorded ``failed`` / ``WorkerLostError`` and the message was acked. Reported at once;
    * ``discarded``: the worker dropped the message (task not registered there, message
      rejected): ``exception_type`` / ``exception_message`` say why. Reported at once;
    * ``returned``: received by a worker that then shut down cleanly before running it: the
      message went back to the broker and nobody took it again (counted from the shutdown).

    Not lost: finished attempts (``worker_lost`` and ``discarded`` aside); anything held by a
    worker instance whose heartbeat is fresh, however long it runs; attempts superseded by a
    later attempt of the same task id (a retry) or already replayed; ETA/countdown tasks whose
    ETA is not due. Dead-lettered attempts (``dead_lettered_at``, set by ``audit watch``) are
    still lost and listed with it. A message redelivered after a Redis visibility timeout
    updates the same row, so it is lost only if no delivery finished. Workers that are not
    instrumented never record ``received``: use :func:`check_results` then. Oldest first.
    """
    with open_db(settings) as db:
        now = now or _db.now_utc()
        stmt = lost_query(db, now=now, older_than=older_than, since=since, until=until)
        stmt = stmt.where(*filters(db.table, task, queue)).limit(limit)
        return [_lost_task(row) for row in db.rows(stmt)]


def lost_query(
    db: TableAccess,
    *,
    now: dt.datetime,
    older_than: dt.timedelta,
    since: dt.datetime | dt.timedelta,
    until: dt.datetime | None,
) -> Select[Any]:
    """The ``lost`` SELECT (exposed for the scale benchmark's EXPLAIN)."""
    t = db.table
    c = t.c
    w = workers_table(t.name).alias("w")
    start = now - since if isinstance(since, dt.timedelta) else since
    stuck, reason = _verdict(t, w, now=now, cutoff=now - older_than)
    conditions = [
        c.published_at >= start,
        # The predicate of the partial index ix_<table>_unfinished, verbatim.
        unfinished_predicate(t),
        stuck,
        ~_superseded(t),
        ~replay_sent(t, c.publish_id),
        ~_released_replay(t),
    ]
    if until is not None:
        conditions.append(c.published_at < until)
    columns = [c[name] for name in _LOST_COLUMNS]
    # One primary-key probe of the small workers table per row read from the partial index.
    return (
        select(*columns, reason.label("reason"))
        .select_from(t.outerjoin(w, w.c.instance_id == c.worker_instance))
        .where(*conditions)
        .order_by(c.published_at, c.publish_id)
    )


def _verdict(
    t: Table, w: FromClause, *, now: dt.datetime, cutoff: dt.datetime
) -> tuple[ColumnElement[bool], ColumnElement[str]]:
    """Whether an unfinished row (joined to its worker instance's heartbeat ``w``) is stuck,
    and the :data:`LostReason` it is stuck for."""
    c = t.c
    edges = timing.edges_sql(c.published_at, c.eta, c.received_at, c.started_at, c.finished_at)
    waiting = and_(c.started_at.is_(None), c.received_at.is_(None))
    aged = or_(
        and_(c.started_at.is_not(None), c.started_at < cutoff),
        and_(c.started_at.is_(None), c.received_at.is_not(None), edges.received < cutoff),
        and_(waiting, c.sent_at.is_not(None), edges.ready < cutoff),
        and_(waiting, c.sent_at.is_(None), c.published_at < cutoff),
    )
    # Liveness of the worker instance that holds the attempt (no row: it never heartbeat).
    known = w.c.instance_id.is_not(None)
    alive = and_(known, w.c.stopped_at.is_(None), w.c.expires_at > now)
    dead = and_(known, w.c.stopped_at.is_(None), w.c.expires_at <= now)
    returned = and_(
        known, w.c.stopped_at.is_not(None), c.started_at.is_(None), c.received_at.is_not(None)
    )
    acked_at_start = or_(c.acks_late.is_(None), c.acks_late.is_(False))
    flagged = c.lost_reason.is_not(None)
    stuck = or_(
        flagged,
        and_(dead, c.started_at.is_not(None), acked_at_start),
        # Back on the broker since the shutdown: ready again then (or at its ETA).
        and_(returned, timing.ready_sql(w.c.stopped_at, c.eta) < cutoff),
        and_(~alive, ~returned, aged),
    )
    reason = case(
        # What the worker recorded (a RecordedLostReason), else where the attempt stopped.
        (flagged, c.lost_reason),
        (and_(dead, c.received_at.is_not(None)), _said("worker_dead")),
        (returned, _said("returned")),
        (c.started_at.is_not(None), _said("not_finished")),
        (c.received_at.is_not(None), _said("not_started")),
        (c.sent_at.is_(None), _said("not_sent")),
        (c.expires < now, _said("expired")),
        else_=_said("not_received"),
    )
    return stuck, reason


def _superseded(t: Table) -> ColumnElement[bool]:
    """A later attempt of the same task id exists (a retry): only the latest one counts."""
    c = t.c
    later = t.alias("later")
    return exists().where(
        later.c.task_id == c.task_id,
        later.c.publish_id != c.publish_id,
        or_(
            func.coalesce(later.c.attempt, 0) > func.coalesce(c.attempt, 0),
            and_(
                func.coalesce(later.c.attempt, 0) == func.coalesce(c.attempt, 0),
                later.c.published_at > c.published_at,
            ),
        ),
    )


def _released_replay(t: Table) -> ColumnElement[bool]:
    """The row of a replay whose send raised: written before the send, never on the broker,
    and its claim on the original released (the original no longer says ``replayed_as`` this
    task), so the original is lost again. Listing this row too would replay the task twice."""
    c = t.c
    original = t.alias("original")
    claimed = exists().where(
        original.c.publish_id == c.replay_of, original.c.replayed_as == c.task_id
    )
    never_sent = and_(c.replay_of.is_not(None), c.sent_at.is_(None), c.received_at.is_(None))
    return and_(never_sent, ~claimed)


def _said(reason: LostReason) -> ColumnElement[str]:
    """A reason as a SQL value; typed, so that mypy holds the CASE to the vocabulary."""
    return literal(reason)


_LOST_COLUMNS = (
    "task_id", "task_name", "publish_id", "attempt", "queue", "published_at", "sent_at",
    "received_at", "started_at", "eta", "expires", "worker", "trace_id", "error",
    "exception_type", "exception_message", "dead_lettered_at",
)  # fmt: skip


def _lost_task(row: Row[Any]) -> LostTask:
    m = row._mapping
    return LostTask(
        task_id=m["task_id"],
        task_name=m["task_name"],
        publish_id=m["publish_id"],
        attempt=m["attempt"] or 0,
        queue=m["queue"],
        reason=m["reason"],
        published_at=_db.utc(m["published_at"]),  # type: ignore[arg-type]
        sent_at=_db.utc(m["sent_at"]),
        received_at=_db.utc(m["received_at"]),
        started_at=_db.utc(m["started_at"]),
        eta=_db.utc(m["eta"]),
        expires=_db.utc(m["expires"]),
        worker=m["worker"],
        trace_id=m["trace_id"],
        error=m["error"],
        exception_type=m["exception_type"],
        exception_message=m["exception_message"],
        dead_lettered_at=_db.utc(m["dead_lettered_at"]),
    )


def check_results(app: Any, tasks: Iterable[LostTask]) -> list[LostTask]:
    """Cross-check ``tasks`` with the app's result backend, for uninstrumented workers.

    A task the backend knows finished (``SUCCESS``, ``FAILURE``, ``REVOKED``) is dropped; the
    others keep the backend's state in ``result_state`` (``PENDING`` means the backend knows
    nothing: lost, or ``ignore_result``). Any backend that stores results works (Redis, the
    SQLAlchemy ``db+...`` one, django-db once Django is set up: the CLI loads the app first);
    ``rpc://``, whose results only their publisher can read, and a backend that cannot be
    created or reached are an :class:`AuditError`.
    """
    from celery import states  # noqa: PLC0415 - the read side needs Celery only here
    from celery.backends.base import DisabledBackend  # noqa: PLC0415
    from celery.backends.rpc import RPCBackend  # noqa: PLC0415

    try:
        backend = app.backend
    except Exception as exc:  # an unknown scheme, a missing client library, Django not set up
        raise AuditError(f"result backend error: {first_line(exc)}") from None
    if isinstance(backend, DisabledBackend):
        raise AuditError("--check-results needs a result backend, and the app has none")
    if isinstance(backend, RPCBackend):
        # rpc:// sends each result to the publisher's own reply queue: nobody else sees it.
        raise AuditError(
            "--check-results needs a result backend that stores results; rpc:// does not"
        )
    kept = []
    for task in tasks:
        try:
            state = str(app.AsyncResult(task.task_id).state)
        except Exception as exc:  # any backend (redis, database, rpc...) and its own errors
            raise AuditError(f"result backend error: {first_line(exc)}") from None
        if state not in states.READY_STATES:
            kept.append(dataclasses.replace(task, result_state=state))
    return kept
