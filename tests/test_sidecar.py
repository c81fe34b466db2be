"""The sidecar shipper (``audit ship --follow``): publishing processes only append to their spool
while it runs, it ships live, rotated and dead segments once each, a second one stands by, and a
writer ships by itself again when the sidecar is gone. Real processes, real PostgreSQL."""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import itertools
import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
from sqlalchemy import create_engine, text
from sqlalchemy.engine import make_url

from otel_celery_publish import Settings
from otel_celery_publish.rows import epoch_to_dt
from otel_celery_publish.sink import sidecar as sidecar_mod
from otel_celery_publish.sink import writer as writer_mod
from otel_celery_publish.sink.records import encode
from otel_celery_publish.sink.sidecar import Sidecar, SidecarProbe, running, shipper
from otel_celery_publish.sink.spool import target_dir
from otel_celery_publish.sink.writer import AuditWriter
from tests.audit_support import celery_audit, celery_audit_popen, validated
from tests.conftest import BROKER, ROOT
from tests.otlp_receiver import wait_for
from tests.tcp_proxy import TcpProxy


@pytest.fixture
def settings(pg_url: str, tmp_path: Path) -> Settings:
    return Settings(
        audit_url=pg_url,
        table_name=f"sidecar_{uuid.uuid4().hex[:8]}",
        spool_dir=str(tmp_path / "spool"),
        durability="spool",
        flush_interval=0.05,
    )


def _env(settings: Settings) -> dict[str, str]:
    return {"OTEL_CELERY_PUBLISH_SPOOL_DIR": settings.spool_dir}


def _directory(settings: Settings) -> str:
    return target_dir(settings.spool_dir, settings.audit_url, settings.table_name)


def _count(settings: Settings, column: str = "*") -> int:
    engine = create_engine(settings.audit_url)
    try:
        with engine.connect() as conn:
            found = conn.execute(text(f'SELECT count({column}) FROM "{settings.table_name}"'))
            return int(found.scalar_one())
    except Exception:  # not created yet
        return 0
    finally:
        engine.dispose()


def _segments(settings: Settings) -> list[str]:
    directory = Path(_directory(settings))
    return sorted(p.name for p in directory.glob("*.seg")) if directory.exists() else []


def _postgres_sockets(pid: int) -> int:
    """How many of process ``pid``'s sockets are TCP connections to port 5432 (from /proc)."""
    inodes = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        with contextlib.suppress(OSError):
            target = os.readlink(fd)
            if target.startswith("socket:["):
                inodes.add(target[8:-1])
    found = 0
    for table in ("tcp", "tcp6"):
        for line in Path(f"/proc/{pid}/net/{table}").read_text().splitlines()[1:]:
            fields = line.split()
            if fields[2].endswith(":1538") and fields[9] in inodes:  # 0x1538 = 5432
                found += 1
    return found


def _row(publish_id: str) -> dict[str, Any]:
    return {
        "publish_id": publish_id,
        "task_id": publish_id,
        "task_name": "t",
        "published_at": epoch_to_dt(1.7e9),
    }


@pytest.fixture
def sidecars(settings: Settings) -> Iterator[list[subprocess.Popen[str]]]:
    started: list[subprocess.Popen[str]] = []
    yield started
    for proc in started:
        if proc.poll() is None:
            proc.kill()
        proc.communicate(timeout=10)


def _start_sidecar(settings: Settings, started: list[subprocess.Popen[str]]) -> Any:
    proc = celery_audit_popen(
        "ship", "--follow", "--interval", "0.05", settings=settings, env=_env(settings)
    )
    started.append(proc)
    return proc


