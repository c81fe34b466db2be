"""The audit database as the writer sees it: bounded connections, prepared upserts, COPY.

Deadlines. A database that accepts connections but never answers (a hung server, a route
black-holed after the handshake) is invisible to the kernel's timeouts: it acknowledges what we
send. So every wait on the audit database has a client-side deadline (:class:`DeadlineExceeded`
when it passes; the connection is then closed and dropped, its protocol state is unknown):

* a ``sync`` publish has one deadline, ``db_timeout`` from its start, covering the wait for the
  shared sync connection, the engine's setup (a cold process connects and migrates), connecting
  and the statement; past it the row goes to the spool. PostgreSQL's waits go through
  psycopg's ``Connection.wait``, which takes a timeout: a subclass passes the deadline's rest.
* the shipping thread's operations are bounded by ``SHIP_TIMEOUT_FACTOR * db_timeout`` each
  (connecting by ``db_timeout``): a batch moves up to a 512 KB spool chunk or ``max_pending``
  rows in one statement and may wait for row locks, so it gets more time than one row, but a
  hung connection is dropped and retried with backoff instead of holding the thread forever.
* a dropped connection's server session may live on, holding the row locks of half a batch:
  the next connection terminates it (see :func:`_bound_connections`).
"""

from __future__ import annotations

import contextlib
import importlib
import logging
import sqlite3
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

from opentelemetry.instrumentation.utils import suppress_instrumentation
from sqlalchemy import Connection, Engine, Table, create_engine, event
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.engine import make_url
from sqlalchemy.sql.dml import Insert

from otel_celery_publish.config import Settings
from otel_celery_publish.schema.migrate import upgrade
from otel_celery_publish.sink.quarantine import is_refusal

logger = logging.getLogger("otel_celery_publish")

Row = dict[str, Any]
# Batches of at least this many rows go to PostgreSQL through COPY.
COPY_MIN_ROWS = 100
# One operation of the shipping thread may take this many times db_timeout (see the docstring).
SHIP_TIMEOUT_FACTOR = 10.0
# Migrations may legitimately run long (an index on a big table): their statements get this.
MIGRATE_TIMEOUT_S = 600.0
_INHERITED: list[Any] = []


class _Deadline(threading.local):
    """Per thread: ``at``, the monotonic time its current database work must end by (None: no
    deadline), and ``op``, a per-operation bound overriding the connection's own. Class-level
    defaults: reading a missing attribute would raise and catch, ~0.5 us per wait."""

    at: float | None = None
    op: float | None = None


_deadline = _Deadline()


class DeadlineExceeded(Exception):
    """The audit database did not answer (or the sync connection was not free) in time."""


@contextlib.contextmanager
def _bounded(at: float | None = None, op: float | None = None) -> Iterator[None]:
    """Within the block, database waits of this thread end by ``at`` (the earlier of it and an
    enclosing deadline) and each takes at most ``op`` seconds."""
    saved = _deadline.at, _deadline.op
    if at is not None and saved[0] is not None:
        at = min(at, saved[0])
    _deadline.at = saved[0] if at is None else at
    _deadline.op = saved[1] if op is None else op
    try:
        yield
    finally:
        _deadline.at, _deadline.op = saved


_PG_CONNECTION: Any = None


