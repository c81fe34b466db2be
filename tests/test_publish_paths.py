"""Every other way a task is published: from inside a task, by a retry, by celery beat, by name
from a process without the task code, by one of several apps in a process; and eager runs,
which publish nothing. Real worker processes, Redis or RabbitMQ, PostgreSQL."""

from __future__ import annotations

import datetime as dt
import json
import os
import signal
import subprocess
import threading
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from celery import Celery
from opentelemetry import context as otel_context
from opentelemetry.trace import SpanKind, format_span_id
from sqlalchemy import select
from sqlalchemy.engine import Engine

from otel_celery_publish.audit import Policy, lost, replay
from otel_celery_publish.config import Settings
from otel_celery_publish.schema.table import audit_table
from tests.app import add, app, autoretry, retry_countdown, spawn
from tests.conftest import (
    BIN,
    BROKER,
    RABBITMQ,
    ROOT,
    Broker,
    Publisher,
    both_brokers,
    wait_row,
    worker_telemetry_env,
)
from tests.otlp_receiver import Receiver, Span, wait_for

#: A solo or threads worker on RabbitMQ stops in a second instead of up to 10 s (see
#: ``tests/app.py``).
QUICK_STOP = {"OCP_BROKER_HEARTBEAT": "2"}


def rows_where(engine: Engine, **where: Any) -> list[dict[str, Any]]:
    """Audit rows whose columns equal ``where``, oldest first."""
    table = audit_table()
    stmt = select(table).where(*(table.c[k] == v for k, v in where.items()))
    with engine.connect() as conn:
        return [dict(r._mapping) for r in conn.execute(stmt.order_by(table.c.published_at))]


def spans_of(receiver: Receiver, trace_id: str, want: Callable[[list[Span]], bool]) -> list[Span]:
    """The spans of ``trace_id`` the receiver got, once ``want`` holds for them."""
    return wait_for(
        lambda: (
            (found := receiver.find(lambda s: s.trace_id == trace_id)) and want(found) and found
        ),
        30,
        f"spans of trace {trace_id}",
    )


def named(spans: list[Span], name: str) -> list[Span]:
    return [s for s in spans if s.name == name]


def settled(rows: list[dict[str, Any]]) -> bool:
    """Every row finished and marked sent (the two come from different processes' batches)."""
    return all(r["finished_at"] and r["sent_at"] for r in rows)


# -- nested publish --------------------------------------------------------------------------


def test_nested_publish_is_a_child_in_the_row_and_the_trace(
    publisher: Publisher, start_worker: Any, receiver: Receiver, pg: Engine, queue_name: str
) -> None:
    """A task published from inside a running task names it as parent and root in its row, and
    its producer span is a child of the publishing task's process span, in the same trace."""
    start_worker()
    parent_id = spawn.apply_async(queue=queue_name).id
    [parent] = wait_row(pg, parent_id, settled)
    [child] = wait_for(
        lambda: (found := rows_where(pg, parent_id=parent_id)) and settled(found) and found,
        30,
        "the child's row",
    )
    assert child["task_name"] == "tests.add"
    assert (child["parent_id"], child["root_id"]) == (parent_id, parent_id)
    assert child["outcome"] == parent["outcome"] == "succeeded"
    assert child["trace_id"] == parent["trace_id"]
    assert child["queue"] == queue_name

    spans = spans_of(
        receiver,
        parent["trace_id"],
        lambda s: len(named(s, "process tests.add")) == len(named(s, "process tests.spawn")) == 1,
    )
    [process_parent] = named(spans, "process tests.spawn")
    [send_child] = named(spans, "send tests.add")
    [process_child] = named(spans, "process tests.add")
    assert process_parent.parent_id == parent["span_id"]
    assert send_child.span_id == child["span_id"]
    assert send_child.parent_id == process_parent.span_id
    assert send_child.kind == 4  # SPAN_KIND_PRODUCER on the wire
    assert send_child.attributes["messaging.message.conversation_id"] == parent_id
    assert process_child.parent_id == send_child.span_id


