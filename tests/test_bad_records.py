"""One record the audit database refuses never stalls the records behind it: it is repaired
where that is faithful, else quarantined on disk, counted and reported - in the shipping
thread, on the sync path and in ``audit drain`` - against real PostgreSQL and SQLite."""

from __future__ import annotations

import datetime
import os
import sqlite3
import stat
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from sqlalchemy import create_engine
from sqlalchemy.engine import Engine

from otel_celery_publish import Settings
from otel_celery_publish.headers import TRUNCATED
from otel_celery_publish.schema.table import audit_table
from otel_celery_publish.sink.quarantine import is_refusal, quarantined, repair
from otel_celery_publish.sink.records import encode
from otel_celery_publish.sink.shipping import drain_spool
from otel_celery_publish.sink.spool import SUFFIX, target_dir
from otel_celery_publish.sink.writer import AuditWriter

EXPECTED = frozenset({"audit record repaired", "audit record quarantined"})
NOW = datetime.datetime(2026, 1, 2, 3, 4, 5, tzinfo=datetime.timezone.utc)  # any fixed time


def _row(**columns: Any) -> dict[str, Any]:
    publish_id = uuid.uuid4().hex
    row = {
        "publish_id": publish_id,
        "task_id": f"task-{publish_id}",
        "task_name": "tests.add",
        "published_at": NOW,
    }
    row.update(columns)
    return row


def _stored(engine: Engine, publish_ids: list[str]) -> dict[str, dict[str, Any]]:
    table = audit_table()
    with engine.connect() as conn:
        result = conn.execute(table.select().where(table.c.publish_id.in_(publish_ids)))
        return {r.publish_id: dict(r._mapping) for r in result}


def _quarantine_count(reader: InMemoryMetricReader) -> int:
    data = reader.get_metrics_data()
    total = 0
    for rm in data.resource_metrics if data else ():
        for sm in rm.scope_metrics:
            for metric in sm.metrics:
                if metric.name == "celery.audit.quarantined":
                    total += sum(p.value for p in metric.data.data_points)
    return total


def _expect_bad_records(internal_errors: list[Any]) -> set[str]:
    """Repair and quarantine reports are the point here; any other swallowed error fails."""
    for where, exc in internal_errors:
        if where in EXPECTED:
            exc._ocp_expected = True
    return {where for where, _ in internal_errors}


@pytest.fixture
def reader() -> InMemoryMetricReader:
    return InMemoryMetricReader()


