"""Worker outcomes with real worker processes: retry, expected error, revoke, unknown, ETA, links,
metrics, and the zero-code path through ``opentelemetry-instrument`` over OTLP/HTTP."""

from __future__ import annotations

import os
import subprocess
from typing import Any

from opentelemetry.trace import format_span_id, format_trace_id

from tests.app import add as add_task
from tests.app import app, expected, retry_once, sleep
from tests.conftest import BIN, BROKER, ROOT, audit_rows, wait_row
from tests.otlp_receiver import Receiver, wait_for
from tests.test_e2e_worker import producer_span, trace_spans

CONSUMER, ERROR, UNSET = 5, 2, 0


def test_retry_is_a_new_attempt_row_and_producer_span(
    publisher: Any, start_worker: Any, receiver: Receiver, pg: Any, queue_name: str
) -> None:
    """A retry marks attempt 0 retried; its republish is a new row and a new producer span."""
    start_worker()
    task_id = retry_once.apply_async(queue=queue_name).id
    first, second = wait_row(
        pg, task_id, lambda rows: len(rows) == 2 and rows[1]["outcome"] == "succeeded"
    )
    assert (first["attempt"], first["outcome"]) == (0, "retried")
    assert first["exception_type"] is None
    assert second["attempt"] == 1 and second["publish_id"] != first["publish_id"]
    assert second["trace_id"] == first["trace_id"]
    spans = trace_spans(receiver, first["trace_id"], {"send tests.retry_once"})
    retry_send = spans["send tests.retry_once"]
    assert retry_send.span_id == second["span_id"]
    first_process = receiver.find(
        lambda s: s.name == "process tests.retry_once" and s.parent_id == first["span_id"]
    )[0]
    assert retry_send.parent_id == first_process.span_id
    assert first_process.attributes["celery.task.outcome"] == "retried"
    assert "first attempt" in first_process.attributes["celery.retry.reason"]


def test_expected_exception_is_not_an_error(
    publisher: Any, start_worker: Any, receiver: Receiver, pg: Any, queue_name: str
) -> None:
    """An exception listed in task.throws fails the row but leaves the span status unset."""
    start_worker(pool="prefork")
    task_id = expected.apply_async(queue=queue_name).id
    [row] = wait_row(pg, task_id, lambda rows: rows[0]["outcome"] == "failed")
    assert row["exception_type"] == "ExpectedError"
    span = trace_spans(receiver, row["trace_id"], {"process tests.expected"})
    process = span["process tests.expected"]
    assert process.status_code == UNSET and "error.type" not in process.attributes
    assert "exception" in process.events


def test_revoked_before_running(
    publisher: Any, start_worker: Any, receiver: Receiver, pg: Any, queue_name: str
) -> None:
    """A task revoked before it arrives is recorded revoked, with an error span in its trace."""
    worker = start_worker()
    task_id = "revoked-before-run-" + queue_name
    replies = app.control.revoke(task_id, reply=True, destination=[worker.nodename], timeout=5)
    assert replies, "the worker must acknowledge the revoke"
    add_task.apply_async((1, 1), queue=queue_name, task_id=task_id)
    [row] = wait_row(pg, task_id, lambda rows: rows[0]["outcome"] == "revoked")
    assert row["started_at"] is None
    spans = trace_spans(receiver, row["trace_id"], {"process tests.add"})
    assert spans["process tests.add"].status_code == ERROR


def test_terminated_task_in_prefork_child(
    publisher: Any, start_worker: Any, receiver: Receiver, pg: Any, queue_name: str
) -> None:
    """Revoke with terminate kills the pool child mid-task; the main process records it."""
    worker = start_worker(pool="prefork", concurrency=1)
    task_id = sleep.apply_async((60,), queue=queue_name).id
    wait_row(pg, task_id, lambda rows: rows[0]["started_at"] is not None)
    app.control.revoke(task_id, terminate=True, destination=[worker.nodename])
    [row] = wait_row(pg, task_id, lambda rows: rows[0]["outcome"] == "revoked")
    assert "terminated" in row["exception_message"]
    # The worker is still healthy and processes the next task.
    nxt = add_task.apply_async((2, 2), queue=queue_name).id
    wait_row(pg, nxt, lambda rows: rows[0]["outcome"] == "succeeded")


def test_unregistered_task_name(
    publisher: Any, start_worker: Any, receiver: Receiver, pg: Any, queue_name: str
) -> None:
    """send_task to a name no worker knows: published, then rejected as NotRegistered, the
    row marked as discarded work."""
    start_worker()
    task_id = app.send_task("tests.does_not_exist", args=(1,), queue=queue_name).id
    [row] = wait_row(
        pg, task_id, lambda rows: rows[0]["outcome"] == "rejected" and rows[0]["sent_at"]
    )
    assert (row["exception_type"], row["lost_reason"]) == ("NotRegistered", "discarded")
    assert row["sent_at"] is not None and row["started_at"] is None
    spans = trace_spans(receiver, row["trace_id"], {"process tests.does_not_exist"})
    assert spans["process tests.does_not_exist"].attributes["error.type"] == "NotRegistered"


