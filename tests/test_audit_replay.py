"""``replay`` without a worker: what is re-sent and how it is recorded, refusals and their flags,
dry run, confirmation, partial failure."""

from __future__ import annotations

import pickle
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
from celery import signals
from opentelemetry.instrumentation.celery import CeleryInstrumentor
from opentelemetry.trace import SpanKind

from otel_celery_publish import CeleryPublishInstrumentor, audit
from otel_celery_publish import headers as hdr
from tests.app import add, app
from tests.audit_support import NOW, ago, cli, database, migrated, row, seed, stored, validated
from tests.conftest import BROKER, audit_rows, wait_row


@pytest.fixture
def queues(queue_name: str) -> Iterator[list[str]]:
    """Names of queues nobody consumes, deleted from Redis afterwards."""
    names = [f"{queue_name}-{n}" for n in ("a", "b")]
    yield names
    redis.Redis.from_url(BROKER).delete(*names)


def test_replay_is_linked_and_faithful(
    publisher: Any, pg: Any, pg_url: str, queues: list[str]
) -> None:
    """The re-send keeps the task's options, stores replay_of, links its producer span to the
    original's, and marks the original replayed; --keep-id keeps the task id."""
    settings = migrated(pg_url)
    stranded, rerouted = queues
    task_id = add.apply_async(
        (4, 5), queue=stranded, priority=3, time_limit=30, soft_time_limit=20,
        headers={"tenant": "acme"}, link=add.s(1),
    ).id  # fmt: skip
    [original] = wait_row(pg, task_id, lambda rows: rows[0]["sent_at"] is not None)

    result = cli("replay", task_id, "--queue", rerouted, "--keep-id", "--yes", settings=settings)
    assert result.exit_code == 0, result.output
    first, again = wait_row(pg, task_id, lambda rows: len(rows) == 2)
    assert first["publish_id"] == original["publish_id"]
    assert (first["replayed_as"], first["replayed_at"] is not None) == (task_id, True)
    assert again["replay_of"] == original["publish_id"] and again["queue"] == rerouted
    assert again["options"] == original["options"]
    assert again["options"]["headers"] == {"tenant": "acme"}
    assert (again["priority"], again["args_repr"]) == (3, "(4, 5)")
    assert again["payload"] == original["payload"]  # args, kwargs and the link callback

    sends = [s for s in publisher.exporter.get_finished_spans() if s.kind is SpanKind.PRODUCER]
    replay_span = next(
        s for s in sends if s.attributes["celery.audit.publish_id"] == again["publish_id"]
    )
    [link] = replay_span.links
    assert (f"{link.context.trace_id:032x}", f"{link.context.span_id:016x}") == (
        original["trace_id"], original["span_id"],
    )  # fmt: skip
    assert replay_span.attributes["celery.audit.replay_of"] == original["publish_id"]
    assert hdr.REPLAY_OF not in again["options"]["headers"]
    assert [a.publish_id for a in audit.show(task_id, settings=settings).attempts] == [
        first["publish_id"], again["publish_id"],
    ]  # fmt: skip


def refusal_rows() -> dict[str, dict[str, Any]]:
    """Rows that must not be replayed without a flag, by the reason they are refused for."""
    replayed = row(sent_at=ago(20))
    return {
        "succeeded": row(sent_at=ago(20), finished_at=ago(19), outcome="succeeded"),
        "already replayed": row(sent_at=ago(20), replayed_at=ago(5), replayed_as="x"),
        "replayed, bookkeeping lost": replayed,
        "the replay": row(replay_of=replayed["publish_id"], published_at=ago(4), sent_at=ago(4)),
        "expired": row(sent_at=ago(20), expires=ago(10)),
        "redacted": row(sent_at=ago(20), payload_redacted=True),
        "headers redacted": row(sent_at=ago(20), options={
            "serializer": "json", "headers": {"authorization": "***"}, "headers_redacted": True}),
        "unregistered": row(sent_at=ago(20), task_name="tests.not_in_this_app"),
        "no payload": row(payload=None, error="payload of 9999999 bytes exceeds max"),
        "pickled": row(payload=pickle.dumps(((2, 3), {}, {})),
                       content_type="application/x-python-serialize", content_encoding="binary"),
        "failed, replayable": row(sent_at=ago(20), finished_at=ago(19), outcome="failed"),
    }  # fmt: skip


