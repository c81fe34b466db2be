"""Promises of README.md and docs/RELIABILITY.md that no other test pinned: one test each.

Each docstring names the promise. A test that fails here means the code does not do what the
documentation says (or the documentation must change): see the report that introduced this file.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
import logging
import os
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import kombu.exceptions
import psycopg
import pytest
import redis
from celery import Celery
from opentelemetry import trace
from opentelemetry.instrumentation.utils import is_instrumentation_enabled
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.trace import SpanKind, StatusCode, TraceState, format_span_id, format_trace_id
from sqlalchemy import create_engine, inspect, text

from otel_celery_publish import CeleryPublishInstrumentor, audit, rows
from otel_celery_publish import headers as hdr
from otel_celery_publish import instrumentor as instrumentor_mod
from otel_celery_publish.config import Settings, default_spool_dir
from otel_celery_publish.hooks import publish as publish_mod
from otel_celery_publish.schema.table import audit_table
from otel_celery_publish.sink import writer as writer_mod
from otel_celery_publish.sink.database import Database
from otel_celery_publish.sink.records import encode
from otel_celery_publish.sink.spool import SUFFIX, target_dir
from otel_celery_publish.sink.writer import AuditWriter
from tests.app import add, app, fail, ignored, login
from tests.audit_support import ago, beat, cli, database, row, seed, stored, validated
from tests.conftest import BIN, BROKER, ROOT, Publisher, audit_rows, wait_row
from tests.otlp_receiver import Receiver, Span, wait_for

INTERNAL, CONSUMER = 1, 5  # span kinds on the OTLP wire


@pytest.fixture
def drain_queue(queue_name: str) -> Iterator[redis.Redis]:
    """The test's queue in Redis, deleted afterwards (nobody consumes it here)."""
    client = redis.Redis.from_url(BROKER)
    yield client
    client.delete(queue_name)


def _producer(publisher: Publisher, task_id: str) -> Any:
    [span] = [
        s
        for s in publisher.exporter.get_finished_spans()
        if s.kind is SpanKind.PRODUCER and s.attributes.get("messaging.message.id") == task_id
    ]
    return span


def _sums(reader: InMemoryMetricReader) -> dict[str, float]:
    data = reader.get_metrics_data()
    if data is None:
        return {}
    return {
        m.name: sum(p.value for p in m.data.data_points)
        for rm in data.resource_metrics
        for sm in rm.scope_metrics
        for m in sm.metrics
    }


def _segments(directory: str) -> list[str]:
    return sorted(n for n in os.listdir(directory) if n.endswith(SUFFIX))


def _ident(publish_id: str) -> dict[str, Any]:
    now = dt.datetime.now(dt.timezone.utc)
    return {"publish_id": publish_id, "task_id": publish_id, "task_name": "t", "published_at": now}


def _count(url: str, table: str = "celery_publish_audit") -> int:
    engine = create_engine(url)
    try:
        if not inspect(engine).has_table(table):
            return 0
        with engine.connect() as conn:
            return int(conn.execute(text(f"SELECT count(*) FROM {table}")).scalar_one())
    finally:
        engine.dispose()


# -- publish side: message headers, producer span, row ---------------------------------------


def test_message_carries_our_headers_at_both_levels(
    publisher: Publisher, queue_name: str, drain_queue: redis.Redis
) -> None:
    """The message on the broker carries traceparent/tracestate, otel_celery_publish_id,
    otel_celery_publish_published_at and otel_celery_publish_eta, top level and in
    headers["headers"]."""
    parent = trace.NonRecordingSpan(
        trace.SpanContext(
            0x0AF7651916CD43DD8448EB211C80319C,
            0xB7AD6B7169203331,
            is_remote=True,
            trace_flags=trace.TraceFlags(1),
            trace_state=TraceState([("vendor", "v1")]),
        )
    )
    with trace.use_span(parent):
        result = add.apply_async((1, 2), queue=queue_name, countdown=60)
    [raw] = drain_queue.lrange(queue_name, 0, -1)
    headers = json.loads(raw)["headers"]
    [row_] = audit_rows_by(publisher, result.id)
    producer = _producer(publisher, result.id)
    traceparent = (
        f"00-{format_trace_id(producer.context.trace_id)}-"
        f"{format_span_id(producer.context.span_id)}-01"
    )
    for level in (headers, headers["headers"]):
        assert level["traceparent"] == traceparent
        assert level["tracestate"] == "vendor=v1"
        assert level[hdr.PUBLISH_ID] == row_["publish_id"]
        assert abs(level[hdr.PUBLISHED_AT] - row_["published_at"].timestamp()) < 1e-3
        assert abs(level[hdr.ETA] - row_["eta"].timestamp()) < 1e-3


def audit_rows_by(publisher: Publisher, task_id: str) -> list[dict[str, Any]]:
    """The rows of ``task_id`` in the publisher's audit database."""
    return audit_rows(publisher.instrumentor.writer.engine(), task_id)


