"""The audit database as the writer sees it: the engine, prepared single-row upserts, COPY.

:func:`make_engine` is the one engine factory (the read side uses it too, without deadlines);
:class:`Database` is the writer's: a pooled engine for the shipping thread's batches, and one
warm raw connection for ``sync`` publish rows, each a prepared upsert.

How long each wait may take (the mechanism is :mod:`.deadline`):

* a ``sync`` publish has one deadline, ``db_timeout`` from its start, covering the wait for the
  shared sync connection, the engine's setup (a cold process connects and migrates), connecting
  and the statement; past it the row goes to the spool. On PostgreSQL its upsert is sent before
  the message goes to the broker and its result read after (:meth:`Database.send_now`,
  :meth:`Database.settle_now`): the database's round trip overlaps the broker's.
* the shipping thread's operations are bounded by ``SHIP_TIMEOUT_FACTOR * db_timeout`` each
  (connecting by ``db_timeout``): a batch moves up to a 512 KB spool chunk or ``max_pending``
  rows in one statement and may wait for row locks, so it gets more time than one row, but a
  hung connection is dropped and retried with backoff instead of holding the thread forever.
* a migration's statements get :data:`MIGRATE_TIMEOUT_S` each.
"""

from __future__ import annotations

import contextlib
import datetime
import importlib
import json
import logging
import operator
import sqlite3
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any, NamedTuple

from opentelemetry.instrumentation.utils import suppress_instrumentation
from sqlalchemy import JSON, Connection, Engine, LargeBinary, Table, create_engine, event
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.engine import make_url
from sqlalchemy.sql.dml import Insert

from otel_celery_publish.config import Settings
from otel_celery_publish.schema.migrate import upgrade
from otel_celery_publish.sink.deadline import (
    DeadlineExceeded,
    bound_connections,
    bounded,
    pg_connection_class,
    thread_deadline,
)
from otel_celery_publish.sink.quarantine import is_refusal
from otel_celery_publish.sink.records import Record

logger = logging.getLogger("otel_celery_publish")

# Batches of at least this many rows go to PostgreSQL through COPY.
COPY_MIN_ROWS = 100
# One operation of the shipping thread may take this many times db_timeout (see the docstring).
SHIP_TIMEOUT_FACTOR = 10.0
# Migrations may legitimately run long (an index on a big table): their statements get this.
MIGRATE_TIMEOUT_S = 600.0
_INHERITED: list[Any] = []


@dataclass(frozen=True)
class _Prepared:
    """A single-row upsert rendered once for the raw driver, with SQLAlchemy's bind processors."""

    sql: str
    columns: tuple[str, ...]
    positions: tuple[str, ...] | None  # parameter order for positional drivers (sqlite3)
    processors: dict[str, Callable[[Any], Any]]

    def params(self, row: Record) -> Any:
        values = dict(row)
        for name, process in self.processors.items():  # few: JSON, mostly
            if name in values:
                values[name] = process(values[name])
        return values if self.positions is None else tuple(values[k] for k in self.positions)


class SyncFailure(NamedTuple):
    """A sync row whose upsert failed after it was sent (:meth:`Database.take_failed`): the
    writer repairs, quarantines or spools it, as for a failed :meth:`Database.insert_now`."""

    row: Record
    exc: Exception
    deadline: float


@dataclass(frozen=True)
class _InFlight:
    """The sync row sent on the connection whose result is not read yet (at most one)."""

    row: Record
    deadline: float
    sent: float  # monotonic


# How a value goes to the server: text input format, bytea binary, or JSON text.
_TEXT, _BYTEA, _JSON = 0, 1, 2


def _kind(table: Table, column: str) -> int:
    """How ``column``'s values go to the server: _TEXT, _BYTEA or _JSON."""
    kind = table.c[column].type
    return _JSON if isinstance(kind, JSON) else _BYTEA if isinstance(kind, LargeBinary) else _TEXT


