"""Draining spool segments fast: batches read ahead, a publish's later records pulled forward,
COPY straight into the table or through the stage, on real files and PostgreSQL."""

from __future__ import annotations

import datetime
import gc
import os
import pickle
import random
import threading
import zlib
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import Engine

from otel_celery_publish import Settings
from otel_celery_publish.schema.table import audit_table
from otel_celery_publish.sink import records, shipping
from otel_celery_publish.sink.database import COPY_MIN_ROWS, Database
from otel_celery_publish.sink.records import CorruptRecord, check_row, encode, to_ship
from otel_celery_publish.sink.shipping import DRAIN_GC_THRESHOLD, drain_spool
from otel_celery_publish.sink.spool import SUFFIX, target_dir
from tests.test_bad_records import _row as _bare_row

NOW = datetime.datetime(2026, 11, 24, 12, 0, tzinfo=datetime.timezone.utc)


def _row(**columns: Any) -> dict[str, Any]:
    return _bare_row(**{"payload": b"[[1], {}, {}]", "options": {"serializer": "json"}, **columns})


def _sent(row: dict[str, Any], minutes: int = 1) -> dict[str, Any]:
    """The "sent" update of ``row``, as the writer spools it."""
    keys = ("publish_id", "task_id", "task_name", "published_at")
    return {**{k: row[k] for k in keys}, "sent_at": NOW + datetime.timedelta(minutes=minutes)}


def _segment(path: Path, rows: list[dict[str, Any]]) -> int:
    path.write_bytes(b"".join(encode(r) for r in rows))
    return os.open(path, os.O_RDONLY)


def _scan_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == "otel-celery-publish-scan"]


def test_a_publishs_later_records_ship_with_its_row(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A "sent" update spooled a batch after its row is shipped in the row's batch (after the
    row); the offsets still say how far the file was read; nothing is shipped twice."""
    monkeypatch.setattr(records, "BATCH_BYTES", 4096)
    monkeypatch.setattr(records, "READ_CHUNK", 1024)
    rows = [_row() for _ in range(60)]
    spooled = []
    for i in range(0, 60, 10):  # ten rows, then their updates (a few hundred bytes each)
        spooled += [*rows[i : i + 10], *(_sent(r) for r in rows[i : i + 10])]
    spooled += [_sent(r, minutes=2) for r in rows[:3]]  # a second, much later
    fd = _segment(tmp_path / "s.seg", spooled)
    try:
        batches = list(to_ship(fd, 0, os.fstat(fd).st_size))
    finally:
        os.close(fd)
    assert len(batches) > 3
    shipped = [r for batch, _ in batches for r in batch.rows]
    assert len({id(r) for r in shipped}) == len(shipped) == len(spooled), "each record once"
    for row in rows:  # the row first, then its update
        mine = [r for r in shipped if r["publish_id"] == row["publish_id"]]
        assert [len(r) for r in mine] == [len(row), 5, 5][: len(mine)]
    offsets = [offset for _, offset in batches]
    assert offsets == sorted(offsets) and offsets[-1] == os.path.getsize(tmp_path / "s.seg")
    # Most updates (not all: a batch's own later records stay) moved to their row's batch:
    together = sum(
        1
        for batch, _ in batches
        for r in batch.rows
        if len(r) == 5
        and any(x is not r and x["publish_id"] == r["publish_id"] for x in batch.rows)
    )
    assert together >= 30
    assert not _scan_threads()


def test_reading_ahead_stops_with_the_reader(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """When shipping fails half-way, the thread decoding ahead is gone before the caller goes on
    (it never reads a descriptor the caller closes next)."""
    monkeypatch.setattr(records, "BATCH_BYTES", 2048)
    monkeypatch.setattr(records, "READ_CHUNK", 1024)
    started: list[threading.Thread] = []
    monkeypatch.setattr(records.threading.Thread, "start", _recording(started))
    fd = _segment(tmp_path / "s.seg", [_row() for _ in range(200)])

    def ship_failing() -> None:
        for _batch, _offset in to_ship(fd, 0, os.fstat(fd).st_size):
            raise ConnectionError("database down")

    try:
        with pytest.raises(ConnectionError):
            ship_failing()
        assert [t.name for t in started] == ["otel-celery-publish-scan"], "it did read ahead"
        assert not _scan_threads()
    finally:
        os.close(fd)


def _recording(started: list[threading.Thread]) -> Any:
    start = threading.Thread.start

    def record(thread: threading.Thread) -> None:
        started.append(thread)
        start(thread)

    return record


def test_a_known_row_shape_still_has_its_values_checked() -> None:
    """check_row remembers shapes, not rows: a timestamp's zone and the JSON are checked in
    every row; a crafted file of many shapes does not grow what it remembers."""
    check_row(_row())
    with pytest.raises(CorruptRecord, match="column published_at cannot hold a datetime"):
        check_row(_row(published_at=NOW.astimezone(_Zone())))
    with pytest.raises(CorruptRecord, match="column options cannot hold a dict"):
        check_row(_row(options={"x": {1, 2}}))
    for i in range(2 * records._MAX_KNOWN):  # the same columns, in other orders
        items = list(_row().items())
        random.Random(i).shuffle(items)
        check_row(dict(items))
    assert len(records._KNOWN) <= records._MAX_KNOWN


def test_timestamps_are_framed_as_microseconds_and_old_frames_still_read() -> None:
    """A UTC timestamp is pickled as an int of microseconds (cheaper than a datetime) and read
    back exactly, far from the epoch too; a frame of an earlier version (datetimes pickled) or
    a timestamp in another zone reads as it was written; the caller's row is not changed."""
    far = datetime.datetime(2243, 1, 1, 0, 0, 0, 1, tzinfo=datetime.timezone.utc)
    plus_one = datetime.timezone(datetime.timedelta(hours=1))
    row = _row(published_at=far, sent_at=NOW, eta=NOW.astimezone(plus_one))
    before = dict(row)
    frame = encode(row)
    assert row == before
    raw = pickle.loads(frame[records.HEADER.size :])
    assert type(raw["published_at"]) is int and type(raw["sent_at"]) is int
    assert raw["eta"] == row["eta"]  # not UTC: kept a datetime
    assert records.decode(frame, records.load_row).rows == [row]
    data = pickle.dumps(before, protocol=pickle.HIGHEST_PROTOCOL)  # as an earlier version wrote
    old = records.HEADER.pack(len(data), zlib.crc32(data)) + data
    assert records.decode(old, records.load_row).rows == [row]


