"""Worker liveness with real worker processes on Redis and PostgreSQL: a running task is never
lost, a dead worker's tasks are, a dead pool process's and a discarded message's work is lost,
and Celery 5.7's worker-lost, ack and redelivery behaviours keep the row and ``lost`` truthful.
The fault classes whose course depends on the broker run on RabbitMQ too (``@both_brokers``)."""

from __future__ import annotations

import dataclasses
import datetime as dt
import os
import signal
import subprocess
import sys
import time
import uuid
from typing import Any

import redis
from celery import Celery
from sqlalchemy import select

from otel_celery_publish import audit
from otel_celery_publish.config import Settings
from otel_celery_publish.schema.table import workers_table
from otel_celery_publish.sink.database import make_engine
from otel_celery_publish.sink.heartbeat import PROCESS_HOOKS, Heartbeat
from tests.app import (
    add,
    app,
    fail_unacked,
    sleep,
    sleep_first,
    sleep_until_redelivered,
    succeed_then_die,
)
from tests.audit_support import celery_audit, migrated, validated
from tests.conftest import BROKER, ROOT, Broker, audit_rows, both_brokers, wait_row
from tests.otlp_receiver import wait_for

INTERVAL = 0.5
FAST_HEARTBEAT = {"OTEL_CELERY_PUBLISH_HEARTBEAT_INTERVAL": str(INTERVAL)}
LONG_AGO = dt.timedelta(minutes=10)
# Its own Redis database: a 2 s visibility timeout restores every unacked message of the
# database it runs on, and other tests' workers hold prefetched messages in db 9.
VISIBILITY_BROKER = BROKER.rsplit("/", 1)[0] + "/13"


def reasons(settings: Settings, queue: str, older_than: dt.timedelta) -> dict[str, str]:
    """``lost`` on ``queue`` by the real clock: task id -> reason."""
    found = audit.lost(settings=settings, older_than=older_than, queue=queue)
    return {t.task_id: t.reason for t in found}


def planned(settings: Settings, queue: str, broker_url: str = BROKER) -> int:
    """How many tasks ``celery audit replay --lost --older-than 0s --dry-run`` would send."""
    done = celery_audit("replay", "--lost", "--older-than", "0s", "--from-queue", queue,
                        "--dry-run", "--json", settings=settings,
                        env={"OCP_BROKER_URL": broker_url})  # fmt: skip
    assert done.returncode == 0, done.stderr
    return int(validated("replay", done.stdout)["would_send"])


def heartbeats(settings: Settings, nodename: str) -> list[dict[str, Any]]:
    """The heartbeat rows of the worker called ``nodename``."""
    table = workers_table(settings.table_name)
    engine = make_engine(settings.audit_url)
    try:
        with engine.connect() as conn:
            stmt = select(table).where(table.c.nodename == nodename)
            return [dict(r._mapping) for r in conn.execute(stmt)]
    finally:
        engine.dispose()


@both_brokers
def test_long_task_on_a_live_worker_is_never_lost(
    broker: Broker, publisher: Any, start_worker: Any, pg: Any, pg_url: str, queue_name: str
) -> None:
    """A task running for many heartbeat intervals is not lost even with older_than=0, and
    replay --lost plans nothing; its row names the worker instance."""
    settings = migrated(pg_url)
    # 1 s, not 0.5: a beat late by a whole interval on this busy machine must not flake it.
    worker = start_worker(pool="prefork", env={"OTEL_CELERY_PUBLISH_HEARTBEAT_INTERVAL": "1"})
    task_id = sleep.apply_async((8,), queue=queue_name).id
    [row] = wait_row(pg, task_id, lambda rows: rows[0]["started_at"] is not None)
    [beat] = wait_for(lambda: heartbeats(settings, worker.nodename), 10, "heartbeat row")
    assert row["worker_instance"] == beat["instance_id"] and row["acks_late"] is False
    assert beat["stopped_at"] is None and beat["interval_s"] == 1.0

    def renewed_three_times() -> bool:
        assert reasons(settings, queue_name, dt.timedelta(0)) == {}
        [now] = heartbeats(settings, worker.nodename)
        return bool(now["heartbeat_at"] - beat["heartbeat_at"] > dt.timedelta(seconds=3))

    wait_for(renewed_three_times, 10, "three heartbeat intervals with the task running")
    assert planned(settings, queue_name, broker.url) == 0
    wait_row(pg, task_id, lambda rows: rows[0]["outcome"] == "succeeded")
    assert reasons(settings, queue_name, dt.timedelta(0)) == {}


