"""The threads, gevent and eventlet pools (solo and prefork: tests/test_e2e_worker.py): a real
worker running tasks concurrently, on Redis and on RabbitMQ, PostgreSQL.

Each task sleeps, then publishes a child from inside its run: if the context a task attaches
leaked into another task running at the same time (another thread or greenlet), the child's
producer span would hang under the wrong process span.
"""

from __future__ import annotations

import itertools
import signal
import time
from typing import Any

import pytest
from sqlalchemy import select
from sqlalchemy.engine import Engine

from otel_celery_publish.schema.table import workers_table
from tests.app import retry_overlap, spawn
from tests.conftest import Broker, Publisher, wait_row
from tests.otlp_receiver import Receiver, Span, wait_for
from tests.test_publish_paths import QUICK_STOP, named, rows_where, settled, spans_of

TASKS = 20
CONCURRENCY = 4


@pytest.mark.parametrize("broker", ["redis", "rabbitmq"], indirect=True)
@pytest.mark.parametrize("pool", ["threads", "gevent", "eventlet"])
def test_concurrent_tasks_keep_their_own_trace_and_lifecycle(
    pool: str, broker: Broker, publisher: Publisher, start_worker: Any, receiver: Receiver,
    pg: Engine, queue_name: str,
) -> None:  # fmt: skip
    """20 tasks on 4 threads or greenlets: each has its own queue-wait and process span under
    its own producer, its child's producer span under its own process span, every row its
    lifecycle; two attempts of one task id running at once (a retry started before the retried
    run ended) keep theirs apart; the worker (and our background threads, greenlets once
    monkeypatched) stops promptly on a warm shutdown and marks its heartbeat stopped."""
    # Not on the green pools: with AMQP heartbeats their warm shutdown hangs, bare Celery too.
    worker = start_worker(
        pool=pool, concurrency=CONCURRENCY, env=QUICK_STOP if pool == "threads" else None
    )
    # Two attempts of one task id at once: each keeps its own state, span and row.
    retried = [retry_overlap.apply_async(queue=queue_name).id for _ in range(2)]
    for task_id in retried:
        rows = wait_row(pg, task_id, lambda rows: len(rows) == 2 and settled(rows))
        assert [r["outcome"] for r in rows] == ["retried", "succeeded"], rows
        assert rows[1]["started_at"] < rows[0]["finished_at"]  # they did overlap
        spans = spans_of(
            receiver,
            rows[0]["trace_id"],
            lambda s: len(named(s, "process tests.retry_overlap")) == 2,
        )
        process = {
            s.attributes["celery.task.retries"]: s
            for s in named(spans, "process tests.retry_overlap")
        }
        assert [process[n].parent_id for n in (0, 1)] == [r["span_id"] for r in rows]
        assert [process[n].attributes["celery.task.outcome"] for n in (0, 1)] == [
            "retried",
            "succeeded",
        ]

    parents = [spawn.apply_async((0.2,), queue=queue_name).id for _ in range(TASKS)]

    children: dict[str, dict[str, Any]] = {}
    for task_id in parents:
        [row] = wait_row(pg, task_id, lambda rows: settled(rows) and rows[0]["outcome"])
        assert row["outcome"] == "succeeded", row
        assert row["received_at"] <= row["started_at"] <= row["finished_at"]
        [child] = wait_for(
            lambda task_id=task_id: (
                (found := rows_where(pg, parent_id=task_id)) and settled(found) and found
            ),
            30,
            f"the child row of {task_id}",
        )
        assert child["outcome"] == "succeeded" and child["trace_id"] == row["trace_id"]
        children[task_id] = row | {"child": child}

    # The tasks did overlap: otherwise this would not test concurrency at all.
    runs = sorted((r["started_at"], r["finished_at"]) for r in children.values())
    assert any(b[0] < a[1] for a, b in itertools.pairwise(runs)), runs

    for task_id, row in children.items():
        child = row["child"]
        # The child may finish before its parent's process span ends: wait for both.
        spans = spans_of(receiver, row["trace_id"], lambda s: len(s) >= 5)
        [process] = named(spans, "process tests.spawn")
        [wait] = named(spans, "queue wait tests.spawn")
        [send_child] = named(spans, "send tests.add")
        [process_child] = named(spans, "process tests.add")
        assert process.attributes["messaging.message.id"] == task_id
        assert process.parent_id == wait.parent_id == row["span_id"]
        assert send_child.span_id == child["span_id"]
        assert send_child.parent_id == process.span_id, leak(spans)
        assert process_child.parent_id == send_child.span_id
        # The worker exported 2 x (queue wait, process) and the child's send (the parent's send
        # is in this process's exporter): nothing of another task.
        assert len(spans) == 5, leak(spans)

    started = time.monotonic()
    worker.proc.send_signal(signal.SIGTERM)
    worker.proc.wait(30)
    stopping = time.monotonic() - started
    output = worker.output()
    assert worker.proc.returncode == 0, output
    assert stopping < 15, f"warm shutdown took {stopping:.1f} s"
    assert "Failed to detach context" not in output, output
    assert "Traceback" not in output, output
    table = workers_table()
    with pg.connect() as conn:
        [stopped] = conn.execute(
            select(table.c.stopped_at).where(table.c.nodename == worker.nodename)
        ).one()
    assert stopped is not None


def leak(spans: list[Span]) -> str:
    return "\n".join(f"{s.name} {s.span_id} <- {s.parent_id}" for s in spans)