def test_producer_parent_is_whatever_was_current(publisher: Publisher, queue_name: str) -> None:
    """send {task}: "Parent: whatever was current (a web request, or the task that published
    it)"."""
    tracer = publisher.instrumentor._tracer_provider.get_tracer("web")
    with tracer.start_as_current_span("GET /checkout", kind=SpanKind.SERVER) as request_span:
        result = add.apply_async((1, 2), queue=queue_name)
    producer = _producer(publisher, result.id)
    assert producer.parent is not None
    assert producer.parent.span_id == request_span.get_span_context().span_id
    assert producer.context.trace_id == request_span.get_span_context().trace_id
    app.connection_for_write().default_channel.client.delete(queue_name)


def test_producer_span_attributes_follow_the_documented_names(
    publisher: Publisher, queue_name: str, drain_queue: redis.Redis
) -> None:
    """The producer span carries messaging.operation.type/.name=send, messaging.system (the
    broker), messaging.destination.name, messaging.message.id, conversation_id (only when the
    root differs), celery.task.name/.retries/.eta/.countdown_s and celery.audit.publish_id."""
    root = str(uuid.uuid4())
    result = add.apply_async(
        (1, 2), queue=queue_name, countdown=30, retries=2, root_id=root, parent_id=root
    )
    plain = add.apply_async((1, 2), queue=queue_name)
    [row_] = audit_rows_by(publisher, result.id)
    span = _producer(publisher, result.id)
    attrs = dict(span.attributes)
    assert (span.name, span.kind) == ("send tests.add", SpanKind.PRODUCER)
    assert attrs["messaging.operation.type"] == attrs["messaging.operation.name"] == "send"
    assert attrs["messaging.system"] == "redis"
    assert attrs["messaging.destination.name"] == queue_name
    assert attrs["messaging.message.id"] == result.id
    assert attrs["messaging.message.conversation_id"] == root
    assert (attrs["celery.task.name"], attrs["celery.task.retries"]) == ("tests.add", 2)
    assert attrs["celery.task.eta"] == row_["eta"].isoformat()
    assert 29 < attrs["celery.task.countdown_s"] <= 30
    assert attrs["celery.audit.publish_id"] == row_["publish_id"]
    assert row_["attempt"] == 2
    plain_attrs = dict(_producer(publisher, plain.id).attributes)
    assert "messaging.message.conversation_id" not in plain_attrs
    assert "celery.task.countdown_s" not in plain_attrs


def test_row_holds_workflow_ids_expiry_and_options(
    publisher: Publisher, queue_name: str, drain_queue: redis.Redis
) -> None:
    """The row holds root_id, parent_id, group_id, exchange, routing_key, expires and options
    (custom headers, time limits, shadow, ignore_result, serializer)."""
    root, parent, group = (str(uuid.uuid4()) for _ in range(3))
    expires = dt.datetime.now(dt.timezone.utc) + dt.timedelta(hours=1)
    result = add.apply_async(
        (1, 2), queue=queue_name, root_id=root, parent_id=parent, group_id=group,
        expires=expires, time_limit=30, soft_time_limit=20, shadow="tests.add[shadow]",
        ignore_result=True, headers={"tenant": "acme"},
    )  # fmt: skip
    [row_] = audit_rows_by(publisher, result.id)
    assert (row_["root_id"], row_["parent_id"], row_["group_id"]) == (root, parent, group)
    assert (row_["queue"], row_["routing_key"], row_["exchange"]) == (queue_name, queue_name, "")
    assert abs((row_["expires"] - expires).total_seconds()) < 1e-3
    assert row_["options"] == {
        "serializer": "json",
        "shadow": "tests.add[shadow]",
        "time_limit": 30,
        "soft_time_limit": 20,
        "ignore_result": True,
        "headers": {"tenant": "acme"},
    }


def test_sent_at_is_batched_never_a_second_synchronous_round_trip(
    pg_url: str, pg: Any, queue_name: str, drain_queue: redis.Redis
) -> None:
    """Lifecycle updates are batched by the background thread: in sync mode apply_async
    commits the row, and sent_at arrives only with the next batch."""
    instrumentor = CeleryPublishInstrumentor()
    instrumentor.instrument(tracer_provider=TracerProvider(), audit_url=pg_url, flush_interval=3600)
    try:
        assert instrumentor.writer.flush(10)  # the thread's first round is over: it now sleeps
        task_id = add.apply_async((1, 2), queue=queue_name).id
        [committed] = audit_rows(pg, task_id)
        assert committed["payload"] is not None and committed["sent_at"] is None
        assert instrumentor.writer.flush(10)
        [batched] = audit_rows(pg, task_id)
        assert batched["sent_at"] is not None
    finally:
        instrumentor.uninstrument()


def _run_eagerly() -> list[Any]:
    """One ``.apply()`` and one ``apply_async`` under ``task_always_eager``: their results."""
    applied = add.apply((1, 2))
    app.conf.task_always_eager = True
    try:
        eager = add.apply_async((3, 4))
    finally:
        app.conf.task_always_eager = False
    assert (applied.get(), eager.get()) == (3, 7)
    return [applied, eager]


def test_eager_tasks_leave_no_row(publisher: Publisher, pg: Any) -> None:
    """Eager tasks (task_always_eager, .apply()) are never published: no row."""
    results = _run_eagerly()
    assert publisher.instrumentor.writer.flush(10)
    assert [audit_rows(pg, r.id) for r in results] == [[], []]
    assert not [s for s in publisher.exporter.get_finished_spans() if s.kind is SpanKind.PRODUCER]


