"""The spool file format and the writer's policies, on SQLite and local files."""

from __future__ import annotations

import datetime
import gc
import os
import pickle
import weakref
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from sqlalchemy import create_engine, inspect, text

from otel_celery_publish import Settings
from otel_celery_publish.sink import spool as spool_mod
from otel_celery_publish.sink.records import HEADER, Decoded, decode, encode, load_row
from otel_celery_publish.sink.spool import Spool, SpoolFull, adopt_orphans
from otel_celery_publish.sink.writer import PROCESS_HOOKS, AuditWriter
from tests.otlp_receiver import wait_for

NOW = datetime.datetime(2026, 11, 24, 12, 0, tzinfo=datetime.timezone.utc)


def _row(publish_id: str) -> dict[str, Any]:
    return {"publish_id": publish_id, "task_id": publish_id, "task_name": "t", "published_at": NOW}


def test_records_round_trip_and_a_torn_tail_is_left_out() -> None:
    """decode() returns whole records and stops at a record cut short by a crash."""
    rows = [_row("a"), {**_row("b"), "payload": b"\x00\xff", "options": {"x": [1, 2.5, None]}}]
    data = b"".join(encode(r) for r in rows)
    assert decode(data, load_row) == Decoded(rows, len(data), [], None)
    assert decode(data + encode(_row("c"))[:-1], load_row) == Decoded(rows, len(data), [], None)


def test_a_corrupt_record_is_not_read_past() -> None:
    """A record whose CRC does not match ends the readable part (no garbage is shipped)."""
    first, second = encode(_row("a")), bytearray(encode(_row("b")))
    second[-1] ^= 0xFF
    decoded = decode(first + bytes(second))
    assert (decoded.rows, decoded.used) == ([_row("a")], len(first))
    assert decoded.corrupt == "a record whose CRC does not match"


def test_spool_files_cannot_run_code() -> None:
    """A pickle naming anything but a row's types is refused, not executed; the next record
    is still read."""
    evil = pickle.dumps(os.system)
    frame = HEADER.pack(len(evil), zlib.crc32(evil)) + evil
    decoded = decode(frame + encode(_row("a")))
    assert decoded.rows == [_row("a")]
    assert decoded.used == len(frame) + len(encode(_row("a")))
    [why] = decoded.refused
    assert "posix.system is not part of an audit row" in why


