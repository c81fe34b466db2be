"""Durability modes against real failures: a database outage (TCP proxy), SIGKILL mid-stream,
processes sharing a spool directory, fork after instrument(), and a real worker per mode."""

from __future__ import annotations

import dataclasses
import datetime
import io
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import pytest
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import ConsoleMetricExporter, PeriodicExportingMetricReader
from opentelemetry.sdk.trace import TracerProvider
from sqlalchemy import func, select
from sqlalchemy.engine import Engine, make_url

from otel_celery_publish import CeleryPublishInstrumentor, Settings
from otel_celery_publish.schema.table import audit_table
from otel_celery_publish.sink.records import read_batches
from otel_celery_publish.sink.shipping import drain_spool
from otel_celery_publish.sink.spool import SUFFIX, target_dir
from otel_celery_publish.sink.writer import OUTAGE_SPILL, AuditWriter
from tests.app import add
from tests.conftest import BROKER, ROOT, audit_rows, wait_row
from tests.otlp_receiver import wait_for
from tests.tcp_proxy import TcpProxy

MODES = ["sync", "spool", "async"]


def _counts(engine: Engine, task_ids: list[str]) -> dict[str, int]:
    table = audit_table()
    with engine.connect() as conn:
        rows = conn.execute(
            select(table.c.task_id, func.count())
            .where(table.c.task_id.in_(task_ids))
            .group_by(table.c.task_id)
        )
        return {task_id: n for task_id, n in rows}


def _segments(directory: str) -> list[str]:
    return (
        [n for n in os.listdir(directory) if n.endswith(SUFFIX)] if os.path.isdir(directory) else []
    )


def _expect_reported(internal_errors: list[Any]) -> None:
    """The outage was reported (log + Sentry); those reports are the point, not failures."""
    assert internal_errors, "the outage must be reported"
    for _where, exc in internal_errors:
        exc._ocp_expected = True


def _instrument(url: str, mode: str, spool_dir: Path, **settings: Any) -> Any:
    instrumentor = CeleryPublishInstrumentor()
    instrumentor.instrument(
        tracer_provider=TracerProvider(),
        audit_url=url,
        durability=mode,
        flush_interval=0.05,
        spool_dir=str(spool_dir),
        **settings,
    )
    return instrumentor


@pytest.mark.usefixtures("drain_queue")
@pytest.mark.parametrize("mode", MODES)
def test_database_outage_loses_nothing_in_every_mode(
    mode: str,
    proxy: TcpProxy,
    pg_url: str,
    pg: Engine,
    queue_name: str,
    tmp_path: Path,
    internal_errors: list[Any],
) -> None:
    """Publishes before, during and after an outage all succeed quickly; every row arrives once."""
    url = make_url(pg_url).set(port=proxy.port).render_as_string(hide_password=False)
    instrumentor = _instrument(url, mode, tmp_path, db_timeout=1.0)
    writer = instrumentor.writer
    slowest = 0.0

    def publish(n: int) -> list[str]:
        nonlocal slowest
        ids = []
        for i in range(n):
            started = time.monotonic()
            ids.append(add.apply_async((i, i), queue=queue_name).id)
            slowest = max(slowest, time.monotonic() - started)
        return ids

    try:
        ids = publish(5)
        assert writer.flush(10)
        proxy.stop()
        ids += publish(30)
        assert not writer.flush(2), "nothing can reach the database during the outage"
        _expect_reported(internal_errors)
        proxy.start()
        wait_for(lambda: writer.flush(2), 30, "the audit backlog to ship after recovery")
        ids += publish(5)
        assert writer.flush(10)
    finally:
        instrumentor.uninstrument()
    assert _counts(pg, ids) == dict.fromkeys(ids, 1)
    rows = [r for task_id in ids for r in audit_rows(pg, task_id)]
    assert all(r["sent_at"] is not None and r["payload"] for r in rows)
    assert slowest < 1.5, f"a publish was blocked for {slowest:.2f}s (db_timeout 1s)"
    assert _segments(writer.spool_dir) == [], "a fully shipped spool is deleted at close"


def _publisher(mode: str, queue: str, env: dict[str, str], count: int = 0) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "tests.spool_publisher", mode, str(count)],
        env={
            **os.environ,
            "PYTHONPATH": str(ROOT),
            "OCP_BROKER_URL": BROKER,
            "OCP_QUEUE": queue,
            "OTEL_TRACES_EXPORTER": "none",
            "OTEL_METRICS_EXPORTER": "none",
            **env,
        },
        stdout=subprocess.PIPE,
        text=True,
    )