def test_a_framed_timestamp_is_not_a_row_and_an_absurd_one_is_refused() -> None:
    """Microseconds are the frame's business: check_row (rows in memory) refuses an int in a
    timestamp column; a frame whose microseconds no datetime can hold is refused, not raised,
    and the records after it still read."""
    row = _row()
    with pytest.raises(CorruptRecord, match="column published_at cannot hold a int"):
        check_row({**row, "published_at": 1})
    frames = b""
    for absurd in (10**20, -(10**20), 1 << 20_000):  # the last has more digits than str() writes
        data = pickle.dumps({**row, "published_at": absurd}, protocol=pickle.HIGHEST_PROTOCOL)
        frames += records.HEADER.pack(len(data), zlib.crc32(data)) + data
    decoded = records.decode(frames + encode(row), records.load_row)
    assert decoded.rows == [row]
    assert decoded.refused == ["a timestamp beyond the years a datetime holds"] * 3


class _Zone(datetime.tzinfo):
    def utcoffset(self, dt: datetime.datetime | None) -> datetime.timedelta:
        return datetime.timedelta(hours=1)

    def dst(self, dt: datetime.datetime | None) -> datetime.timedelta:
        return datetime.timedelta(0)


@pytest.fixture
def db(pg_url: str) -> Any:
    table = audit_table()
    database = Database(Settings(audit_url=pg_url), table)
    database.engine()
    yield database
    database.dispose()


