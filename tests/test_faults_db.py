"""The audit database failing in the ways that hold a client forever - a hung server, a route
black-holed after the handshake, a reset, a slow link, a locked table, a cold process meeting
a hung database - never holds a publish beyond db_timeout, and every row arrives exactly once
once the database is back, without restarting the process."""

from __future__ import annotations

import datetime
import os
import sqlite3
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import create_engine, text
from sqlalchemy.engine import Engine, make_url

from otel_celery_publish import Settings
from otel_celery_publish.sink.deadline import DeadlineExceeded, bounded
from otel_celery_publish.sink.records import encode
from otel_celery_publish.sink.shipping import drain_spool
from otel_celery_publish.sink.spool import SUFFIX, target_dir
from otel_celery_publish.sink.writer import AuditWriter
from tests.app import add
from tests.conftest import audit_rows
from tests.otlp_receiver import wait_for
from tests.tcp_proxy import TcpProxy
from tests.test_durability import MODES, _counts, _instrument

DB_TIMEOUT = 0.5
# What a publish may take beyond db_timeout: Redis, the span, the spool append, a slow CI core.
SLACK = 0.5
BOUND = DB_TIMEOUT + SLACK
RECOVERY_S = 20.0


def _through(proxy: TcpProxy, pg_url: str) -> str:
    return make_url(pg_url).set(port=proxy.port).render_as_string(hide_password=False)


OUTAGE_REPORTS = frozenset({"audit write", "audit batch write"})


def _expect_outage(internal_errors: list[Any]) -> None:
    """Outage reports (log + Sentry) are the point, not failures. Only those: anything else the
    guard swallowed still fails the test."""
    for where, exc in internal_errors:
        if where in OUTAGE_REPORTS:
            exc._ocp_expected = True


def _reported(internal_errors: list[Any], where: str) -> bool:
    return any(w == where for w, _ in list(internal_errors))


class Publishing:
    """Publishes ``tests.add`` and remembers the ids and the slowest ``apply_async``."""

    def __init__(self, queue: str) -> None:
        self.queue = queue
        self.ids: list[str] = []
        self.slowest = 0.0
        self._lock = threading.Lock()

    def publish(self, n: int) -> None:
        for i in range(n):
            started = time.monotonic()
            task_id = add.apply_async((i, i), queue=self.queue).id
            took = time.monotonic() - started
            with self._lock:
                self.ids.append(task_id)
                self.slowest = max(self.slowest, took)

    def in_threads(self, threads: int, each: int) -> None:
        before = len(self.ids)
        workers = [
            threading.Thread(target=self.publish, args=(each,), name=f"publisher-{i}")
            for i in range(threads)
        ]
        for worker in workers:
            worker.start()
        for worker in workers:
            worker.join(60)
        assert len(self.ids) == before + threads * each, "a publishing thread did not finish"

    def assert_bounded(self) -> None:
        assert self.slowest < BOUND, (
            f"a publish was held {self.slowest:.2f}s (db_timeout {DB_TIMEOUT}s + {SLACK}s)"
        )


def _all_arrive_once(pg: Engine, writer: Any, ids: list[str]) -> None:
    """Poll until every id has exactly one row with its sent_at, flushing to kick retries."""

    def arrived() -> bool:
        writer.flush(1)
        counts = _counts(pg, ids)
        assert all(n == 1 for n in counts.values()), f"a row stored twice: {counts}"
        if len(counts) < len(ids):
            return False
        return all(r["sent_at"] is not None for i in ids for r in audit_rows(pg, i))

    try:
        wait_for(arrived, RECOVERY_S, "every row once the database is back")
    except AssertionError:
        missing = sorted(set(ids) - set(_counts(pg, ids)))
        raise AssertionError(f"{len(missing)} of {len(ids)} rows missing: {missing[:5]}") from None


# fault name -> (break the proxy, heal it)
FAULTS: dict[str, tuple[Callable[[TcpProxy], None], Callable[[TcpProxy], None]]] = {
    # The black hole: open connections stop answering, new ones are accepted, never served.
    "hang": (lambda p: p.hang(open_too=True), TcpProxy.heal),
    # Only the open connections die silently, and never come back: new ones work. Recovering
    # is the client's job alone (its deadline drops them).
    "hang_open": (lambda p: p.hang(new=False, open_too=True), lambda p: None),
    # A server restarted into a hung state: open connections reset, new ones never served.
    "hang_new": (lambda p: (p.cut(), p.hang(open_too=False)), TcpProxy.heal),
    "reset": (TcpProxy.stop, TcpProxy.start),
    # Every chunk late: one round trip takes longer than db_timeout.
    "slow": (lambda p: p.slow(0.4), TcpProxy.heal),
}


