"""Getting audit records into the database without slowing the host down.

One :class:`AuditWriter` per process. Two entry points:

* :meth:`AuditWriter.record_publish` - the publish row, made durable before the message goes to
  the broker, as the durability mode promises:

  - ``sync``: committed in the audit database (one prepared single-row upsert on a warm raw
    connection); if the database fails, the row goes to the spool instead, loudly;
  - ``spool``: appended to this process's local spool file and handed to the OS;
  - ``async``: queued in memory (may lose the last moments on a crash).

* :meth:`AuditWriter.record_event` - everything else (sent, received, started, finished): to the
  spool in ``spool`` mode, else to the in-memory queue.

One background thread per process ships the queue and the spool in batches. When the database is
down, what was queued in memory moves to the spool, so memory stays bounded and nothing is lost
with the process; the spool ships when the database is back, and a dead process's spool is
shipped by the next process that starts on the same spool directory (see :mod:`.spool`).

Every write is an upsert keyed by ``publish_id`` that sets only the columns it carries, so writes
commute (a worker update may land before the publish row it updates) and shipping a record twice
stores it once.
"""

from __future__ import annotations

import atexit
import contextlib
import logging
import os
import queue
import sqlite3
import threading
import time
import weakref
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from opentelemetry import metrics
from opentelemetry.instrumentation.utils import suppress_instrumentation
from sqlalchemy import Connection, Engine, Table, create_engine, event
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.sql.dml import Insert

from otel_celery_publish._guard import report
from otel_celery_publish.audit.migrate import upgrade
from otel_celery_publish.audit.schema import audit_table
from otel_celery_publish.audit.spool import Spool, SpoolFull, adopt_orphans, target_dir
from otel_celery_publish.config import Settings

logger = logging.getLogger("otel_celery_publish")

Row = dict[str, Any]
# After a failed synchronous write, publishes skip the database for this long and go straight to
# the spool, so a dead database costs one timeout, not one per publish.
BREAKER_OPEN_S = 5.0
RETRY_BACKOFF_MAX_S = 30.0
# A fully shipped segment is deleted once it is this large (less re-shipping after a crash).
ROTATE_AT_BYTES = 4 << 20
ADOPT_EVERY_S = 60.0
# Batches of at least this many rows go to PostgreSQL through COPY.
COPY_MIN_ROWS = 100
_INHERITED: list[Any] = []


@dataclass
class _Flush:
    done: threading.Event = field(default_factory=threading.Event)
    ok: bool = False
    stop: bool = False


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