def test_orphan_with_torn_tail_is_shipped_and_deleted(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A dead process's segment ships up to its torn tail; the tail is logged; the file goes."""
    (tmp_path / "dead-1-x.seg").write_bytes(encode(_row("a")) + encode(_row("b"))[:5])
    shipped: list[list[dict[str, Any]]] = []
    assert adopt_orphans(str(tmp_path), shipped.append) == 1
    assert shipped == [[_row("a")]]
    assert os.listdir(tmp_path) == []
    assert "unreadable bytes" in caplog.text


def test_live_segments_are_not_adopted(tmp_path: Path) -> None:
    """A segment whose owner is alive (holds the lock) is left alone."""
    live = Spool(str(tmp_path), fsync=False, max_bytes=1 << 20)
    live.append(_row("a"))
    assert adopt_orphans(str(tmp_path), lambda rows: None) == 0
    assert len(os.listdir(tmp_path)) == 1
    live.close(delete=False)
    assert adopt_orphans(str(tmp_path), lambda rows: None) == 1
    assert os.listdir(tmp_path) == []


def test_failed_shipping_keeps_the_orphan(tmp_path: Path) -> None:
    """If the database fails while adopting, the segment stays for the next attempt."""
    (tmp_path / "dead-1-x.seg").write_bytes(encode(_row("a")))

    def fail(rows: list[dict[str, Any]]) -> None:
        raise ConnectionError("database down")

    with pytest.raises(ConnectionError):
        adopt_orphans(str(tmp_path), fail)
    assert os.listdir(tmp_path) == ["dead-1-x.seg"]


def test_shipped_segment_rotates(tmp_path: Path) -> None:
    """A fully shipped segment past the rotation size is deleted; the next append starts anew."""
    spool = Spool(str(tmp_path), fsync=True, max_bytes=1 << 20)
    spool.append(_row("a"))
    [first] = os.listdir(tmp_path)
    assert spool.ship(lambda rows: None, rotate_at=1 << 20) == 1
    assert os.listdir(tmp_path) == [first], "small: kept"
    spool.append(_row("b"))
    assert spool.ship(lambda rows: None, rotate_at=1) == 1
    assert os.listdir(tmp_path) == []
    spool.append(_row("c"))
    assert len(os.listdir(tmp_path)) == 1
    spool.close(delete=True)


@pytest.fixture
def metrics_reader() -> InMemoryMetricReader:
    return InMemoryMetricReader()


def _writer(tmp_path: Path, reader: InMemoryMetricReader, **settings: Any) -> Iterator[AuditWriter]:
    meter = MeterProvider(metric_readers=[reader]).get_meter("test")
    writer = AuditWriter(
        Settings(spool_dir=str(tmp_path / "spool"), flush_interval=3600, **settings), meter
    )
    yield writer
    writer.close()


def _sums(reader: InMemoryMetricReader) -> dict[str, float]:
    data = reader.get_metrics_data()
    assert data is not None
    return {
        m.name: sum(p.value for p in m.data.data_points)
        for rm in data.resource_metrics
        for sm in rm.scope_metrics
        for m in sm.metrics
    }


def _count(url: str) -> int:
    """Rows in the audit table; 0 while the writer's thread has not created it yet."""
    engine = create_engine(url)
    try:
        if not inspect(engine).has_table("celery_publish_audit"):
            return 0
        with engine.connect() as conn:
            return int(conn.execute(text("SELECT count(*) FROM celery_publish_audit")).scalar_one())
    finally:
        engine.dispose()


def test_full_spool_keeps_records_in_memory_and_says_so(
    tmp_path: Path, metrics_reader: InMemoryMetricReader, internal_errors: list[Any]
) -> None:
    """Past spool_max_bytes, records stay in memory (reported), and still reach the database."""
    url = f"sqlite:///{tmp_path}/a.db"
    for writer in _writer(
        tmp_path, metrics_reader, audit_url=url, durability="spool", spool_max_bytes=300
    ):
        for i in range(5):
            writer.record_publish(_row(f"p{i}"))
        assert [where for where, _ in internal_errors][:1] == [
            "audit spool (record kept in memory)"
        ]
        assert all(isinstance(exc, SpoolFull) for _, exc in internal_errors)
        internal_errors.clear()
        assert _sums(metrics_reader)["celery.audit.spool.overflow"] >= 1
        assert writer.flush()
        assert _count(url) == 5


def test_sync_falls_back_to_the_spool_with_a_metric(
    tmp_path: Path, metrics_reader: InMemoryMetricReader, internal_errors: list[Any]
) -> None:
    """A sync write that fails goes to the spool, counted; it ships when the database is back."""
    db_dir = tmp_path / "later"
    url = f"sqlite:///{db_dir}/a.db"
    for writer in _writer(tmp_path, metrics_reader, audit_url=url):
        writer.record_publish(_row("p1"))
        writer.record_publish(_row("p2"))
        assert _sums(metrics_reader)["celery.audit.fallback"] == 2
        assert _sums(metrics_reader)["celery.audit.spool.backlog"] > 0
        assert "audit write" in [where for where, _ in internal_errors]
        internal_errors.clear()
        assert os.listdir(writer.spool_dir), "the rows wait on disk, not in memory"
        db_dir.mkdir()
        assert writer.flush()
        assert _count(url) == 2
        assert _sums(metrics_reader)["celery.audit.spool.backlog"] == 0


def test_a_later_writer_on_the_same_meter_reports_its_backlog(
    tmp_path: Path, metrics_reader: InMemoryMetricReader, internal_errors: list[Any]
) -> None:
    """A meter's one backlog gauge reports the writers alive on it, so a writer created after
    another was closed is counted (the SDK keeps only the first gauge of a name per meter)."""
    meter = MeterProvider(metric_readers=[metrics_reader]).get_meter("test")
    closed = AuditWriter(
        Settings(audit_url=f"sqlite:///{tmp_path}/a.db", spool_dir=str(tmp_path / "a")), meter
    )
    assert closed.close()
    down = f"sqlite:///{tmp_path}/missing/b.db"  # rows wait in the spool
    writer = AuditWriter(
        Settings(audit_url=down, spool_dir=str(tmp_path / "b"), flush_interval=3600), meter
    )
    try:
        writer.record_publish(_row("p1"))
        assert writer.backlog() > 0
        assert _sums(metrics_reader)["celery.audit.spool.backlog"] == writer.backlog()
    finally:
        writer.close(timeout=5.0)
    assert "audit write" in [where for where, _ in internal_errors]
    internal_errors.clear()


def test_writers_share_one_fork_hook_and_one_exit_hook(tmp_path: Path) -> None:
    """However many writers a process creates, one at-fork and one atexit hook serve them all,
    and holding a writer there does not keep it alive."""
    settings = Settings(audit_url=f"sqlite:///{tmp_path}/a.db", spool_dir=str(tmp_path / "s"))
    writers = [AuditWriter(settings) for _ in range(3)]
    assert PROCESS_HOOKS.registered == 2
    assert all(writer in PROCESS_HOOKS.live() for writer in writers)
    for writer in writers:
        assert writer.close()
    gone = weakref.ref(writers.pop(0))  # the loop variable still holds the last one
    gc.collect()
    assert gone() is None


def test_async_mode_ships_in_batches(tmp_path: Path, metrics_reader: InMemoryMetricReader) -> None:
    """async: nothing is written before the batch; flush() ships it."""
    url = f"sqlite:///{tmp_path}/a.db"
    for writer in _writer(tmp_path, metrics_reader, audit_url=url, durability="async"):
        writer.record_publish(_row("p1"))
        assert _count(url) == 0
        assert writer.flush()
        assert _count(url) == 1
        assert not os.path.exists(writer.spool_dir), "a healthy async writer never spools"


def test_spool_dir_is_per_audit_database(tmp_path: Path) -> None:
    """Two audit databases never share spool segments; the password is not part of the key."""
    a = spool_mod.target_dir(str(tmp_path), "postgresql://u:one@h/db", "t")
    assert a == spool_mod.target_dir(str(tmp_path), "postgresql://u:two@h/db", "t")
    assert a != spool_mod.target_dir(str(tmp_path), "postgresql://u@h/other", "t")
    assert a != spool_mod.target_dir(str(tmp_path), "postgresql://u@h/db", "t2")


def test_memory_backlog_beyond_max_pending_moves_to_the_spool(
    tmp_path: Path, metrics_reader: InMemoryMetricReader
) -> None:
    """More records than max_pending waiting in memory: they go to the spool, none dropped."""
    url = f"sqlite:///{tmp_path}/a.db"
    for writer in _writer(
        tmp_path, metrics_reader, audit_url=url, durability="async", max_pending=3
    ):
        for i in range(10):
            writer.record_publish(_row(f"p{i}"))
        spooled = writer.spool_dir
        wait_for(lambda d=spooled: os.path.isdir(d) and os.listdir(d), 10, "a spill")
        assert writer.flush()
        assert _count(url) == 10
        assert "celery.audit.dropped" not in _sums(metrics_reader)