@pytest.mark.usefixtures("drain_queue")
@pytest.mark.parametrize("fault", list(FAULTS))
@pytest.mark.parametrize("mode", MODES)
def test_a_failing_database_never_holds_a_publish(
    mode: str,
    fault: str,
    proxy: TcpProxy,
    pg_url: str,
    pg: Engine,
    queue_name: str,
    tmp_path: Path,
    internal_errors: list[Any],
) -> None:
    """Under each fault every apply_async returns within db_timeout (+ slack), and after the
    database heals every row arrives exactly once without restarting the process."""
    instrumentor = _instrument(_through(proxy, pg_url), mode, tmp_path, db_timeout=DB_TIMEOUT)
    writer = instrumentor.writer
    publishing = Publishing(queue_name)
    breaks, heals = FAULTS[fault]
    try:
        publishing.publish(3)
        assert writer.flush(10), "the database works before the fault"
        breaks(proxy)
        publishing.publish(10)
        if mode == "sync":
            assert _reported(internal_errors, "audit write"), "the sync path saw the fault"
        if fault != "slow":  # slow but within its bound, a batch may well get through
            # The shipping thread notices by itself (its own deadline, not the heal), so it
            # would recover from a fault that never heals on its own connection.
            wait_for(
                lambda: _reported(internal_errors, "audit batch write"),
                RECOVERY_S,
                "the shipping thread to give up on the broken database",
            )
        heals(proxy)
        publishing.publish(3)
        _all_arrive_once(pg, writer, publishing.ids)
    finally:
        instrumentor.uninstrument()
    _expect_outage(internal_errors)
    publishing.assert_bounded()


@pytest.mark.usefixtures("drain_queue")
@pytest.mark.parametrize("mode", MODES)
def test_a_locked_table_holds_no_publish_beyond_its_deadline(
    mode: str,
    pg_url: str,
    pg: Engine,
    queue_name: str,
    tmp_path: Path,
    internal_errors: list[Any],
) -> None:
    """With the audit table locked by another session, 8 threads publishing at once each
    return within one db_timeout (not one per thread queued on the sync connection), and
    their rows arrive once the lock is released."""
    instrumentor = _instrument(pg_url, mode, tmp_path, db_timeout=DB_TIMEOUT)
    writer = instrumentor.writer
    publishing = Publishing(queue_name)
    try:
        publishing.publish(1)
        assert writer.flush(10)
        with pg.connect() as locker:
            locker.execute(text("LOCK TABLE celery_publish_audit IN ACCESS EXCLUSIVE MODE"))
            publishing.in_threads(8, 3)
            if mode == "sync":
                assert _reported(internal_errors, "audit write"), "the sync path saw the lock"
            locker.rollback()
        _all_arrive_once(pg, writer, publishing.ids)
    finally:
        instrumentor.uninstrument()
    _expect_outage(internal_errors)
    publishing.assert_bounded()


@pytest.mark.usefixtures("drain_queue")
@pytest.mark.parametrize("mode", MODES)
def test_a_cold_process_meeting_a_hung_database_publishes_within_its_deadline(
    mode: str,
    proxy: TcpProxy,
    pg_url: str,
    pg: Engine,
    queue_name: str,
    tmp_path: Path,
    internal_errors: list[Any],
) -> None:
    """The first publishes of a process whose database hangs from the start (no engine, no
    connection, no migration yet) return within db_timeout; the rows arrive once it heals."""
    proxy.hang()
    started = time.monotonic()
    instrumentor = _instrument(_through(proxy, pg_url), mode, tmp_path, db_timeout=DB_TIMEOUT)
    assert time.monotonic() - started < BOUND, "instrument() itself must not wait for it"
    writer = instrumentor.writer
    publishing = Publishing(queue_name)
    try:
        publishing.publish(5)
        if mode == "sync":
            assert _reported(internal_errors, "audit write"), "the sync path saw the fault"
        proxy.heal()
        _all_arrive_once(pg, writer, publishing.ids)
    finally:
        instrumentor.uninstrument()
    _expect_outage(internal_errors)
    publishing.assert_bounded()


