"""Fast unit tests of the pure functions and the SQLite-backed audit writer (no broker)."""

from __future__ import annotations

import ast
import dataclasses
import datetime as dt
import decimal
import json
import logging
import uuid
from collections import namedtuple
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from billiard.einfo import ExceptionWithTraceback
from kombu import serialization
from sqlalchemy import create_engine, func, select

from otel_celery_publish import _guard, redaction, rows
from otel_celery_publish import headers as hdr
from otel_celery_publish.config import DEFAULT_REDACT_KEYS, Settings
from otel_celery_publish.hooks._celery import messaging_system
from otel_celery_publish.hooks._outcomes import unwrap
from otel_celery_publish.hooks.pending import BoundedStore
from otel_celery_publish.hooks.worker import row_key
from otel_celery_publish.sink.database import make_engine
from otel_celery_publish.sink.writer import AuditWriter
from otel_celery_publish.timing import Waits, queue_waits

KEYS = frozenset({"password", "token"})
TRACEPARENT = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
T0 = 1_700_000_000.0

# -- headers -------------------------------------------------------------------------------


def test_stamp_writes_top_level_and_copies_nested() -> None:
    """stamp() adds ours at the top level and into a copy of the caller's nested headers dict."""
    nested = {"custom": "x"}
    headers: dict[str, Any] = {"id": "t1", "headers": nested}
    hdr.stamp(headers, {hdr.PUBLISH_ID: "p1"})
    assert headers[hdr.PUBLISH_ID] == "p1"
    assert headers["headers"] == {"custom": "x", hdr.PUBLISH_ID: "p1"}
    assert headers["headers"] is not nested
    assert nested == {"custom": "x"}


def test_stamp_replaces_nested_none() -> None:
    """stamp() turns a nested ``headers=None`` into a dict holding ours."""
    headers: dict[str, Any] = {"headers": None}
    hdr.stamp(headers, {hdr.PUBLISH_ID: "p1"})
    assert headers == {hdr.PUBLISH_ID: "p1", "headers": {hdr.PUBLISH_ID: "p1"}}


@pytest.mark.parametrize(
    "source",
    [
        {hdr.PUBLISH_ID: "p1"},
        SimpleNamespace(**{hdr.PUBLISH_ID: "p1", "headers": None}),
        {hdr.PUBLISH_ID: None, "headers": {hdr.PUBLISH_ID: "p1"}},
        SimpleNamespace(headers={hdr.PUBLISH_ID: "p1"}),
    ],
    ids=["mapping", "attributes", "mapping-nested", "attributes-nested"],
)
def test_lookup_finds_header(source: Any) -> None:
    """lookup() reads a mapping or attributes, falling back to the nested headers dict."""
    assert hdr.lookup(source, hdr.PUBLISH_ID) == "p1"


def test_carrier_returns_propagation_fields() -> None:
    """carrier() returns the string propagation fields and nothing else."""
    request = {"traceparent": TRACEPARENT, "tracestate": None, "id": "t1"}
    assert hdr.carrier(request) == {"traceparent": TRACEPARENT}


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("1764590400.5", 1764590400.5),
        (1764590400, 1764590400.0),
        (None, None),
        (True, None),
        ("soon", None),
        (object(), None),
        (0, None),  # the epoch: a 56-year queue wait
        (-1.0, None),
        ("inf", None),
        ("nan", None),
        (1e300, None),
        (10**400, None),
        ("9" * 5000, None),
    ],
)
def test_as_timestamp(value: Any, expected: float | None) -> None:
    """as_timestamp() takes plausible epoch seconds only: forged or broken values are None."""
    assert hdr.as_timestamp(value) == expected


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("0123456789abcdef0123456789abcdef", "0123456789abcdef0123456789abcdef"),
        ("2d7a4c1e-0f0e-4c3a-9a55-3b1c0d8e9f10", "2d7a4c1e-0f0e-4c3a-9a55-3b1c0d8e9f10"),
        ("", None),
        ("a" * 37, None),
        ("'; DROP TABLE x; --", None),
        ("ABCDEF", None),
        (12345, None),
        (None, None),
    ],
)
def test_as_publish_id(value: Any, expected: str | None) -> None:
    """as_publish_id() accepts our id format only."""
    assert hdr.as_publish_id(value) == expected