def _read_ids(proc: subprocess.Popen[str], n: int) -> list[str]:
    assert proc.stdout is not None
    ids = [proc.stdout.readline().strip() for _ in range(n)]
    assert all(ids), f"publisher stopped early (exit code {proc.poll()})"
    return ids


def _kill(proc: subprocess.Popen[str]) -> list[str]:
    """SIGKILL; return every id it printed, i.e. whose apply_async had returned."""
    proc.send_signal(signal.SIGKILL)
    out, _ = proc.communicate(timeout=30)
    return [line for line in out.splitlines() if line.strip()]


@pytest.mark.usefixtures("drain_queue")
def test_sigkill_mid_stream_loses_nothing_that_returned(
    pg_url: str, pg: Engine, queue_name: str, tmp_path: Path
) -> None:
    """kill -9 a spool-mode publisher mid-stream: after drain, every task whose apply_async
    returned is in the database exactly once (some were shipped before the kill, the whole
    segment is shipped again by the drain)."""
    env = {
        "OTEL_CELERY_PUBLISH_AUDIT_URL": pg_url,
        "OTEL_CELERY_PUBLISH_SPOOL_DIR": str(tmp_path),
        "OTEL_CELERY_PUBLISH_FLUSH_INTERVAL": "0.05",
    }
    proc = _publisher("spool", queue_name, env)
    ids = _read_ids(proc, 300)
    ids += _kill(proc)
    settings = Settings.from_env(env)
    directory = target_dir(str(tmp_path), pg_url, settings.table_name)
    assert len(_segments(directory)) == 1, "the killed process leaves its segment behind"
    assert drain_spool(settings) >= len(ids)
    assert _counts(pg, ids) == dict.fromkeys(ids, 1)
    assert _segments(directory) == []
    assert drain_spool(settings) == 0


@pytest.mark.usefixtures("drain_queue")
def test_processes_share_a_spool_directory_and_adopt_the_dead(
    proxy: TcpProxy, pg_url: str, pg: Engine, queue_name: str, tmp_path: Path
) -> None:
    """Two publishers spool side by side while the database is down; one is killed. The other
    exits cleanly but cannot ship; the next process to start on the directory ships both."""
    url = make_url(pg_url).set(port=proxy.port).render_as_string(hide_password=False)
    env = {
        "OTEL_CELERY_PUBLISH_AUDIT_URL": url,
        "OTEL_CELERY_PUBLISH_SPOOL_DIR": str(tmp_path),
        "OTEL_CELERY_PUBLISH_FLUSH_INTERVAL": "0.05",
        "OTEL_CELERY_PUBLISH_DB_TIMEOUT": "1",
    }
    proxy.stop()
    doomed = _publisher("spool", queue_name, env)
    survivor = _publisher("spool", queue_name, env, count=200)
    ids = _read_ids(doomed, 100)
    ids += _read_ids(survivor, 200)
    ids += _kill(doomed)
    assert survivor.wait(60) == 0
    directory = target_dir(str(tmp_path), url, Settings().table_name)
    assert len(_segments(directory)) == 2, "both segments wait for the database"
    audit_table().create(pg, checkfirst=True)
    assert _counts(pg, ids) == {}

    proxy.start()
    newcomer = _publisher("spool", queue_name, env, count=1)
    ids += _read_ids(newcomer, 1)
    assert newcomer.wait(60) == 0
    assert _counts(pg, ids) == dict.fromkeys(ids, 1)
    assert _segments(directory) == []


