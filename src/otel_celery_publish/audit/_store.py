"""Read side of the audit table: lost tasks, one task's history, retention, replay bookkeeping.

Every statement is a SQLAlchemy Core expression run under ``suppress_instrumentation()`` through
:class:`Db`, which also turns driver errors into one-line :class:`AuditError` messages.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as dt
import os
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

from opentelemetry.instrumentation.utils import suppress_instrumentation
from sqlalchemy import (
    ColumnElement,
    Connection,
    Engine,
    Executable,
    Row,
    Select,
    Table,
    and_,
    case,
    delete,
    exists,
    func,
    inspect,
    literal,
    or_,
    select,
    update,
)
from sqlalchemy.engine import make_url
from sqlalchemy.exc import DBAPIError

from otel_celery_publish.config import Settings
from otel_celery_publish.schema import migrate
from otel_celery_publish.schema.table import (
    LostReason,
    audit_table,
    unfinished_predicate,
    workers_table,
)
from otel_celery_publish.sink.database import make_engine
from otel_celery_publish.sink.quarantine import QuarantinedRecord
from otel_celery_publish.sink.quarantine import quarantined as read_quarantine
from otel_celery_publish.sink.shipping import drain_spool

UTC = dt.timezone.utc
# ``show`` follows replay links at most this many hops from the asked-for task.
MAX_REPLAY_HOPS = 20


class AuditError(Exception):
    """A failure an operator can act on, said in one line (the CLI prints no traceback)."""


class DatabaseUnavailable(AuditError):
    """The audit database cannot be reached."""


class SchemaNotMigrated(AuditError):
    """The audit table is missing or at another revision than this package expects."""


class UnknownTask(AuditError):
    """No audit row has the asked-for task id."""


def first_line(exc: BaseException) -> str:
    """The driver's message without SQLAlchemy's SQL echo and background link."""
    inner = getattr(exc, "orig", None) or exc
    text = str(inner).strip().splitlines()
    return text[0] if text else type(inner).__name__


def utc(value: dt.datetime | None) -> dt.datetime | None:
    """Aware UTC: SQLite hands back naive UTC, PostgreSQL the session's time zone."""
    if value is None:
        return None
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


def now_utc() -> dt.datetime:
    """The read side's clock: every default "now" of the API and the CLI is read from here
    (call it as ``_store.now_utc()``, so a test can pin it)."""
    return dt.datetime.now(UTC)


def safe_url(url: str) -> str:
    """``url`` without its password, for messages."""
    return make_url(url).render_as_string(hide_password=True)


@contextlib.contextmanager
def db_errors(url: str) -> Iterator[None]:
    """Our database calls, untraced, with driver errors as one-line :class:`AuditError`."""
    with suppress_instrumentation():
        try:
            yield
        except DBAPIError as exc:
            # Refused, unknown host, missing file: raised before any statement ran.
            if exc.connection_invalidated or exc.statement is None:
                raise DatabaseUnavailable(
                    f"audit database {safe_url(url)} is unreachable: {first_line(exc)}"
                ) from None
            raise AuditError(f"audit database error: {first_line(exc)}") from None


class Db:
    """One audit database and table for the duration of an API call."""

    def __init__(self, settings: Settings, engine: Engine) -> None:
        self.settings = settings
        self.engine = engine
        self.table = audit_table(settings.table_name)
        self.dialect = engine.dialect.name

    def rows(self, stmt: Executable) -> Sequence[Row[Any]]:
        with self._connection() as conn:
            return conn.execute(stmt).all()

    def run(self, stmt: Executable) -> int:
        """Execute a write; its row count. Each call commits on its own (autocommit engine)."""
        with self._connection() as conn:
            return conn.execute(stmt).rowcount

    def errors(self) -> contextlib.AbstractContextManager[None]:
        return db_errors(self.settings.audit_url)

    @contextlib.contextmanager
    def _connection(self) -> Iterator[Connection]:
        with self.errors(), self.engine.connect() as conn:
            yield conn

    def check_schema(self) -> None:
        """Fail with a one-line hint unless the table is at the revision this package expects."""
        with self._connection() as conn:
            revision = migrate.current(conn, self.table.name)
        if revision == migrate.HEAD:
            return
        hint = "run `celery -A <app> audit migrate`"
        if revision is None:
            raise SchemaNotMigrated(f"audit table {self.table.name!r} is not migrated: {hint}")
        raise SchemaNotMigrated(
            f"audit table {self.table.name!r} is at revision {revision}, this version of "
            f"otel-celery-publish needs {migrate.HEAD}: {hint} (or upgrade the package)"
        )