def test_as_text_bounds_and_strips_nul() -> None:
    """as_text() drops NUL bytes and cuts long values with a visible marker."""
    assert hdr.as_text("a\x00b") == "ab"
    assert hdr.as_text(None) == ""
    cut = hdr.as_text("x" * 10_000)
    assert len(cut) == hdr.MAX_TEXT and cut.endswith(hdr.TRUNCATED)
    assert hdr.as_text("x" * hdr.MAX_TEXT) == "x" * hdr.MAX_TEXT
    assert [len(hdr.as_text("y" * 50, limit)) for limit in (0, 1, 5, 12, 13)] == [0, 1, 5, 12, 13]


# -- timing --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("published", "eta", "received", "started", "expected"),
    [
        (100.0, None, 103.0, 104.0, Waits(100.0, 103.0, 104.0, 0.0)),
        (100.0, 150.0, 151.0, 152.0, Waits(150.0, 151.0, 152.0, 0.0)),
        (100.0, None, 95.0, 97.0, Waits(97.0, 97.0, 97.0, 5.0)),
        (100.0, None, None, 104.0, Waits(100.0, None, 104.0, 0.0)),
        (100.0, None, 106.0, 104.0, Waits(100.0, 104.0, 104.0, 0.0)),
    ],
    ids=["plain", "eta-future", "publisher-ahead", "received-unknown", "received-after-start"],
)
def test_queue_waits(
    published: float, eta: float | None, received: float | None, started: float, expected: Waits
) -> None:
    """queue_waits() waits from max(published, eta), clamps edges and reports publisher skew."""
    waits = queue_waits(published, eta, received, started)
    assert waits == expected
    assert waits.total == expected.started - expected.ready >= 0


# -- audit record --------------------------------------------------------------------------


def test_redact_masks_nested_keys_case_insensitively() -> None:
    """redact() masks matching keys at any depth in dicts, lists and tuples, keeping types."""
    value: dict[str, Any] = {
        "user": "bob",
        "Password": "pw",
        "items": [({"TOKEN": "t", "n": 1},), 2],
    }
    out, hit = redaction.redact(value, KEYS)
    assert hit is True
    assert out == {"user": "bob", "Password": "***", "items": [({"TOKEN": "***", "n": 1},), 2]}
    assert isinstance(out["items"][0], tuple)
    assert value["Password"] == "pw"
    assert value["items"][0][0]["TOKEN"] == "t"


def test_redact_returns_same_object_when_nothing_matches() -> None:
    """redact() returns the very same object, unflagged, when no key matches."""
    value = {"user": "bob", "items": [({"n": 1},)]}
    out, hit = redaction.redact(value, KEYS)
    assert out is value
    assert hit is False


def test_redact_namedtuple() -> None:
    """redact() masks a sensitive key inside a namedtuple argument (returned as a tuple)."""
    pair = namedtuple("pair", "a b")
    out, hit = redaction.redact(pair({"password": "pw"}, 2), KEYS)
    assert hit is True
    assert out == ({"password": "***"}, 2)


def test_redact_args_by_parameter_name() -> None:
    """redact_args() masks positional args whose parameter name is sensitive and recurses."""
    out, hit = redaction.redact_args(["bob", "pw", {"token": "t"}], ["user", "Password"], KEYS)
    assert hit is True
    assert out == ("bob", "***", {"token": "***"})
    args = ("bob", "alice")
    assert redaction.redact_args(args, ["user", "other"], KEYS) == (args, False)


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        (([1], {"a": 2}, {"chord": None}), ([1], {"a": 2}, {"chord": None})),
        ((None, None, None), ((), {}, {})),
        ({"task": "t", "id": "i", "args": [1], "kwargs": {"a": 2}}, ([1], {"a": 2}, {})),
        ("garbage", ((), {}, {})),
    ],
    ids=["protocol2", "protocol2-empty", "protocol1", "unknown"],
)
def test_split_body(body: Any, expected: tuple[Any, Any, Any]) -> None:
    """split_body() extracts (args, kwargs, embed) from protocol 2 tuples and protocol 1 dicts."""
    assert rows.split_body(body) == expected