def make_engine(url: str, timeout: float = 2.0) -> Engine:
    """An autocommit engine for the audit database, bounded waits, WAL on SQLite.

    Autocommit: every write is one idempotent upsert statement, so an explicit transaction
    would only add BEGIN and COMMIT round trips to the publish path (~0.2 ms on loopback).
    ``timeout`` bounds connecting and unacknowledged sends (PostgreSQL) or lock waits (SQLite).
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
        return create_engine(url, connect_args=connect_args, isolation_level="AUTOCOMMIT")
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

    def engine(self) -> Engine:
        with self._lock:
            if self._engine is None:
                engine = make_engine(self.settings.audit_url, self.settings.db_timeout)
                if self.settings.create_schema:
                    upgrade(engine, self.table.name)
                self._engine = engine
            return self._engine

    def insert_now(self, row: Row) -> None:
        """Commit one row through the raw driver: a prepared upsert, no ORM, no transaction."""
        columns = tuple(row)
        with self._sync_lock, suppress_instrumentation():
            try:
                if self._raw is None:
                    self._raw = self._connect_sync()
                prepared = self._prepared.get(columns) or self._prepare(columns)
                if self._dialect == "postgresql":
                    self._raw.execute(prepared.sql, prepared.params(row), prepare=True).close()
                else:
                    self._raw.execute(prepared.sql, prepared.params(row)).close()
            except BaseException:
                self._drop_sync()
                raise

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
                    self._copy_upsert(conn, columns, group)
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
        """Close every connection; the next call reconnects."""
        with self._lock, self._sync_lock:
            self._drop_sync()
            if self._engine is not None:
                self._engine.dispose()
                self._engine = None
            self._statements.clear()
            self._prepared.clear()

    def forget(self) -> None:
        """In a forked child: let go of the parent's connections without closing them (the
        sockets are the parent's) and without our locks (a parent thread may have held one at
        fork time). This object is not used again."""
        # A checked-out connection that is garbage collected gets terminated by the pool, on
        # the parent's socket: keep it referenced for the life of this process instead.
        _INHERITED.append(self._fairy)
        if self._engine is not None:
            self._engine.dispose(close=False)

    def _connect_sync(self) -> Any:
        engine = self.engine()
        self._fairy = engine.raw_connection()
        self._dialect = engine.dialect.name
        raw = self._fairy.driver_connection
        if self._dialect == "postgresql":
            # Bound a hung server too, not just a dead one (connect/tcp timeouts cover that).
            ms = str(int(self.settings.db_timeout * 1000))
            raw.execute("SELECT set_config('statement_timeout', %s, false)", (ms,)).close()
        return raw

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


class AuditWriter:
    """Per-process audit writer. Safe to share between threads; re-arms itself after fork."""

    db: Database
    _spool: Spool

    def __init__(self, settings: Settings, meter: metrics.Meter | None = None) -> None:
        self.settings = settings
        self.table = audit_table(settings.table_name)
        self.spool_dir = target_dir(settings.spool_dir, settings.audit_url, settings.table_name)
        meter = meter or metrics.get_meter("otel_celery_publish")
        self._fallbacks = meter.create_counter(
            "celery.audit.fallback",
            unit="{record}",
            description="Publish rows the sync path could not commit and spooled instead",
        )
        self._overflow = meter.create_counter(
            "celery.audit.spool.overflow",
            unit="{record}",
            description="Records the spool refused (spool_max_bytes reached); kept in memory",
        )
        self._dropped = meter.create_counter(
            "celery.audit.dropped",
            unit="{record}",
            description="Audit records lost: spool full or unwritable and memory queue full",
        )
        meter.create_observable_gauge(
            "celery.audit.spool.backlog",
            callbacks=[self._observe_backlog],
            unit="By",
            description="Bytes in this process's spool not yet shipped to the audit database",
        )
        self._reset(fork=False)
        ref = weakref.ref(self)

        def after_fork() -> None:
            writer = ref()
            if writer is not None:
                writer._reset(fork=True)

        def at_exit() -> None:
            writer = ref()
            if writer is not None:
                writer.close(timeout=5.0)

        os.register_at_fork(after_in_child=after_fork)
        atexit.register(at_exit)

    def _reset(self, *, fork: bool) -> None:
        # After fork: the parent's connections, spool segment, queue and thread are not ours.
        # Its sockets and segment must not be closed from here (that would break the parent's),
        # so just forget them.
        if fork:
            self.db.forget()
            self._spool.forget()
        self._lock = threading.Lock()
        self.db = Database(self.settings, self.table)
        self._spool = Spool(
            self.spool_dir, fsync=self.settings.spool_fsync, max_bytes=self.settings.spool_max_bytes
        )
        self._queue: queue.SimpleQueue[Row | _Flush] = queue.SimpleQueue()
        # The thread sleeps on this, not on the queue: a put must not wake it (a thread switch
        # per event costs the task or publish that made it), only flush/close and a backlog.
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None
        self._breaker_until = 0.0
        self._next_adopt = 0.0

    def engine(self) -> Engine:
        return self.db.engine()

    # -- write paths -----------------------------------------------------------------------

    def record_publish(self, row: Row) -> None:
        """Make the publish row durable now, as the durability mode says; never raises."""
        mode = self.settings.durability
        if mode == "sync":
            if time.monotonic() >= self._breaker_until:
                try:
                    self.db.insert_now(row)
                    return
                except Exception as exc:
                    self._breaker_until = time.monotonic() + BREAKER_OPEN_S
                    report(
                        "audit write",
                        exc,
                        f"audit database unavailable ({exc!r}): publish rows go to the spool in "
                        f"{self.spool_dir} and are shipped when it is back",
                    )
            self._fallbacks.add(1)
        if mode == "async":
            self._enqueue(row)
        else:
            self._to_spool(row)

    def record_event(self, row: Row, *, durable: bool = True) -> None:
        """A partial row (must hold ``publish_id``) for the batched upsert: to the spool in
        ``spool`` mode unless ``durable`` is False, else to the in-memory queue."""
        if durable and self.settings.durability == "spool":
            self._to_spool(row)
        else:
            self._enqueue(row)

    def flush(self, timeout: float | None = 10.0) -> bool:
        """Ship everything queued and spooled so far; True when it reached the database."""
        return self._signal(_Flush(), timeout)

    def close(self, timeout: float | None = 10.0) -> bool:
        """Flush, stop the thread and close connections; later writes start afresh."""
        flushed = self._signal(_Flush(stop=True), timeout)
        self.db.dispose()
        return flushed

    def _enqueue(self, row: Row) -> None:
        if self._thread is None:
            self._start()
        self._queue.put(row)
        if self._queue.qsize() > self.settings.max_pending:
            self._wake.set()

    def _to_spool(self, row: Row) -> None:
        if self._thread is None:
            self._start()
        try:
            self._spool.append(row)
        except Exception as exc:
            if isinstance(exc, SpoolFull):
                self._overflow.add(1)
            report("audit spool (record kept in memory)", exc, f"{exc}; kept in memory instead")
            self._queue.put(row)

    def _signal(self, msg: _Flush, timeout: float | None) -> bool:
        if self._thread is None or not self._thread.is_alive():
            return not self._spool.pending()
        self._queue.put(msg)
        self._wake.set()
        return msg.done.wait(timeout) and msg.ok

    def _observe_backlog(self, _options: metrics.CallbackOptions) -> list[metrics.Observation]:
        return [metrics.Observation(self._spool.size - self._spool.shipped)]

    # -- background shipping ---------------------------------------------------------------

    def start(self) -> None:
        """Start the background thread now: it connects, migrates the schema and ships dead
        processes' spools before the first publish needs any of it."""
        self._start()

    def _start(self) -> None:
        with self._lock:
            if self._thread is None:
                self._thread = threading.Thread(
                    target=self._run, name="otel-celery-publish-audit", daemon=True
                )
                self._thread.start()

    def _run(self) -> None:
        pending: dict[str, Row] = {}
        interval = self.settings.flush_interval
        next_ship = time.monotonic()
        backoff = interval
        while True:
            waiters: list[_Flush] = []
            self._wake.wait(max(0.0, next_ship - time.monotonic()))
            self._wake.clear()
            self._drain(pending, waiters)
            if waiters or time.monotonic() >= next_ship:
                ok = self._ship(pending)
                backoff = interval if ok else min(backoff * 2, RETRY_BACKOFF_MAX_S)
                next_ship = time.monotonic() + backoff
            shipped = not pending and not self._spool.pending()
            stop = any(w.stop for w in waiters)
            if stop:  # before the waiters wake: a pool child exits right after close()
                self._spool.close(delete=shipped)
                with self._lock:
                    self._thread = None
            for waiter in waiters:
                waiter.ok = shipped
                waiter.done.set()
            if stop:
                return

    def _ship(self, pending: dict[str, Row]) -> bool:
        """Ship the memory queue, then the spool, then dead processes' spools. On failure the
        memory queue moves to the spool: bounded memory, and a crash now loses nothing."""
        try:
            self.db.engine()  # connect (and migrate) here, not on the first publish
            if pending:
                self.db.upsert(list(pending.values()))
                pending.clear()
            if self._spool.pending():
                self._spool.ship(self.db.upsert, ROTATE_AT_BYTES)
            if time.monotonic() >= self._next_adopt:
                self._next_adopt = time.monotonic() + ADOPT_EVERY_S
                adopt_orphans(self.spool_dir, self.db.upsert)
            return True
        except Exception as exc:
            report(
                "audit batch write",
                exc,
                f"audit database unavailable ({exc!r}): records wait in the spool in "
                f"{self.spool_dir} and are retried with backoff",
            )
            self._spill(pending)
            return False

    def _spill(self, pending: dict[str, Row]) -> None:
        for publish_id in list(pending):
            try:
                self._spool.append(pending[publish_id])
            except Exception as exc:
                if isinstance(exc, SpoolFull):
                    self._overflow.add(len(pending))
                report("audit spool (record kept in memory)", exc, f"{exc}; kept in memory")
                return
            del pending[publish_id]

    def _drain(self, pending: dict[str, Row], waiters: list[_Flush]) -> None:
        """Take everything queued so far: records merge into ``pending``, flushes wait."""
        while True:
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                return
            if isinstance(item, _Flush):
                waiters.append(item)
                continue
            merged = pending.setdefault(item["publish_id"], {})
            merged.update(item)
            if len(pending) > self.settings.max_pending:
                # Memory is full (the database is slow, or this thread starved of the GIL by a
                # busy publisher): the backlog moves to the spool; dropped only if it refuses.
                self._spill(pending)
            if len(pending) > self.settings.max_pending:
                dropped = next(iter(pending))
                del pending[dropped]
                self._dropped.add(1)
                exc = OverflowError(
                    f"more than {self.settings.max_pending} audit records waiting in memory "
                    f"and the spool refuses them; dropped the oldest ({dropped})"
                )
                report("audit queue full", exc, str(exc))


def drain_spool(settings: Settings) -> int:
    """Ship the spool leftovers of dead processes now; return the number of records shipped."""
    db = Database(settings, audit_table(settings.table_name))
    try:
        return adopt_orphans(
            target_dir(settings.spool_dir, settings.audit_url, settings.table_name), db.upsert
        )
    finally:
        db.dispose()