@both_brokers
def test_sigkill_of_the_whole_worker_is_worker_dead_within_two_intervals(
    broker: Broker, publisher: Any, start_worker: Any, pg: Any, pg_url: str, queue_name: str
) -> None:
    """SIGKILL of main process and pool: the started task is worker_dead within two heartbeat
    intervals regardless of older_than; the prefetched one, still on the broker, is not yet."""
    settings = migrated(pg_url)
    worker = start_worker(pool="prefork", env=FAST_HEARTBEAT)
    running = sleep.apply_async((30,), queue=queue_name).id
    wait_row(pg, running, lambda rows: rows[0]["started_at"] is not None)
    prefetched = add.apply_async((1, 2), queue=queue_name).id
    wait_row(pg, prefetched, lambda rows: rows[0]["received_at"] is not None)
    worker.kill_all()
    killed = time.monotonic()
    wait_for(
        lambda: reasons(settings, queue_name, LONG_AGO) == {running: "worker_dead"},
        2 * INTERVAL + 5,
        "worker_dead",
    )
    # The poll itself, a database round trip, may take a moment past the verdict.
    assert time.monotonic() - killed < 2 * INTERVAL + 1.0
    # The prefetched message is back on the broker (RabbitMQ: ready again at once; Redis:
    # unacked until its visibility timeout), so it counts only after older_than.
    assert reasons(settings, queue_name, dt.timedelta(0)) == {
        running: "worker_dead",
        prefetched: "worker_dead",
    }
    assert planned(settings, queue_name, broker.url) == 2


@both_brokers
def test_clean_shutdown_with_a_reserved_task_is_not_misreported(
    broker: Broker, publisher: Any, start_worker: Any, pg: Any, pg_url: str, queue_name: str
) -> None:
    """A warm shutdown finishes the running task, returns the prefetched one to the broker and
    marks the instance stopped: returned (after older_than only), run by the next worker."""
    settings = migrated(pg_url)
    worker = start_worker(pool="prefork", env=FAST_HEARTBEAT)
    running = sleep.apply_async((2,), queue=queue_name).id
    wait_row(pg, running, lambda rows: rows[0]["started_at"] is not None)
    prefetched = add.apply_async((2, 2), queue=queue_name).id
    wait_row(pg, prefetched, lambda rows: rows[0]["received_at"] is not None)
    worker.proc.send_signal(signal.SIGTERM)
    worker.proc.wait(30)
    [beat] = heartbeats(settings, worker.nodename)
    assert beat["stopped_at"] is not None
    [ran] = audit_rows(pg, running)
    assert ran["outcome"] == "succeeded"
    assert reasons(settings, queue_name, LONG_AGO) == {}
    assert reasons(settings, queue_name, dt.timedelta(0)) == {prefetched: "returned"}
    start_worker(env=FAST_HEARTBEAT)
    wait_row(pg, prefetched, lambda rows: rows[0]["outcome"] == "succeeded")
    assert reasons(settings, queue_name, dt.timedelta(0)) == {}