def test_encode_payload_roundtrips_through_kombu() -> None:
    """encode_payload() produces bytes that kombu's loads() decodes back to the body."""
    body = [[1, "é"], {"a": {"b": [1.5]}}, {}]
    data, content_type, encoding, error = rows.encode_payload(body, "json", 1_000)
    assert error is None
    assert isinstance(data, bytes)
    assert content_type == "application/json"
    assert serialization.loads(data, content_type, encoding) == body  # type: ignore[no-untyped-call]


def test_encode_payload_writes_what_kombu_writes_and_honours_a_replaced_json(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The json payload is kombu's own text, its types included (datetime, UUID, Decimal,
    bytes); a json encoder the application registered instead is the one used."""
    body = [
        [dt.datetime(2030, 1, 2, 3, 4, 5, 6, tzinfo=dt.timezone.utc), uuid.UUID(int=7)],
        {"amount": decimal.Decimal("19.99"), "blob": b"\xff\x00", "name": "é"},
        {},
    ]
    data, *_ = rows.encode_payload(body, "json", 10_000)
    _, _, expected = serialization.dumps(body, serializer="json")  # type: ignore[no-untyped-call]
    assert data == expected.encode()
    custom = serialization.registry._encoders["json"]
    monkeypatch.setitem(
        serialization.registry._encoders, "json", custom._replace(encoder=lambda b: "[42]")
    )
    assert rows.encode_payload(body, "json", 10_000)[0] == b"[42]"


def test_encode_payload_unserializable_returns_error() -> None:
    """encode_payload() reports an unserializable body as an error string instead of raising."""
    data, content_type, _, error = rows.encode_payload([[object()], {}, {}], "json", 1_000)
    assert (data, content_type) == (None, None)
    assert error is not None
    assert "not serializable with 'json'" in error


def test_encode_payload_over_max_bytes_drops_data() -> None:
    """encode_payload() drops data larger than max_bytes but keeps its content type."""
    data, content_type, _, error = rows.encode_payload([["x" * 100], {}, {}], "json", 50)
    assert data is None
    assert content_type == "application/json"
    assert error is not None
    assert "exceeds max_payload_bytes=50" in error


POLICY = rows.RowPolicy(
    redact_keys=KEYS, redact_payload=False, repr_maxsize=1_000, max_payload_bytes=10_000
)


def _row(policy: rows.RowPolicy = POLICY, **overrides: Any) -> rows.PublishRow:
    kwargs: dict[str, Any] = {
        "publish_id": "p1",
        "task_id": "t1",
        "task_name": "tests.login",
        "body": (["bob", "pw"], {"token": "t", "n": 1}, {}),
        "headers": {"id": "t1", "task": "tests.login", "retries": 0},
        "properties": {"delivery_mode": 2, "priority": 3},
        "exchange": SimpleNamespace(name="ex"),
        "routing_key": "q",
        "published_at": T0,
        "serializer": "json",
        "arg_names": ("user", "password"),
        "exclude_headers": (),
        "host": "h",
        "pid": 1,
        "trace_id": None,
        "span_id": None,
    }
    kwargs.update(overrides)
    return rows.publish_row(rows.PublishFacts(**kwargs), policy)


def _payload(row: rows.PublishRow) -> Any:
    return serialization.loads(  # type: ignore[no-untyped-call]
        row["payload"], row["content_type"], row["content_encoding"]
    )


def test_publish_row_redacts_reprs_but_stores_real_payload() -> None:
    """publish_row() masks secrets in the reprs while the payload stays the real body."""
    row = _row()
    assert "pw" not in row["args_repr"]
    assert "***" in row["args_repr"]
    assert "'t'" not in row["kwargs_repr"]
    assert _payload(row) == [["bob", "pw"], {"token": "t", "n": 1}, {}]
    assert row["payload_redacted"] is False
    assert row["error"] is None
    assert row["exchange"] == "ex"
    assert row["published_at"] == dt.datetime.fromtimestamp(T0, dt.timezone.utc)


def test_publish_row_redact_payload_stores_redacted_body() -> None:
    """publish_row() under redact_payload stores the redacted body and flags payload_redacted."""
    row = _row(dataclasses.replace(POLICY, redact_payload=True))
    assert _payload(row) == [["bob", "***"], {"token": "***", "n": 1}, {}]
    assert row["payload_redacted"] is True


def test_publish_row_keeps_only_custom_headers_in_options() -> None:
    """publish_row() keeps user headers in options["headers"], not celery's or excluded ones."""
    headers = {
        "id": "t1",
        "task": "tests.login",
        "root_id": "r",
        "timelimit": (10, 5),
        "traceparent": TRACEPARENT,
        hdr.PUBLISH_ID: "p1",
        "headers": {hdr.PUBLISH_ID: "p1"},
        "tenant": "acme",
        "when": dt.date(2024, 1, 2),
    }
    row = _row(headers=headers, exclude_headers={"traceparent": 1, hdr.PUBLISH_ID: 1})
    options = row["options"]
    assert options["headers"] == {"tenant": "acme", "when": "datetime.date(2024, 1, 2)"}
    assert (options["time_limit"], options["soft_time_limit"]) == (10, 5)
    assert options["delivery_mode"] == 2
    assert "shadow" not in options