@pytest.mark.parametrize("fault", ["reset", "hang"])
def test_an_outage_moves_waiting_updates_to_the_spool_early(
    fault: str,
    proxy: TcpProxy,
    pg_url: str,
    pg: Engine,
    tmp_path: Path,
    internal_errors: list[Any],
) -> None:
    """While the database is down, the updates waiting in memory (each publish's "sent", in
    every mode) go to the spool once OUTAGE_SPILL of them wait, not max_pending: a crash then
    loses at most that many, and each lands near its row, where a drain merges the two. They
    ship once the database is back. Refused connections, or a database that accepts and never
    answers."""
    if fault == "reset":
        proxy.stop()
    else:
        proxy.hang()
    url = make_url(pg_url).set(port=proxy.port).render_as_string(hide_password=False)
    settings = Settings(audit_url=url, durability="spool", spool_dir=str(tmp_path))
    writer = AuditWriter(dataclasses.replace(settings, flush_interval=3600, db_timeout=0.3))
    run = uuid.uuid4().hex[:8]
    ids = [f"outage-spill-{run}-{i}" for i in range(OUTAGE_SPILL + 1)]
    assert len(ids) < writer.settings.max_pending
    writer.start()
    wait_for(lambda: writer._failing or None, 10, "the first shipping attempt to fail")
    now = datetime.datetime.now(datetime.timezone.utc)
    for i in ids:
        update = {"publish_id": i, "task_id": i, "task_name": "t", "published_at": now}
        writer.record_update({**update, "sent_at": now}, best_effort=True)  # type: ignore[typeddict-item]

    def spooled() -> bool | None:
        found: set[str] = set()
        for name in _segments(writer.spool_dir):
            fd = os.open(os.path.join(writer.spool_dir, name), os.O_RDONLY)
            try:
                for rows, _ in read_batches(fd, 0, os.fstat(fd).st_size):
                    found.update(row["publish_id"] for row in rows)
            finally:
                os.close(fd)
        return found >= set(ids) or None

    wait_for(spooled, 10, "the waiting updates in the spool")
    if fault == "reset":
        proxy.start()
    else:
        proxy.heal()
    assert writer.close(10)
    assert _counts(pg, ids) == dict.fromkeys(ids, 1)
    _expect_reported(internal_errors)


def test_fork_after_instrument_keeps_parent_and_child_apart(
    pg_url: str, pg: Engine, tmp_path: Path
) -> None:
    """A child forked from an instrumented process gets a spool segment, connections and a
    thread of its own; the parent's segment and connections keep working."""
    writer = AuditWriter(
        Settings(audit_url=pg_url, durability="spool", spool_dir=str(tmp_path), flush_interval=60)
    )

    def row(task_id: str) -> dict[str, Any]:
        now = datetime.datetime.now(datetime.timezone.utc)
        return {"publish_id": task_id, "task_id": task_id, "task_name": "t", "published_at": now}

    ids = [f"fork-parent-{os.getpid()}-1"]
    writer.record_publish(row(ids[0]))
    parent_segments = _segments(writer.spool_dir)
    pid = os.fork()
    if pid == 0:  # the child: publish, ship, exit (like a pool child: no atexit hooks)
        try:
            writer.record_publish(row(f"fork-child-{os.getpid()}"))
            os._exit(0 if writer.close(10) else 1)
        finally:
            os._exit(2)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    ids.append(f"fork-child-{pid}")
    ids.append(f"fork-parent-{os.getpid()}-2")
    writer.record_publish(row(ids[-1]))
    assert writer.flush(10)
    assert _counts(pg, ids) == dict.fromkeys(ids, 1)
    assert set(parent_segments) <= set(_segments(writer.spool_dir)), "the child left it alone"
    assert writer.close()
    assert _segments(writer.spool_dir) == []


@pytest.mark.parametrize("mode", MODES)
def test_worker_lifecycle_in_every_mode(
    mode: str, pg_url: str, pg: Engine, start_worker: Any, queue_name: str, tmp_path: Path
) -> None:
    """A prefork worker in each mode records the whole lifecycle of a task."""
    start_worker(pool="prefork", concurrency=1, env={"OTEL_CELERY_PUBLISH_DURABILITY": mode})
    instrumentor = _instrument(pg_url, mode, tmp_path)
    try:
        task_id = add.apply_async((2, 3), queue=queue_name).id
        # Three processes write the row (publisher, worker main, pool child), each in batches:
        # the columns arrive in any order.
        lifecycle = ("sent_at", "received_at", "started_at", "finished_at")
        [row] = wait_row(pg, task_id, lambda rows: None not in [rows[0][c] for c in lifecycle])
    finally:
        instrumentor.uninstrument()
    assert row["outcome"] == "succeeded"
    assert row["payload"]


def test_metric_reader_forked_mid_export_still_exports_in_the_child(tmp_path: Path) -> None:
    """A pool child forked while the parent's metric reader held its export lock gets a free
    lock (opentelemetry-python#3307), instead of never exporting and hanging at shutdown."""
    reader = PeriodicExportingMetricReader(ConsoleMetricExporter(out=io.StringIO()), 60_000)
    provider = MeterProvider(metric_readers=[reader])
    instrumentor = _instrument(f"sqlite:///{tmp_path}/a.db", "async", tmp_path)
    try:
        with reader._export_lock:  # the parent's thread, exporting at the moment of fork
            pid = os.fork()
            if pid == 0:
                try:
                    os._exit(0 if reader._export_lock.acquire(timeout=5) else 1)
                finally:
                    os._exit(2)
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0
    finally:
        instrumentor.uninstrument()
        provider.shutdown()
