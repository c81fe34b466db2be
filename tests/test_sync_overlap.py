"""``sync`` mode on PostgreSQL: the row's upsert is sent before the message goes to the broker and
its result read after, so the database's round trip overlaps the broker's; the row is still
committed (or, failed, settled) before ``apply_async`` returns, and a row whose publish raised is
settled all the same. Real Redis, real PostgreSQL."""

from __future__ import annotations

import datetime as dt
import os
import signal
import subprocess
import sys
import threading
import uuid
from collections.abc import Iterator
from typing import Any

import kombu.exceptions
import pytest
import redis
from celery import Celery
from kombu import messaging
from sqlalchemy import Engine

from tests.app import add
from tests.conftest import BROKER, ROOT, Publisher, audit_rows
from tests.otlp_receiver import wait_for


@pytest.fixture
def drain_queue(queue_name: str) -> Iterator[str]:
    """The test's queue in Redis, deleted afterwards (nobody consumes it here)."""
    yield queue_name
    redis.Redis.from_url(BROKER).delete(queue_name)


def test_the_row_is_sent_before_the_message_and_committed_when_apply_async_returns(
    publisher: Publisher, pg: Engine, drain_queue: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """While the message is being handed to the broker, the row is already visible to another
    connection (its upsert went first) and its result has not been read (the round trip
    overlaps the send); when apply_async returns it has been, and the row is there."""
    db = publisher.instrumentor.writer.db  # type: ignore[attr-defined]
    task_id = f"overlap-{uuid.uuid4()}"
    seen: dict[str, Any] = {}
    publish = messaging.Producer.publish

    def watched(self: messaging.Producer, *args: Any, **kwargs: Any) -> Any:
        if kwargs.get("headers", {}).get("id") == task_id:
            seen["in_flight"] = db._inflight is not None and db._inflight.row["task_id"]
            seen["visible"] = wait_for(lambda: audit_rows(pg, task_id), timeout=10)
        return publish(self, *args, **kwargs)

    monkeypatch.setattr(messaging.Producer, "publish", watched)
    add.apply_async((1, 2), task_id=task_id, queue=drain_queue)
    assert seen["in_flight"] == task_id
    assert [r["task_id"] for r in seen["visible"]] == [task_id]
    assert db._inflight is None
    [row] = audit_rows(pg, task_id)
    assert row["payload"] is not None


def test_a_row_sent_for_a_publish_that_raised_is_settled_without_it(
    publisher: Publisher, pg: Engine, internal_errors: list[tuple[str, BaseException]]
) -> None:
    """The broker refuses the message after the row was sent, so after_task_publish never
    comes; the database refuses the row too (a task name longer than its column: known only
    from the result). The host gets its exception, and the writer's thread reads the result by
    itself (no flush), cuts the name to the column, marked, commits the row and says so."""
    down = Celery("ocp_overlap_down", broker="redis://127.0.0.1:1/0", set_as_current=False)
    down.conf.broker_connection_retry = False
    task_id = f"overlap-raised-{uuid.uuid4()}"
    name = "tests." + "x" * 300
    try:
        with pytest.raises(kombu.exceptions.OperationalError):
            down.send_task(name, args=(1, 2), task_id=task_id, retry=False)
    finally:
        down.close()
    [row] = wait_for(lambda: audit_rows(pg, task_id), timeout=30)
    assert len(row["task_name"]) == 255 and row["task_name"].startswith(name[:200])
    assert row["sent_at"] is None
    assert [where for where, _ in internal_errors] == ["audit record repaired"]
    internal_errors.clear()


def test_concurrent_sync_publishes_share_the_connection_and_all_commit(
    publisher: Publisher, pg: Engine, drain_queue: str
) -> None:
    """Threads publishing at once on the one sync connection: each settles the row in flight
    before sending its own, and every apply_async returns with its own row committed."""
    failures: list[str] = []

    def publish(n: int) -> None:
        for i in range(40):
            task_id = f"overlap-{n}-{i}-{uuid.uuid4().hex[:8]}"
            add.apply_async((n, i), task_id=task_id, queue=drain_queue)
            if len(audit_rows(pg, task_id)) != 1:
                failures.append(task_id)

    threads = [threading.Thread(target=publish, args=(n,)) for n in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    assert not any(t.is_alive() for t in threads)
    assert failures == []


def test_text_with_a_nul_byte_is_repaired_never_cut(
    publisher: Publisher, pg: Engine, internal_errors: list[tuple[str, BaseException]]
) -> None:
    """libpq reads a text parameter as a C string, so a NUL byte would silently cut the value
    there: such text is refused before it is sent, then repaired (the NUL stripped) and
    committed like any refused row, and reported."""
    task_id = f"overlap-nul-{uuid.uuid4()}"
    row = {
        "publish_id": uuid.uuid4().hex,
        "task_id": task_id,
        "task_name": "tests.add",
        "published_at": dt.datetime(2026, 1, 1, tzinfo=dt.timezone.utc),
        "exception_message": "before\x00after",
    }
    publisher.instrumentor.writer.record_publish(row)  # type: ignore[attr-defined]
    [stored] = audit_rows(pg, task_id)
    assert stored["exception_message"] == "beforeafter"
    assert [where for where, _ in internal_errors] == ["audit record repaired"]
    internal_errors.clear()


_KILLED_AFTER_SEND = """
import os, signal, sys
from kombu import messaging
from otel_celery_publish import CeleryPublishInstrumentor
from tests.app import add

publish = messaging.Producer.publish

def publish_then_die(self, *args, **kwargs):
    publish(self, *args, **kwargs)
    os.kill(os.getpid(), signal.SIGKILL)  # the message is on the broker, the row's result unread

messaging.Producer.publish = publish_then_die
CeleryPublishInstrumentor().instrument(audit_url=sys.argv[1], durability="sync")
add.apply_async((1, 2), task_id=sys.argv[2], queue=sys.argv[3])
"""


def test_a_publisher_killed_right_after_the_broker_send_still_leaves_its_row(
    pg_url: str, pg: Engine, drain_queue: str
) -> None:
    """SIGKILL between the broker taking the message and the row's result being read: the
    upsert was on the wire before the message, so the database commits it anyway."""
    task_id = f"overlap-killed-{uuid.uuid4()}"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OCP_BROKER_URL": BROKER}
    done = subprocess.run(
        [sys.executable, "-c", _KILLED_AFTER_SEND, pg_url, task_id, drain_queue],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == -signal.SIGKILL, done.stderr
    assert redis.Redis.from_url(BROKER).llen(drain_queue) == 1  # the message went
    [row] = wait_for(lambda: audit_rows(pg, task_id), timeout=30)
    assert row["payload"] is not None


def test_every_column_type_round_trips_exactly(publisher: Publisher, pg: Engine) -> None:
    """The sync upsert sends values in PostgreSQL's text format (bytea as binary): what is
    stored is exactly what the row held - microseconds and a non-UTC offset, floats to the
    last bit, any byte in the payload, non-ASCII text, nested JSON, booleans, ints."""
    task_id = f"overlap-types-{uuid.uuid4()}"
    plus_five = dt.timezone(dt.timedelta(hours=5, minutes=30))
    row = {
        "publish_id": uuid.uuid4().hex,
        "task_id": task_id,
        "task_name": "tests.añd ☃",
        "published_at": dt.datetime(2026, 2, 3, 4, 5, 6, 789012, tzinfo=plus_five),
        "attempt": 2**31 - 1,
        "priority": 0,
        "payload": bytes(range(256)),
        "payload_redacted": True,
        "acks_late": False,
        "options": {"headers": {"x": [1, 2.5, None, "ü"]}, "time_limit": None},
        "runtime_s": 0.1 + 0.2,
        "exception_message": "line\nbreak\ttab \\ backslash 'quote' \"dq\"",
    }
    publisher.instrumentor.writer.record_publish(row)  # type: ignore[attr-defined]
    [stored] = audit_rows(pg, task_id)
    assert {k: stored[k] for k in row} == row