def test_publish_row_parses_eta_and_expires() -> None:
    """publish_row() parses ISO eta/expires headers into aware datetimes (naive means UTC)."""
    headers = {"id": "t1", "eta": "2024-01-02T03:04:05", "expires": "2024-01-02T05:04:05+02:00"}
    row = _row(headers=headers)
    utc = dt.datetime(2024, 1, 2, 3, 4, 5, tzinfo=dt.timezone.utc)
    assert row["eta"] == utc
    assert row["eta"].tzinfo is not None
    assert row["expires"] == utc
    assert row["expires"].utcoffset() == dt.timedelta(hours=2)


# -- config --------------------------------------------------------------------------------


def test_from_env_parses_types() -> None:
    """from_env() parses bools, floats, ints and comma-separated lower-cased redact keys."""
    env = {
        "OTEL_CELERY_PUBLISH_USE_LINKS": "Yes",
        "OTEL_CELERY_PUBLISH_CREATE_SCHEMA": "0",
        "OTEL_CELERY_PUBLISH_FLUSH_INTERVAL": "0.25",
        "OTEL_CELERY_PUBLISH_MAX_PENDING": "7",
        "OTEL_CELERY_PUBLISH_REDACT_KEYS": " Password, ssn ,,",
        "UNRELATED": "1",
    }
    settings = Settings.from_env(env)
    assert settings.use_links is True
    assert settings.create_schema is False
    assert settings.flush_interval == 0.25
    assert settings.max_pending == 7
    assert settings.redact_keys == frozenset({"password", "ssn"})
    assert Settings.from_env({}).redact_keys == DEFAULT_REDACT_KEYS


def test_from_env_kwargs_override_env() -> None:
    """from_env() lets non-None kwargs win over the environment."""
    env = {"OTEL_CELERY_PUBLISH_FLUSH_INTERVAL": "3", "OTEL_CELERY_PUBLISH_AUDIT_URL": "sqlite://"}
    settings = Settings.from_env(env, flush_interval=0.05, redact_keys=["API"], audit_url=None)
    assert settings.flush_interval == 0.05
    assert settings.redact_keys == frozenset({"api"})
    assert settings.audit_url == "sqlite://"


def test_from_env_rejects_unknown_durability() -> None:
    """from_env() raises ValueError for a durability other than sync/spool/async."""
    with pytest.raises(ValueError, match="DURABILITY"):
        Settings.from_env({"OTEL_CELERY_PUBLISH_DURABILITY": "fast"})
    assert Settings.from_env({"OTEL_CELERY_PUBLISH_DURABILITY": "spool"}).durability == "spool"


