"""The worker hooks' span shape, with a real SDK and the in-memory exporter (no broker, no
database): which spans a task exports, their parents, edges, events and attributes, and the
lifecycle updates they record beside them."""

from __future__ import annotations

import time
import uuid
from types import SimpleNamespace
from typing import Any

import pytest
from celery import Celery
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind

from otel_celery_publish import headers as hdr
from otel_celery_publish.config import Settings
from otel_celery_publish.hooks.worker import WorkerHooks

TRACE_ID = "0af7651916cd43dd8448eb211c80319c"
PRODUCER_SPAN_ID = "b7ad6b7169203331"

app = Celery("worker_spans", broker="memory://", set_as_current=False)


@app.task(name="tests.noop", shared=False)
def noop() -> None:
    return None


class Updates:
    """Stands in for the AuditWriter: keeps the lifecycle updates in order."""

    def __init__(self) -> None:
        self.updates: list[dict[str, Any]] = []

    def record_update(self, update: Any, *, best_effort: bool = False) -> None:
        self.updates.append(dict(update))


class Harness:
    def __init__(self, **settings: Any) -> None:
        self.exporter = InMemorySpanExporter()
        provider = TracerProvider()
        provider.add_span_processor(SimpleSpanProcessor(self.exporter))
        self.reader = InMemoryMetricReader()
        meter = MeterProvider(metric_readers=[self.reader]).get_meter("test")
        self.writer = Updates()
        self.hooks = WorkerHooks(
            provider.get_tracer("test"),
            meter,
            self.writer,
            Settings(**settings),  # type: ignore[arg-type]
        )

    def run(self, *, received: bool = True, published_ago: float = 0.5) -> dict[str, Any]:
        """One message through task_received (optional), prerun and postrun, as Celery sends
        them; returns the request dict the pool child got."""
        task_id = str(uuid.uuid4())
        headers = {
            "id": task_id,
            "task": noop.name,
            "retries": 0,
            "root_id": task_id,
            "delivery_info": {"routing_key": "q1", "redelivered": False},
            "hostname": "w1@host",
            "traceparent": f"00-{TRACE_ID}-{PRODUCER_SPAN_ID}-01",
            hdr.PUBLISH_ID: uuid.uuid4().hex,
            hdr.PUBLISHED_AT: time.time() - published_ago,
        }
        request_dict = dict(headers, headers=dict(headers))
        if received:
            request = SimpleNamespace(
                request_dict=request_dict, id=task_id, task=noop, hostname="w1@host"
            )
            self.hooks.on_received(request=request)
        noop.push_request(**request_dict)
        try:
            self.hooks.on_prerun(task_id=task_id, task=noop)
            self.hooks.on_postrun(task_id=task_id, task=noop, state="SUCCESS")
        finally:
            noop.pop_request()
        return request_dict

    def spans(self) -> dict[str, ReadableSpan]:
        return {s.name: s for s in self.exporter.get_finished_spans()}


@pytest.fixture
def harness() -> Harness:
    return Harness()


