"""End to end: an instrumented publisher, a real ``celery worker`` process, Redis or RabbitMQ,
PostgreSQL."""

from __future__ import annotations

from typing import Any

import pytest
from opentelemetry.trace import SpanKind, format_span_id, format_trace_id

from tests.app import add, fail
from tests.conftest import Broker, wait_row
from tests.otlp_receiver import Receiver, Span, wait_for


def trace_spans(receiver: Receiver, trace_id: str, names: set[str]) -> dict[str, Span]:
    """Wait until spans with all ``names`` arrived for ``trace_id``; return them by name."""

    def probe() -> dict[str, Span] | None:
        found = {s.name: s for s in receiver.find(lambda s: s.trace_id == trace_id)}
        return found if names <= found.keys() else None

    return wait_for(probe, 30, f"spans {sorted(names)} in trace {trace_id}")


def producer_span(publisher: Any, task_id: str) -> Any:
    return next(
        s
        for s in publisher.exporter.get_finished_spans()
        if s.kind is SpanKind.PRODUCER and s.attributes["messaging.message.id"] == task_id
    )


# The pools on Redis, the broker on the prefork pool: a third run, not a doubled matrix.
@pytest.mark.parametrize(
    ("pool", "broker"),
    [("solo", "redis"), ("prefork", "redis"), ("prefork", "rabbitmq")],
    indirect=["broker"],
)
def test_one_trace_holds_producer_queue_wait_and_process(
    pool: str, broker: Broker, publisher: Any, start_worker: Any, receiver: Receiver, pg: Any,
    queue_name: str,
) -> None:  # fmt: skip
    """A published task yields one trace: send -> queue wait (broker, worker) -> process."""
    start_worker(pool=pool, concurrency=2 if pool == "prefork" else 1)
    task_id = add.apply_async((2, 3), queue=queue_name).id

    # "sent" comes from the publisher's batch, "finished" from the worker's: either may be last.
    [row] = wait_row(
        pg, task_id, lambda rows: rows[0]["outcome"] == "succeeded" and rows[0]["sent_at"]
    )
    producer = producer_span(publisher, task_id)
    trace_id = format_trace_id(producer.context.trace_id)
    producer_id = format_span_id(producer.context.span_id)
    assert (row["trace_id"], row["span_id"]) == (trace_id, producer_id)
    assert producer.name == "send tests.add"
    assert producer.attributes["messaging.system"] == broker.system
    assert producer.attributes["messaging.destination.name"] == queue_name
    assert producer.attributes["celery.audit.publish_id"] == row["publish_id"]

    spans = trace_spans(receiver, trace_id, {"queue wait tests.add", "process tests.add"})
    wait, process = spans["queue wait tests.add"], spans["process tests.add"]
    assert wait.parent_id == producer_id
    assert process.parent_id == producer_id
    assert process.kind == 5  # SPAN_KIND_CONSUMER on the wire
    # The split is on the queue-wait span (no child spans unless queue_wait_children).
    assert "broker wait tests.add" not in spans and "worker wait tests.add" not in spans
    assert wait.events == ["received"]
    broker_s = wait.attributes["celery.queue_wait.broker_s"]
    worker_s = wait.attributes["celery.queue_wait.worker_s"]
    assert broker_s >= 0 and worker_s >= 0
    assert abs(broker_s + worker_s - (wait.end_ns - wait.start_ns) / 1e9) < 1e-5
    assert abs(wait.start_ns / 1e9 - row["published_at"].timestamp()) < 1e-3
    assert wait.end_ns <= process.start_ns
    assert process.attributes["celery.task.outcome"] == "succeeded"
    assert process.attributes["messaging.system"] == broker.system
    assert process.attributes["messaging.destination.name"] == queue_name

    # sent_at is read after the broker accepted the message: a fast worker may receive it first.
    published, sent = row["published_at"], row["sent_at"]
    assert published <= sent <= row["finished_at"]
    assert published <= row["received_at"] <= row["started_at"] <= row["finished_at"]
    assert row["worker"].startswith("ocp-")
    assert 0 <= row["runtime_s"] < 10
    assert row["payload"] is not None and row["exception_type"] is None


def test_queue_wait_children_split_the_wait_into_broker_and_worker_spans(
    publisher: Any, start_worker: Any, receiver: Receiver, pg: Any, queue_name: str
) -> None:
    """With queue_wait_children, broker wait and worker wait are child spans of the queue
    wait, edge to edge, and the queue-wait span still carries the split."""
    start_worker(env={"OTEL_CELERY_PUBLISH_QUEUE_WAIT_CHILDREN": "true"})
    task_id = add.apply_async((2, 3), queue=queue_name).id
    [row] = wait_row(pg, task_id, lambda rows: rows[0]["outcome"] == "succeeded")
    names = {f"{kind} tests.add" for kind in ("queue wait", "broker wait", "worker wait")}
    spans = trace_spans(receiver, row["trace_id"], names)
    wait, broker, worker = (spans[f"{k} wait tests.add"] for k in ("queue", "broker", "worker"))
    assert broker.parent_id == wait.span_id and worker.parent_id == wait.span_id
    assert (broker.start_ns, broker.end_ns, worker.end_ns) == (
        wait.start_ns, worker.start_ns, wait.end_ns,
    )  # fmt: skip
    assert broker.attributes["messaging.message.id"] == task_id
    assert "celery.queue_wait.broker_s" in wait.attributes and wait.events == ["received"]


def test_failure_is_recorded_on_span_and_row(
    publisher: Any, start_worker: Any, receiver: Receiver, pg: Any, queue_name: str
) -> None:
    """A raising task ends its process span as an error and its row as failed, with the type."""
    start_worker()
    task_id = fail.apply_async(("boom",), queue=queue_name).id
    [row] = wait_row(pg, task_id, lambda rows: rows[0]["outcome"] == "failed")
    assert (row["exception_type"], row["exception_message"]) == ("ValueError", "boom")
    process = trace_spans(receiver, row["trace_id"], {"process tests.fail"})["process tests.fail"]
    assert process.status_code == 2  # STATUS_CODE_ERROR
    assert process.attributes["error.type"] == "ValueError"
    assert "exception" in process.events