def _pg_connection_class() -> Any:
    """A psycopg ``Connection`` whose every wait ends by the thread's deadline (or its own
    per-operation bound), built on first use: psycopg is an optional dependency."""
    global _PG_CONNECTION  # noqa: PLW0603 - one class per process, created lazily
    if _PG_CONNECTION is not None:
        return _PG_CONNECTION
    import psycopg  # noqa: PLC0415 - only with PostgreSQL (the optional extra)
    from psycopg import errors  # noqa: PLC0415

    wait_timeout = errors._WaitTimeout  # what psycopg's wait functions raise on their timeout
    base_wait = psycopg.Connection.wait
    monotonic = time.monotonic

    class AuditDeadline(psycopg.OperationalError, DeadlineExceeded):
        """Our deadline passed; an OperationalError so SQLAlchemy treats it as a disconnect."""

    class BoundedConnection(psycopg.Connection[Any]):
        op_timeout = 30.0
        # The engine's list of backends we abandoned (see _bound_connections).
        abandoned: list[int] | None = None

        @classmethod
        def _connect_gen(cls, conninfo: str = "") -> Any:
            # libpq's connect_timeout is whole seconds, 2 at least; psycopg's wait_conn wakes
            # us every 0.1 s whatever it waits for, so this checks our deadline as often.
            gen = super()._connect_gen(conninfo)
            at = _deadline.at
            try:
                item = next(gen)
                while True:
                    if at is not None and time.monotonic() >= at:
                        gen.close()  # frees the half-open PGconn: its socket is closed
                        raise AuditDeadline("audit database: no connection within the deadline")
                    item = gen.send((yield item))
            except StopIteration as stop:
                return stop.value

        def wait(self, gen: Any, interval: float = 0.1, timeout: float | None = None) -> Any:
            # On every round trip of the sync publish: kept to a few attribute reads.
            limit = _deadline.op or self.op_timeout
            at = _deadline.at
            if at is not None:
                left = at - monotonic()
                if left < limit:
                    limit = left if left > 0.0 else 0.0
            if timeout is not None and timeout <= limit:
                return base_wait(self, gen, interval, timeout)  # the caller's is stricter
            try:
                return base_wait(self, gen, interval, limit)
            except wait_timeout:
                # Mid-protocol: the connection cannot be reused. Closed, SQLAlchemy sees a
                # disconnect and invalidates it (and the rest of its pool). Its server side
                # may live on (see _bound_connections): remember it.
                if self.abandoned is not None and self.pgconn.backend_pid:
                    self.abandoned.append(self.pgconn.backend_pid)
                self.close()
                raise AuditDeadline(f"audit database did not answer within {limit:.2f}s") from None

    _PG_CONNECTION = BoundedConnection
    return BoundedConnection


# Our sessions' name on the server, unless the URL gives one: what _terminate looks for.
APPLICATION_NAME = "otel-celery-publish"
_TERMINATE = (
    "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE pid = ANY(%s) "
    "AND application_name = current_setting('application_name') AND pid <> pg_backend_pid()"
)


def _bound_connections(engine: Engine, connect_timeout: float, op_timeout: float) -> None:
    """Make ``engine`` connect through :func:`_pg_connection_class` with these bounds.

    A connection we abandon at its deadline may have delivered half a batch: the server ran
    some of its upserts and waits for the rest (and the final Sync) in an open transaction,
    holding those rows' locks; on a black-holed route it notices only by TCP keepalive, hours
    later. Every retry of those rows would wait for those locks. So the next connection that
    succeeds terminates the backends we abandoned - only sessions of our own application name
    (a reused pid is then at worst another audit session, whose write is retried).
    """
    connection_class = _pg_connection_class()
    abandoned: list[int] = []

    @event.listens_for(engine, "do_connect")
    def _connect(_dialect: Any, _record: Any, cargs: Any, cparams: Any) -> Any:
        # The engine's dict: copied, not changed. Autocommit from the start, as the engine
        # sets it anyway, so _terminate's statement opens no transaction.
        params = {"application_name": APPLICATION_NAME, **cparams, "autocommit": True}
        with _bounded(at=time.monotonic() + connect_timeout):
            conn = connection_class.connect(*cargs, **params)
            conn.op_timeout = op_timeout
            conn.abandoned = abandoned
            if abandoned:
                _terminate(conn, abandoned)
        return conn


def _terminate(conn: Any, abandoned: list[int]) -> None:
    pids = abandoned[:]
    del abandoned[: len(pids)]
    try:
        conn.execute(_TERMINATE, (pids,)).close()
    except Exception as exc:
        if conn.closed:
            raise  # this connection failed too: an outage, reported by the caller
        # No right to (pg_signal_backend): the server's keepalive will, eventually.
        logger.warning("otel-celery-publish: could not end abandoned audit sessions: %r", exc)


@dataclass(frozen=True)
class _Prepared:
    """A single-row upsert rendered once for the raw driver, with SQLAlchemy's bind processors."""

    sql: str
    positions: tuple[str, ...] | None  # parameter order for positional drivers (sqlite3)
    processors: dict[str, Callable[[Any], Any]]

    def params(self, row: Row) -> Any:
        values = dict(row)
        for name, process in self.processors.items():  # few: JSON, mostly
            if name in values:
                values[name] = process(values[name])
        return values if self.positions is None else tuple(values[k] for k in self.positions)


