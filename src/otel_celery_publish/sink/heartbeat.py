"""Worker liveness: a heartbeat row per worker instance, so ``lost`` can tell running from dead.

A *worker instance* is one boot of a worker's main process, named by a random id. At
``worker_init`` (or ``worker_ready`` if we were instrumented later) the main process starts one
daemon thread that upserts the instance's row in ``<table>_workers`` every
``heartbeat_interval`` seconds over a connection of its own (bounded by ``db_timeout``), and
marks it stopped at ``worker_shutdown``. Pool children inherit the id through fork and put it
on the rows they start; they never beat. The cost is one single-row upsert per interval per
worker, off every task's path.

An instance whose row is not renewed within :data:`GRACE_INTERVALS` intervals (by the worker's
clock, stored as ``expires_at``) and was never marked stopped is dead: SIGKILL, OOM killer,
machine lost. Worker and ``lost`` clocks must agree to well within an interval.
"""

from __future__ import annotations

import datetime as dt
import os
import random
import threading
import time
from typing import Any

from opentelemetry.instrumentation.utils import suppress_instrumentation
from sqlalchemy import Engine, Table, event
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert

from otel_celery_publish._guard import report
from otel_celery_publish.config import Settings
from otel_celery_publish.schema.migrate import upgrade
from otel_celery_publish.schema.table import workers_table
from otel_celery_publish.sink.database import make_engine, preload_driver
from otel_celery_publish.sink.process_hooks import ProcessHooks

UTC = dt.timezone.utc
# A beat may be late by up to one interval (a slow database, a busy host) before the instance
# counts as dead.
GRACE_INTERVALS = 2.0


def _now() -> dt.datetime:
    return dt.datetime.now(UTC)


class Heartbeat:
    """The heartbeat of this worker instance; inert in every process but the one that started it."""

    def __init__(self, settings: Settings) -> None:
        self._settings = settings
        preload_driver(settings.audit_url)  # not in our thread: a fork could catch it importing
        self._table: Table = workers_table(settings.table_name)
        self._interval = float(settings.heartbeat_interval)
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._owner: int | None = None
        #: Inherited by forked pool children, which stamp it on the rows they start.
        self.instance_id: str | None = None
        PROCESS_HOOKS.add(self)

    def _forked(self) -> None:
        # The thread is the parent's; the lock may have been held by it at fork time.
        self._lock = threading.Lock()
        self._thread = None

    def start(self, nodename: str) -> None:
        """Start beating for this process as a new worker instance (idempotent per process)."""
        with self._lock:
            if self._owner == os.getpid():
                return
            self._owner = os.getpid()
            self.instance_id = f"{random.getrandbits(128):032x}"
            self._stop = threading.Event()
            self._thread = threading.Thread(
                target=self._run,
                args=(self.instance_id, nodename, self._stop),
                name="otel-celery-publish-heartbeat",
                daemon=True,
            )
            self._thread.start()

    def stop(self, timeout: float) -> None:
        """Mark the instance stopped and end the thread, waiting at most ``timeout`` seconds."""
        with self._lock:
            thread = self._thread if self._owner == os.getpid() else None
            self._thread = None
            self._owner = None
        if thread is not None:
            self._stop.set()
            thread.join(timeout)

    def _run(self, instance_id: str, nodename: str, stop: threading.Event) -> None:
        engine = _engine(self._settings)
        started = _now()
        migrated = not self._settings.create_schema
        try:
            while True:
                try:
                    if not migrated:
                        with suppress_instrumentation():
                            upgrade(engine, self._settings.table_name)
                        migrated = True
                    self._beat(engine, instance_id, nodename, started, stopped=False)
                except Exception as exc:
                    _report(exc)
                # Anchored to the monotonic clock: a slow beat does not push the next one back.
                if stop.wait(self._interval - time.monotonic() % self._interval):
                    break
            try:
                self._beat(engine, instance_id, nodename, started, stopped=True)
            except Exception as exc:
                _report(exc)
        finally:
            engine.dispose()

    def _beat(
        self, engine: Engine, instance_id: str, nodename: str, started: dt.datetime, *,
        stopped: bool,
    ) -> None:  # fmt: skip
        now = _now()
        values: dict[str, Any] = {
            "instance_id": instance_id,
            "nodename": nodename,
            "pid": os.getpid(),
            "started_at": started,
            "heartbeat_at": now,
            "expires_at": now + dt.timedelta(seconds=GRACE_INTERVALS * self._interval),
            "interval_s": self._interval,
            "stopped_at": now if stopped else None,
        }
        insert = pg_insert if engine.dialect.name == "postgresql" else sqlite_insert
        stmt = insert(self._table).values(values)
        stmt = stmt.on_conflict_do_update(
            index_elements=[self._table.c.instance_id],
            set_={k: stmt.excluded[k] for k in ("heartbeat_at", "expires_at", "stopped_at")},
        )
        with suppress_instrumentation(), engine.connect() as conn:
            conn.execute(stmt)


def _engine(settings: Settings) -> Engine:
    """Our own small engine; on PostgreSQL a hung server is bounded too (statement_timeout,
    set once per connection rather than once per beat)."""
    engine = make_engine(settings.audit_url, settings.db_timeout)
    if engine.dialect.name == "postgresql":
        milliseconds = int(settings.db_timeout * 1000)

        @event.listens_for(engine, "connect")
        def _statement_timeout(dbapi_conn: Any, _record: Any) -> None:
            dbapi_conn.execute(f"SET statement_timeout = {milliseconds}")

    return engine


def _report(exc: Exception) -> None:
    report(
        "worker heartbeat",
        exc,
        f"worker heartbeat not written ({exc!r}): if it stays so for two intervals, `audit "
        "lost` takes this worker for dead and reports the tasks it runs",
    )


#: Every heartbeat of this process, for the one at-fork hook they share.
PROCESS_HOOKS: ProcessHooks[Heartbeat] = ProcessHooks(
    "worker heartbeat", after_fork=Heartbeat._forked
)