# -- retries ---------------------------------------------------------------------------------


def check_retried(
    pg: Engine, pg_url: str, receiver: Receiver, task_id: str, name: str,
    countdowns: list[float], queue_name: str,
) -> None:  # fmt: skip
    """Three attempts of ``task_id``: rows 0, 1, 2 (retried, retried, succeeded) in one trace,
    each retry's ETA ``countdown`` after its publish; each attempt's producer span is a child
    of the previous attempt's process span; ``lost`` reports none of them."""
    settings = Settings.from_env(environ={}, audit_url=pg_url)
    # While the next attempt is in flight (waiting for its ETA), the retried one is not lost.
    first = wait_row(pg, task_id, lambda rows: len(rows) >= 2 and rows[0]["finished_at"])[0]
    early = lost(settings=settings, older_than=dt.timedelta(0), queue=queue_name)
    assert first["publish_id"] not in {t.publish_id for t in early}

    rows = wait_row(pg, task_id, lambda rows: len(rows) == 3 and settled(rows))
    assert [r["attempt"] for r in rows] == [0, 1, 2]
    assert [r["outcome"] for r in rows] == ["retried", "retried", "succeeded"]
    assert len({r["trace_id"] for r in rows}) == 1
    assert len({r["publish_id"] for r in rows}) == 3
    assert rows[0]["eta"] is None
    for row, countdown in zip(rows[1:], countdowns, strict=True):
        assert row["eta"] is not None
        ahead = (row["eta"] - row["published_at"]).total_seconds()
        assert countdown - 0.05 <= ahead <= countdown + 0.5, (ahead, countdown)
        assert row["started_at"] >= row["eta"]
    assert lost(settings=settings, older_than=dt.timedelta(0), queue=queue_name) == []

    spans = spans_of(receiver, rows[0]["trace_id"], lambda s: len(named(s, f"process {name}")) == 3)
    process = {s.attributes["celery.task.retries"]: s for s in named(spans, f"process {name}")}
    sends = {s.span_id: s for s in named(spans, f"send {name}")}
    for attempt, row in enumerate(rows):
        assert process[attempt].parent_id == row["span_id"]
        outcome = process[attempt].attributes["celery.task.outcome"]
        assert outcome == row["outcome"]
        if attempt:
            # The retry is published by the worker, from inside the attempt before it.
            assert sends[row["span_id"]].parent_id == process[attempt - 1].span_id
            assert sends[row["span_id"]].attributes["celery.task.retries"] == attempt


@both_brokers
def test_retry_with_countdown_is_a_row_per_attempt(
    broker: Broker, publisher: Publisher, start_worker: Any, receiver: Receiver, pg: Engine,
    pg_url: str, queue_name: str,
) -> None:  # fmt: skip
    """``self.retry(countdown=...)``: each attempt is its own row in one trace, ETA recorded."""
    start_worker(env=QUICK_STOP)
    task_id = retry_countdown.apply_async(queue=queue_name).id
    check_retried(pg, pg_url, receiver, task_id, "tests.retry_countdown", [0.3, 0.3], queue_name)


@both_brokers
def test_autoretry_with_backoff_is_a_row_per_attempt(
    broker: Broker, publisher: Publisher, start_worker: Any, receiver: Receiver, pg: Engine,
    pg_url: str, queue_name: str,
) -> None:  # fmt: skip
    """``autoretry_for`` + ``retry_backoff``: each attempt is a row, the backoff is the ETA."""
    start_worker(env=QUICK_STOP)
    task_id = autoretry.apply_async(queue=queue_name).id
    check_retried(pg, pg_url, receiver, task_id, "tests.autoretry", [1.0, 2.0], queue_name)


# -- celery beat -----------------------------------------------------------------------------