@dataclass(frozen=True)
class _Statement:
    """A sync upsert prepared on the server for libpq's own calls: name, how each value goes."""

    name: bytes
    columns: tuple[str, ...]
    kinds: tuple[int, ...]  # _TEXT, _BYTEA or _JSON per column
    formats: tuple[int, ...]  # libpq's parameter formats: 1 (binary) for bytea

    def params(self, row: Record) -> list[bytes | None]:
        return [_param(row[c], kind) for c, kind in zip(self.columns, self.kinds, strict=True)]


def _param(value: Any, kind: int) -> bytes | None:
    """One value as libpq sends it (None: NULL; JSON None is JSON ``null``, as SQLAlchemy
    binds it). Text parameters end at a NUL byte there (libpq reads them as C strings), so
    text holding one is refused here, as psycopg refuses it, never cut."""
    if kind == _JSON:
        value = json.dumps(value)
    elif value is None:
        return None
    elif kind == _BYTEA:
        if not isinstance(value, bytes):
            raise TypeError(f"cannot adapt {type(value).__name__} to a bytea audit column")
        return value
    if isinstance(value, str):
        if "\x00" in value:
            raise ValueError("PostgreSQL text fields cannot contain NUL (0x00) bytes")
        text = value
    elif isinstance(value, bool):
        text = "t" if value else "f"
    elif isinstance(value, int):
        text = int.__repr__(value)
    elif isinstance(value, float):
        text = float.__repr__(value)
    elif isinstance(value, datetime.date):  # datetimes too
        text = value.isoformat()
    else:
        raise TypeError(f"cannot adapt {type(value).__name__} to an audit column")
    return text.encode()


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
        pg_connection_class()
        importlib.import_module("psycopg.sql")