@contextlib.contextmanager
def open_db(settings: Settings | None, *, migrated: bool = True) -> Iterator[Db]:
    """The audit database of ``settings`` (default: the environment), schema checked."""
    settings = settings or Settings.from_env()
    url = make_url(settings.audit_url)
    path = url.database or ":memory:"
    # SQLite would silently create an empty file for a mistyped path.
    sqlite_file = url.get_backend_name() == "sqlite" and path != ":memory:"
    if migrated and sqlite_file and not os.path.exists(path):
        raise DatabaseUnavailable(f"audit database file {path} does not exist")
    try:
        engine = make_engine(settings.audit_url, settings.db_timeout)
    except ValueError as exc:
        raise AuditError(str(exc)) from None
    try:
        db = Db(settings, engine)
        if migrated:
            db.check_schema()
        yield db
    finally:
        engine.dispose()


def glob_to_like(pattern: str) -> str:
    """A shell glob (``*``, ``?``) as a LIKE pattern with backslash escapes."""
    escaped = pattern.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
    return escaped.replace("*", "%").replace("?", "_")


def filters(table: Table, task: str | None, queue: str | None) -> list[ColumnElement[bool]]:
    """Task-name glob and exact queue filters shared by ``lost`` and ``stats``."""
    out: list[ColumnElement[bool]] = []
    if task:
        out.append(table.c.task_name.like(glob_to_like(task), escape="\\"))
    if queue:
        out.append(table.c.queue == queue)
    return out


def greatest(dialect: str, *values: Any) -> ColumnElement[Any]:
    """SQL ``greatest`` (PostgreSQL) / multi-argument ``max`` (SQLite); no argument is NULL."""
    return func.greatest(*values) if dialect == "postgresql" else func.max(*values)


