"""What only RabbitMQ does, with real workers and PostgreSQL: it redelivers an unacked message
the moment its consumer's connection drops (Redis waits for the visibility timeout), and it is
the broker a second app of the publishing process may point at."""

from __future__ import annotations

import datetime as dt
import uuid
from typing import Any

import pytest
from celery import Celery
from opentelemetry.trace import SpanKind

from otel_celery_publish import audit
from tests.app import sleep_late
from tests.audit_support import migrated
from tests.conftest import RABBITMQ, Broker, audit_rows, wait_row
from tests.otlp_receiver import wait_for

UTC = dt.timezone.utc
FAST_HEARTBEAT = {"OTEL_CELERY_PUBLISH_HEARTBEAT_INTERVAL": "0.5"}
LONG_AGO = dt.timedelta(minutes=10)

on_rabbitmq = pytest.mark.parametrize("broker", ["rabbitmq"], indirect=True)


@on_rabbitmq
def test_acks_late_task_of_a_killed_worker_is_redelivered_at_once_to_another(
    broker: Broker, publisher: Any, start_worker: Any, pg: Any, pg_url: str, queue_name: str
) -> None:
    """acks_late on a SIGKILLed worker: RabbitMQ hands the message to the waiting second worker
    at once, which runs the same row to success; lost never reports it."""
    settings = migrated(pg_url)
    first = start_worker(pool="prefork", env=FAST_HEARTBEAT)
    task_id = sleep_late.apply_async((30,), queue=queue_name).id
    [before] = wait_row(pg, task_id, lambda rows: rows[0]["started_at"] is not None)
    assert before["acks_late"] is True and before["worker"] == first.nodename
    second = start_worker(env=FAST_HEARTBEAT)
    first.kill_all()
    killed_at = dt.datetime.now(UTC)
    assert audit.lost(settings=settings, older_than=LONG_AGO, queue=queue_name) == []
    [after] = wait_row(pg, task_id, lambda rows: rows[0]["outcome"] == "succeeded", 20)
    assert after["publish_id"] == before["publish_id"]
    assert (after["worker"], after["worker_instance"]) != (
        first.nodename,
        before["worker_instance"],
    )
    assert after["worker"] == second.nodename and after["started_at"] > before["started_at"]
    # No visibility timeout to wait out: the broker saw the connection drop.
    assert after["received_at"] - killed_at < dt.timedelta(seconds=5)
    assert after["exception_type"] is None and after["lost_reason"] is None
    assert len(audit_rows(pg, task_id)) == 1
    assert audit.lost(settings=settings, older_than=dt.timedelta(0), queue=queue_name) == []


def test_a_second_app_publishing_to_rabbitmq_is_labelled_rabbitmq(
    publisher: Any, queue_name: str
) -> None:
    """A publish through an app that is not Celery's current one (here on RabbitMQ, while the
    current app is on Redis) carries its own broker's messaging.system."""
    rabbit = Celery(f"ocp_second_{uuid.uuid4().hex[:6]}", broker=RABBITMQ, set_as_current=False)
    try:
        task_id = rabbit.send_task("tests.add", (1, 2), queue=queue_name).id
        producer = wait_for(
            lambda: next(
                (
                    s
                    for s in publisher.exporter.get_finished_spans()
                    if s.kind is SpanKind.PRODUCER
                    and s.attributes["messaging.message.id"] == task_id
                ),
                None,
            ),
            10,
            "the producer span",
        )
        assert producer.attributes["messaging.system"] == "rabbitmq"
    finally:
        Broker("rabbitmq", RABBITMQ, "rabbitmq", [queue_name]).delete_queues()
        rabbit.close()