def test_beat_names_its_schedule_entry_on_rows_and_spans(
    start_worker: Any, receiver: Receiver, pg: Engine, pg_url: str, queue_name: str,
    broker: Broker, tmp_path: Path,
) -> None:  # fmt: skip
    """A real ``celery beat`` (under ``opentelemetry-instrument``) sending a 1 s entry: each
    row names the entry in ``periodic_task``, each producer span in ``celery.beat.entry``; the
    worker runs them."""
    start_worker()
    entry = f"ocp-every-second-{uuid.uuid4().hex[:8]}"
    log = tmp_path / "beat.log"
    env = {
        **os.environ,
        "PYTHONPATH": str(ROOT),
        "OCP_BROKER_URL": broker.url,
        "OCP_QUEUE": queue_name,
        "OCP_SETUP_SDK": "0",
        "OCP_BEAT_ENTRY": entry,
        "OCP_BEAT_INTERVAL": "1",
        "OTEL_SERVICE_NAME": "ocp-test-beat",
        **worker_telemetry_env(pg_url, receiver),
    }
    cmd = [str(BIN / "opentelemetry-instrument"), str(BIN / "celery"), "-A", "tests.app_beat"]
    cmd += ["beat", "-l", "INFO"]
    cmd += ["-s", str(tmp_path / "schedule"), "--pidfile", str(tmp_path / "beat.pid")]
    with log.open("wb") as out:
        beat = subprocess.Popen(
            cmd, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )
    try:
        rows = wait_for(
            lambda: (
                len(found := rows_where(pg, periodic_task=entry, outcome="succeeded")) >= 2
                and found
            ),
            30,
            f"two finished rows of {entry}",
        )
    finally:
        beat.send_signal(signal.SIGTERM)
        try:
            beat.wait(15)
        except subprocess.TimeoutExpired:
            os.killpg(beat.pid, signal.SIGKILL)
            beat.wait(10)
            raise AssertionError(f"beat did not stop on SIGTERM:\n{log.read_text()}") from None
    output = log.read_text(errors="replace")
    assert "otel-celery-publish internal error" not in output, output
    for row in rows:
        assert (row["task_name"], row["queue"], row["app"]) == (
            "tests.add",
            queue_name,
            "ocp_tests",
        )
        assert row["attempt"] == 0 and row["received_at"] is not None
        spans = spans_of(receiver, row["trace_id"], lambda s: bool(named(s, "send tests.add")))
        [send] = named(spans, "send tests.add")
        assert send.span_id == row["span_id"]
        assert send.service == "ocp-test-beat"
        assert send.attributes["celery.beat.entry"] == entry
    assert len({r["task_id"] for r in rows}) == len(rows)


# -- send_task by name -----------------------------------------------------------------------