def test_eta_task_waits_from_its_eta(
    publisher: Any, start_worker: Any, receiver: Receiver, pg: Any, queue_name: str
) -> None:
    """A countdown task's queue wait starts at its ETA, not at the publish."""
    start_worker()
    task_id = add_task.apply_async((1, 2), queue=queue_name, countdown=1.5).id
    [row] = wait_row(pg, task_id, lambda rows: rows[0]["outcome"] == "succeeded")
    assert 1.4 < (row["eta"] - row["published_at"]).total_seconds() < 1.6
    wait = trace_spans(receiver, row["trace_id"], {"queue wait tests.add"})["queue wait tests.add"]
    assert abs(wait.start_ns / 1e9 - row["eta"].timestamp()) < 1e-3
    assert row["received_at"] < row["eta"] <= row["started_at"]
    producer = producer_span(publisher, task_id)
    assert producer.attributes["celery.task.eta"] == row["eta"].isoformat()


def test_links_mode_starts_a_new_trace_linked_to_the_producer(
    publisher: Any, start_worker: Any, receiver: Receiver, pg: Any, queue_name: str
) -> None:
    """With use_links the process span roots its own trace and links to the producer span."""
    start_worker(env={"OTEL_CELERY_PUBLISH_USE_LINKS": "true"})
    task_id = add_task.apply_async((3, 4), queue=queue_name).id
    [row] = wait_row(pg, task_id, lambda rows: rows[0]["outcome"] == "succeeded")
    process = wait_for(
        lambda: receiver.find(
            lambda s: (
                s.name == "process tests.add" and s.attributes["messaging.message.id"] == task_id
            )
        ),
        30,
        "process span",
    )[0]
    assert process.trace_id != row["trace_id"] and process.parent_id == ""
    assert process.links == [(row["trace_id"], row["span_id"])]
    wait = trace_spans(receiver, row["trace_id"], {"queue wait tests.add"})["queue wait tests.add"]
    assert wait.parent_id == row["span_id"]


def test_zero_code_through_opentelemetry_instrument_over_otlp(
    start_worker: Any, receiver: Receiver, pg: Any, pg_url: str, queue_name: str
) -> None:
    """opentelemetry-instrument alone (both sides, official instrumentation installed too)."""
    start_worker(pool="prefork", concurrency=2, auto=True)
    env = {
        **os.environ,
        "PYTHONPATH": str(ROOT),
        "OCP_BROKER_URL": BROKER,
        "OTEL_SERVICE_NAME": "ocp-test-publisher",
        "OTEL_CELERY_PUBLISH_AUDIT_URL": pg_url,
        "OTEL_EXPORTER_OTLP_ENDPOINT": receiver.endpoint,  # type: ignore[attr-defined]
        "OTEL_EXPORTER_OTLP_PROTOCOL": "http/protobuf",
        "OTEL_METRICS_EXPORTER": "none",
        "OTEL_LOGS_EXPORTER": "none",
    }
    script = f"from tests.app import add; print(add.apply_async((5, 6), queue={queue_name!r}).id)"
    out = subprocess.run(
        [str(BIN / "opentelemetry-instrument"), str(BIN / "python"), "-c", script],
        env=env, capture_output=True, text=True, timeout=60, check=True,
    )  # fmt: skip
    task_id = out.stdout.strip().splitlines()[-1]
    [row] = wait_row(pg, task_id, lambda rows: rows[0]["outcome"] == "succeeded")
    spans = trace_spans(
        receiver, row["trace_id"], {"send tests.add", "queue wait tests.add", "process tests.add"}
    )
    assert spans["send tests.add"].service == "ocp-test-publisher"
    assert spans["send tests.add"].span_id == row["span_id"]
    assert spans["process tests.add"].service == "ocp-test-worker"
    assert spans["process tests.add"].kind == CONSUMER
    assert spans["process tests.add"].parent_id == row["span_id"]
    # The official instrumentation was superseded: no "run/..." or "apply_async/..." spans.
    names = {s.name for s in receiver.find(lambda s: s.trace_id == row["trace_id"])}
    assert not {n for n in names if n.startswith(("run/", "apply_async/"))}, names
    assert len(receiver.find(lambda s: s.trace_id == row["trace_id"] and s.kind == CONSUMER)) == 1


def test_metrics_reach_the_collector(
    publisher: Any, start_worker: Any, receiver: Receiver, pg: Any, queue_name: str
) -> None:
    """Queue wait and messaging.process.duration histograms, in seconds, by task and queue."""
    start_worker()
    task_id = add_task.apply_async((1, 1), queue=queue_name).id
    wait_row(pg, task_id, lambda rows: rows[0]["outcome"] == "succeeded")

    def seen() -> set[str]:
        return {
            name
            for name, unit, attrs, count in list(receiver.histograms)
            if unit == "s" and attrs.get("messaging.destination.name") == queue_name and count
        }

    names = wait_for(
        lambda: (
            (s := seen()) >= {"celery.task.queue_wait.duration", "messaging.process.duration"} and s
        ),
        30,
        "histograms",
    )
    assert names
    assert format_trace_id(0) and format_span_id(0)  # keep helpers imported for readers
    assert audit_rows(pg, task_id)


def test_hard_time_limit_kills_the_child_and_the_row_says_failed(
    publisher: Any, start_worker: Any, receiver: Receiver, pg: Any, queue_name: str
) -> None:
    """A hard time limit kills the pool child; the main process records the failure."""
    start_worker(pool="prefork", concurrency=1)
    task_id = sleep.apply_async((30,), queue=queue_name, time_limit=1).id
    [row] = wait_row(pg, task_id, lambda rows: rows[0]["outcome"] == "failed")
    assert row["exception_type"] == "TimeLimitExceeded"
    assert row["started_at"] is not None
    nxt = add_task.apply_async((2, 2), queue=queue_name).id
    wait_row(pg, nxt, lambda rows: rows[0]["outcome"] == "succeeded")
