"""Publish side against real Redis and PostgreSQL, no worker: rows, spans, headers, bad input."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from kombu import serialization
from kombu.exceptions import EncodeError
from opentelemetry.instrumentation.celery import CeleryInstrumentor
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode, format_span_id
from sqlalchemy import create_engine

from otel_celery_publish import CeleryPublishInstrumentor, rows
from tests.app import add, app, login
from tests.conftest import Publisher, audit_rows, wait_row


def _producers(publisher: Publisher, task_id: str) -> list[Any]:
    return [
        s
        for s in publisher.exporter.get_finished_spans()
        if s.kind is SpanKind.PRODUCER and s.attributes.get("messaging.message.id") == task_id
    ]


def test_row_is_committed_before_apply_async_returns(
    publisher: Publisher, pg: Any, queue_name: str
) -> None:
    """In sync mode the row is in the database the moment apply_async returns."""
    result = add.apply_async((1, 2), queue=queue_name, priority=3, headers={"tenant": "acme"})
    [row] = audit_rows(pg, result.id)
    assert row["task_name"] == "tests.add"
    assert (row["queue"], row["routing_key"], row["priority"]) == (queue_name, queue_name, 3)
    assert row["options"]["headers"] == {"tenant": "acme"}
    assert row["options"]["serializer"] == "json"
    args, kwargs, _embed = serialization.loads(
        row["payload"], row["content_type"], row["content_encoding"]
    )
    assert (args, kwargs) == ([1, 2], {})
    [span] = _producers(publisher, result.id)
    assert row["span_id"] == format_span_id(span.context.span_id)
    assert row["publisher_pid"] > 0 and row["publisher_host"]
    wait_row(pg, result.id, lambda rows: rows[0]["sent_at"] is not None)


def test_secrets_are_redacted_in_reprs_and_never_in_span_attributes(
    publisher: Publisher, pg: Any, queue_name: str
) -> None:
    """Configured sensitive keys are masked in reprs; args never reach span attributes."""
    result = login.apply_async(("bob", "hunter2"), {"token": "t0k3n"}, queue=queue_name)
    [row] = audit_rows(pg, result.id)
    assert "hunter2" not in row["args_repr"] and "***" in row["args_repr"]
    assert "t0k3n" not in row["kwargs_repr"] and "bob" in row["args_repr"]
    assert row["payload_redacted"] is False
    args, kwargs, _ = serialization.loads(row["payload"], row["content_type"], "utf-8")
    assert (args, kwargs) == (["bob", "hunter2"], {"token": "t0k3n"})  # replayable
    [span] = _producers(publisher, result.id)
    assert "hunter2" not in json.dumps(dict(span.attributes))
    assert "t0k3n" not in json.dumps(dict(span.attributes))


def test_unserializable_args_raise_to_the_host_and_leave_a_not_sent_row(
    publisher: Publisher, pg: Any, queue_name: str
) -> None:
    """The host's own EncodeError propagates; the row says why and is never marked sent."""
    with pytest.raises(EncodeError):
        add.apply_async((object(), 1), queue=queue_name, task_id="unserializable-1")
    publisher.instrumentor.writer.flush()
    [row] = audit_rows(pg, "unserializable-1")
    assert row["payload"] is None and "not serializable" in row["error"]
    assert row["sent_at"] is None
    [span] = _producers(publisher, "unserializable-1") or [None]
    assert span is None  # still open: after_task_publish never came; ended by the sweep later


def test_huge_payload_is_published_with_reprs_only(
    publisher: Publisher, pg: Any, queue_name: str
) -> None:
    """A payload over max_payload_bytes still publishes; the row keeps reprs and the reason."""
    result = add.apply_async(("x" * 1_200_000, "y"), queue=queue_name)
    [row] = audit_rows(pg, result.id)
    assert row["payload"] is None and "max_payload_bytes" in row["error"]
    assert len(row["args_repr"]) < 4096 + 64  # saferepr bounds each item, roughly
    app.connection_for_write().default_channel.client.delete(queue_name)