def test_send_task_by_name_without_the_task_code(
    start_worker: Any, receiver: Receiver, pg: Engine, pg_url: str, queue_name: str,
    broker: Broker,
) -> None:  # fmt: skip
    """``app.send_task("tests.login", ...)`` from a process whose app has no tasks (zero-code
    instrumented): the row is complete and replayable, the worker runs it, the lifecycle and
    the trace are recorded. Without the task's signature positional arguments cannot be
    matched to names: only keyword arguments are redacted by name."""
    start_worker()
    task_id = str(uuid.uuid4())
    env = {
        **os.environ,
        "PYTHONPATH": str(ROOT),
        "OCP_BROKER_URL": broker.url,
        "OTEL_SERVICE_NAME": "ocp-notasks",
        **worker_telemetry_env(pg_url, receiver),
    }
    cmd = [str(BIN / "opentelemetry-instrument"), str(BIN / "python"), "-m", "tests.app_notasks"]
    done = subprocess.run(
        [*cmd, task_id, queue_name], env=env, capture_output=True, timeout=60, check=False
    )
    assert done.returncode == 0, done.stderr.decode(errors="replace")
    assert b"internal error" not in done.stderr, done.stderr.decode(errors="replace")

    [row] = wait_row(pg, task_id, settled)
    assert (row["task_name"], row["app"], row["queue"]) == (
        "tests.login",
        "ocp_notasks",
        queue_name,
    )
    assert row["broker"] == BROKER
    assert row["outcome"] == "succeeded" and row["received_at"] and row["started_at"]
    assert row["content_type"] == "application/json" and row["error"] is None
    args, kwargs, _embed = json.loads(row["payload"])
    assert (args, kwargs) == (["ada", "hunter2"], {"token": "t0k3n"})
    assert row["kwargs_repr"] == "{'token': '***'}"
    assert row["args_repr"] == "('ada', 'hunter2')"

    spans = spans_of(
        receiver,
        row["trace_id"],
        lambda s: bool(named(s, "process tests.login") and named(s, "send tests.login")),
    )
    [send] = named(spans, "send tests.login")
    assert (send.span_id, send.service) == (row["span_id"], "ocp-notasks")
    assert named(spans, "process tests.login")[0].parent_id == send.span_id

    # The stored payload is enough to send it again, from an app that does know the task.
    settings = Settings.from_env(environ={}, audit_url=pg_url)
    report = replay(app, [task_id], policy=Policy(force=True), settings=settings)
    [result] = report.results
    assert result.status == "sent", result
    assert result.new_task_id is not None
    [again] = wait_row(pg, result.new_task_id, settled)
    assert again["replay_of"] == row["publish_id"] and again["outcome"] == "succeeded"
    assert again["payload"] == row["payload"]


# -- several apps in one process -------------------------------------------------------------


@pytest.fixture
def rabbitmq_queue(queue_name: str) -> Iterator[None]:
    """Delete the test's queue on RabbitMQ too, after the workers stopped (requested first)."""
    yield
    Broker("rabbitmq", RABBITMQ, "rabbitmq", [queue_name]).delete_queues()


def login_app(main: str, broker_url: str, serializer: str, secret_first: bool) -> Any:
    """An app of its own with a ``tests.login`` task whose secret is its first or second
    positional parameter (redaction by name must use the publishing app's task)."""
    other = Celery(main, broker=broker_url, set_as_current=False)
    other.conf.update(task_serializer=serializer, accept_content=["json", "pickle"])

    def secret_first_login(password: str, user: str) -> str:
        return user

    def secret_second_login(user: str, password: str) -> str:
        return user

    return other.task(name="tests.login")(
        secret_first_login if secret_first else secret_second_login
    )


def test_several_apps_each_row_and_span_is_its_apps(
    rabbitmq_queue: None, publisher: Publisher, start_worker: Any, pg: Engine, queue_name: str
) -> None:
    """Two apps in one process, on Redis (json) and RabbitMQ (pickle): every row names its
    app and broker (no credentials) and is encoded and redacted as its own app does, whether
    it was sent with ``apply_async`` or ``send_task``, from the main thread or another, while
    the other app is the current one; each producer span names its app's broker."""
    start_worker()
    # Celery refuses to run a pickle-accepting worker as root without C_FORCE_ROOT.
    pickle_env = {"OCP_BROKER_URL": RABBITMQ, "OCP_ACCEPT_PICKLE": "1", "C_FORCE_ROOT": "1"}
    pickle_env |= QUICK_STOP
    start_worker(env=pickle_env)
    one = login_app("ocp_app_one", BROKER, "json", secret_first=False)
    two = login_app("ocp_app_two", RABBITMQ, "pickle", secret_first=True)
    sent: dict[str, str] = {}  # task id -> the app that sent it

    def publish_all() -> None:
        two.app.set_current()  # created last and current: it must not describe app one's rows
        for task, secret_args in ((one, ("ada", "s3cret")), (two, ("s3cret", "bob"))):
            sent[task.apply_async(secret_args, queue=queue_name).id] = task.app.main
            by_name = task.app.send_task("tests.login", secret_args, queue=queue_name)
            sent[by_name.id] = task.app.main

    try:
        publish_all()
        thread = threading.Thread(target=publish_all)
        thread.start()
        thread.join(30)
        assert len(sent) == 8
        expected = {
            "ocp_app_one": (BROKER, "application/json", "('ada', '***')", "redis", 6379),
            "ocp_app_two": (
                "amqp://127.0.0.1:5672//",
                "application/x-python-serialize",
                "('***', 'bob')",
                "rabbitmq",
                5672,
            ),
        }
        for task_id, main in sent.items():
            [row] = wait_row(pg, task_id, settled)
            broker_url, content_type, args_repr, system, port = expected[main]
            assert (row["app"], row["broker"]) == (main, broker_url), row
            assert (row["content_type"], row["args_repr"]) == (content_type, args_repr), row
            assert row["outcome"] == "succeeded"
            [send] = [
                s
                for s in publisher.spans("send tests.login")
                if s.attributes["messaging.message.id"] == task_id
            ]
            assert format_span_id(send.context.span_id) == row["span_id"]
            assert send.attributes["messaging.system"] == system
            assert send.attributes["server.address"] == "127.0.0.1"
            assert send.attributes["server.port"] == port
    finally:
        app.set_current()
        one.app.close()
        two.app.close()