# -- lost -----------------------------------------------------------------------------------


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
      ``max(sent_at, eta)``; ``expired`` when its ``expires`` has passed, so no worker will run
      it any more;
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
    ETA is not due. A message redelivered after a Redis visibility timeout updates the same row,
    so it is lost only if no delivery finished. Workers that are not instrumented never record
    ``received``: use :func:`check_results` then. Oldest first.
    """
    with open_db(settings) as db:
        now = now or now_utc()
        stmt = lost_query(db, now=now, older_than=older_than, since=since, until=until)
        stmt = stmt.where(*filters(db.table, task, queue)).limit(limit)
        return [_lost_task(row) for row in db.rows(stmt)]


def lost_query(
    db: Db,
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
    cutoff = now - older_than
    start = now - since if isinstance(since, dt.timedelta) else since
    later = t.alias("later")
    superseded = exists().where(
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
    waiting = and_(c.started_at.is_(None), c.received_at.is_(None))
    aged = or_(
        and_(c.started_at.is_not(None), c.started_at < cutoff),
        and_(
            c.started_at.is_(None),
            c.received_at.is_not(None),
            greatest(db.dialect, c.received_at, func.coalesce(c.eta, c.received_at)) < cutoff,
        ),
        and_(
            waiting,
            c.sent_at.is_not(None),
            greatest(db.dialect, c.sent_at, func.coalesce(c.eta, c.sent_at)) < cutoff,
        ),
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
        and_(
            returned,
            greatest(db.dialect, w.c.stopped_at, func.coalesce(c.eta, w.c.stopped_at)) < cutoff,
        ),
        and_(~alive, ~returned, aged),
    )
    reason = case(
        (flagged, c.lost_reason),
        (and_(dead, c.received_at.is_not(None)), literal("worker_dead")),
        (returned, literal("returned")),
        (c.started_at.is_not(None), literal("not_finished")),
        (c.received_at.is_not(None), literal("not_started")),
        (c.sent_at.is_(None), literal("not_sent")),
        (c.expires < now, literal("expired")),
        else_=literal("not_received"),
    )
    conditions = [
        c.published_at >= start,
        # The predicate of the partial index ix_<table>_unfinished, verbatim.
        unfinished_predicate(t),
        stuck,
        ~superseded,
        ~replay_sent(t, c.publish_id),
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


_LOST_COLUMNS = (
    "task_id", "task_name", "publish_id", "attempt", "queue", "published_at", "sent_at",
    "received_at", "started_at", "eta", "expires", "worker", "trace_id", "error",
    "exception_type", "exception_message",
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
        published_at=utc(m["published_at"]),  # type: ignore[arg-type]
        sent_at=utc(m["sent_at"]),
        received_at=utc(m["received_at"]),
        started_at=utc(m["started_at"]),
        eta=utc(m["eta"]),
        expires=utc(m["expires"]),
        worker=m["worker"],
        trace_id=m["trace_id"],
        error=m["error"],
        exception_type=m["exception_type"],
        exception_message=m["exception_message"],
    )


def check_results(app: Any, tasks: Iterable[LostTask]) -> list[LostTask]:
    """Cross-check ``tasks`` with the app's result backend, for uninstrumented workers.

    A task the backend knows finished (``SUCCESS``, ``FAILURE``, ``REVOKED``) is dropped; the
    others keep the backend's state in ``result_state`` (``PENDING`` means the backend knows
    nothing: lost, or ``ignore_result``).
    """
    from celery import states  # noqa: PLC0415 - the read side needs Celery only here
    from celery.backends.base import DisabledBackend  # noqa: PLC0415

    if isinstance(app.backend, DisabledBackend):
        raise AuditError("--check-results needs a result backend, and the app has none")
    kept = []
    for task in tasks:
        try:
            state = str(app.AsyncResult(task.task_id).state)
        except Exception as exc:  # any backend (redis, database, rpc...) and its own errors
            raise AuditError(f"result backend error: {first_line(exc)}") from None
        if state not in states.READY_STATES:
            kept.append(dataclasses.replace(task, result_state=state))
    return kept


# -- show -----------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Attempt:
    """One audit row (a publish attempt) as ``show`` reports it; the payload itself is left out."""

    publish_id: str
    task_id: str
    task_name: str
    attempt: int
    queue: str | None
    exchange: str | None
    routing_key: str | None
    priority: int | None
    root_id: str | None
    parent_id: str | None
    group_id: str | None
    published_at: dt.datetime
    sent_at: dt.datetime | None
    received_at: dt.datetime | None
    started_at: dt.datetime | None
    finished_at: dt.datetime | None
    eta: dt.datetime | None
    expires: dt.datetime | None
    outcome: str | None
    worker: str | None
    runtime_s: float | None
    exception_type: str | None
    exception_message: str | None
    args_repr: str | None
    kwargs_repr: str | None
    payload_bytes: int | None
    payload_redacted: bool
    options: dict[str, Any]
    publisher_host: str | None
    publisher_pid: int | None
    error: str | None
    trace_id: str | None
    span_id: str | None
    trace_url: str | None
    replay_of: str | None
    replayed_at: dt.datetime | None
    replayed_as: str | None


@dataclasses.dataclass(frozen=True)
class TaskHistory:
    """Every attempt of a task, of its replays and of what it replays, oldest first."""

    task_id: str
    attempts: list[Attempt]


def show(task_id: str, *, settings: Settings | None = None) -> TaskHistory:
    """The history of ``task_id``: its attempts (retries) and replays, following replay links
    both ways; ``trace_url`` is filled from ``settings.trace_url`` (``{trace_id}``)."""
    with open_db(settings) as db:
        t = db.table
        found = {r.publish_id: r for r in db.rows(select(t).where(t.c.task_id == task_id))}
        if not found:
            raise UnknownTask(f"no audit row for task id {task_id!r}")
        for _ in range(MAX_REPLAY_HOPS):
            origins = {r.replay_of for r in found.values() if r.replay_of}
            related = or_(
                t.c.task_id.in_({r.task_id for r in found.values()}),
                t.c.replay_of.in_(set(found)),
                t.c.publish_id.in_(origins - set(found)),
            )
            new = [r for r in db.rows(select(t).where(related)) if r.publish_id not in found]
            if not new:
                break
            found.update((r.publish_id, r) for r in new)
        rows = sorted(found.values(), key=lambda r: (utc(r.published_at), r.attempt or 0))
        template = db.settings.trace_url
        return TaskHistory(task_id, [_attempt(r, template) for r in rows])


def trace_url(template: str, trace_id: str | None) -> str | None:
    """``template`` (e.g. ``http://jaeger:16686/trace/{trace_id}``) filled in, if both exist."""
    if not template or not trace_id:
        return None
    try:
        return template.format(trace_id=trace_id)
    except (KeyError, IndexError, ValueError):
        raise AuditError(
            f"OTEL_CELERY_PUBLISH_TRACE_URL {template!r} must be a format string using "
            "{trace_id} and no other field"
        ) from None


def _attempt(row: Row[Any], template: str) -> Attempt:
    m = row._mapping
    fields: dict[str, Any] = {name: m[name] for name in _ATTEMPT_COLUMNS}
    fields.update({name: utc(m[name]) for name in _ATTEMPT_TIMES})
    return Attempt(
        **fields,
        attempt=m["attempt"] or 0,
        payload_bytes=None if m["payload"] is None else len(m["payload"]),
        payload_redacted=bool(m["payload_redacted"]),
        options=dict(m["options"] or {}),
        trace_url=trace_url(template, m["trace_id"]),
    )


_ATTEMPT_COLUMNS = (
    "publish_id", "task_id", "task_name", "queue", "exchange", "routing_key", "priority",
    "root_id", "parent_id", "group_id", "outcome", "worker", "runtime_s", "exception_type",
    "exception_message", "args_repr", "kwargs_repr", "publisher_host", "publisher_pid", "error",
    "trace_id", "span_id", "replay_of", "replayed_as",
)  # fmt: skip
_ATTEMPT_TIMES = (
    "published_at", "sent_at", "received_at", "started_at", "finished_at", "eta", "expires",
    "replayed_at",
)  # fmt: skip


# -- prune ----------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class PruneResult:
    deleted: int
    cutoff: dt.datetime
    batches: int


def prune(
    *,
    older_than: dt.timedelta,
    settings: Settings | None = None,
    batch_size: int = 5000,
    now: dt.datetime | None = None,
) -> PruneResult:
    """Delete rows published before ``now - older_than``, ``batch_size`` rows per statement.

    Each batch is its own short transaction selecting victims by primary key through the
    ``published_at`` index, so locks are held for one batch only and writers never wait long.
    Heartbeat rows of worker instances last seen before the cutoff go too.
    """
    if batch_size < 1:
        raise AuditError("batch size must be at least 1")
    with open_db(settings) as db:
        t = db.table
        cutoff = (now or now_utc()) - older_than
        victims = (
            select(t.c.publish_id)
            .where(t.c.published_at < cutoff)
            .order_by(t.c.published_at)
            .limit(batch_size)
        )
        stmt = delete(t).where(t.c.publish_id.in_(victims.scalar_subquery()))
        deleted = batches = 0
        while True:
            count = db.run(stmt)
            deleted += count
            batches += 1
            if count < batch_size:
                break
        # Heartbeats of worker instances gone before the cutoff: one row per worker boot.
        workers = workers_table(t.name)
        db.run(delete(workers).where(workers.c.heartbeat_at < cutoff))
        return PruneResult(deleted, cutoff, batches)


# -- replay bookkeeping ---------------------------------------------------------------------


def latest_attempts(db: Db, task_ids: Sequence[str]) -> dict[str, Row[Any]]:
    """The newest attempt (by attempt number, then publish time) of each task id found."""
    t = db.table
    latest: dict[str, Row[Any]] = {}
    for row in db.rows(select(t).where(t.c.task_id.in_(set(task_ids)))):
        best = latest.get(row.task_id)
        if best is None or _attempt_order(row) > _attempt_order(best):
            latest[row.task_id] = row
    return latest


def _attempt_order(row: Row[Any]) -> tuple[int, dt.datetime]:
    return row.attempt or 0, utc(row.published_at)  # type: ignore[return-value]


def rows_by_publish_id(db: Db, publish_ids: Sequence[str]) -> dict[str, Row[Any]]:
    t = db.table
    return {r.publish_id: r for r in db.rows(select(t).where(t.c.publish_id.in_(publish_ids)))}


def replay_sent(table: Table, publish_id: Any) -> ColumnElement[bool]:
    """Some row replays ``publish_id`` and reached the broker. Normally the original's
    ``replayed_at`` says so too; this also holds when that update was lost, while the row of a
    replay whose send raised (written before the send, never sent) does not count."""
    replay = table.alias("replay")
    reached = or_(replay.c.sent_at.is_not(None), replay.c.received_at.is_not(None))
    return exists().where(replay.c.replay_of == publish_id, reached)


def replayed_by_row(db: Db, publish_ids: Iterable[str]) -> set[str]:
    """Which of ``publish_ids`` have a replay that reached the broker (:func:`replay_sent`)."""
    t = db.table
    stmt = select(t.c.publish_id).where(
        t.c.publish_id.in_(set(publish_ids)), replay_sent(t, t.c.publish_id)
    )
    return {r.publish_id for r in db.rows(stmt)}


def claim_replay(db: Db, publish_id: str, new_task_id: str, *, force: bool) -> bool:
    """Mark ``publish_id`` replayed as ``new_task_id`` before sending; False if another replay
    got there first (so two operators replaying at once send it once)."""
    t = db.table
    stmt = update(t).where(t.c.publish_id == publish_id)
    if not force:
        stmt = stmt.where(t.c.replayed_at.is_(None), ~replay_sent(t, publish_id))
    return db.run(stmt.values(replayed_at=now_utc(), replayed_as=new_task_id)) == 1


def release_replay(db: Db, original: Row[Any], new_task_id: str) -> None:
    """Undo :func:`claim_replay` after the send failed: restore what the row said before."""
    t = db.table
    db.run(
        update(t)
        .where(t.c.publish_id == original.publish_id, t.c.replayed_as == new_task_id)
        .values(replayed_at=original.replayed_at, replayed_as=original.replayed_as)
    )


# -- maintenance ----------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Migration:
    """``action``: ``created``, ``adopted`` (made without Alembic), ``upgraded`` or ``current``."""

    table: str
    version_table: str
    action: str
    from_revision: str | None
    to_revision: str


def migrate_schema(*, settings: Settings | None = None) -> Migration:
    """Create, adopt or upgrade the audit table of ``settings`` (see :mod:`.migrate`)."""
    with open_db(settings, migrated=False) as db:
        name = db.table.name
        with db._connection() as conn:
            before = migrate.current(conn, name)
            existed = inspect(conn).has_table(name)
        with db.errors():
            migrate.upgrade(db.engine, name)
        if before == migrate.HEAD:
            action = "current"
        elif before is not None:
            action = "upgraded"
        else:
            action = "adopted" if existed else "created"
        return Migration(name, migrate.version_table(name), action, before, migrate.HEAD)


def quarantined(*, settings: Settings | None = None) -> list[QuarantinedRecord]:
    """The records the audit database refused even repaired, kept in the spool's quarantine."""
    settings = settings or Settings.from_env()
    try:
        return read_quarantine(settings)
    except OSError as exc:
        raise AuditError(f"cannot read the quarantine in {settings.spool_dir}: {exc}") from None


def drain(*, settings: Settings | None = None) -> int:
    """Ship what dead processes left in the local spool now; the number of records shipped."""
    settings = settings or Settings.from_env()
    with db_errors(settings.audit_url):
        try:
            return drain_spool(settings)
        except OSError as exc:
            raise AuditError(f"cannot read the spool in {settings.spool_dir}: {exc}") from None