def preload_driver(url: str) -> None:
    """Import the database driver and what our threads import of it, now, on the caller's thread.

    A process that forks while one of its threads is importing a module hands the child that
    module's import lock, held by a thread the child does not have: the child's first import of
    it hangs forever (a prefork pool forked right after the worker instrumented, a gunicorn
    ``--preload`` master). Our background threads must find everything already imported.
    """
    dialect = make_url(url).get_dialect()
    dialect.import_dbapi()
    if dialect.name == "postgresql":
        _pg_connection_class()
        importlib.import_module("psycopg.sql")


def make_engine(url: str, timeout: float = 2.0, *, op_timeout: float | None = None) -> Engine:
    """An autocommit engine for the audit database, bounded waits, WAL on SQLite.

    Autocommit: every write is one idempotent upsert statement, so an explicit transaction
    would only add BEGIN and COMMIT round trips to the publish path (~0.2 ms on loopback).
    ``timeout`` bounds connecting and unacknowledged sends (PostgreSQL) or lock waits (SQLite).
    ``op_timeout`` (PostgreSQL, the writer's engine) bounds every wait for the server on the
    client side too, connecting included (by ``timeout``), and makes the calling thread's
    deadline apply (see the module docstring); the read side's long queries go without.
    """
    if url.startswith("sqlite"):
        engine = create_engine(url, connect_args={"timeout": timeout}, isolation_level="AUTOCOMMIT")

        @event.listens_for(engine, "connect")
        def _pragmas(dbapi_conn: Any, _record: Any) -> None:
            cur = dbapi_conn.cursor()
            # WAL is a property of the file: if another process holds the lock while setting
            # it on a new database, it is being set; this connection need not.
            with contextlib.suppress(sqlite3.OperationalError):
                cur.execute("PRAGMA journal_mode=WAL")
            cur.execute("PRAGMA synchronous=NORMAL")
            cur.close()

        return engine
    if url.startswith("postgresql"):
        connect_args = {
            "connect_timeout": max(2, round(timeout)),  # libpq: whole seconds, 2 at least
            "tcp_user_timeout": int(timeout * 1000),
        }
        engine = create_engine(
            url, connect_args=connect_args, isolation_level="AUTOCOMMIT", pool_timeout=timeout
        )
        if op_timeout is not None:
            _bound_connections(engine, timeout, op_timeout)
        return engine
    scheme = url.split(":", 1)[0]
    raise ValueError(f"unsupported audit database {scheme!r}: use postgresql or sqlite")


def upsert(table: Table, dialect: str, columns: Iterable[str]) -> Insert:
    """``INSERT ... ON CONFLICT (publish_id) DO UPDATE`` setting only ``columns``."""
    stmt = (pg_insert if dialect == "postgresql" else sqlite_insert)(table)
    return stmt.on_conflict_do_update(
        index_elements=[table.c.publish_id],
        set_={name: stmt.excluded[name] for name in columns if name != "publish_id"},
    )