def test_eager_tasks_leave_no_span(publisher: Publisher) -> None:
    """Eager tasks (task_always_eager, .apply()) are never published: "no span"."""
    _run_eagerly()
    spans = [(s.name, s.kind.name) for s in publisher.exporter.get_finished_spans()]
    assert spans == [], "an eager run must leave no span"


def test_a_publish_the_broker_refused_leaves_its_row_not_sent(
    publisher: Publisher, pg: Any
) -> None:
    """A publish that raised (broker down) leaves its row with sent_at NULL; the host's
    exception reaches the caller."""
    down = Celery("ocp_broker_down", broker="redis://127.0.0.1:1/0", set_as_current=False)
    down.conf.broker_connection_retry = False
    task_id = f"broker-down-{uuid.uuid4()}"
    try:
        with pytest.raises(kombu.exceptions.OperationalError) as raised:
            down.send_task("tests.add", args=(1, 2), task_id=task_id, retry=False)
    finally:
        down.close()
    assert "Connection refused" in str(raised.value) or "Error 111" in str(raised.value)
    assert publisher.instrumentor.writer.flush(10)
    [row_] = audit_rows(pg, task_id)
    assert row_["payload"] is not None and row_["sent_at"] is None


def test_the_span_of_a_publish_that_raised_is_ended_as_an_error_by_a_later_publish(
    publisher: Publisher, monkeypatch: pytest.MonkeyPatch
) -> None:
    """after_task_publish never comes for a publish that raised: its producer span (whose
    traceparent may be in a message) is ended as an error by a later publish's sweep, once it
    has waited ABANDONED_AFTER_S, not left open."""
    monkeypatch.setattr(publish_mod, "ABANDONED_AFTER_S", 0.0)
    monkeypatch.setattr(publish_mod, "SWEEP_EVERY_S", 0.0)
    down = Celery("ocp_broker_down_sweep", broker="redis://127.0.0.1:1/0", set_as_current=False)
    down.conf.broker_connection_retry = False
    first, second = (f"sweep-{uuid.uuid4()}" for _ in range(2))
    try:
        for task_id in (first, second):
            with pytest.raises(kombu.exceptions.OperationalError):
                down.send_task("tests.add", args=(1, 2), task_id=task_id, retry=False)
    finally:
        down.close()
    ended = {s.attributes["messaging.message.id"]: s for s in publisher.spans("send tests.add")}
    assert set(ended) & {first, second} == {first}, "only the earlier span is swept"
    assert ended[first].status.status_code is StatusCode.ERROR
    assert ended[first].status.description == "publish did not complete"