def make_engine(url: str, timeout: float = 2.0, *, op_timeout: float | None = None) -> Engine:
    """An autocommit engine for the audit database, bounded waits, WAL on SQLite.

    Autocommit: every write is one idempotent upsert statement, so an explicit transaction
    would only add BEGIN and COMMIT round trips to the publish path (~0.2 ms on loopback).
    ``timeout`` bounds connecting and unacknowledged sends (PostgreSQL) or lock waits (SQLite).
    ``op_timeout`` (PostgreSQL, the writer's engine) bounds every wait for the server on the
    client side too, connecting included (by ``timeout``), and makes the calling thread's
    deadline apply (see :mod:`.deadline`); the read side's long queries go without.
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
            bound_connections(engine, timeout, op_timeout)
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


def _set_excluded(columns: Iterable[str]) -> Any:
    """``c = EXCLUDED.c, ...`` for the upsert of ``columns`` (all but the key)."""
    from psycopg import sql  # noqa: PLC0415 - only with PostgreSQL (the optional extra)

    return sql.SQL(", ").join(
        sql.SQL("{0} = EXCLUDED.{0}").format(sql.Identifier(c))
        for c in columns
        if c != "publish_id"
    )


def _results(raw: Any) -> None:
    """Wait (bounded, see :mod:`.deadline`) for the results of what was sent on ``raw`` through
    libpq; raise the first error as psycopg would."""
    from psycopg import errors, pq  # noqa: PLC0415 - only with PostgreSQL (the optional extra)
    from psycopg.generators import fetch_many  # noqa: PLC0415

    for result in raw.wait(fetch_many(raw.pgconn)):
        if result.status != pq.ExecStatus.COMMAND_OK:
            raise errors.error_from_result(result, encoding=raw.info.encoding)


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
        # PostgreSQL: upserts prepared on the sync connection, the row sent on it and not read
        # back yet, and the rows that failed after they were sent (see send_now).
        self._statements_on: dict[tuple[str, ...], _Statement] = {}
        self._inflight: _InFlight | None = None
        self._failed: list[SyncFailure] = []

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
                    with bounded(op=MIGRATE_TIMEOUT_S):
                        upgrade(engine, self.table.name)
                except BaseException:
                    engine.dispose()
                    raise
            self._engine = engine
        return self._engine

    def insert_now(self, row: Record, deadline: float | None = None) -> None:
        """Commit one row through the raw driver: a prepared upsert, no ORM, no transaction.

        Everything - waiting for the sync connection, setting the engine up, connecting, the
        statement - ends by ``deadline`` (monotonic; default ``db_timeout`` from now), else
        :class:`DeadlineExceeded` (or the driver's error) and the connection is dropped.
        """
        if deadline is None:
            deadline = time.monotonic() + self.settings.db_timeout
        with self._sync_connection(deadline) as raw:
            prepared = self._prepared.get(tuple(row)) or self._prepare(tuple(row))
            if self._dialect == "postgresql":
                raw.execute(prepared.sql, prepared.params(row), prepare=True).close()
            else:
                self._sqlite_busy(deadline)
                raw.execute(prepared.sql, prepared.params(row)).close()

    def send_now(self, row: Record, deadline: float) -> None:
        """Send one row's upsert and return without waiting for the database (PostgreSQL):
        :meth:`settle_now` reads its result, by ``deadline`` (a failure then comes out of
        :meth:`take_failed`). It is on the wire when this returns, so before a message sent
        next. SQLite: committed now, as :meth:`insert_now`. Raises as :meth:`insert_now` when
        the row could not be sent; a row sent earlier is settled first."""
        if not self.settings.audit_url.startswith("postgresql"):
            self.insert_now(row, deadline)
            return
        with self._sync_connection(deadline) as raw:
            from psycopg.generators import send  # noqa: PLC0415 - PostgreSQL only

            statement = self._statements_on.get(tuple(row)) or self._server_prepare(tuple(row))
            raw.pgconn.send_query_prepared(statement.name, statement.params(row), statement.formats)
            raw.wait(send(raw.pgconn))
            self._inflight = _InFlight(row, deadline, time.monotonic())

    def settle_now(self, publish_id: str | None = None, *, older_than: float = 0.0) -> None:
        """Read the result of the row in flight - ``publish_id``'s (default: any) sent at least
        ``older_than`` seconds ago - if there is one; waits no longer than its deadline."""
        flight = self._inflight
        if flight is None or (publish_id is not None and flight.row["publish_id"] != publish_id):
            return
        if time.monotonic() - flight.sent < older_than:
            return
        # Another thread holding the connection settles this row first, by the same deadline.
        if self._sync_lock.acquire(timeout=max(0.0, flight.deadline - time.monotonic())):
            try:
                if self._inflight is flight:
                    self._read_inflight()
            finally:
                self._sync_lock.release()

    def take_failed(self) -> list[SyncFailure]:
        """The rows sent and then failed since the last call (their writer must settle them)."""
        if not self._failed:
            return []  # every publish asks, twice: nothing to copy
        failed = self._failed[:]
        del self._failed[: len(failed)]
        return failed

    @contextlib.contextmanager
    def _sync_connection(self, deadline: float) -> Iterator[Any]:
        """The sync connection, held until the block ends, and free of a row in flight: every
        wait ends by ``deadline``; on failure the connection is dropped unless only a value was
        refused (that leaves it as it was)."""
        if not self._sync_lock.acquire(timeout=max(0.0, deadline - time.monotonic())):
            raise DeadlineExceeded(
                f"the audit connection stayed busy for {self.settings.db_timeout}s "
                "(another publish is waiting for the database)"
            )
        saved = thread_deadline.at
        try:
            with suppress_instrumentation():
                self._read_inflight()
                thread_deadline.at = deadline  # read by the PostgreSQL connection's waits
                if self._raw is None:
                    self._raw = self._connect_sync(deadline)
                yield self._raw
        except BaseException as exc:
            # A refused value leaves the connection as it was; anything else may not have.
            if not (isinstance(exc, Exception) and is_refusal(exc)) or self._broken():
                self._drop_sync()
            raise
        finally:
            thread_deadline.at = saved
            self._sync_lock.release()

    def _read_inflight(self) -> None:
        """Read the result of the row in flight, if any, by its deadline; a failure goes to
        :meth:`take_failed`. The caller holds the sync lock. The row stays in flight until it
        is read: its own publish's :meth:`settle_now` waits for whoever reads it."""
        flight = self._inflight
        if flight is None:
            return
        saved = thread_deadline.at
        thread_deadline.at = flight.deadline
        try:
            _results(self._raw)
        except BaseException as exc:
            self._inflight = None
            failure = exc if isinstance(exc, Exception) else DeadlineExceeded(repr(exc))
            self._failed.append(SyncFailure(flight.row, failure, flight.deadline))
            if not is_refusal(failure) or self._broken():
                self._drop_sync()
            if failure is not exc:
                raise
        else:
            self._inflight = None
        finally:
            thread_deadline.at = saved

    def _server_prepare(self, columns: tuple[str, ...]) -> _Statement:
        """PREPARE the upsert of ``columns`` on the sync connection (once per connection)."""
        from psycopg import sql  # noqa: PLC0415 - PostgreSQL only
        from psycopg.generators import send  # noqa: PLC0415

        text = sql.SQL("INSERT INTO {} ({}) VALUES ({}) ON CONFLICT (publish_id) {}").format(
            sql.Identifier(self.table.name),
            sql.SQL(", ").join(map(sql.Identifier, columns)),
            sql.SQL(", ").join(sql.SQL(f"${i}") for i in range(1, len(columns) + 1)),
            sql.SQL("DO UPDATE SET ") + _set_excluded(columns)
            if len(columns) > 1
            else sql.SQL("DO NOTHING"),
        )
        raw = self._raw
        name = f"otel_celery_publish_{len(self._statements_on)}".encode()
        raw.pgconn.send_prepare(name, text.as_bytes(raw))
        raw.wait(send(raw.pgconn))
        _results(raw)
        kinds = tuple(_kind(self.table, c) for c in columns)
        formats = tuple(int(kind == _BYTEA) for kind in kinds)
        statement = _Statement(name, columns, kinds, formats)
        self._statements_on[columns] = statement
        return statement

    def upsert(self, rows: list[Record]) -> None:
        """Upsert ``rows`` (merged per publish_id, later records win), one statement per
        distinct column set (rows of one writer all have their columns in one order)."""
        merged: dict[str, Record] = {}
        for row in rows:
            key = row["publish_id"]
            earlier = merged.get(key)
            # A copy only when merging: the caller's rows are never changed (it may retry them).
            merged[key] = row if earlier is None else {**earlier, **row}
        groups: dict[tuple[str, ...], list[Record]] = {}
        for row in merged.values():
            groups.setdefault(tuple(row), []).append(row)
        engine = self.engine()
        copies: list[tuple[tuple[str, ...], list[Record]]] = []
        statements: list[tuple[tuple[str, ...], list[Record]]] = []
        for item in groups.items():
            big = engine.dialect.name == "postgresql" and len(item[1]) >= COPY_MIN_ROWS
            (copies if big else statements).append(item)
        with suppress_instrumentation(), engine.connect() as conn:
            if copies:
                try:
                    self._copy_upsert(conn, copies)
                except Exception:
                    # Raw driver calls: SQLAlchemy did not see a disconnect; tell it, or
                    # the pool would try to reset a closed connection.
                    raw = conn.connection.driver_connection
                    if raw is None or raw.closed:
                        conn.invalidate()
                    raise
            for columns, group in statements:
                stmt = self._statements.get(columns)
                if stmt is None:
                    stmt = self._statements[columns] = upsert(
                        self.table, engine.dialect.name, columns
                    )
                conn.execute(stmt, group)

    def _copy_upsert(
        self, conn: Connection, groups: list[tuple[tuple[str, ...], list[Record]]]
    ) -> None:
        """PostgreSQL's fast path for big batches (a spool drain): COPY, in one transaction.

        Rows the database has never seen (most of a dead process's spool) are COPYed straight
        into the table. COPY cannot upsert: if a group's first or last row is already there
        (updates; rows shipped before their process died, or by another shipper), or a COPY
        meets one (rolled back to a savepoint), the group is COPYed into a temporary table
        and moved by one ``INSERT ... SELECT ... ON CONFLICT DO UPDATE``.
        """
        from psycopg import errors, sql  # noqa: PLC0415 - only with PostgreSQL (the optional extra)

        ident = sql.Identifier
        table, stage = ident(self.table.name), ident(f"{self.table.name}_stage")
        probe = sql.SQL("SELECT 1 FROM {} WHERE publish_id IN (%s, %s) LIMIT 1").format(table)
        raw = conn.connection.driver_connection
        assert raw is not None
        with raw.transaction(), raw.cursor() as cur:
            for columns, rows in groups:
                names = sql.SQL(", ").join(map(ident, columns))
                # A group's rows were spooled together: all shipped before, or all new (but
                # at its edges, or a few another shipper races us to).
                ends = (rows[0]["publish_id"], rows[-1]["publish_id"])
                if cur.execute(probe, ends).fetchone() is None:
                    try:
                        with raw.transaction():  # a savepoint
                            self._copy(cur, table, columns, rows)
                        continue
                    except errors.UniqueViolation:
                        pass  # rolled back to the savepoint: upsert them
                # Once per connection (emptied at every commit): no catalogue churn per batch.
                cur.execute(
                    sql.SQL(
                        "CREATE TEMP TABLE IF NOT EXISTS {} (LIKE {} INCLUDING DEFAULTS) "
                        "ON COMMIT DELETE ROWS"
                    ).format(stage, table)
                )
                self._copy(cur, stage, columns, rows)
                updates = _set_excluded(columns)
                # Emptied as it is read: the next group of this transaction stages its own.
                cur.execute(
                    sql.SQL(
                        "WITH moved AS (DELETE FROM {} RETURNING {}) "
                        "INSERT INTO {} ({}) SELECT {} FROM moved "
                        "ON CONFLICT (publish_id) DO UPDATE SET {}"
                    ).format(stage, names, table, names, names, updates)
                )

    def _copy(self, cur: Any, into: Any, columns: tuple[str, ...], rows: list[Record]) -> None:
        """COPY ``rows`` (all with ``columns``, in that order) into ``into``: a JSON column's
        value as its JSON text (as SQLAlchemy binds it: None is JSON ``null``), the others as
        they are (their types checked by :func:`~.records.check_row`, or built by us)."""
        from psycopg import sql  # noqa: PLC0415 - only with PostgreSQL (the optional extra)

        names = sql.SQL(", ").join(map(sql.Identifier, columns))
        documents = [i for i, c in enumerate(columns) if _kind(self.table, c) == _JSON]
        values = (
            operator.itemgetter(*columns) if len(columns) > 1 else lambda row: (row[columns[0]],)
        )
        with cur.copy(sql.SQL("COPY {} ({}) FROM STDIN").format(into, names)) as copy:
            write = copy.write_row
            if not documents:
                for row in rows:
                    write(values(row))
                return
            for row in rows:
                some = list(values(row))
                for i in documents:
                    some[i] = json.dumps(some[i])
                write(some)

    def dispose(self) -> None:
        """Close every connection; the next call reconnects. Gives up (connections left to
        the process's end) if the shipping thread holds the engine longer than one of its
        operations may take: a migration on a database that hung half-way."""
        if not self._lock.acquire(timeout=self.settings.db_timeout * SHIP_TIMEOUT_FACTOR):
            logger.warning("otel-celery-publish: audit engine busy (migrating?); not disposed")
            return
        try:
            with self._sync_lock:
                with contextlib.suppress(Exception):  # a failure goes to take_failed
                    self._read_inflight()
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
        prepared = _Prepared(compiled.string, columns, positions, processors)
        self._prepared[columns] = prepared
        return prepared

    def _drop_sync(self) -> None:
        flight, self._inflight = self._inflight, None
        if flight is not None:  # its result is gone with the connection
            lost = DeadlineExceeded("the audit connection was closed before the row's result")
            self._failed.append(SyncFailure(flight.row, lost, flight.deadline))
        self._statements_on.clear()
        fairy, self._fairy, self._raw = self._fairy, None, None
        if fairy is not None:
            with contextlib.suppress(Exception):  # already failing; that error is reported
                fairy.invalidate()