def test_dead_database_never_blocks_or_fails_the_publish_and_loses_no_row(
    tmp_path: Path, internal_errors: list[Any], queue_name: str
) -> None:
    """With the audit database unreachable, publishes succeed and rows arrive once it is back."""
    db_dir = tmp_path / "later"
    instrumentor = CeleryPublishInstrumentor()
    instrumentor.instrument(audit_url=f"sqlite:///{db_dir}/audit.db", flush_interval=0.05)
    try:
        ids = [add.apply_async((i, i), queue=queue_name).id for i in range(5)]
        assert internal_errors, "the failed write must be reported"
        for _where, exc in internal_errors:
            exc._ocp_expected = True  # type: ignore[attr-defined]
        db_dir.mkdir()
        assert instrumentor.writer.flush(10)
    finally:
        instrumentor.uninstrument()
    engine = create_engine(f"sqlite:///{db_dir}/audit.db")
    stored = {r["task_id"]: r for task_id in ids for r in audit_rows(engine, task_id)}
    assert set(stored) == set(ids)
    assert all(r["sent_at"] is not None and r["payload"] for r in stored.values())


def test_official_instrumentation_is_superseded_without_duplicates(
    pg_url: str, pg: Any, queue_name: str
) -> None:
    """Official instrumentor active before and instrumented after us: still one producer span."""
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    official = CeleryInstrumentor()
    official.instrument(tracer_provider=provider)
    ours = CeleryPublishInstrumentor()
    ours.instrument(tracer_provider=provider, audit_url=pg_url)
    try:
        official.instrument(tracer_provider=provider)  # as if loaded after us: a no-op
        result = add.apply_async((1, 1), queue=queue_name)
    finally:
        ours.uninstrument()
    assert not official.is_instrumented_by_opentelemetry  # released: the user may turn it on
    spans = [s for s in exporter.get_finished_spans() if s.kind is SpanKind.PRODUCER]
    assert [s.name for s in spans] == ["send tests.add"]
    [row] = audit_rows(pg, result.id)
    assert row["span_id"] == format_span_id(spans[0].context.span_id)


def test_instrument_and_uninstrument_twice(pg_url: str, pg: Any, queue_name: str) -> None:
    """Re-instrumenting works, double instrument is a no-op, and uninstrument stops everything."""
    instrumentor = CeleryPublishInstrumentor()
    for _ in range(2):
        instrumentor.instrument(audit_url=pg_url)
        instrumentor.instrument(audit_url=pg_url)  # already instrumented: ignored
        on = add.apply_async((1, 1), queue=queue_name)
        instrumentor.uninstrument()
        instrumentor.uninstrument()
        off = add.apply_async((1, 1), queue=queue_name)
        assert len(audit_rows(pg, on.id)) == 1
        assert audit_rows(pg, off.id) == []


def test_per_call_serializer_is_recorded_and_the_row_replayable(
    publisher: Publisher, pg: Any, queue_name: str
) -> None:
    """apply_async(serializer=...) is what the row records and encodes its payload with."""
    when = {"at": (2026, 1, 2)}
    result = add.apply_async(({1, 2}, when), queue=queue_name, serializer="pickle")
    [row] = audit_rows(pg, result.id)
    assert row["options"]["serializer"] == "pickle"
    assert row["content_type"] == "application/x-python-serialize"
    args, _kwargs, _embed = serialization.loads(
        row["payload"],
        row["content_type"],
        row["content_encoding"],
        accept={"application/x-python-serialize"},
    )
    assert tuple(args) == ({1, 2}, when)
    plain = add.apply_async((1, 2), queue=queue_name)
    [default] = audit_rows(pg, plain.id)
    assert default["options"]["serializer"] == "json"


def test_span_is_ended_as_an_error_when_building_the_row_raises(
    publisher: Publisher,
    pg: Any,
    queue_name: str,
    drain_queue: None,
    internal_errors: list[tuple[str, BaseException]],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A failure of ours between starting the producer span and handing it over ends the span
    (ERROR, error.type) and is reported; the publish still goes through."""
    failure = RuntimeError("row building broke")
    failure._ocp_expected = True  # type: ignore[attr-defined]

    def broken(*_args: Any) -> rows.PublishRow:
        raise failure

    monkeypatch.setattr(rows, "publish_row", broken)
    result = add.apply_async((1, 2), queue=queue_name)
    [span] = _producers(publisher, result.id)
    assert span.end_time is not None
    assert span.status.status_code is StatusCode.ERROR
    assert span.attributes["error.type"] == "RuntimeError"
    assert internal_errors == [("before_task_publish", failure)]
    assert app.connection_for_write().default_channel.client.llen(queue_name) == 1
    assert audit_rows(pg, result.id) == []