def test_official_instrumentation_is_kept_off_with_one_warning(
    pg_url: str, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """With opentelemetry-instrumentation-celery installed, instrumenting logs one warning
    that it is kept off, however often we are instrumented."""
    from opentelemetry.instrumentation.celery import CeleryInstrumentor  # noqa: PLC0415

    monkeypatch.setattr(instrumentor_mod, "_said_official", False)
    monkeypatch.delenv("OTEL_PYTHON_DISABLED_INSTRUMENTATIONS", raising=False)
    caplog.set_level(logging.WARNING, "otel_celery_publish")
    ours = CeleryPublishInstrumentor()
    for _ in range(2):
        ours.instrument(tracer_provider=TracerProvider(), audit_url=pg_url)
        try:
            assert CeleryInstrumentor().is_instrumented_by_opentelemetry  # its instrument(): no-op
        finally:
            ours.uninstrument()
    warnings = [r for r in caplog.records if "kept off" in r.getMessage()]
    assert len(warnings) == 1, [r.getMessage() for r in caplog.records]


def test_our_database_calls_run_with_instrumentation_suppressed(
    publisher: Publisher, queue_name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Our own database calls (the sync row and the batches) run under
    suppress_instrumentation(): a DB instrumentation would record no span for them."""
    seen: list[bool] = []
    for name in ("execute", "executemany"):
        original = getattr(psycopg.Cursor, name)

        def spy(self: Any, *args: Any, _original: Any = original, **kwargs: Any) -> Any:
            seen.append(is_instrumentation_enabled())
            return _original(self, *args, **kwargs)

        monkeypatch.setattr(psycopg.Cursor, name, spy)
    add.apply_async((1, 2), queue=queue_name)  # the sync row, through the raw connection
    assert publisher.instrumentor.writer.flush(10)  # sent_at, through the pooled engine
    monkeypatch.undo()
    assert len(seen) >= 2 and not any(seen), seen
    app.connection_for_write().default_channel.client.delete(queue_name)


def test_packaging_registers_the_entry_points_and_pulls_the_sdk_setup() -> None:
    """The package registers the celery_publish entry point for opentelemetry-instrument and
    the audit command for celery, and depends on opentelemetry-distro and the OTLP exporter;
    the [postgresql] extra brings psycopg 3, the [sentry] extra sentry-sdk."""
    from importlib import metadata  # noqa: PLC0415

    instrumentors = metadata.entry_points(group="opentelemetry_instrumentor")
    [ours] = [e for e in instrumentors if e.name == "celery_publish"]
    assert ours.load() is CeleryPublishInstrumentor
    [command] = [e for e in metadata.entry_points(group="celery.commands") if e.name == "audit"]
    assert command.value == "otel_celery_publish.cli:audit"
    requires = metadata.requires("otel-celery-publish") or []
    names = {r.split(";")[0].split(">")[0].split("~")[0].split("[")[0] for r in requires}
    assert {"opentelemetry-distro", "opentelemetry-exporter-otlp"} <= names
    assert any(r.startswith("psycopg") and "extra == 'postgresql'" in r for r in requires)
    sentry = [r for r in requires if r.startswith("sentry-sdk")]
    assert sentry and all("extra ==" in r for r in sentry), "sentry-sdk is an extra, not required"


# -- configuration ---------------------------------------------------------------------------

DOCUMENTED_DEFAULTS = [
    ("audit_url", "sqlite:///celery_audit.db"),
    ("durability", "sync"),
    ("spool_fsync", False),
    ("spool_max_bytes", 1073741824),
    ("db_timeout", 2.0),
    ("use_links", False),
    ("queue_wait_children", False),
    (
        "redact_keys",
        frozenset(
            [
                "password",
                "passwd",
                "passphrase",
                "secret",
                "token",
                "api_key",
                "apikey",
                "authorization",
                "cookie",
                "session_id",
                "private_key",
                "credit_card",
                "card_number",
                "cardnumber",
                "cvv",
                "cvc",
                "pan",
                "ssn",
                "social_security",
                "iban",
                "account_number",
                "routing_number",
                "pin",
            ]
        ),
    ),
    ("redact_payload", False),
    ("create_schema", True),
    ("table_name", "celery_publish_audit"),
    ("flush_interval", 1.0),
    ("max_pending", 10000),
    ("repr_maxsize", 4096),
    ("max_payload_bytes", 1048576),
    ("heartbeat_interval", 30.0),
    ("trace_url", ""),
    ("autoreplay", ()),
    ("autoreplay_min_age", 600.0),
    ("autoreplay_max", 3),
    ("autoreplay_rate", 10.0),
]


@pytest.mark.parametrize(("name", "default"), DOCUMENTED_DEFAULTS)
def test_documented_default(name: str, default: Any) -> None:
    """Each default in README's configuration table is what an empty environment gives."""
    assert getattr(Settings.from_env({}), name) == default
    assert {f.name for f in dataclasses.fields(Settings)} == {
        *(n for n, _ in DOCUMENTED_DEFAULTS),
        "spool_dir",
    }, "a setting the README table does not document"


def test_default_spool_dir(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """SPOOL_DIR defaults to $XDG_STATE_HOME/otel-celery-publish/spool, ~/.local/state/... without
    it, and the temp dir when the home is not writable."""
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "state"))
    assert default_spool_dir() == str(tmp_path / "state" / "otel-celery-publish" / "spool")
    assert Settings.from_env({}).spool_dir == default_spool_dir()
    monkeypatch.delenv("XDG_STATE_HOME")
    assert default_spool_dir() == str(
        tmp_path / ".local" / "state" / "otel-celery-publish" / "spool"
    )
    monkeypatch.setenv("HOME", str(tmp_path / "no-such-home"))
    assert default_spool_dir() == os.path.join(
        tempfile.gettempdir(), f"otel-celery-publish-{os.getuid()}", "spool"
    )


def test_sqlite_audit_database_is_in_wal_mode(tmp_path: Path) -> None:
    """AUDIT_URL sqlite: "WAL mode is turned on"."""
    url = f"sqlite:///{tmp_path}/audit.db"
    writer = AuditWriter(Settings(audit_url=url, spool_dir=str(tmp_path / "spool")))
    try:
        writer.record_publish(_ident("wal-1"))
    finally:
        assert writer.close()
    engine = create_engine(url)
    try:
        with engine.connect() as conn:
            assert conn.execute(text("PRAGMA journal_mode")).scalar_one() == "wal"
    finally:
        engine.dispose()


def test_create_schema_false_never_creates_the_table(tmp_path: Path) -> None:
    """CREATE_SCHEMA=false: the table is not created on first use (true: it is)."""
    for create, expected in ((False, False), (True, True)):
        url = f"sqlite:///{tmp_path}/create-{create}.db"
        settings = Settings(audit_url=url, create_schema=create, spool_dir=str(tmp_path))
        db = Database(settings, audit_table(settings.table_name))
        try:
            assert inspect(db.engine()).has_table("celery_publish_audit") is expected
        finally:
            db.dispose()


REPR_ROW: dict[str, Any] = {
    "publish_id": "p", "task_id": "t", "task_name": "tests.login", "properties": {},
    "exchange": "", "routing_key": "q", "published_at": 1_700_000_000.0, "serializer": "json",
    "arg_names": ("user", "password"),
    "exclude_headers": (), "host": "h", "pid": 1, "trace_id": None, "span_id": None,
    "headers": {"id": "t", "argsrepr": "('celery-made',)", "kwargsrepr": "{'k': 1}"},
}  # fmt: skip
REPR_POLICY = rows.RowPolicy(
    redact_keys=frozenset({"password"}), redact_payload=False, repr_maxsize=40,
    max_payload_bytes=10_000,
)  # fmt: skip


def _repr_row(body: Any) -> rows.PublishRow:
    return rows.publish_row(rows.PublishFacts(body=body, **REPR_ROW), REPR_POLICY)


def test_celerys_argsrepr_is_reused_when_nothing_is_masked() -> None:
    """REPR_MAXSIZE row of the table: "when nothing is masked, Celery's own argsrepr header is
    reused" (and ours is built when something is)."""
    plain = _repr_row((["bob"], {"k": 1}, {}))
    assert (plain["args_repr"], plain["kwargs_repr"]) == ("('celery-made',)", "{'k': 1}")
    masked = _repr_row((["bob", "pw"], {}, {}))
    assert masked["args_repr"] == "('bob', '***')"


def test_repr_maxsize_bounds_the_reprs_we_build() -> None:
    """REPR_MAXSIZE is the "length bound of args_repr / kwargs_repr when we build them"."""
    long_kwargs = {"password": "x", "note": "y" * 500}
    built = _repr_row(([], long_kwargs, {}))
    assert "***" in built["kwargs_repr"]
    assert len(built["kwargs_repr"]) <= REPR_POLICY.repr_maxsize, built["kwargs_repr"]


def test_max_payload_bytes_zero_never_stores_a_payload(
    publisher: Publisher, pg_url: str, pg: Any, queue_name: str, drain_queue: redis.Redis
) -> None:
    """MAX_PAYLOAD_BYTES=0: never store a payload (reprs only, the row's error says why); the
    publish is unaffected."""
    publisher.instrumentor.uninstrument()
    publisher.instrumentor.instrument(
        tracer_provider=TracerProvider(), audit_url=pg_url, max_payload_bytes=0
    )
    result = add.apply_async((1, 2), queue=queue_name)
    [row_] = audit_rows(pg, result.id)
    assert row_["payload"] is None and "max_payload_bytes=0" in row_["error"]
    assert row_["args_repr"] == "(1, 2)"
    assert drain_queue.llen(queue_name) == 1


def test_header_names_with_dashes_match_redact_keys() -> None:
    """Sensitive keys are matched in names with "-" read as "_": an X-Api-Key header is masked
    by the default api_key, and the row says headers_redacted."""
    headers = {"id": "t", "X-Api-Key": "k3y", "Auth-Token": {"v": 1}, "tenant": "acme"}
    found, hit = rows.custom_headers(headers, (), Settings().redact_keys)
    assert found == {"X-Api-Key": "***", "Auth-Token": "***", "tenant": "acme"}
    assert hit is True


# -- the spool -------------------------------------------------------------------------------


def test_spool_segment_path_and_lock(tmp_path: Path) -> None:
    """The spool is <SPOOL_DIR>/<hash of the database URL and table>/<host>-<pid>-<random>.seg,
    one file per process, locked (flock) by its owner while it lives."""
    import fcntl  # noqa: PLC0415
    import socket  # noqa: PLC0415

    url = f"sqlite:///{tmp_path}/a.db"
    settings = Settings(audit_url=url, durability="spool", spool_dir=str(tmp_path / "spool"))
    writer = AuditWriter(settings)
    try:
        for i in range(3):
            writer.record_publish(_ident(f"seg-{i}"))
        directory = target_dir(str(tmp_path / "spool"), url, "celery_publish_audit")
        assert writer.spool_dir == directory
        assert os.path.dirname(directory) == str(tmp_path / "spool")
        [name] = _segments(directory)
        host, pid, rest = name.rsplit("-", 2)
        assert (host, pid) == (socket.gethostname(), str(os.getpid()))
        assert rest.endswith(SUFFIX) and len(rest) > len(SUFFIX)
        fd = os.open(os.path.join(directory, name), os.O_RDONLY)
        try:
            with pytest.raises(BlockingIOError):
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        finally:
            os.close(fd)
    finally:
        assert writer.close()


def test_spool_fsync_syncs_every_record(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """SPOOL_FSYNC=true fsyncs every spool record; false never does."""
    from otel_celery_publish.sink import spool as spool_mod  # noqa: PLC0415

    synced: list[int] = []
    real = os.fsync
    monkeypatch.setattr(spool_mod.os, "fsync", lambda fd: (synced.append(fd), real(fd))[1])
    for fsync, expected in ((True, 5), (False, 0)):
        synced.clear()
        settings = Settings(
            audit_url=f"sqlite:///{tmp_path}/f{fsync}.db",
            durability="spool",
            spool_fsync=fsync,
            flush_interval=3600,
            spool_dir=str(tmp_path / f"spool-{fsync}"),
        )
        writer = AuditWriter(settings)
        try:
            assert writer.flush(10)
            synced.clear()
            for i in range(5):
                writer.record_publish(_ident(f"fsync-{fsync}-{i}"))
            assert len(synced) == expected
        finally:
            assert writer.close()


def test_spool_mode_worker_updates_go_through_the_spool_but_sent_at_does_not(
    tmp_path: Path,
) -> None:
    """In spool mode the worker's updates go through the spool too; the publisher's sent_at
    is always batched from memory."""
    settings = Settings(
        audit_url=f"sqlite:///{tmp_path}/a.db",
        durability="spool",
        flush_interval=3600,
        spool_dir=str(tmp_path / "spool"),
    )
    writer = AuditWriter(settings)
    try:
        assert writer.flush(10)
        writer.record_update({**_ident("w1"), "received_at": dt.datetime.now(dt.timezone.utc)})
        size = writer._spool.size
        assert size > 0, "a worker update is in the spool file"
        writer.record_update(
            {**_ident("w1"), "sent_at": dt.datetime.now(dt.timezone.utc)}, best_effort=True
        )
        assert writer._spool.size == size, "sent_at never touches the spool"
        assert writer.flush(10)
    finally:
        assert writer.close()
    [stored_] = _rows(f"sqlite:///{tmp_path}/a.db")
    assert stored_["received_at"] is not None and stored_["sent_at"] is not None


def _rows(url: str) -> list[dict[str, Any]]:
    engine = create_engine(url)
    try:
        with engine.connect() as conn:
            return [
                dict(r._mapping) for r in conn.execute(text("SELECT * FROM celery_publish_audit"))
            ]
    finally:
        engine.dispose()


def test_full_spool_then_full_memory_drops_the_oldest_loudly(
    tmp_path: Path, internal_errors: list[Any]
) -> None:
    """Beyond SPOOL_MAX_BYTES records are kept in memory up to MAX_PENDING, then the oldest are
    dropped; each step is reported and counted (celery.audit.spool.overflow, .dropped)."""
    reader = InMemoryMetricReader()
    url = f"sqlite:///{tmp_path}/a.db"
    settings = Settings(
        audit_url=url,
        durability="spool",
        spool_max_bytes=300,
        max_pending=3,
        flush_interval=3600,
        spool_dir=str(tmp_path / "spool"),
    )
    writer = AuditWriter(settings, MeterProvider(metric_readers=[reader]).get_meter("t"))
    try:
        assert writer.flush(10)
        ids = [f"drop-{i:02d}" for i in range(10)]
        for publish_id in ids:
            writer.record_publish(_ident(publish_id))
        spooled = [r for r in ids if r not in _queued(writer)]
        assert spooled and spooled == ids[: len(spooled)], "the first ones fit in the spool"
        writer.flush(10)
        sums = _sums(reader)
    finally:
        writer.close()
    wheres = [where for where, _ in internal_errors]
    for _where, exc in internal_errors:
        exc._ocp_expected = True
    kept = {r["publish_id"] for r in _rows(url)}
    in_memory = [r for r in ids if r not in spooled]
    assert kept == {*spooled, *in_memory[-3:]}, "the newest MAX_PENDING stay, the oldest go"
    assert sums["celery.audit.spool.overflow"] >= len(in_memory)
    assert sums["celery.audit.dropped"] == len(in_memory) - 3
    assert "audit spool (record kept in memory)" in wheres and "audit queue full" in wheres


def _queued(writer: AuditWriter) -> list[str]:
    """publish ids waiting in the writer's memory queue (peeked, not taken)."""
    items: list[Any] = []
    while True:
        try:
            items.append(writer._queue.get_nowait())
        except Exception:
            break
    for item in items:
        writer._queue.put(item)
    return [i["publish_id"] for i in items if isinstance(i, dict)]


def test_orphan_segments_are_adopted_every_minute(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A segment nobody holds is shipped and deleted by any process starting on the directory
    "and every minute after" (ADOPT_EVERY_S; shortened here to see two rounds)."""
    assert writer_mod.ADOPT_EVERY_S == 60.0
    monkeypatch.setattr(writer_mod, "ADOPT_EVERY_S", 0.2)
    url = f"sqlite:///{tmp_path}/a.db"
    settings = Settings(audit_url=url, flush_interval=0.05, spool_dir=str(tmp_path / "spool"))
    writer = AuditWriter(settings)
    try:
        writer.start()
        assert writer.flush(10)  # the start-up adoption is behind us
        directory = writer.spool_dir
        os.makedirs(directory, mode=0o700, exist_ok=True)
        orphan = os.path.join(directory, f"deadhost-1-{uuid.uuid4().hex[:8]}{SUFFIX}")
        fd = os.open(orphan, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        os.write(fd, encode(_ident("orphan-1")) + encode(_ident("orphan-2")))
        os.close(fd)
        wait_for(lambda: not os.path.exists(orphan), 10, "the orphan adopted by a later round")
    finally:
        assert writer.close()
    assert {r["publish_id"] for r in _rows(url)} == {"orphan-1", "orphan-2"}


# -- replay ----------------------------------------------------------------------------------


def test_two_operators_replaying_at_once_send_it_once(
    tmp_path: Path, pg_url: str, queue_name: str, drain_queue: redis.Redis
) -> None:
    """replay claims each original first: two operators replaying the same task at once send
    it once: both plan it, the first send claims it, the second is refused."""
    settings = database("postgresql", tmp_path, pg_url)
    lost = row(sent_at=ago(20), queue=queue_name)
    seed(settings, lost)
    policy = audit.Policy(queue=queue_name)
    first = audit.plan_replay(app, [lost["task_id"]], policy=policy, settings=settings)
    second = audit.plan_replay(app, [lost["task_id"]], policy=policy, settings=settings)
    assert first[0].refused is None and second[0].refused is None, "both planned it"
    sent = audit.send_replay(app, first, settings=settings)
    late = audit.send_replay(app, second, settings=settings)
    assert [r.status for r in sent.results] == ["sent"]
    assert [(r.status, r.reason) for r in late.results] == [
        ("refused", "it was replayed by someone else just now")
    ]
    assert len(stored(settings, replay_of=lost["publish_id"])) == 1
    assert drain_queue.llen(queue_name) == 1


def test_replay_lost_resends_only_what_lost_reports(sqlite_settings: Any) -> None:
    """replay --lost re-sends only what lost reports: not a task running on a live worker
    (it may still finish), nor a finished one."""
    settings = sqlite_settings
    beat(settings, "alive")
    lost = row(sent_at=ago(20))
    seed(
        settings,
        lost,
        row(sent_at=ago(21), received_at=ago(21), started_at=ago(20), worker_instance="alive",
            acks_late=False),
        row(sent_at=ago(21), received_at=ago(21), started_at=ago(21), finished_at=ago(20),
            outcome="succeeded"),
    )  # fmt: skip
    result = cli("replay", "--lost", "--older-than", "0s", "--dry-run", "--json", settings=settings)
    assert result.exit_code == 0, result.output
    data = validated("replay", result.stdout)
    assert [(r["task_id"], r["status"]) for r in data["results"]] == [
        (lost["task_id"], "would_send")
    ]


@pytest.fixture
def sqlite_settings(tmp_path: Path, pg_url: str) -> Any:
    return database("sqlite", tmp_path, pg_url)


# -- processes: exit and worker --------------------------------------------------------------


def test_a_publisher_ships_its_batched_rows_at_exit(
    pg_url: str, pg: Any, queue_name: str, tmp_path: Path, drain_queue: redis.Redis
) -> None:
    """Publishers ship at exit: an async-mode process that exits normally before any batch
    was due leaves every row in the database."""
    env = {
        **os.environ,
        "PYTHONPATH": str(ROOT),
        "OCP_BROKER_URL": BROKER,
        "OCP_QUEUE": queue_name,
        "OTEL_TRACES_EXPORTER": "none",
        "OTEL_METRICS_EXPORTER": "none",
        "OTEL_CELERY_PUBLISH_AUDIT_URL": pg_url,
        "OTEL_CELERY_PUBLISH_DURABILITY": "async",
        "OTEL_CELERY_PUBLISH_FLUSH_INTERVAL": "3600",
        "OTEL_CELERY_PUBLISH_SPOOL_DIR": str(tmp_path),
    }
    out = subprocess.run(
        [sys.executable, "-m", "tests.spool_publisher", "async", "20"],
        env=env, capture_output=True, text=True, timeout=60, check=True,
    )  # fmt: skip
    ids = out.stdout.split()
    assert len(ids) == 20
    assert all(len(audit_rows(pg, task_id)) == 1 for task_id in ids)


def _trace(receiver: Receiver, trace_id: str, names: set[str]) -> dict[str, Span]:
    def probe() -> dict[str, Span] | None:
        found = {s.name: s for s in receiver.find(lambda s: s.trace_id == trace_id)}
        return found if names <= found.keys() else None

    return wait_for(probe, 30, f"spans {sorted(names)} in trace {trace_id}")


def test_worker_spans_and_metrics_carry_the_documented_attributes(
    publisher: Publisher, start_worker: Any, receiver: Receiver, pg: Any, queue_name: str
) -> None:
    """Queue-wait spans are INTERNAL; the process span carries messaging.system and
    messaging.operation.type/.name=process; task arguments are never span attributes;
    messaging.process.duration has celery.task.name, messaging.destination.name and error.type
    on failures; an Ignore()d task ends its row as ignored."""
    start_worker()
    secret = login.apply_async(("bob", "hunter2"), {"token": "t0k3n"}, queue=queue_name).id
    failing = fail.apply_async(("boom",), queue=queue_name).id
    skipped = ignored.apply_async(queue=queue_name).id
    [row_] = wait_row(pg, secret, lambda rows: rows[0]["outcome"] == "succeeded")
    wait_row(pg, failing, lambda rows: rows[0]["outcome"] == "failed")
    wait_row(pg, skipped, lambda rows: rows[0]["outcome"] == "ignored")
    names = {f"{p} tests.login" for p in ("queue wait", "process")}
    spans = _trace(receiver, row_["trace_id"], names)
    for name in names - {"process tests.login"}:
        assert spans[name].kind == INTERNAL, name
    process = spans["process tests.login"]
    assert process.kind == CONSUMER
    assert process.attributes["messaging.system"] == "redis"
    assert process.attributes["messaging.operation.type"] == "process"
    assert process.attributes["messaging.operation.name"] == "process"
    assert process.attributes["messaging.destination.name"] == queue_name
    for span in spans.values():
        shown = json.dumps(span.attributes)
        assert "hunter2" not in shown and "t0k3n" not in shown and "bob" not in shown, span.name

    def failed_histogram() -> list[dict[str, Any]]:
        return [
            attrs
            for name, unit, attrs, count in list(receiver.histograms)
            if name == "messaging.process.duration" and unit == "s" and count
            and attrs.get("messaging.destination.name") == queue_name
            and attrs.get("celery.task.name") == "tests.fail"
        ]  # fmt: skip

    [attrs, *_] = wait_for(failed_histogram, 30, "the failed task's process duration")
    assert attrs["error.type"] == "ValueError"


def test_ids_and_names_read_from_a_message_are_bounded_before_spans(
    start_worker: Any, receiver: Receiver, pg: Any, queue_name: str
) -> None:
    """RELIABILITY.md, "Not the message headers": ids and names we read back are at most 255
    characters before they reach a span, a metric or a row (any broker client can send any
    header: here a plain, uninstrumented Celery client)."""
    start_worker()
    long_id = "L" * 600
    other_id = "U" * 600
    long_name = "tests.nope" + "n" * 600
    forged = {hdr.PUBLISH_ID: uuid.uuid4().hex, hdr.PUBLISHED_AT: time.time()}
    unknown = {hdr.PUBLISH_ID: uuid.uuid4().hex, hdr.PUBLISHED_AT: time.time()}
    app.send_task("tests.add", args=(1, 2), task_id=long_id, queue=queue_name, headers=forged)
    app.send_task(long_name, task_id=other_id, queue=queue_name, headers=unknown)
    bounded_id = hdr.as_text(long_id)
    [ran] = wait_row(pg, bounded_id, lambda rows: rows[0]["outcome"] == "succeeded")
    [discarded] = wait_row(pg, hdr.as_text(other_id), lambda rows: rows[0]["outcome"] == "rejected")
    assert len(ran["task_id"]) == len(discarded["task_name"]) == 255  # rows: bounded
    process = wait_for(
        lambda: receiver.find(
            lambda s: (
                s.name == "process tests.add"
                and s.attributes.get("messaging.message.id", "").startswith("LLLL")
            )
        ),
        30,
        "the process span of the long id",
    )[0]
    rejected = wait_for(
        lambda: receiver.find(lambda s: s.name.startswith("process tests.nopennn")),
        30,
        "the process span of the unregistered name",
    )[0]
    lengths = {
        "messaging.message.id of a run": len(process.attributes["messaging.message.id"]),
        "messaging.message.id of a discard": len(rejected.attributes["messaging.message.id"]),
        "celery.task.name of a discard": len(rejected.attributes["celery.task.name"]),
        "name of a discard's span": len(rejected.name) - len("process "),
    }
    assert all(n <= 255 for n in lengths.values()), lengths


def test_a_publisher_clock_ahead_is_clamped_and_said_on_the_span(
    start_worker: Any, receiver: Receiver, pg: Any, queue_name: str
) -> None:
    """If the publisher's clock is ahead, the queue-wait edges are clamped to zero and the span
    carries celery.queue_wait.clamped=true and celery.queue_wait.clock_skew_s."""
    start_worker()
    ahead = {hdr.PUBLISH_ID: uuid.uuid4().hex, hdr.PUBLISHED_AT: time.time() + 30}
    task_id = app.send_task("tests.add", args=(1, 2), queue=queue_name, headers=ahead).id
    wait_row(pg, task_id, lambda rows: rows[0]["outcome"] == "succeeded")
    [wait] = wait_for(
        lambda: receiver.find(
            lambda s: (
                s.name == "queue wait tests.add"
                and s.attributes.get("messaging.message.id") == task_id
            )
        ),
        30,
        "the queue wait span",
    )
    assert wait.attributes["celery.queue_wait.clamped"] is True
    assert 25 < wait.attributes["celery.queue_wait.clock_skew_s"] <= 30
    assert wait.end_ns - wait.start_ns == 0


def test_prefork_children_ship_rows_and_spans_when_they_exit(
    publisher: Publisher, start_worker: Any, receiver: Receiver, pg: Any, queue_name: str
) -> None:
    """With max_tasks_per_child, pool children ship their rows and flush their spans on
    worker_process_shutdown (no batch or span export would be due before they exit)."""
    start_worker(
        pool="prefork",
        concurrency=1,
        env={
            "CELERY_WORKER_MAX_TASKS_PER_CHILD": "1",
            "OTEL_CELERY_PUBLISH_FLUSH_INTERVAL": "600",
            "OTEL_BSP_SCHEDULE_DELAY": "600000",
        },
    )
    ids = [add.apply_async((i, i), queue=queue_name).id for i in range(3)]
    for task_id in ids:
        wait_row(pg, task_id, lambda rows: rows[0]["outcome"] == "succeeded", timeout=45)
    for task_id in ids:
        wait_for(
            lambda t=task_id: receiver.find(
                lambda s: (
                    s.name == "process tests.add" and s.attributes["messaging.message.id"] == t
                )
            ),
            30,
            f"the process span of {task_id}",
        )
    assert BIN  # the worker is the real celery entry point (conftest)
