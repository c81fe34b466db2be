"""Getting audit records into the database without slowing the host down.

One :class:`AuditWriter` per process. Two entry points:

* :meth:`AuditWriter.record_publish` - the publish row, made durable before ``apply_async``
  returns, as the durability mode promises (the publish hooks call it in two halves around the
  broker send, :meth:`AuditWriter.begin_publish` and :meth:`AuditWriter.end_publish`):

  - ``sync``: committed in the audit database (one prepared single-row upsert on a warm raw
    connection, sent before the message and read back after it); if the database fails, the
    row goes to the spool instead, loudly;
  - ``spool``: appended to this process's local spool file and handed to the OS;
  - ``async``: queued in memory (may lose the last moments on a crash).

* :meth:`AuditWriter.record_update` - every lifecycle update (sent, received, started,
  finished): to the spool in ``spool`` mode, else to the in-memory queue.

One background thread per process ships the queue and the spool in batches. When the database is
down, what was queued in memory moves to the spool, so memory stays bounded and nothing is lost
with the process; the spool ships when the database is back, and a dead process's spool is
shipped by the next process that starts on the same spool directory (see :mod:`.spool`).

Every write is an upsert keyed by ``publish_id`` that sets only the columns it carries, so writes
commute (a worker update may land before the publish row it updates) and shipping a record twice
stores it once.

The database side (engine, statements) is :mod:`.database`, its deadlines :mod:`.deadline`;
isolating refused records is :mod:`.shipping`; the metrics are :mod:`.instruments`. A process
with several writers (``instrument()`` again after ``uninstrument()``) still has one at-fork and
one atexit hook for them all (:data:`PROCESS_HOOKS`) and one backlog gauge per meter.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from dataclasses import dataclass, field
from typing import cast

from opentelemetry import metrics
from sqlalchemy import Engine

from otel_celery_publish._guard import report
from otel_celery_publish.config import Settings
from otel_celery_publish.rows import PublishRow, Update
from otel_celery_publish.schema.table import audit_table
from otel_celery_publish.sink.database import Database, preload_driver
from otel_celery_publish.sink.directories import SpoolRefused
from otel_celery_publish.sink.instruments import instruments
from otel_celery_publish.sink.process_hooks import ProcessHooks
from otel_celery_publish.sink.quarantine import Quarantine, is_refusal
from otel_celery_publish.sink.records import Record
from otel_celery_publish.sink.shipping import ship_isolating
from otel_celery_publish.sink.sidecar import RETRY_BACKOFF_MAX_S, SidecarProbe
from otel_celery_publish.sink.spool import (
    Spool,
    SpoolFull,
    adopt_orphans,
    target_dir,
)

logger = logging.getLogger("otel_celery_publish")

# After a failed synchronous write, publishes skip the database for this long and go straight to
# the spool, so a dead database costs one timeout, not one per publish.
BREAKER_OPEN_S = 5.0
# A fully shipped segment is deleted once it is this large (less re-shipping after a crash).
ROTATE_AT_BYTES = 4 << 20
ADOPT_EVERY_S = 60.0
# A sync row still in flight this long after it was sent belongs to a publish that raised (no
# end_publish comes): the shipping thread reads its result.
ABANDONED_S = 1.0
# While the database is down, records waiting in memory go to the spool once this many are
# queued, not max_pending: a crash then loses fewer (a "sent" update, mostly), and each lands
# near its publish's row, where a drain merges the two into one write.
OUTAGE_SPILL = 1000


@dataclass
class _Flush:
    done: threading.Event = field(default_factory=threading.Event)
    ok: bool = False
    stop: bool = False


class AuditWriter:
    """Per-process audit writer. Safe to share between threads; re-arms itself after fork."""

    db: Database
    _spool: Spool
    _sidecar: SidecarProbe

    def __init__(self, settings: Settings, meter: metrics.Meter | None = None) -> None:
        self.settings = settings
        self.table = audit_table(settings.table_name)
        self.spool_dir = target_dir(settings.spool_dir, settings.audit_url, settings.table_name)
        preload_driver(settings.audit_url)
        metered = instruments(meter or metrics.get_meter("otel_celery_publish"))
        self._fallbacks = metered.fallbacks
        self._overflow = metered.overflow
        self._dropped = metered.dropped
        self._quarantined = metered.quarantined
        self._reset(fork=False)
        metered.watch(self)
        PROCESS_HOOKS.add(self)

    def _forked(self) -> None:
        self._reset(fork=True)

    def _exiting(self) -> None:
        self.close(timeout=5.0)

    def _reset(self, *, fork: bool) -> None:
        # After fork: the parent's connections, spool segment, queue and thread are not ours.
        # Its sockets and segment must not be closed from here (that would break the parent's),
        # so just forget them.
        if fork:
            self.db.forget()
            self._spool.forget()
            self._sidecar.forget()
        self._lock = threading.Lock()
        self._settle_lock = threading.Lock()
        self.db = Database(self.settings, self.table)
        self._spool = Spool(
            self.spool_dir, fsync=self.settings.spool_fsync, max_bytes=self.settings.spool_max_bytes
        )
        self._sidecar = SidecarProbe(self.spool_dir)
        # Its lock too: a parent thread may have held it at fork time.
        self._quarantine = Quarantine(self.spool_dir, self._quarantined.add)
        self._queue: queue.SimpleQueue[Record | _Flush] = queue.SimpleQueue()
        # The thread sleeps on this, not on the queue: a put must not wake it (a thread switch
        # per event costs the task or publish that made it), only flush/close and a backlog.
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None
        self._breaker_until = 0.0
        self._next_adopt = 0.0
        self._failing = False  # the last shipping attempt failed

    def engine(self) -> Engine:
        return self.db.engine()

    # -- write paths -----------------------------------------------------------------------

    def record_publish(self, row: PublishRow) -> None:
        """Make the publish row durable now, as the durability mode says; never raises, and
        never takes more than ``db_timeout`` (plus a few milliseconds) in ``sync`` mode."""
        self.begin_publish(row)
        self.end_publish(row["publish_id"])

    def begin_publish(self, row: PublishRow) -> None:
        """:meth:`record_publish` in two halves around the broker send, so that in ``sync``
        mode on PostgreSQL the database's round trip overlaps the broker's: the row's upsert
        is sent here, before the message, and :meth:`end_publish` reads its result (a row it
        failed is then repaired, quarantined or spooled). Never raises; both halves together
        take at most ``db_timeout`` (plus a few milliseconds)."""
        record = cast(Record, row)  # the same dict: the sink stores it as it is
        mode = self.settings.durability
        if mode == "sync":
            if self._thread is None:
                self._start()  # it sets the engine up, so this publish need not
            if time.monotonic() >= self._breaker_until:
                deadline = time.monotonic() + self.settings.db_timeout
                try:
                    self.db.send_now(record, deadline)
                    return
                except Exception as exc:
                    if self._sync_refused(record, exc, deadline):
                        return
                finally:
                    self._settle()  # earlier rows found failed while sending this one
            self._fallbacks.add(1)
        if mode == "async":
            self._enqueue(record)
        else:
            self._to_spool(record)

    def end_publish(self, publish_id: str | None = None) -> None:
        """Wait for the row :meth:`begin_publish` sent (``publish_id``'s; default any) to be
        committed, or settled otherwise. Never raises."""
        if self.settings.durability == "sync":
            try:
                self.db.settle_now(publish_id)
            finally:
                self._settle()

    def _settle(self, older_than: float | None = None) -> None:
        """Rows whose sync upsert failed after it was sent: repaired and committed, or
        quarantined, or spooled (as :meth:`begin_publish` does with a write that fails). One
        thread at a time, so an :meth:`end_publish` returns after its own row is settled.
        ``older_than``: first read the result of a row in flight for that long (a publish
        whose message never went, so ``end_publish`` never came)."""
        with self._settle_lock:
            if older_than is not None:
                self.db.settle_now(older_than=older_than)
            while failed := self.db.take_failed():
                for row, exc, deadline in failed:
                    if not self._sync_refused(row, exc, deadline):
                        self._fallbacks.add(1)
                        self._to_spool(row)

    def _sync_refused(self, row: Record, exc: Exception, deadline: float) -> bool:
        """After a failed sync write: True when the row was refused and is now repaired and
        committed, or quarantined; False (the row goes to the spool) on an outage, which opens
        the breaker: publishes skip the database for a while, a dead one costs one timeout."""
        if is_refusal(exc):
            try:
                ship_isolating(
                    lambda rows: self.db.insert_now(rows[0], deadline),
                    [row],
                    self.table,
                    self._quarantine.refuse,
                    error=exc,
                )
                return True
            except Exception as again:
                exc = again
        self._breaker_until = time.monotonic() + BREAKER_OPEN_S
        report(
            "audit write",
            exc,
            f"audit database unavailable ({exc!r}): publish rows go to the spool in "
            f"{self.spool_dir} and are shipped when it is back",
        )
        return False

    def record_update(self, update: Update, *, best_effort: bool = False) -> None:
        """A lifecycle update (a partial row holding ``publish_id``) for the batched upsert: to
        the spool in ``spool`` mode, else to the in-memory queue; ``best_effort`` updates go to
        the in-memory queue in every mode (a crash may lose them, the row itself stays)."""
        record = cast(Record, update)  # the same dict: merged into the row as it is
        if not best_effort and self.settings.durability == "spool":
            self._to_spool(record)
        else:
            self._enqueue(record)

    def flush(self, timeout: float | None = 10.0) -> bool:
        """Ship everything queued and spooled so far; True when it reached the database."""
        self.end_publish()
        return self._signal(_Flush(), timeout)

    def close(self, timeout: float | None = 10.0) -> bool:
        """Flush, stop the thread and close connections; later writes start afresh."""
        self.end_publish()
        flushed = self._signal(_Flush(stop=True), timeout)
        self.db.dispose()
        return flushed

    def _enqueue(self, row: Record) -> None:
        if self._thread is None:
            self._start()
        self._queue.put(row)
        waiting = self._queue.qsize()
        if waiting > self.settings.max_pending or (self._failing and waiting > OUTAGE_SPILL):
            self._wake.set()

    def _to_spool(self, row: Record) -> None:
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

    def backlog(self) -> int:
        """Bytes of this writer's spool segment not yet shipped (the backlog gauge's value)."""
        return self._spool.size - self._spool.shipped

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
        pending: dict[str, Record] = {}
        interval = self.settings.flush_interval
        next_ship = time.monotonic()
        backoff = interval
        while True:
            waiters: list[_Flush] = []
            self._wake.wait(max(0.0, next_ship - time.monotonic()))
            self._wake.clear()
            try:
                self._settle(older_than=ABANDONED_S)
            except Exception as exc:  # never the end of this thread
                report("audit write", exc)
            self._take_queued(pending, waiters)
            if waiters or time.monotonic() >= next_ship:
                # A flush or close ships itself: its promise must not depend on the sidecar.
                ok = self._ship(pending, stand_down=not waiters and self._sidecar.present())
                backoff = interval if ok else min(backoff * 2, RETRY_BACKOFF_MAX_S)
                next_ship = time.monotonic() + backoff
                self._failing = not ok
            elif self._failing:
                self._spill(pending)  # woken by OUTAGE_SPILL: the next attempt is a while off
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

    def _ship(self, pending: dict[str, Record], *, stand_down: bool = False) -> bool:
        """Ship the memory queue, then the spool, then dead processes' spools. On failure the
        memory queue moves to the spool: bounded memory, and a crash now loses nothing.

        ``stand_down`` (a sidecar ships this spool directory, :mod:`.sidecar`): the memory
        queue goes to the spool, and a large segment is released for the sidecar to finish;
        what the spool refuses (full disk) is still shipped from here."""
        if stand_down:
            self._spill(pending)
            if not pending:
                if self._spool.size >= ROTATE_AT_BYTES:
                    self._spool.rotate()
                return True
        try:
            self.db.engine()  # connect (and migrate) here, not on the first publish
            if pending:
                self._write(list(pending.values()))
                pending.clear()
            if self._spool.pending():
                self._spool.ship(self._write, ROTATE_AT_BYTES)
            if time.monotonic() >= self._next_adopt:
                self._next_adopt = time.monotonic() + ADOPT_EVERY_S
                try:
                    adopt_orphans(self.spool_dir, self._write)
                except SpoolRefused as exc:  # another user's tree: not a database outage
                    report("audit spool adopt", exc, str(exc))
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

    def _write(self, rows: list[Record]) -> None:
        ship_isolating(self.db.upsert, rows, self.table, self._quarantine.refuse)

    def _spill(self, pending: dict[str, Record]) -> None:
        for publish_id in list(pending):
            try:
                self._spool.append(pending[publish_id])
            except Exception as exc:
                if isinstance(exc, SpoolFull):
                    self._overflow.add(len(pending))
                report("audit spool (record kept in memory)", exc, f"{exc}; kept in memory")
                return
            del pending[publish_id]

    def _take_queued(self, pending: dict[str, Record], waiters: list[_Flush]) -> None:
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


#: Every writer of this process, for the one at-fork hook (re-arm in the child) and the one
#: atexit hook (ship what is left) they share.
PROCESS_HOOKS: ProcessHooks[AuditWriter] = ProcessHooks(
    "audit writer", after_fork=AuditWriter._forked, at_exit=AuditWriter._exiting
)