def test_with_a_sidecar_the_publisher_only_appends_and_nothing_is_lost(
    settings: Settings, sidecars: list[subprocess.Popen[str]]
) -> None:
    """A spool-mode publisher process never connects to the audit database while the sidecar
    runs (no TCP socket of it goes to PostgreSQL's port); every publish reaches the table with
    its sent_at while it runs; SIGKILLed, its last records are shipped by the sidecar, and its
    segment is deleted."""
    _start_sidecar(settings, sidecars)
    probe = SidecarProbe(_directory(settings))
    assert wait_for(probe.present, timeout=30), sidecars[0].stderr
    queue = f"ocp-sidecar-{uuid.uuid4().hex[:6]}"
    env = {
        **os.environ,
        "PYTHONPATH": str(ROOT),
        "OCP_BROKER_URL": BROKER,
        "OCP_QUEUE": queue,
        "OTEL_CELERY_PUBLISH_AUDIT_URL": settings.audit_url,
        "OTEL_CELERY_PUBLISH_TABLE_NAME": settings.table_name,
        "OTEL_CELERY_PUBLISH_SPOOL_DIR": settings.spool_dir,
        "OTEL_CELERY_PUBLISH_FLUSH_INTERVAL": "0.05",
        "OTEL_PYTHON_DISABLED_INSTRUMENTATIONS": "celery",
    }
    publisher = subprocess.Popen(
        [sys.executable, "-m", "tests.spool_publisher", "spool", "0"],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    engine = create_engine(settings.audit_url)
    try:
        seen_connections = 0

        def shipped_with_sent_at() -> bool:
            nonlocal seen_connections
            seen_connections += _postgres_sockets(publisher.pid)
            return _count(settings, "sent_at") >= 300

        assert wait_for(shipped_with_sent_at, timeout=60)
        assert publisher.poll() is None, publisher.stderr
        assert seen_connections == 0
        with engine.connect():  # the check does see a connection where there is one
            assert _postgres_sockets(os.getpid()) > 0
        publisher.send_signal(signal.SIGKILL)
        out, _ = publisher.communicate(timeout=10)
        published = set(out.split())
        with engine.connect() as conn:
            # Rows of every publish whose apply_async returned, shipped once each.
            assert wait_for(
                lambda: _count(settings) >= len(published) and not _segments(settings),
                timeout=30,
            ), _segments(settings)
            ids = set(conn.execute(text(f'SELECT task_id FROM "{settings.table_name}"')).scalars())
        assert published <= ids
    finally:
        engine.dispose()
        redis.Redis.from_url(BROKER).delete(queue)


def test_rotated_segments_are_finished_once_and_the_writer_never_connects(
    settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    """In one process: a sidecar holding the lock, a writer appending. The writer's thread
    spills its memory queue to the spool and releases its segment when large; the sidecar ships
    each record once (upserts: once in the table), deletes released segments, and the writer's
    own engine is never built."""
    monkeypatch.setattr(writer_mod, "ROTATE_AT_BYTES", 4096)
    directory = _directory(settings)
    ship, close = shipper(settings, directory)
    shipped: list[str] = []
    sidecar = Sidecar(
        directory, lambda rows: (ship(rows), shipped.extend(r["publish_id"] for r in rows))
    )
    assert sidecar.acquire()
    writer = AuditWriter(settings)
    try:
        for i in range(300):
            row = _row(f"r{i}")
            writer.record_publish(row)  # type: ignore[arg-type]
            writer.record_update({**row, "sent_at": epoch_to_dt(1.7e9 + 1)}, best_effort=True)  # type: ignore[typeddict-item]
            if i % 50 == 0:
                sidecar.cycle()

        def done() -> bool:
            sidecar.cycle()
            return _count(settings, "sent_at") == 300 and len(_segments(settings)) <= 1

        assert wait_for(done, timeout=30)
        assert writer.db._engine is None  # the writer's thread never connected
        assert _count(settings) == 300
        assert len(set(shipped)) == 300
    finally:
        sidecar.release()
        writer.close()
        close()
    assert not _segments(settings)


def test_a_second_sidecar_stands_by_then_takes_over_and_then_the_writer_ships_itself(
    settings: Settings, sidecars: list[subprocess.Popen[str]]
) -> None:
    """Two sidecars: one ships, the other stands by (says so) and ships once the first is
    SIGKILLed; with both gone, the writer's own thread ships again."""
    first = _start_sidecar(settings, sidecars)
    probe = SidecarProbe(_directory(settings))
    assert wait_for(probe.present, timeout=30)
    assert running(settings)
    second = _start_sidecar(settings, sidecars)
    writer = AuditWriter(settings)
    try:
        writer.record_publish(_row("a"))  # type: ignore[arg-type]
        assert wait_for(lambda: _count(settings) == 1, timeout=30)
        assert second.stderr is not None
        assert "standing by" in second.stderr.readline()  # its first line, once it polled
        first.kill()
        first.wait(10)
        assert wait_for(probe.present, timeout=30)  # the second took the lock
        writer.record_publish(_row("b"))  # type: ignore[arg-type]
        assert wait_for(lambda: _count(settings) == 2, timeout=30)
        second.send_signal(signal.SIGTERM)
        out, err = second.communicate(timeout=30)
        assert second.returncode == 0, err
        assert "now shipping" in err, (out, err)
        assert wait_for(lambda: not probe.present(), timeout=10)
        assert not running(settings)  # the compose stack's healthcheck
        writer.record_publish(_row("c"))  # type: ignore[arg-type]
        assert wait_for(lambda: _count(settings) == 3, timeout=30)
    finally:
        writer.close()


def test_the_sidecar_rides_out_a_hung_then_a_reset_database(
    settings: Settings, proxy: TcpProxy, sidecars: list[subprocess.Popen[str]]
) -> None:
    """Behind a proxy that hangs (accepts, never answers), then resets its connections: the
    sidecar's wait ends at its deadline (it gives the hung connection up and connects again),
    it keeps retrying without exiting, and once the database answers every record appended
    meanwhile lands, once; the publishing side only appended all along."""
    via = dataclasses.replace(
        settings,
        audit_url=make_url(settings.audit_url)
        .set(port=proxy.port)
        .render_as_string(hide_password=False),
        db_timeout=0.3,
    )
    env = {**_env(via), "OTEL_CELERY_PUBLISH_DB_TIMEOUT": "0.3"}  # batches: 3 s each at most
    proc = celery_audit_popen("ship", "--follow", "--interval", "0.05", settings=via, env=env)
    sidecars.append(proc)
    probe = SidecarProbe(_directory(via))
    writer = AuditWriter(via)
    try:
        assert wait_for(probe.present, timeout=30), proc.stderr
        batches = [[f"{name}-{i}" for i in range(50)] for name in ("before", "hung", "reset")]

        def append(ids: list[str]) -> None:
            for publish_id in ids:
                writer.record_publish(_row(publish_id))  # type: ignore[arg-type]

        append(batches[0])
        assert wait_for(lambda: _count(settings) == 50, timeout=30)
        accepted = proxy.accepted
        proxy.hang()
        append(batches[1])
        # The hung connection given up at its deadline, a new one tried (into the hang).
        assert wait_for(lambda: proxy.accepted > accepted, timeout=15)
        assert proc.poll() is None and _count(settings) == 50
        proxy.heal()
        assert wait_for(lambda: _count(settings) == 100, timeout=30)
        proxy.cut()  # the sidecar's pooled connection is reset under it
        append(batches[2])
        assert wait_for(lambda: _count(settings) == 150, timeout=30)
        assert proc.poll() is None
    finally:
        writer.close()
        probe.forget()
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err
    assert "shipping" in err and "retrying" in err, err
    engine = create_engine(settings.audit_url)
    try:
        with engine.connect() as conn:
            ids = conn.execute(text(f'SELECT publish_id FROM "{settings.table_name}"')).scalars()
            assert sorted(ids) == sorted(i for batch in batches for i in batch)
    finally:
        engine.dispose()
    assert not _segments(via)


def test_a_failing_sidecar_backs_off_and_ships_at_once_when_the_database_is_back(
    settings: Settings,
    proxy: TcpProxy,
    monkeypatch: pytest.MonkeyPatch,
    internal_errors: list[Any],
) -> None:
    """While the database refuses connections, the sidecar's cycles come further and further
    apart (the wait doubles with each failure, up to RETRY_BACKOFF_MAX_S), not every
    --interval; once it answers, a cycle ships, and the next ones come every interval again."""
    proxy.stop()
    url = make_url(settings.audit_url).set(port=proxy.port).render_as_string(hide_password=False)
    via = dataclasses.replace(settings, audit_url=url, db_timeout=0.3)
    directory = Path(_directory(via))
    directory.parent.mkdir(mode=0o700)
    directory.mkdir(mode=0o700)
    (directory / "dead-1.seg").write_bytes(encode(_row("backoff-1")))
    cycles: list[float] = []
    cycle = Sidecar.cycle

    def counted(self: Sidecar) -> int:
        cycles.append(time.monotonic())
        return cycle(self)

    monkeypatch.setattr(Sidecar, "cycle", counted)
    stop = threading.Event()
    kwargs = {"follow": True, "interval": 0.01, "stop": stop}
    thread = threading.Thread(target=sidecar_mod.run, args=(via,), kwargs=kwargs)
    thread.start()
    try:
        wait_for(lambda: len(cycles) >= 6 or None, timeout=30)
        gaps = [later - earlier for earlier, later in itertools.pairwise(cycles[:6])]
        for failures, gap in enumerate(gaps, 1):
            assert gap >= 0.01 * 2**failures, gaps
        proxy.start()
        assert wait_for(lambda: _count(via) == 1 or None, timeout=30)
        shipped = len(cycles)
        wait_for(lambda: len(cycles) >= shipped + 10 or None, timeout=5)
    finally:
        stop.set()
        thread.join(30)
    for _where, exc in internal_errors:
        exc._ocp_expected = True  # type: ignore[attr-defined]


def test_ship_once_ships_live_and_dead_segments(settings: Settings) -> None:
    """``audit ship`` without --follow: one pass over every segment, live ones too, then
    exit; the count is printed."""
    writer = AuditWriter(settings)
    try:
        writer._spool.append(_row("live"))
        dead = Path(_directory(settings)) / "gone-1-x.seg"
        dead.write_bytes(encode(_row("dead")))
        done = celery_audit("ship", settings=settings, env=_env(settings))
        assert done.returncode == 0, done.stderr
        assert done.stdout.strip() == "shipped 2 spooled record(s)"
        assert _count(settings) == 2
        assert not dead.exists()
        writer._spool.append(_row("later"))
        done = celery_audit("ship", "--json", settings=settings, env=_env(settings))
        # A new process starts the live segment over (twice shipped, stored once).
        assert validated("ship", done.stdout) == {"shipped": 2}
        assert _count(settings) == 3
    finally:
        writer.close()


def test_a_planted_lock_file_neither_silences_the_writer_nor_is_followed(
    settings: Settings, tmp_path: Path
) -> None:
    """A hostile local user's ``shipper.lock`` (a symlink to a file they lock) does not make
    writers stand down, and a sidecar refuses it instead of locking through it."""
    directory = Path(_directory(settings))
    writer = AuditWriter(settings)
    writer._spool.append(_row("x"))  # creates the checked directory
    bait = tmp_path / "bait"
    bait.write_text("")
    (directory / "shipper.lock").symlink_to(bait)
    with open(bait) as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        assert not SidecarProbe(str(directory)).present()
        with pytest.raises(OSError, match="Too many levels of symbolic links"):
            Sidecar(str(directory), lambda rows: None).acquire()
    writer._spool.close(delete=True)