@pytest.fixture(params=["postgresql", "sqlite"])
def database(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[tuple[str, str, Engine]]:
    """(dialect, audit_url, an engine to read it back with): the session's PostgreSQL, or a
    fresh SQLite file."""
    if request.param == "postgresql":
        url = request.getfixturevalue("pg_url")
        yield "postgresql", url, request.getfixturevalue("pg")
        return
    url = f"sqlite:///{tmp_path / 'audit.db'}"
    engine = create_engine(url)
    yield "sqlite", url, engine
    engine.dispose()


def _writer(
    url: str, mode: str, spool_dir: Path, reader: InMemoryMetricReader
) -> tuple[AuditWriter, Settings]:
    settings = Settings(audit_url=url, durability=mode, spool_dir=str(spool_dir), flush_interval=60)
    meter = MeterProvider(metric_readers=[reader]).get_meter("test")
    return AuditWriter(settings, meter), settings


def test_refusals_are_told_from_outages() -> None:
    """Data errors are refusals; connection errors, timeouts and schema errors are not."""

    class Server(psycopg.errors.DataError):
        sqlstate = "22001"

    class Undefined(psycopg.errors.ProgrammingError):
        sqlstate = "42P01"

    class Mismatch(psycopg.errors.ProgrammingError):
        sqlstate = "42804"

    assert is_refusal(Server("value too long"))
    assert is_refusal(Mismatch("column is of type timestamp but expression is of type smallint"))
    assert is_refusal(psycopg.DataError("PostgreSQL text fields cannot contain NUL"))
    assert is_refusal(psycopg.ProgrammingError("cannot adapt type 'set'"))
    assert is_refusal(sqlite3.IntegrityError("NOT NULL constraint failed"))
    assert is_refusal(sqlite3.ProgrammingError("Error binding parameter 1"))
    assert is_refusal(OverflowError("Python int too large to convert to SQLite INTEGER"))
    assert not is_refusal(Undefined('relation "celery_publish_audit" does not exist'))
    assert not is_refusal(psycopg.OperationalError("connection refused"))
    assert not is_refusal(sqlite3.OperationalError("database is locked"))
    assert not is_refusal(sqlite3.ProgrammingError("Cannot operate on a closed database."))
    assert not is_refusal(TimeoutError("no answer"))
    assert not is_refusal(ConnectionResetError("reset by peer"))


def test_repair_is_faithful_and_visible() -> None:
    """NUL bytes go, over-long text is cut to its column and marked, the key is never touched."""
    table = audit_table()
    row = _row(task_name="n" * 10_000, exception_message="a\x00b", publish_id="p" * 50)
    fixed, notes = repair(row, table) or ({}, [])
    assert len(fixed["task_name"]) == 255 and fixed["task_name"].endswith(TRUNCATED)
    assert fixed["exception_message"] == "ab"
    assert fixed["publish_id"] == "p" * 50
    assert row["exception_message"] == "a\x00b", "the original is not modified"
    assert any("task_name" in n for n in notes) and any("NUL" in n for n in notes)
    assert repair(_row(), table) is None


@pytest.mark.parametrize("mode", ["async", "spool"])
def test_a_bad_record_in_a_batch_never_stalls_the_rest(
    mode: str,
    database: tuple[str, str, Engine],
    tmp_path: Path,
    reader: InMemoryMetricReader,
    internal_errors: list[Any],
) -> None:
    """Good records around bad ones arrive; repairable ones arrive repaired; the rest are
    quarantined (durably, counted, listed) and the records after them are not stuck."""
    dialect, url, engine = database
    writer, settings = _writer(url, mode, tmp_path, reader)
    good = [_row() for _ in range(6)]
    repaired = {
        "nul": _row(exception_message="boom\x00"),
        "long_name": _row(task_name="n" * 10_000),
        "long_task_id": _row(task_id="t" * 300),
        "surrogate": _row(args_repr="caf\udce9"),
    }
    # Refused whatever we do: a type neither driver can send; a lifecycle update for a row
    # that never existed (task_id etc. are NOT NULL); and on PostgreSQL a forged over-long key.
    refused = {
        "set": _row(kwargs_repr={"not", "text"}),
        "orphan_update": {"publish_id": uuid.uuid4().hex, "exception_message": "late"},
    }
    if dialect == "postgresql":
        refused["long_key"] = _row(publish_id="f" * 40)
    if mode == "spool":
        del refused["set"]  # not an audit row: the spool itself refuses it (spool.check_row)
    batch = [good[0], *repaired.values(), good[1], *refused.values(), good[2]]
    try:
        for row in batch:
            writer.record_update(row)
        assert writer.flush(20), "the batch is shipped despite its bad records"
        later = good[3:]
        for row in later:
            writer.record_update(row)
        assert writer.flush(20), "records after the bad ones are not stuck"
    finally:
        writer.close()
    stored = _stored(engine, [r["publish_id"] for r in batch + later])
    assert set(stored) == {r["publish_id"] for r in good + list(repaired.values())}
    if dialect == "postgresql":
        assert stored[repaired["nul"]["publish_id"]]["exception_message"] == "boom"
        name = stored[repaired["long_name"]["publish_id"]]["task_name"]
        assert len(name) == 255 and name.endswith(TRUNCATED)
        task_id = stored[repaired["long_task_id"]["publish_id"]]["task_id"]
        assert len(task_id) == 255 and task_id.endswith(TRUNCATED)
    assert stored[repaired["surrogate"]["publish_id"]]["args_repr"] == "caf\\udce9"
    kept = quarantined(settings)
    assert sorted(q.publish_id for q in kept) == sorted(r["publish_id"] for r in refused.values())
    assert all(q.reason and q.path.endswith(".q") for q in kept)
    assert stat.S_IMODE(os.stat(kept[0].path).st_mode) == 0o600
    assert _quarantine_count(reader) == len(refused)
    reports = _expect_bad_records(internal_errors)
    assert "audit record quarantined" in reports


def test_a_bad_record_in_a_copy_sized_batch_is_isolated(
    pg_url: str,
    pg: Engine,
    tmp_path: Path,
    reader: InMemoryMetricReader,
    internal_errors: list[Any],
) -> None:
    """A batch big enough for PostgreSQL's COPY path, with a repairable and a refused record
    in it, ships every good record (the halves fall back to plain upserts)."""
    writer, settings = _writer(pg_url, "async", tmp_path, reader)
    rows = [_row() for _ in range(300)]
    rows[17]["exception_message"] = "nul\x00here"
    rows[230] = {"publish_id": uuid.uuid4().hex, "runtime_s": 1.0}  # no such row: NOT NULL
    try:
        for row in rows:
            writer.record_update(row)
        assert writer.flush(20)
    finally:
        writer.close()
    stored = _stored(pg, [r["publish_id"] for r in rows])
    assert len(stored) == 299
    assert stored[rows[17]["publish_id"]]["exception_message"] == "nulhere"
    assert [q.publish_id for q in quarantined(settings)] == [rows[230]["publish_id"]]
    _expect_bad_records(internal_errors)


def test_a_refused_sync_row_is_repaired_or_quarantined_without_opening_the_breaker(
    database: tuple[str, str, Engine],
    tmp_path: Path,
    reader: InMemoryMetricReader,
    internal_errors: list[Any],
) -> None:
    """A publish row the database refuses costs that row a repair or the quarantine; the
    publishes after it still commit synchronously (no fallback to the spool)."""
    dialect, url, engine = database
    writer, settings = _writer(url, "sync", tmp_path, reader)
    bad = _row(exception_message="x\x00y", task_name="n" * 1000)
    hopeless = _row(attempt={"not an int"})
    after = [_row() for _ in range(3)]
    try:
        writer.record_publish(_row())  # warm
        writer.record_publish(bad)
        writer.record_publish(hopeless)
        for row in after:
            writer.record_publish(row)
        # Committed synchronously: visible before any flush.
        stored = _stored(engine, [r["publish_id"] for r in [bad, hopeless, *after]])
    finally:
        writer.close()
    assert set(stored) == {r["publish_id"] for r in [bad, *after]}
    if dialect == "postgresql":
        assert stored[bad["publish_id"]]["exception_message"] == "xy"
    else:  # SQLite takes NUL bytes and any length: nothing refused, nothing repaired
        assert stored[bad["publish_id"]]["exception_message"] == "x\x00y"
        assert len(stored[bad["publish_id"]]["task_name"]) == 1000
    assert writer._breaker_until == 0.0, "a bad row is not an outage"
    assert [q.publish_id for q in quarantined(settings)] == [hopeless["publish_id"]]
    assert _quarantine_count(reader) == 1
    _expect_bad_records(internal_errors)


def test_drain_ships_an_orphan_segment_around_its_bad_record(
    database: tuple[str, str, Engine], tmp_path: Path, internal_errors: list[Any]
) -> None:
    """``audit drain`` on a dead process's segment holding a refused record ships the rest,
    quarantines that one and deletes the segment: the next drain has nothing left to do."""
    _dialect, url, engine = database
    settings = Settings(audit_url=url, spool_dir=str(tmp_path))
    directory = target_dir(settings.spool_dir, url, settings.table_name)
    os.makedirs(directory, mode=0o700)
    good = [_row() for _ in range(5)]
    bad = {"publish_id": uuid.uuid4().hex, "exception_message": "for a row never published"}
    fixable = _row(exception_message="caf\udce9")
    segment = os.path.join(directory, f"deadhost-1-{uuid.uuid4().hex[:8]}{SUFFIX}")
    fd = os.open(segment, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as file:
        for row in [good[0], good[1], bad, fixable, *good[2:]]:
            file.write(encode(row))
    AuditWriter(settings).engine()  # the schema, as the dead process had it
    assert drain_spool(settings) == len(good) + 1
    assert set(_stored(engine, [r["publish_id"] for r in [*good, bad, fixable]])) == {
        r["publish_id"] for r in [*good, fixable]
    }
    assert [q.publish_id for q in quarantined(settings)] == [bad["publish_id"]]
    assert not os.path.exists(segment)
    assert drain_spool(settings) == 0
    _expect_bad_records(internal_errors)