# -- store, celery, worker -----------------------------------------------------------------


def test_bounded_store_evicts_oldest() -> None:
    """BoundedStore.put() beyond capacity evicts the oldest entries through on_evict."""
    evicted: list[tuple[str, int]] = []
    store: BoundedStore[int] = BoundedStore(2, lambda k, v: evicted.append((k, v)))
    for i, key in enumerate("abc"):
        store.put(key, i)
    assert evicted == [("a", 0)]
    assert (len(store), store.get("b"), store.get("c")) == (2, 1, 2)


def test_pop_older_stops_at_first_young_entry() -> None:
    """BoundedStore.pop_older() removes the oldest entries until the first young one."""
    store: BoundedStore[int] = BoundedStore(10)
    for key, age in [("a", 9), ("b", 8), ("c", 1), ("d", 9)]:
        store.put(key, age)
    assert store.pop_older(lambda age: age > 5) == [("a", 9), ("b", 8)]
    assert store.get("d") == 9
    assert len(store) == 2


@pytest.mark.parametrize(
    ("url", "system"),
    [
        ("amqp://guest@localhost//", "rabbitmq"),
        ("pyamqp://localhost", "rabbitmq"),
        ("redis://localhost:6379/0", "redis"),
        ("rediss://localhost:6380/0", "redis"),
        (None, "rabbitmq"),
    ],
)
def test_messaging_system(url: str | None, system: str) -> None:
    """messaging_system() maps the broker URL scheme to the semconv messaging.system."""
    assert messaging_system(url) == system


def test_unwrap_returns_real_exception() -> None:
    """unwrap() unwraps billiard's ExceptionWithTraceback, from the argument or from einfo."""
    exc = ValueError("boom")
    wrapped = ExceptionWithTraceback(exc, None)
    assert unwrap(wrapped, None) is exc
    assert unwrap(None, SimpleNamespace(exception=wrapped)) is exc
    assert unwrap(None, None) is None


def test_row_key_none_without_our_headers() -> None:
    """row_key() returns None unless both publish id and a valid publish time are present."""
    assert row_key({"id": "t1", "task": "x"}) is None
    assert row_key({hdr.PUBLISH_ID: "p1", hdr.PUBLISHED_AT: "bad"}) is None
    key = row_key(
        {"id": "t1", "task": "x", "headers": {hdr.PUBLISH_ID: "abc123", hdr.PUBLISHED_AT: T0}}
    )
    assert row_key({hdr.PUBLISH_ID: "not-ours!", hdr.PUBLISHED_AT: T0}) is None
    assert key == {
        "publish_id": "abc123",
        "task_id": "t1",
        "task_name": "x",
        "published_at": dt.datetime.fromtimestamp(T0, dt.timezone.utc),
    }


# -- audit writer (SQLite) -----------------------------------------------------------------


def _ident(publish_id: str = "p1") -> dict[str, Any]:
    return {
        "publish_id": publish_id,
        "task_id": "t1",
        "task_name": "tests.add",
        "published_at": dt.datetime.fromtimestamp(T0, dt.timezone.utc),
    }


def _event(**columns: Any) -> dict[str, Any]:
    return {**_ident(), **columns}


def _at(seconds: float) -> dt.datetime:
    return dt.datetime.fromtimestamp(T0 + seconds, dt.timezone.utc)


@pytest.fixture
def db_url(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path}/a.db"


def _writer(db_url: str, flush_interval: float = 0.05) -> Iterator[AuditWriter]:
    spool = db_url.removeprefix("sqlite:///") + ".spool"
    writer = AuditWriter(Settings(audit_url=db_url, flush_interval=flush_interval, spool_dir=spool))
    yield writer
    assert writer.close()
    writer.engine().dispose()


@pytest.fixture
def writer(db_url: str) -> Iterator[AuditWriter]:
    yield from _writer(db_url)