class Database:
    """The audit database: a pooled engine for batches, one warm raw connection for sync rows."""

    def __init__(self, settings: Settings, table: Table) -> None:
        self.settings = settings
        self.table = table
        self._lock = threading.Lock()
        self._sync_lock = threading.Lock()
        self._engine: Engine | None = None
        self._statements: dict[tuple[str, ...], Insert] = {}
        self._fairy: Any = None  # the pool's wrapper of _raw
        self._raw: Any = None  # the DBAPI connection (psycopg or sqlite3) for sync rows
        self._dialect = ""
        self._prepared: dict[tuple[str, ...], _Prepared] = {}
        self._busy_ms = 0  # SQLite: the sync connection's current lock wait bound

    def engine(self) -> Engine:
        with self._lock:
            return self._build()

    def _build(self) -> Engine:
        """The engine, created (and the schema migrated) on first use; the caller holds _lock."""
        if self._engine is None:
            timeout = self.settings.db_timeout
            engine = make_engine(
                self.settings.audit_url, timeout, op_timeout=timeout * SHIP_TIMEOUT_FACTOR
            )
            if self.settings.create_schema:
                try:
                    with _bounded(op=MIGRATE_TIMEOUT_S):
                        upgrade(engine, self.table.name)
                except BaseException:
                    engine.dispose()
                    raise
            self._engine = engine
        return self._engine

    def insert_now(self, row: Row, deadline: float | None = None) -> None:
        """Commit one row through the raw driver: a prepared upsert, no ORM, no transaction.

        Everything - waiting for the sync connection, setting the engine up, connecting, the
        statement - ends by ``deadline`` (monotonic; default ``db_timeout`` from now), else
        :class:`DeadlineExceeded` (or the driver's error) and the connection is dropped.
        """
        if deadline is None:
            deadline = time.monotonic() + self.settings.db_timeout
        if not self._sync_lock.acquire(timeout=max(0.0, deadline - time.monotonic())):
            raise DeadlineExceeded(
                f"the audit connection stayed busy for {self.settings.db_timeout}s "
                "(another publish is waiting for the database)"
            )
        columns = tuple(row)
        saved = _deadline.at
        _deadline.at = deadline  # read by the PostgreSQL connection's waits
        try:
            with suppress_instrumentation():
                if self._raw is None:
                    self._raw = self._connect_sync(deadline)
                prepared = self._prepared.get(columns) or self._prepare(columns)
                if self._dialect == "postgresql":
                    self._raw.execute(prepared.sql, prepared.params(row), prepare=True).close()
                else:
                    self._sqlite_busy(deadline)
                    self._raw.execute(prepared.sql, prepared.params(row)).close()
        except BaseException as exc:
            # A refused value leaves the connection as it was; anything else may not have.
            if not (isinstance(exc, Exception) and is_refusal(exc)) or self._broken():
                self._drop_sync()
            raise
        finally:
            _deadline.at = saved
            self._sync_lock.release()

    def upsert(self, rows: list[Row]) -> None:
        """Upsert ``rows`` (merged per publish_id), one executemany per distinct column set."""
        merged: dict[str, Row] = {}
        for row in rows:
            merged.setdefault(row["publish_id"], {}).update(row)
        groups: dict[tuple[str, ...], list[Row]] = {}
        for row in merged.values():
            groups.setdefault(tuple(sorted(row)), []).append(row)
        engine = self.engine()
        with suppress_instrumentation(), engine.connect() as conn:
            for columns, group in groups.items():
                if engine.dialect.name == "postgresql" and len(group) >= COPY_MIN_ROWS:
                    try:
                        self._copy_upsert(conn, columns, group)
                    except Exception:
                        # Raw driver calls: SQLAlchemy did not see a disconnect; tell it, or
                        # the pool would try to reset a closed connection.
                        raw = conn.connection.driver_connection
                        if raw is None or raw.closed:
                            conn.invalidate()
                        raise
                    continue
                stmt = self._statements.get(columns)
                if stmt is None:
                    stmt = self._statements[columns] = upsert(
                        self.table, engine.dialect.name, columns
                    )
                conn.execute(stmt, group)

    def _copy_upsert(self, conn: Connection, columns: tuple[str, ...], rows: list[Row]) -> None:
        """PostgreSQL's fast path for a big batch (a spool drain): COPY into a temporary
        table, then one ``INSERT ... SELECT ... ON CONFLICT DO UPDATE`` (COPY cannot upsert)."""
        from psycopg import sql  # noqa: PLC0415 - only with PostgreSQL (the optional extra)

        prepared = self._prepared.get(columns) or self._prepare(columns)
        ident = sql.Identifier
        names = sql.SQL(", ").join(map(ident, columns))
        updates = sql.SQL(", ").join(
            sql.SQL("{0} = EXCLUDED.{0}").format(ident(c)) for c in columns if c != "publish_id"
        )
        table, stage = ident(self.table.name), ident(f"{self.table.name}_stage")
        raw = conn.connection.driver_connection
        assert raw is not None
        with raw.transaction(), raw.cursor() as cur:
            # Once per connection (emptied at every commit): no catalogue churn per batch.
            cur.execute(
                sql.SQL(
                    "CREATE TEMP TABLE IF NOT EXISTS {} (LIKE {} INCLUDING DEFAULTS) "
                    "ON COMMIT DELETE ROWS"
                ).format(stage, table)
            )
            with cur.copy(sql.SQL("COPY {} ({}) FROM STDIN").format(stage, names)) as copy:
                for row in rows:
                    values = prepared.params(row)
                    copy.write_row([values[c] for c in columns])
            cur.execute(
                sql.SQL(
                    "INSERT INTO {} ({}) SELECT {} FROM {} "
                    "ON CONFLICT (publish_id) DO UPDATE SET {}"
                ).format(table, names, names, stage, updates)
            )

    def dispose(self) -> None:
        """Close every connection; the next call reconnects. Gives up (connections left to
        the process's end) if the shipping thread holds the engine longer than one of its
        operations may take: a migration on a database that hung half-way."""
        if not self._lock.acquire(timeout=self.settings.db_timeout * SHIP_TIMEOUT_FACTOR):
            logger.warning("otel-celery-publish: audit engine busy (migrating?); not disposed")
            return
        try:
            with self._sync_lock:
                self._drop_sync()
                if self._engine is not None:
                    self._engine.dispose()
                    self._engine = None
                self._statements.clear()
                self._prepared.clear()
        finally:
            self._lock.release()

    def forget(self) -> None:
        """In a forked child: let go of the parent's connections without closing them (the
        sockets are the parent's) and without our locks (a parent thread may have held one at
        fork time). This object is not used again."""
        # A checked-out connection that is garbage collected gets terminated by the pool, on
        # the parent's socket: keep it referenced for the life of this process instead.
        _INHERITED.append(self._fairy)
        if self._engine is not None:
            self._engine.dispose(close=False)

    def _connect_sync(self, deadline: float) -> Any:
        engine = self._engine
        if engine is None:
            # A cold process: the shipping thread is probably connecting and migrating now.
            # Wait for it (or do it) only as long as this publish may take.
            if not self._lock.acquire(timeout=max(0.0, deadline - time.monotonic())):
                raise DeadlineExceeded(
                    f"the audit database was not set up within {self.settings.db_timeout}s "
                    "(connecting and migrating)"
                )
            try:
                engine = self._build()
            finally:
                self._lock.release()
        self._fairy = engine.raw_connection()
        self._dialect = engine.dialect.name
        raw = self._fairy.driver_connection
        if self._dialect == "postgresql":
            # The server gives up too (a lock wait), not just our side of the connection.
            ms = str(int(self.settings.db_timeout * 1000))
            raw.execute("SELECT set_config('statement_timeout', %s, false)", (ms,)).close()
        else:
            self._busy_ms = int(self.settings.db_timeout * 1000)  # sqlite3's timeout
        return raw

    def _sqlite_busy(self, deadline: float) -> None:
        """Bound SQLite's lock wait by what is left of the deadline (only rewritten when that
        differs: a pragma costs a few microseconds, an uncontended publish needs none)."""
        ms = int((deadline - time.monotonic()) * 1000)
        if ms <= 0:
            raise DeadlineExceeded("no time left for the audit database")
        if ms < self._busy_ms * 0.9 or ms > self._busy_ms:
            self._raw.execute(f"PRAGMA busy_timeout = {ms}").close()
            self._busy_ms = ms

    def _broken(self) -> bool:
        raw = self._raw
        return raw is not None and bool(
            getattr(raw, "closed", False) or getattr(raw, "broken", False)
        )

    def _prepare(self, columns: tuple[str, ...]) -> _Prepared:
        dialect = self.engine().dialect
        compiled = upsert(self.table, dialect.name, columns).compile(
            dialect=dialect, column_keys=list(columns)
        )
        processors: dict[str, Callable[[Any], Any]] = {}
        for name in columns:
            impl = self.table.c[name].type.dialect_impl(dialect)
            processor = impl.bind_processor(dialect)
            if processor is not None:
                processors[name] = processor
        positions = tuple(compiled.positiontup) if compiled.positiontup else None
        prepared = self._prepared[columns] = _Prepared(compiled.string, positions, processors)
        return prepared

    def _drop_sync(self) -> None:
        fairy, self._fairy, self._raw = self._fairy, None, None
        if fairy is not None:
            with contextlib.suppress(Exception):  # already failing; that error is reported
                fairy.invalidate()