@pytest.mark.usefixtures("drain_queue")
@pytest.mark.parametrize("mode", MODES)
def test_a_locked_sqlite_database_holds_no_publish_beyond_its_deadline(
    mode: str, queue_name: str, tmp_path: Path, internal_errors: list[Any]
) -> None:
    """SQLite locked by another writer (BEGIN IMMEDIATE): 8 threads publishing at once each
    return within one db_timeout (the lock wait is cut to what is left of the deadline), and
    their rows arrive once the lock is released."""
    url = f"sqlite:///{tmp_path / 'audit.db'}"
    instrumentor = _instrument(url, mode, tmp_path, db_timeout=DB_TIMEOUT)
    writer = instrumentor.writer
    publishing = Publishing(queue_name)
    engine = create_engine(url)
    try:
        publishing.publish(1)
        assert writer.flush(10)
        locker = sqlite3.connect(tmp_path / "audit.db", isolation_level=None)
        locker.execute("BEGIN IMMEDIATE")
        publishing.in_threads(8, 3)
        if mode == "sync":
            assert _reported(internal_errors, "audit write"), "the sync path saw the lock"
        locker.execute("ROLLBACK")
        locker.close()
        _all_arrive_once(engine, writer, publishing.ids)
    finally:
        instrumentor.uninstrument()
        engine.dispose()
    _expect_outage(internal_errors)
    publishing.assert_bounded()


def test_a_session_abandoned_holding_row_locks_is_ended_so_its_rows_ship(
    proxy: TcpProxy, pg_url: str, pg: Engine, tmp_path: Path, internal_errors: list[Any]
) -> None:
    """A connection abandoned at its deadline in the middle of a write (the server got half a
    batch and holds its row locks, waiting for the rest forever) is terminated from the next
    connection, so the rows it locked are not stuck behind it."""
    settings = Settings(
        audit_url=_through(proxy, pg_url),
        durability="async",
        db_timeout=DB_TIMEOUT,
        flush_interval=0.05,
        spool_dir=str(tmp_path),
    )
    writer = AuditWriter(settings)
    now = datetime.datetime.now(datetime.timezone.utc)
    task_id = f"locked-{uuid.uuid4().hex}"
    row = {
        "publish_id": uuid.uuid4().hex,
        "task_id": task_id,
        "task_name": "t",
        "published_at": now,
    }
    try:
        writer.engine()
        zombie = writer.db.engine().raw_connection()  # the pool's one connection
        raw = zombie.driver_connection
        raw.execute("BEGIN")
        insert = "INSERT INTO celery_publish_audit (publish_id, task_id, task_name, published_at)"
        raw.execute(insert + " VALUES (%s, 'zombie', 't', now())", (row["publish_id"],))
        proxy.hang(new=False, open_too=True)  # that session's link dies; new ones work
        with pytest.raises(DeadlineExceeded), bounded(at=time.monotonic() + 0.2):
            raw.execute("COMMIT")
        zombie.invalidate()
        writer.record_update(row)
        [stored] = wait_for(lambda: audit_rows(pg, task_id), RECOVERY_S, "the locked row")
    finally:
        writer.close()
    assert stored["publish_id"] == row["publish_id"]
    _expect_outage(internal_errors)


def test_drain_against_a_hung_database_fails_within_its_bound(
    proxy: TcpProxy, pg_url: str, tmp_path: Path
) -> None:
    """``audit drain`` with a dead process's segment to ship and a database that hangs raises
    (for the CLI to report) within its connect bound, instead of hanging the command; the
    segment stays for the next drain."""
    url = _through(proxy, pg_url)
    settings = Settings(audit_url=url, spool_dir=str(tmp_path), db_timeout=DB_TIMEOUT)
    directory = target_dir(settings.spool_dir, url, settings.table_name)
    os.makedirs(directory, mode=0o700)
    segment = os.path.join(directory, f"deadhost-1-{uuid.uuid4().hex[:8]}{SUFFIX}")
    now = datetime.datetime.now(datetime.timezone.utc)
    row = {"publish_id": uuid.uuid4().hex, "task_id": "t", "task_name": "t", "published_at": now}
    with open(os.open(segment, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), "wb") as file:
        file.write(encode(row))
    proxy.hang()
    started = time.monotonic()
    with pytest.raises(Exception, match="deadline"):
        drain_spool(settings)
    assert time.monotonic() - started < BOUND
    assert os.path.exists(segment)