def test_refusals_say_why_and_flags_lift_them(tmp_path: Path, pg_url: str) -> None:
    """Succeeded, replayed and expired need --force, redacted payloads or headers
    --allow-redacted, unregistered
    --allow-unregistered; no payload and untrusted content are never sent."""
    settings = database("sqlite", tmp_path, pg_url)
    rows = refusal_rows()
    seed(settings, *rows.values())
    ids = [r["task_id"] for r in rows.values()]

    def refused(policy: audit.Policy) -> dict[str, str | None]:
        planned = audit.plan_replay(app, ids, policy=policy, settings=settings, now=NOW)
        return {name: p.refused for name, p in zip(rows, planned, strict=True)}

    default = refused(audit.Policy())
    assert "already succeeded" in str(default["succeeded"])
    assert "already replayed as x" in str(default["already replayed"])
    assert "already replayed" in str(default["replayed, bookkeeping lost"])
    assert "expired" in str(default["expired"])
    assert "redacted when published" in str(default["redacted"])
    assert "custom headers were redacted" in str(default["headers redacted"])
    assert "not registered in this app" in str(default["unregistered"])
    assert "no stored payload (payload of 9999999 bytes" in str(default["no payload"])
    assert "untrusted content" in str(default["pickled"])
    assert default["failed, replayable"] is None and default["the replay"] is None
    lifted = refused(audit.Policy(force=True, allow_redacted=True, allow_unregistered=True))
    assert {name for name, why in lifted.items() if why} == {"no payload", "pickled"}


def test_dry_run_and_declined_confirmation_send_nothing(tmp_path: Path, pg_url: str) -> None:
    """--dry-run shows the plan (documented JSON) and sends nothing; declining does neither."""
    settings = database("sqlite", tmp_path, pg_url)
    lost = row(sent_at=ago(20), queue="nobody-listens", options={"serializer": "json",
               "headers": {"tenant": "acme"}, "time_limit": 30})  # fmt: skip
    seed(settings, lost)
    dry = cli("replay", lost["task_id"], "--dry-run", "--json", settings=settings)
    data = validated("replay", dry.stdout)
    assert (data["dry_run"], data["would_send"], data["sent"]) == (True, 1, 0)
    [plan] = data["results"]
    assert plan["options"]["time_limit"] == 30 and plan["options"]["queue"] == "nobody-listens"
    assert plan["options"]["headers"][hdr.REPLAY_OF] == lost["publish_id"]
    declined = cli("replay", lost["task_id"], settings=settings, input="n\n")
    assert declined.exit_code == 1 and "Re-send 1 task(s)?" in declined.stderr
    assert stored(settings, replay_of=lost["publish_id"]) == []
    assert stored(settings, publish_id=lost["publish_id"])[0]["replayed_at"] is None
    assert not CeleryPublishInstrumentor().is_instrumented_by_opentelemetry