def test_a_task_exports_a_queue_wait_and_a_process_span(harness: Harness) -> None:
    """By default: two spans per task, both children of the producer; the queue wait runs from
    the publish to the start, carries the broker/worker split as attributes and a ``received``
    event at the moment the worker took the message."""
    request_dict = harness.run()
    spans = harness.spans()
    assert set(spans) == {"queue wait tests.noop", "process tests.noop"}
    wait, process = spans["queue wait tests.noop"], spans["process tests.noop"]
    for span in (wait, process):
        assert span.parent is not None and span.parent.is_remote
        assert f"{span.parent.trace_id:032x}" == TRACE_ID
        assert f"{span.parent.span_id:016x}" == PRODUCER_SPAN_ID
    assert wait.kind is SpanKind.INTERNAL and process.kind is SpanKind.CONSUMER

    published, received = request_dict[hdr.PUBLISHED_AT], request_dict[hdr.RECEIVED_AT]
    assert wait.start_time == int(published * 1e9)
    assert wait.end_time is not None and wait.start_time <= wait.end_time
    [event] = wait.events
    assert (event.name, event.timestamp) == ("received", int(received * 1e9))
    attributes = dict(wait.attributes or {})
    assert attributes.pop("celery.queue_wait.broker_s") == received - published
    worker_s = attributes.pop("celery.queue_wait.worker_s")
    assert worker_s >= 0
    assert abs(received + worker_s - wait.end_time / 1e9) < 1e-5
    assert attributes == {
        "messaging.destination.name": "q1",
        "messaging.message.id": request_dict["id"],
        "celery.task.name": "tests.noop",
    }
    assert dict(process.attributes or {}) == {
        "messaging.system": "memory",
        "messaging.destination.name": "q1",
        "messaging.message.id": request_dict["id"],
        "messaging.operation.type": "process",
        "messaging.operation.name": "process",
        "celery.task.name": "tests.noop",
        "celery.task.retries": 0,
        "celery.task.outcome": "succeeded",
    }


def test_the_lifecycle_updates_are_received_started_finished(harness: Harness) -> None:
    """Each task records its three updates in order, all keyed by its publish id."""
    request_dict = harness.run()
    updates = harness.writer.updates
    assert [next(k for k in u if k.endswith("_at") and k != "published_at") for u in updates] == [
        "received_at",
        "started_at",
        "finished_at",
    ]
    assert {u["publish_id"] for u in updates} == {request_dict[hdr.PUBLISH_ID]}
    received, started, finished = updates
    assert received["received_at"] <= started["started_at"] <= finished["finished_at"]
    assert (finished["outcome"], finished["lost_reason"]) == ("succeeded", None)
    assert "finished_at" not in started  # not redelivered: nothing to reopen


def test_queue_wait_children_are_opt_in() -> None:
    """``queue_wait_children``: broker wait and worker wait are also child spans of the queue
    wait, edge to edge."""
    harness = Harness(queue_wait_children=True)
    request_dict = harness.run()
    spans = harness.spans()
    assert len(spans) == 4
    wait = spans["queue wait tests.noop"]
    broker, worker = spans["broker wait tests.noop"], spans["worker wait tests.noop"]
    for child in (broker, worker):
        assert child.parent is not None and child.parent.span_id == wait.context.span_id
        assert child.attributes is not None
        assert child.attributes["messaging.message.id"] == request_dict["id"]
    assert broker.start_time == wait.start_time
    assert broker.end_time == worker.start_time == wait.events[0].timestamp
    assert worker.end_time == wait.end_time


def test_no_received_time_no_split() -> None:
    """A message the main process did not stamp (task_received not seen): the queue wait is
    one span, with neither event nor split, even with children asked for."""
    harness = Harness(queue_wait_children=True)
    harness.run(received=False)
    spans = harness.spans()
    assert set(spans) == {"queue wait tests.noop", "process tests.noop"}
    wait = spans["queue wait tests.noop"]
    assert not wait.events
    assert wait.attributes is not None
    assert "celery.queue_wait.broker_s" not in wait.attributes


def test_a_publisher_clock_ahead_is_clamped_and_reported(harness: Harness) -> None:
    """Published "in the future" (a clock ahead): the edges are clamped to the start, the
    skew is an attribute, and the split is zero, never negative."""
    harness.run(published_ago=-30.0)
    wait = harness.spans()["queue wait tests.noop"]
    assert wait.attributes is not None
    assert wait.attributes["celery.queue_wait.clamped"] is True
    assert 25 < wait.attributes["celery.queue_wait.clock_skew_s"] <= 30
    assert wait.attributes["celery.queue_wait.broker_s"] == 0
    assert wait.attributes["celery.queue_wait.worker_s"] == 0
    assert wait.start_time == wait.end_time