@pytest.fixture
def slow_writer(db_url: str) -> Iterator[AuditWriter]:
    """A writer whose timer never fires during a test: batches ship only on flush()."""
    yield from _writer(db_url, flush_interval=3600)


def _rows(url: str, writer: AuditWriter) -> list[dict[str, Any]]:
    engine = create_engine(url)
    try:
        with engine.connect() as conn:
            return [dict(r._mapping) for r in conn.execute(select(writer.table))]
    finally:
        engine.dispose()


def test_record_publish_commits_immediately(writer: AuditWriter, db_url: str) -> None:
    """record_publish() commits the row before returning, visible from another engine."""
    writer.record_publish(_row())
    [stored] = _rows(db_url, writer)
    assert (stored["publish_id"], stored["task_id"], stored["queue"]) == ("p1", "t1", "q")
    assert stored["options"]["delivery_mode"] == 2


def test_event_before_publish_upserts_and_keeps_columns(writer: AuditWriter, db_url: str) -> None:
    """An event for an unknown id creates the row; the later publish keeps the event's columns."""
    writer.record_update(_event(received_at=_at(1), worker="w1"))
    assert writer.flush() is True
    [stored] = _rows(db_url, writer)
    assert (stored["worker"], stored["payload"]) == ("w1", None)

    writer.record_publish(_row())
    [stored] = _rows(db_url, writer)
    assert stored["worker"] == "w1"
    assert stored["received_at"] is not None
    assert stored["routing_key"] == "q"
    assert stored["payload"] is not None