def test_partial_failure_reports_each_task_and_releases_the_failed(
    tmp_path: Path, pg_url: str, queues: list[str]
) -> None:
    """replay --lost sends what it can: a send that raises is reported and its original stays
    replayable; the command instruments itself for the re-sends and exits 1."""
    settings = database("sqlite", tmp_path, pg_url)
    target = queues[0]
    good = row(sent_at=ago(20), queue="stranded")
    bad = row(sent_at=ago(20), queue="stranded", options={"serializer": "no-such-serializer"})
    seed(settings, good, bad)
    result = cli("replay", "--lost", "--older-than", "0s", "--from-queue", "stranded",
                 "--queue", target, "--yes", "--json", settings=settings)  # fmt: skip
    assert result.exit_code == 1
    data = validated("replay", result.stdout)
    by_id = {r["task_id"]: r for r in data["results"]}
    assert (data["sent"], data["failed"]) == (1, 1)
    assert by_id[good["task_id"]]["status"] == "sent"
    assert by_id[bad["task_id"]]["status"] == "failed"
    assert "no-such-serializer" in by_id[bad["task_id"]]["reason"]
    [replay_row] = stored(settings, replay_of=good["publish_id"])
    assert replay_row["task_id"] == by_id[good["task_id"]]["new_task_id"]
    assert stored(settings, publish_id=bad["publish_id"])[0]["replayed_at"] is None
    [planned] = audit.plan_replay(app, [bad["task_id"]], settings=settings, now=NOW)
    assert planned.refused is None  # its raised send does not count as a replay
    assert not CeleryPublishInstrumentor().is_instrumented_by_opentelemetry
    assert redis.Redis.from_url(BROKER).llen(target) == 1


def test_replay_refuses_to_record_in_another_database(
    publisher: Any, pg: Any, tmp_path: Path, pg_url: str
) -> None:
    """When the process is already instrumented for another audit table, replay says so and
    sends nothing."""
    settings = database("sqlite", tmp_path, pg_url)
    lost = row(sent_at=ago(20))
    seed(settings, lost)
    result = cli("replay", lost["task_id"], "--yes", settings=settings)
    assert result.exit_code == 1
    assert "already instrumented with another audit table" in result.stderr
    assert audit_rows(pg, lost["task_id"]) == []
    assert stored(settings, publish_id=lost["publish_id"])[0]["replayed_at"] is None


@pytest.mark.parametrize("official_on", [False, True], ids=["official-off", "official-on"])
def test_replay_undoes_the_instrumentation_it_set_up(
    tmp_path: Path, pg_url: str, queues: list[str], official_on: bool
) -> None:
    """In a process that is not instrumented, replay() instruments for its sends only: after
    it, its row is stored, our receivers are off before_task_publish again and
    opentelemetry-instrumentation-celery is as it was (on or off)."""
    settings = database("sqlite", tmp_path, pg_url)
    lost = row(sent_at=ago(20))
    seed(settings, lost)
    official = CeleryInstrumentor()  # type: ignore[no-untyped-call]
    if official_on:
        official.instrument()
    try:
        receivers = _publish_receivers()
        report = audit.replay(
            app, [lost["task_id"]], policy=audit.Policy(queue=queues[0]), settings=settings
        )
        assert report.ok and report.count("sent") == 1
        assert len(stored(settings, replay_of=lost["publish_id"])) == 1
        assert _publish_receivers() == receivers
        assert official.is_instrumented_by_opentelemetry is official_on
        assert not CeleryPublishInstrumentor().is_instrumented_by_opentelemetry
    finally:
        if official.is_instrumented_by_opentelemetry:
            official.uninstrument()


def _publish_receivers() -> set[Any]:
    """Who is connected to before_task_publish (their lookup keys)."""
    return {key for key, _ in signals.before_task_publish.receivers}


class RecordingApp:
    """Stands in for the Celery app where only the pacing of send_task calls matters."""

    conf = app.conf
    tasks = app.tasks

    def __init__(self) -> None:
        self.sent_at: list[float] = []

    def send_task(self, **_: Any) -> None:
        self.sent_at.append(time.monotonic())


def test_rate_paces_the_sends(tmp_path: Path, pg_url: str) -> None:
    """--rate N leaves at least 1/N s between two sends."""
    settings = database("sqlite", tmp_path, pg_url)
    rows = [row(sent_at=ago(20)) for _ in range(3)]
    seed(settings, *rows)
    recorder = RecordingApp()
    report = audit.replay(recorder, [r["task_id"] for r in rows], rate=10, settings=settings)
    assert report.ok and report.count("sent") == 3
    gaps = [b - a for a, b in zip(recorder.sent_at, recorder.sent_at[1:], strict=False)]
    assert len(gaps) == 2 and min(gaps) >= 0.1 - 1e-3