@both_brokers
def test_sigkill_of_a_pool_child_mid_task_is_worker_lost(
    broker: Broker, publisher: Any, start_worker: Any, pg: Any, pg_url: str, queue_name: str
) -> None:
    """The OOM case: the row says failed / WorkerLostError and lost reports worker_lost at
    once, on a worker that is still alive; replay --lost plans it."""
    settings = migrated(pg_url)
    worker = start_worker(pool="prefork", env=FAST_HEARTBEAT)
    task_id = sleep.apply_async((30,), queue=queue_name).id
    wait_row(pg, task_id, lambda rows: rows[0]["started_at"] is not None)
    [child] = worker.pool_children()
    os.kill(child, signal.SIGKILL)
    [row] = wait_row(pg, task_id, lambda rows: rows[0]["outcome"] == "failed")
    assert (row["exception_type"], row["lost_reason"]) == ("WorkerLostError", "worker_lost")
    [lost] = audit.lost(settings=settings, older_than=LONG_AGO, queue=queue_name)
    assert (lost.task_id, lost.reason, lost.exception_type) == (
        task_id, "worker_lost", "WorkerLostError",
    )  # fmt: skip
    assert worker.proc.poll() is None
    assert planned(settings, queue_name, broker.url) == 1


@both_brokers
def test_unregistered_task_is_discarded(
    broker: Broker, publisher: Any, start_worker: Any, pg: Any, pg_url: str, queue_name: str
) -> None:
    """A message for a task the worker does not know is dropped: lost says discarded, why."""
    settings = migrated(pg_url)
    start_worker(env=FAST_HEARTBEAT)
    task_id = app.send_task("tests.nobody_has_this", queue=queue_name).id
    wait_row(pg, task_id, lambda rows: rows[0]["outcome"] == "rejected")
    [lost] = audit.lost(settings=settings, older_than=LONG_AGO, queue=queue_name)
    assert (lost.task_id, lost.reason, lost.exception_type) == (
        task_id, "discarded", "NotRegistered",
    )  # fmt: skip
    assert "tests.nobody_has_this" in (lost.exception_message or "")


def test_retry_on_worker_lost_supersedes_the_lost_attempt(
    publisher: Any, start_worker: Any, pg: Any, pg_url: str, queue_name: str
) -> None:
    """task_retry_on_worker_lost (Celery 5.7): attempt 0 ends retried / WorkerLostError, the
    re-send runs as attempt 1, and nothing is lost."""
    settings = migrated(pg_url)
    worker = start_worker(pool="prefork", env=FAST_HEARTBEAT)
    task_id = sleep_first.apply_async((30,), queue=queue_name).id
    wait_row(pg, task_id, lambda rows: rows[0]["started_at"] is not None)
    [child] = worker.pool_children()
    os.kill(child, signal.SIGKILL)
    first, second = wait_row(
        pg, task_id, lambda rows: len(rows) == 2 and rows[1]["outcome"] == "succeeded"
    )
    assert (first["outcome"], first["exception_type"]) == ("retried", "WorkerLostError")
    assert first["lost_reason"] is None and second["attempt"] == 1
    assert reasons(settings, queue_name, dt.timedelta(0)) == {}


def test_success_stored_before_the_pool_process_was_lost_is_not_a_failure(
    publisher: Any, start_worker: Any, pg: Any, pg_url: str, queue_name: str
) -> None:
    """Celery 5.7 emits task-succeeded (runtime=None) for a child lost after storing SUCCESS:
    the row is never marked failed and lost does not report it while the worker lives."""
    settings = migrated(pg_url)
    worker = start_worker(pool="prefork", env={**FAST_HEARTBEAT, "OCP_RESULT_BACKEND": BROKER})
    task_id = succeed_then_die.apply_async(queue=queue_name).id
    wait_for(lambda: "succeeded before the worker was lost" in worker.output(), 20, "warning")
    nxt = add.apply_async((1, 1), queue=queue_name).id
    wait_row(pg, nxt, lambda rows: rows[0]["outcome"] == "succeeded")
    [row] = audit_rows(pg, task_id)
    assert row["outcome"] in (None, "succeeded") and row["lost_reason"] is None
    assert reasons(settings, queue_name, dt.timedelta(0)) == {}


