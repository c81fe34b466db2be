"""End to end: the demo stack's own code (examples/stack) on the local Redis and PostgreSQL.

The commands docker-compose.yml runs - ``opentelemetry-instrument celery -A examples.stack.app
worker`` with the prefork pool, and ``python -m examples.stack.producer`` - as subprocesses, with
OTLP/HTTP going to the in-test receiver instead of the collector. Both run in subprocesses only:
importing examples.stack.app here would make its Celery app the current app of this process.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import redis
from sqlalchemy.engine import Engine

from tests.conftest import audit_rows, wait_row, worker_telemetry_env
from tests.otlp_receiver import Receiver, Span, wait_for
from tests.test_deploy import WORKER_METRIC_ATTRIBUTES

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
# A database of its own on the local Redis: the lost task's message stays there until teardown.
BROKER = os.environ.get("OCP_STACK_BROKER_URL", "redis://127.0.0.1:6379/11")
SPAN_KIND_PRODUCER, SPAN_KIND_CONSUMER = 4, 5
STATUS_CODE_ERROR = 2


@dataclass
class Stack:
    env: dict[str, str]
    queue: str
    lost_queue: str
    worker: subprocess.Popen[bytes]
    worker_log: Path

    def produce(self, *args: str) -> list[dict[str, Any]]:
        """Run the producer to completion; return the publish records it printed."""
        result = subprocess.run(
            [sys.executable, "-m", "examples.stack.producer", *args],
            env={**self.env, "OTEL_SERVICE_NAME": "stack-producer-test"},
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert result.returncode == 0, result.stderr
        return [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]


@pytest.fixture
def stack(pg_url: str, receiver: Receiver, tmp_path: Path) -> Iterator[Stack]:
    """The example worker (prefork, auto-instrumented) on queues unique to this test."""
    suffix = uuid.uuid4().hex[:8]
    queue, lost_queue = f"stack-{suffix}", f"stack-{suffix}-unconsumed"
    env = {
        **os.environ,
        "PYTHONPATH": str(ROOT),
        "STACK_BROKER_URL": BROKER,
        "STACK_QUEUE": queue,
        "STACK_LOST_QUEUE": lost_queue,
        **worker_telemetry_env(pg_url, receiver),
        # The official instrumentation is a dev dependency here (not in the image): keep it off.
        "OTEL_PYTHON_DISABLED_INSTRUMENTATIONS": "celery",
    }
    log = tmp_path / "stack-worker.log"
    command = [
        str(BIN / "opentelemetry-instrument"),
        str(BIN / "celery"), "-A", "examples.stack.app", "worker",
        "--pool=prefork", "--concurrency=2", f"--queues={queue}", "--loglevel=INFO",
        f"--hostname=stack-{suffix}@localhost",
        "--without-gossip", "--without-mingle", "--without-heartbeat",
    ]  # fmt: skip
    with log.open("wb") as out:
        worker = subprocess.Popen(
            command,
            env={**env, "OTEL_SERVICE_NAME": "stack-worker-test"},
            cwd=ROOT,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    try:
        yield Stack(env, queue, lost_queue, worker, log)
    finally:
        if worker.poll() is None:
            worker.send_signal(signal.SIGTERM)  # warm shutdown: children flush rows and spans
        try:
            worker.wait(30)
        except subprocess.TimeoutExpired:
            worker.kill()
            worker.wait(10)
        client = redis.Redis.from_url(BROKER)
        # The queues (the lost task is still in one) and kombu's bindings for them.
        keys = list(client.scan_iter(match=f"*stack-{suffix}*"))
        if keys:
            client.delete(*keys)
        client.close()
    output = log.read_text(errors="replace")
    assert "otel-celery-publish internal error" not in output, output


def spans_of(receiver: Receiver, trace_id: str, names: set[str]) -> dict[str, Span]:
    """Wait until spans with all ``names`` arrived in ``trace_id``; return them by name."""

    def probe() -> dict[str, Span] | None:
        found = {s.name: s for s in receiver.find(lambda s: s.trace_id == trace_id)}
        return found if names <= found.keys() else None

    return wait_for(probe, 30, f"spans {sorted(names)} in trace {trace_id}")


def test_stack_worker_and_producer_emit_traces_rows_and_metrics(
    stack: Stack, receiver: Receiver, pg: Engine
) -> None:
    """The demo producer and worker give one trace per task (send -> queue wait, process), an
    ERROR span for the failing task, a never-received row for the lost one, a row per publish."""
    records = stack.produce("--count=4", "--interval=0", "--fail-every=2", "--lost-every=4")
    assert [r["kind"] for r in records] == ["ok", "fail", "ok", "lost"]
    ok, fail, _, lost = records
    assert (ok["task"], fail["task"], lost["task"]) == (
        "stack.process_order",
        "stack.charge_card",
        "stack.process_order",
    )
    assert lost["queue"] == stack.lost_queue and ok["queue"] == stack.queue

    # A successful task: one trace from the producer's span down to the worker's.
    name = ok["task"]
    spans = spans_of(
        receiver,
        ok["trace_id"],
        {"place order", f"send {name}", f"queue wait {name}", f"process {name}"},
    )
    send, wait, process = (
        spans[f"send {name}"],
        spans[f"queue wait {name}"],
        spans[f"process {name}"],
    )
    assert send.parent_id == spans["place order"].span_id
    assert (send.kind, send.service) == (SPAN_KIND_PRODUCER, "stack-producer-test")
    assert send.attributes["messaging.message.id"] == ok["task_id"]
    assert wait.parent_id == send.span_id and process.parent_id == send.span_id
    assert (process.kind, process.service) == (SPAN_KIND_CONSUMER, "stack-worker-test")
    assert process.status_code != STATUS_CODE_ERROR
    assert wait.end_ns <= process.start_ns
    assert process.attributes["messaging.destination.name"] == stack.queue

    # The failing task: its process span is an error.
    failed = spans_of(receiver, fail["trace_id"], {f"process {fail['task']}"})
    failed_process = failed[f"process {fail['task']}"]
    assert failed_process.status_code == STATUS_CODE_ERROR
    assert failed_process.attributes["error.type"] == "PaymentDeclinedError"
    assert "exception" in failed_process.events

    # Rows: every publish has one, linked to its trace; the lost one was never received.
    for record in records[:3]:
        wait_row(pg, record["task_id"], lambda rows: bool(rows[0]["finished_at"]))
    for record in records:
        [row] = wait_row(pg, record["task_id"], lambda rows: bool(rows[0]["sent_at"]))
        assert (row["task_name"], row["queue"]) == (record["task"], record["queue"])
        assert row["trace_id"] == record["trace_id"]
    assert audit_rows(pg, ok["task_id"])[0]["outcome"] == "succeeded"
    [failed_row] = audit_rows(pg, fail["task_id"])
    assert (failed_row["outcome"], failed_row["exception_type"]) == (
        "failed",
        "PaymentDeclinedError",
    )
    [lost_row] = audit_rows(pg, lost["task_id"])
    assert lost_row["received_at"] is None and lost_row["outcome"] is None
    spans_of(receiver, lost["trace_id"], {f"send {lost['task']}"})
    assert not receiver.find(
        lambda s: (
            s.name.startswith("process ")
            and s.attributes.get("messaging.message.id") == lost["task_id"]
        )
    )

    # Our own metrics, with the names, unit and attributes the dashboard relies on.
    def metrics_arrived() -> bool:
        with receiver.lock:
            seen = list(receiver.histograms)
        waits = {
            (attrs.get("celery.task.name"), attrs.get("messaging.destination.name"))
            for metric, unit, attrs, _ in seen
            if (metric, unit) == ("celery.task.queue_wait.duration", "s")
        }
        errors = {
            attrs.get("error.type")
            for metric, unit, attrs, _ in seen
            if (metric, unit) == ("messaging.process.duration", "s")
            and attrs.get("celery.task.name") == fail["task"]
        }
        return (name, stack.queue) in waits and "PaymentDeclinedError" in errors

    wait_for(metrics_arrived, 30, "the worker's queue-wait and process-duration histograms")
    with receiver.lock:
        ours = [(metric, attrs) for metric, _, attrs, _ in receiver.histograms
                if attrs.get("messaging.destination.name") == stack.queue]  # fmt: skip
    assert {metric for metric, _ in ours} == set(WORKER_METRIC_ATTRIBUTES)
    assert all(set(attrs) <= WORKER_METRIC_ATTRIBUTES[metric] for metric, attrs in ours)