# -- eager -----------------------------------------------------------------------------------


def worker_hooks(publisher: Publisher) -> Any:
    """The instrumentation's WorkerHooks (the receiver of task_prerun)."""
    return next(
        r.__self__ for _signal, r in publisher.instrumentor._receivers if r.__name__ == "on_prerun"
    )


def test_eager_runs_publish_nothing_and_leave_nothing(
    publisher: Publisher, pg: Engine, queue_name: str
) -> None:
    """``task.apply()`` and ``task_always_eager`` (with a nested ``.delay()``, eager too) are
    never published: no row, no span, no state left, the caller's context untouched."""
    hooks = worker_hooks(publisher)
    before = otel_context.get_current()
    task_id = str(uuid.uuid4())
    assert add.apply((1, 2), task_id=task_id).get() == 3
    app.conf.task_always_eager = True
    try:
        nested_id = spawn.apply_async(task_id=str(uuid.uuid4()), kwargs={"queue": queue_name})
        child_id = nested_id.get()
        delayed = add.delay(2, 2)
        assert delayed.get() == 4
    finally:
        app.conf.task_always_eager = False
    # A real publish afterwards, as a marker: once its row is there, ours would be too.
    marker = add.apply_async((0, 0), queue=queue_name)
    wait_row(pg, marker.id, lambda rows: bool(rows[0]["sent_at"]))
    for eager in (task_id, nested_id.id, child_id, delayed.id):
        assert rows_where(pg, task_id=eager) == []
    assert [
        s.attributes["messaging.message.id"] for s in publisher.exporter.get_finished_spans()
    ] == [marker.id]
    assert len(hooks._running) == 0
    assert otel_context.get_current() is before


def test_apply_publishes_what_its_task_publishes(
    publisher: Publisher, pg: Engine, queue_name: str, drain_queue: None
) -> None:
    """``task.apply()`` alone (no ``task_always_eager``) runs in the caller, unpublished, but
    a ``.delay()`` inside it is a real publish: a row and a producer span in the caller's
    trace. Celery names the eager task as the child's parent and root; it has no row."""
    tracer = publisher.instrumentor._tracer_provider.get_tracer("test")
    with tracer.start_as_current_span("caller") as caller:
        eager = spawn.apply(kwargs={"queue": queue_name})
    child_id = eager.get()
    [row] = wait_row(pg, child_id, lambda rows: bool(rows[0]["sent_at"]))
    assert (row["parent_id"], row["root_id"]) == (eager.id, eager.id)
    assert row["queue"] == queue_name
    assert rows_where(pg, task_id=eager.id) == []
    [send] = publisher.spans("send tests.add")
    assert send.kind is SpanKind.PRODUCER
    assert send.parent is not None and send.parent.span_id == caller.get_span_context().span_id
    assert not publisher.spans("send tests.spawn") and not publisher.spans("process tests.spawn")