def test_events_for_one_id_merge_in_one_batch(
    slow_writer: AuditWriter, db_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two queued events for one publish_id are merged into a single row of a single batch."""
    batches: list[list[dict[str, Any]]] = []
    ship = slow_writer.db.upsert

    def spy(rows: list[dict[str, Any]]) -> None:
        batches.append(rows)
        ship(rows)

    monkeypatch.setattr(slow_writer.db, "upsert", spy)
    slow_writer.record_update(_event(received_at=_at(1)))
    slow_writer.record_update(_event(started_at=_at(2), worker="w1"))
    assert slow_writer.flush() is True
    assert len(batches) == 1
    assert len(batches[0]) == 1
    assert batches[0][0]["received_at"] == _at(1)  # merged before the batch, not by upsert()
    assert batches[0][0]["started_at"] == _at(2)
    [stored] = _rows(db_url, slow_writer)
    assert stored["received_at"] is not None
    assert stored["started_at"] is not None
    assert stored["worker"] == "w1"


def test_shipping_same_row_twice_stores_once(writer: AuditWriter, db_url: str) -> None:
    """Shipping a row twice (sync and batched) leaves one row: writes are idempotent upserts."""
    row = _row()
    writer.record_publish(row)
    writer.record_publish(row)
    writer.record_update(row)
    assert writer.flush() is True
    engine = create_engine(db_url)
    with engine.connect() as conn:
        assert conn.execute(select(func.count()).select_from(writer.table)).scalar() == 1
    engine.dispose()


def test_make_engine_rejects_unsupported_scheme() -> None:
    """make_engine() refuses databases other than PostgreSQL and SQLite."""
    with pytest.raises(ValueError, match="'mysql'"):
        make_engine("mysql://localhost/db")


_PACKAGE = Path(rows.__file__).parent  # src/otel_celery_publish


def _own_imports(module: str) -> set[str]:
    """The package's modules (not packages) that ``module``'s import statements name."""
    source = _PACKAGE.parent.joinpath(*module.split(".")).with_suffix(".py")
    found: set[str] = set()
    for node in ast.walk(ast.parse(source.read_text())):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            names = [node.module, *(f"{node.module}.{alias.name}" for alias in node.names)]
        else:
            continue
        # Package __init__ files are left out: any import of ours runs the top-level one,
        # which loads the instrumentor for the public API; this pins the modules' own edges.
        found |= {
            name
            for name in names
            if name.startswith("otel_celery_publish.")
            and _PACKAGE.parent.joinpath(*name.split(".")).with_suffix(".py").exists()
        }
    return found


@pytest.mark.parametrize("module", ["database", "shipping", "quarantine"])
def test_what_the_read_side_imports_of_the_sink_never_reaches_the_writer(module: str) -> None:
    """The sink modules audit/ imports reach neither sink.writer (the shipping thread) nor the
    hooks through any chain of their own imports."""
    seen, todo = set(), [f"otel_celery_publish.sink.{module}"]
    while todo:
        for name in _own_imports(todo.pop()) - seen:
            seen.add(name)
            todo.append(name)
    assert "otel_celery_publish.sink.writer" not in seen
    assert not {name for name in seen if name.startswith("otel_celery_publish.hooks")}


# -- guard ---------------------------------------------------------------------------------


def _expected(exc: Exception) -> Exception:
    exc._ocp_expected = True  # type: ignore[attr-defined]
    return exc


@pytest.fixture
def fresh_reports(monkeypatch: pytest.MonkeyPatch) -> dict[Any, float]:
    reports: dict[Any, float] = {}
    monkeypatch.setattr(_guard, "_last_report", reports)
    return reports


def _logged(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "otel_celery_publish"]


def test_guard_swallows_and_reports_once_per_place_and_type(
    fresh_reports: dict[Any, float],
    caplog: pytest.LogCaptureFixture,
    internal_errors: list[tuple[str, BaseException]],
) -> None:
    """guard() swallows exceptions and logs each (where, type) once within REPEAT_AFTER_S."""
    caplog.set_level(logging.ERROR, "otel_celery_publish")
    for where, exc in [
        ("a", ValueError("1")),
        ("a", ValueError("2")),
        ("a", KeyError("3")),
        ("b", ValueError("4")),
    ]:
        with _guard.guard(where):
            raise _expected(exc)
    logged = _logged(caplog)
    assert len(logged) == 3
    assert "ValueError('1')" in logged[0]
    assert "KeyError('3')" in logged[1]
    assert "ValueError('4')" in logged[2]
    assert [w for w, _ in internal_errors] == ["a", "a", "a", "b"]


def test_guard_reports_again_after_repeat_window(
    fresh_reports: dict[Any, float], caplog: pytest.LogCaptureFixture
) -> None:
    """guard() logs the same (where, type) again once REPEAT_AFTER_S has passed."""
    caplog.set_level(logging.ERROR, "otel_celery_publish")
    with _guard.guard("a"):
        raise _expected(ValueError("1"))
    fresh_reports[("a", ValueError)] -= _guard.REPEAT_AFTER_S
    with _guard.guard("a"):
        raise _expected(ValueError("2"))
    assert len(_logged(caplog)) == 2


def test_redact_masks_containers_deeper_than_it_reads() -> None:
    """A secret nested past the depth limit is masked with its container, never passed through."""
    value: Any = {"password": "pw"}
    for _ in range(12):
        value = {"level": value}
    out, hit = redaction.redact(value, KEYS)
    assert hit is True
    assert "pw" not in repr(out)


def test_redacted_protocol1_payload_keeps_its_shape() -> None:
    """With redact_payload, a protocol-1 dict body stays a dict with its other fields."""
    body = {"id": "t1", "task": "x", "args": ["pw"], "kwargs": {"token": "t"}, "eta": None}
    stored, _ = redaction.redact(body["kwargs"], KEYS)
    assert stored == {"token": "***"}
    facts = rows.PublishFacts(
        publish_id="p", task_id="t1", task_name="x", body=body, headers={"id": "t1"}, properties={},
        exchange="", routing_key="q", published_at=0.0, serializer="json",
        arg_names=("password",), exclude_headers=(), host="h", pid=1, trace_id=None, span_id=None,
    )  # fmt: skip
    policy = rows.RowPolicy(
        redact_keys=KEYS, redact_payload=True, repr_maxsize=100, max_payload_bytes=10_000
    )
    row = rows.publish_row(facts, policy)
    decoded = json.loads(row["payload"])
    assert decoded["id"] == "t1"
    assert (decoded["args"], decoded["kwargs"]) == (["***"], {"token": "***"})