def test_acks_on_timeout_false_requeues_and_the_redelivery_ends_the_row(
    publisher: Any, start_worker: Any, pg: Any, pg_url: str, queue_name: str
) -> None:
    """acks_late + acks_on_timeout=False: the hard time limit requeues the message, which does
    not end the attempt; the redelivery runs the same row to success, never lost."""
    settings = migrated(pg_url)
    worker = start_worker(pool="prefork", env=FAST_HEARTBEAT)
    task_id = sleep_until_redelivered.apply_async((30,), queue=queue_name, time_limit=1).id
    [row] = wait_row(pg, task_id, lambda rows: rows[0]["outcome"] == "succeeded")
    assert "Hard time limit (1s) exceeded" in worker.output()
    assert row["exception_type"] is None and row["acks_late"] is True
    assert reasons(settings, queue_name, dt.timedelta(0)) == {}


def test_acks_on_failure_false_is_a_failure_not_a_loss(
    publisher: Any, start_worker: Any, pg: Any, pg_url: str, queue_name: str
) -> None:
    """acks_late + acks_on_failure=False: Celery rejects the failed message; the row says
    failed and lost does not list it (the task ran; failures are not lost)."""
    settings = migrated(pg_url)
    start_worker(env=FAST_HEARTBEAT)
    task_id = fail_unacked.apply_async(queue=queue_name).id
    [row] = wait_row(pg, task_id, lambda rows: rows[0]["outcome"] == "failed")
    assert row["exception_type"] == "ValueError" and row["lost_reason"] is None
    assert reasons(settings, queue_name, dt.timedelta(0)) == {}


def test_acks_late_task_of_a_dead_worker_is_redelivered_not_replayed(
    publisher: Any, start_worker: Any, pg: Any, pg_url: str, queue_name: str
) -> None:
    """acks_late on a SIGKILLed worker: not reported before older_than (the broker still owns
    the message); after the 2 s visibility timeout another worker runs the same row to the end."""
    settings = migrated(pg_url)
    env = {**FAST_HEARTBEAT, "OCP_BROKER_URL": VISIBILITY_BROKER, "OCP_VISIBILITY_TIMEOUT": "2"}
    sender = Celery("ocp_visibility", broker=VISIBILITY_BROKER, set_as_current=False)
    try:
        first = start_worker(pool="prefork", env=env)
        task_id = sender.send_task("tests.sleep_late", args=(30,), queue=queue_name).id
        wait_row(pg, task_id, lambda rows: rows[0]["started_at"] is not None)
        first.kill_all()
        [before] = audit_rows(pg, task_id)
        wait_for(
            lambda: (
                heartbeats(settings, first.nodename)[0]["expires_at"]
                < dt.datetime.now(dt.timezone.utc)
            ),
            10,
            "the first worker's heartbeat to go stale",
        )
        assert reasons(settings, queue_name, LONG_AGO) == {}
        second = start_worker(pool="prefork", env=env)
        [after] = wait_row(pg, task_id, lambda rows: rows[0]["outcome"] == "succeeded", 30)
        assert after["publish_id"] == before["publish_id"]
        assert after["worker"] == second.nodename and after["started_at"] > before["started_at"]
        assert reasons(settings, queue_name, dt.timedelta(0)) == {}
    finally:
        redis.Redis.from_url(VISIBILITY_BROKER).flushdb()
        sender.close()


def test_protocol_1_messages_record_their_lifecycle(
    publisher: Any, start_worker: Any, pg: Any, pg_url: str, queue_name: str
) -> None:
    """task_protocol = 1 has no headers dict of its own, but ours ride along as message
    headers: the worker records the lifecycle and lost does not list what ran."""
    settings = migrated(pg_url)
    start_worker(env=FAST_HEARTBEAT)
    app.conf.task_protocol = 1
    try:
        task_id = add.apply_async((3, 4), queue=queue_name).id
    finally:
        app.conf.task_protocol = 2
    [row] = wait_row(pg, task_id, lambda rows: rows[0]["outcome"] == "succeeded")
    assert row["received_at"] and row["started_at"] and row["worker_instance"]
    assert reasons(settings, queue_name, dt.timedelta(0)) == {}