def _stored(engine: Engine, rows: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    table = audit_table()
    ids = [r["publish_id"] for r in rows]
    with engine.connect() as conn:
        result = conn.execute(table.select().where(table.c.publish_id.in_(ids)))
        return {r.publish_id: dict(r._mapping) for r in result}


def test_shipping_a_copy_sized_batch_again_stores_it_once(db: Database, pg: Engine) -> None:
    """New rows are COPYed straight in; the same batch shipped again (with its updates merged,
    or alone), and a batch whose ends are new but whose middle is stored, upsert instead."""
    rows = [_row() for _ in range(COPY_MIN_ROWS * 2)]
    db.upsert(rows)
    db.upsert([*rows, *(_sent(r) for r in rows)])
    db.upsert([_sent(r, minutes=2) for r in rows])
    stored = _stored(pg, rows)
    assert len(stored) == len(rows)
    assert {s["sent_at"] for s in stored.values()} == {NOW + datetime.timedelta(minutes=2)}
    assert {s["payload"] for s in stored.values()} == {b"[[1], {}, {}]"}
    assert {repr(s["options"]) for s in stored.values()} == {"{'serializer': 'json'}"}
    fresh = [_row() for _ in range(COPY_MIN_ROWS)]
    # The same columns in the same order: one group, whose COPY meets the stored row.
    mixed = [*fresh[:50], {**rows[7], "task_name": "tests.changed"}, *fresh[50:]]
    db.upsert(mixed)
    stored = _stored(pg, [*rows, *fresh])
    assert len(stored) == len(rows) + len(fresh)
    assert stored[rows[7]["publish_id"]]["task_name"] == "tests.changed"
    assert stored[rows[7]["publish_id"]]["sent_at"] == NOW + datetime.timedelta(minutes=2)


def test_every_group_of_a_batch_commits_together(db: Database, pg: Engine) -> None:
    """Rows and updates of one batch go in one transaction: a refused one rolls all back (the
    caller then isolates it), so nothing is half-shipped."""
    rows = [_row() for _ in range(COPY_MIN_ROWS)]
    updates = [{**_sent(_row()), "exception_message": "x"} for _ in range(COPY_MIN_ROWS)]
    updates[3]["exception_message"] = "nul\x00"
    with pytest.raises(Exception, match=r"0x00"):
        db.upsert([*rows, *updates])
    assert _stored(pg, [*rows, *updates]) == {}


def test_a_copy_stores_every_column_type_as_a_statement_does(db: Database, pg: Engine) -> None:
    """COPY (a batch of COPY_MIN_ROWS or more) sends values as they are and JSON as its text:
    what it stores is exactly what the row-by-row upsert of a small batch stores, microseconds
    and an offset, floats to the last bit, any byte, non-ASCII and escapes, JSON null, nested
    JSON, booleans."""
    plus_five = datetime.timezone(datetime.timedelta(hours=5, minutes=30))

    def typed(options: Any) -> dict[str, Any]:
        return _row(
            task_name="tests.añd ☃",
            published_at=datetime.datetime(2026, 2, 3, 4, 5, 6, 789012, tzinfo=plus_five),
            attempt=2**31 - 1,
            payload=bytes(range(256)),
            payload_redacted=True,
            acks_late=False,
            options=options,
            runtime_s=0.1 + 0.2,
            exception_message="line\nbreak\ttab \\ backslash 'quote' \"dq\" \\N",
        )

    documents = [None, {"headers": {"x": [1, 2.5, None, "ü"]}, "time_limit": None}, [], "s"]
    copied = [typed(documents[i % len(documents)]) for i in range(COPY_MIN_ROWS)]
    one_by_one = [typed(documents[i % len(documents)]) for i in range(len(documents))]
    db.upsert(copied)
    db.upsert(one_by_one)
    stored = _stored(pg, [*copied, *one_by_one])
    for row in [*copied, *one_by_one]:
        assert {k: stored[row["publish_id"]][k] for k in row} == row
    with pg.connect() as conn:
        kinds = conn.exec_driver_sql(
            "SELECT json_typeof(options), count(*) FROM celery_publish_audit "
            "WHERE publish_id = ANY(%(ids)s) GROUP BY 1 ORDER BY 1",
            {"ids": [r["publish_id"] for r in copied]},
        ).all()
    assert kinds == [("array", 25), ("null", 25), ("object", 25), ("string", 25)]


def test_a_drain_defers_young_collections_and_restores_them(
    db: Database, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """While a drain runs, the collector's young passes are rare (its records hold no
    cycles); overlapping drains give the process its own setting back when the last ends."""
    before = gc.get_threshold()
    seen: list[int] = []
    upsert = Database.upsert

    def spying(self: Database, rows: list[dict[str, Any]]) -> None:
        seen.append(gc.get_threshold()[0])
        upsert(self, rows)

    monkeypatch.setattr(Database, "upsert", spying)
    settings = Settings(audit_url=db.settings.audit_url, spool_dir=str(tmp_path))
    directory = Path(target_dir(settings.spool_dir, settings.audit_url, settings.table_name))
    directory.mkdir(parents=True, mode=0o700)
    os.chmod(tmp_path, 0o700)
    os.close(_segment(directory / f"dead-1{SUFFIX}", [_row()]))
    assert drain_spool(settings) == 1
    assert seen == [max(before[0], DRAIN_GC_THRESHOLD)]
    assert gc.get_threshold() == before
    first, second = shipping._fewer_collections(), shipping._fewer_collections()
    first.__enter__()
    second.__enter__()
    first.__exit__(None, None, None)
    assert gc.get_threshold()[0] == max(before[0], DRAIN_GC_THRESHOLD)
    second.__exit__(None, None, None)
    assert gc.get_threshold() == before