def test_heartbeat_in_process_on_sqlite_and_fork_safe(tmp_path: Any) -> None:
    """The heartbeat upserts one row per instance and marks it stopped; a forked child keeps
    the instance id (for the rows it starts) but never beats or stops it."""
    settings = migrated(f"sqlite:///{tmp_path / 'audit.db'}")
    settings = dataclasses.replace(settings, heartbeat_interval=0.1)
    heartbeat = Heartbeat(settings)
    heartbeat.start("fork-test@host")
    try:
        [first] = wait_for(lambda: heartbeats(settings, "fork-test@host"), 10, "first beat")
        assert first["instance_id"] == heartbeat.instance_id and first["pid"] == os.getpid()
        read, write = os.pipe()
        pid = os.fork()
        if pid == 0:  # the child: report what it inherited, try to stop, leave without atexit
            try:
                heartbeat.stop(1.0)
                os.write(write, (heartbeat.instance_id or "").encode())
            finally:
                os._exit(0)
        os.close(write)
        inherited = os.read(read, 64).decode()
        os.close(read)
        os.waitpid(pid, 0)
        assert inherited == heartbeat.instance_id
        wait_for(
            lambda: (
                heartbeats(settings, "fork-test@host")[0]["heartbeat_at"] > first["heartbeat_at"]
            ),
            10,
            "a beat after the child tried to stop it",
        )
        assert heartbeats(settings, "fork-test@host")[0]["stopped_at"] is None
    finally:
        heartbeat.stop(5.0)
    [last] = heartbeats(settings, "fork-test@host")
    assert last["stopped_at"] is not None and len(heartbeats(settings, "fork-test@host")) == 1


def test_heartbeats_share_one_fork_hook(tmp_path: Any) -> None:
    """However many heartbeats a process creates, one at-fork hook re-arms them all."""
    settings = Settings(audit_url=f"sqlite:///{tmp_path / 'audit.db'}")
    heartbeats = [Heartbeat(settings) for _ in range(3)]
    assert PROCESS_HOOKS.registered == 1
    assert all(heartbeat in PROCESS_HOOKS.live() for heartbeat in heartbeats)


FORK_WHILE_STARTING = """
import os, signal, sys
assert "psycopg" not in sys.modules and "alembic" not in sys.modules
from otel_celery_publish.sink.writer import AuditWriter
from otel_celery_publish.config import Settings
from otel_celery_publish.sink.heartbeat import Heartbeat
settings = Settings.from_env(audit_url=sys.argv[1], table_name=sys.argv[2], heartbeat_interval=0.1)
writer = AuditWriter(settings)
writer.start()  # connects and migrates (importing Alembic) in its thread
heartbeat = Heartbeat(settings)
heartbeat.start("fork-while-starting@host")
children = []
for _ in range(30):
    pid = os.fork()
    if pid == 0:
        signal.alarm(10)  # a child stuck on an inherited import lock dies of SIGALRM
        import psycopg, psycopg.sql
        from alembic import command
        os._exit(0)
    children.append(pid)
stuck = sum(os.waitpid(pid, 0)[1] != 0 for pid in children)
heartbeat.stop(5.0)
writer.close(5.0)
print(stuck)
"""


def test_a_fork_while_our_threads_start_never_hangs_the_child(pg_url: str) -> None:
    """Forking right after instrumenting (a prefork pool) never hands a child an import lock
    held by one of our threads: every child imports the driver and Alembic and exits."""
    table = f"fork_{uuid.uuid4().hex[:8]}"
    done = subprocess.run(
        [sys.executable, "-c", FORK_WHILE_STARTING, pg_url, table],
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        capture_output=True,
        text=True,
        timeout=90,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "0", f"children stuck on an import lock: {done.stdout}"
