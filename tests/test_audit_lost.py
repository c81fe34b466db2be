"""``lost`` on seeded tables (SQLite and PostgreSQL): each reason, every known false positive,
worker liveness, and the partial index."""

from __future__ import annotations

import datetime as dt
from pathlib import Path
from typing import Any

import pytest
from celery import Celery

from otel_celery_publish import audit
from otel_celery_publish.audit import _db, _lost
from otel_celery_publish.config import Settings
from otel_celery_publish.schema.table import LOST_REASONS
from tests.audit_support import NOW, ago, beat, cli, database, row, schema, seed, validated
from tests.conftest import BROKER


@pytest.fixture(params=["sqlite", "postgresql"])
def settings(request: pytest.FixtureRequest, tmp_path: Path, pg_url: str) -> Settings:
    return database(request.param, tmp_path, pg_url)


def scenario() -> tuple[list[dict[str, Any]], dict[str, str]]:
    """Rows named by their task id, and the reason ``lost`` must give (absent: not lost)."""
    original = row(task_id="replay-bookkeeping-lost", sent_at=ago(20))
    failed_replay_of = row(task_id="replay-send-raised", sent_at=ago(20))
    rows = [
        row(task_id="finished", sent_at=ago(21), received_at=ago(21), started_at=ago(21),
            finished_at=ago(20), outcome="succeeded"),
        row(task_id="failed-is-not-lost", sent_at=ago(21), received_at=ago(21),
            started_at=ago(21), finished_at=ago(20), outcome="failed"),
        row(task_id="never-received", sent_at=ago(20)),
        row(task_id="too-recent", published_at=ago(5), sent_at=ago(5)),
        row(task_id="eta-not-due", sent_at=ago(20), eta=NOW + dt.timedelta(hours=1)),
        row(task_id="eta-due-recently", sent_at=ago(20), eta=ago(5)),
        row(task_id="eta-long-past", published_at=ago(40), sent_at=ago(40), eta=ago(20)),
        row(task_id="expired", sent_at=ago(20), expires=ago(15)),
        row(task_id="publish-raised", error="payload not serializable with 'json'",
            payload=None),
        row(task_id="received-not-started", sent_at=ago(21), received_at=ago(20)),
        row(task_id="held-for-its-eta", sent_at=ago(21), received_at=ago(20),
            eta=NOW + dt.timedelta(minutes=5)),
        row(task_id="worker-died", sent_at=ago(21), received_at=ago(21), started_at=ago(20),
            worker="w1@host"),
        row(task_id="replayed", sent_at=ago(20), replayed_at=ago(1), replayed_as="new-id"),
        original,
        row(task_id="the-replay", replay_of=original["publish_id"], published_at=ago(2),
            sent_at=ago(2), received_at=ago(2), started_at=ago(2), finished_at=ago(2),
            outcome="succeeded"),
        failed_replay_of,
        row(task_id="the-failed-replay", replay_of=failed_replay_of["publish_id"],
            published_at=ago(2)),
        # A worker died after publishing the retry, before recording attempt 0's outcome.
        row(task_id="retried", published_at=ago(40), sent_at=ago(40), received_at=ago(40),
            started_at=ago(40)),
        row(task_id="retried", attempt=1, published_at=ago(39), sent_at=ago(39),
            received_at=ago(39), started_at=ago(39), finished_at=ago(39), outcome="succeeded"),
        row(task_id="retry-lost", published_at=ago(40), sent_at=ago(40), received_at=ago(40),
            started_at=ago(40), finished_at=ago(40), outcome="retried"),
        row(task_id="retry-lost", attempt=1, published_at=ago(40), sent_at=ago(40)),
        # Redelivered after a visibility timeout (same publish_id, received again): finished.
        row(task_id="redelivered", published_at=ago(120), sent_at=ago(120),
            received_at=ago(30), started_at=ago(30), finished_at=ago(29), outcome="succeeded"),
        row(task_id="two-days-old", published_at=ago(60 * 48), sent_at=ago(60 * 48)),
        row(task_id="other-queue", queue="q2", sent_at=ago(20), task_name="tests.other"),
    ]  # fmt: skip
    expected = {
        "never-received": "not_received",
        "eta-long-past": "not_received",
        "expired": "expired",
        "publish-raised": "not_sent",
        "received-not-started": "not_started",
        "worker-died": "not_finished",
        "retry-lost": "not_received",
        "other-queue": "not_received",
        "replay-send-raised": "not_received",
    }
    return rows, expected


def test_reasons_and_false_positives(settings: Settings) -> None:
    """Each stuck stage gets its reason; finished, retried, replayed, ETA-not-due and recent
    tasks are not reported, nor anything outside the window."""
    rows, expected = scenario()
    seed(settings, *rows)
    found = audit.lost(settings=settings, now=NOW)
    assert {t.task_id: t.reason for t in found} == expected
    stuck = next(t for t in found if t.task_id == "worker-died")
    assert (stuck.worker, stuck.started_at, stuck.attempt) == ("w1@host", ago(20), 0)
    assert next(t for t in found if t.task_id == "retry-lost").attempt == 1
    assert next(t for t in found if t.task_id == "publish-raised").error
    assert [t.published_at for t in found] == sorted(t.published_at for t in found)
    older = audit.lost(settings=settings, now=NOW, since=dt.timedelta(days=3))
    assert {t.task_id for t in older} == {*expected, "two-days-old"}


def test_filters(settings: Settings) -> None:
    """Task-name glob, queue, time window, threshold and limit narrow the report."""
    rows, _ = scenario()
    seed(settings, *rows)

    def ids(**filters: Any) -> set[str]:
        return {t.task_id for t in audit.lost(settings=settings, now=NOW, **filters)}

    assert ids(task="tests.o*") == {"other-queue"}
    assert ids(task="tests.?dd", queue="q2") == set()
    assert ids(queue="q2") == {"other-queue"}
    assert ids(since=ago(60), until=ago(22)) == {"eta-long-past", "retry-lost"}
    assert ids(since=ago(30)) == {
        "never-received", "expired", "publish-raised", "received-not-started", "worker-died",
        "other-queue", "replay-send-raised",
    }  # fmt: skip
    assert ids(older_than=dt.timedelta(minutes=30)) == {"retry-lost"}
    assert len(audit.lost(settings=settings, now=NOW, limit=2)) == 2


def test_cli_lost_json_and_table(settings: Settings) -> None:
    """``lost --json`` follows the documented shape; the table names each reason in words."""
    rows, expected = scenario()
    seed(settings, *rows)
    result = cli("lost", "--json", "--since", "3d", settings=settings)
    assert result.exit_code == 0, result.output
    found = validated("lost", result.stdout)
    assert {t["task_id"] for t in found} >= set(expected)
    table = cli("lost", "--queue", "q2", settings=settings)
    assert "sent, never received" in table.stdout and "1 lost task(s)" in table.stdout


def test_check_results_drops_what_the_backend_saw_finish(tmp_path: Path, pg_url: str) -> None:
    """--check-results drops tasks whose result says SUCCESS and shows the others' state."""
    settings = database("sqlite", tmp_path, pg_url)
    done, unknown = row(sent_at=ago(20)), row(sent_at=ago(20))
    seed(settings, done, unknown)
    with_backend = Celery("ocp_results", broker=BROKER, backend=BROKER, set_as_current=False)
    with_backend.backend.store_result(done["task_id"], 5, "SUCCESS")
    try:
        kept = audit.check_results(with_backend, audit.lost(settings=settings, now=NOW))
        assert [(t.task_id, t.result_state) for t in kept] == [(unknown["task_id"], "PENDING")]
        result = cli("lost", "--check-results", "--json", settings=settings, app_=with_backend)
        assert [t["task_id"] for t in validated("lost", result.stdout)] == [unknown["task_id"]]
        without = cli("lost", "--check-results", settings=settings)
        assert without.exit_code == 1 and "needs a result backend" in without.stderr
    finally:
        with_backend.backend.forget(done["task_id"])


def liveness_scenario(settings: Settings) -> dict[str, str]:
    """Seed rows held by live, dead, stopped and unknown worker instances; the reasons."""
    beat(settings, "alive")
    beat(settings, "dead", heartbeat_at=ago(seconds=62), expires_at=ago(seconds=2))
    beat(settings, "stopped-recently", stopped_at=ago(5), expires_at=ago(4))
    beat(settings, "stopped-long-ago", stopped_at=ago(15), expires_at=ago(14))
    lost_attempt = row(
        task_id="worker-lost-then-retried",
        sent_at=ago(21),
        received_at=ago(21),
        started_at=ago(21),
        finished_at=ago(1),
        outcome="failed",
        lost_reason="worker_lost",
        worker_instance="alive",
    )
    started = {"sent_at": ago(21), "received_at": ago(21), "acks_late": False}
    seed(
        settings,
        row(task_id="running-for-ages", started_at=ago(20), worker_instance="alive", **started),
        row(task_id="held-for-ages", sent_at=ago(21), received_at=ago(20),
            worker_instance="alive", acks_late=False),
        row(task_id="dead-just-started", **{**started, "received_at": ago(seconds=30)},
            started_at=ago(seconds=30), worker_instance="dead"),
        row(task_id="dead-acks-late-recent",
            **{**started, "received_at": ago(seconds=30), "acks_late": True},
            started_at=ago(seconds=30), worker_instance="dead"),
        row(task_id="dead-acks-late-old", started_at=ago(20), worker_instance="dead",
            **{**started, "acks_late": True}),
        row(task_id="dead-received-recent", sent_at=ago(21), received_at=ago(seconds=30),
            worker_instance="dead", acks_late=False),
        row(task_id="dead-received-old", sent_at=ago(21), received_at=ago(20),
            worker_instance="dead", acks_late=False),
        row(task_id="returned-recently", sent_at=ago(30), received_at=ago(30),
            worker_instance="stopped-recently", acks_late=False),
        row(task_id="returned-long-ago", sent_at=ago(30), received_at=ago(30),
            worker_instance="stopped-long-ago", acks_late=False),
        row(task_id="stopped-started", started_at=ago(20), worker_instance="stopped-recently",
            **started),
        row(task_id="never-beat-old", started_at=ago(20), worker_instance="never-beat",
            **started),
        row(task_id="never-beat-recent", **{**started, "received_at": ago(1)},
            started_at=ago(1), worker_instance="never-beat"),
        row(task_id="worker-lost", sent_at=ago(21), received_at=ago(21), started_at=ago(21),
            finished_at=ago(seconds=1), outcome="failed", exception_type="WorkerLostError",
            exception_message="Worker exited prematurely: signal 9 (SIGKILL).",
            lost_reason="worker_lost", worker_instance="alive"),
        lost_attempt,
        row(task_id="worker-lost-then-retried", attempt=1, published_at=ago(1), sent_at=ago(1),
            worker_instance="alive", received_at=ago(1), started_at=ago(1), finished_at=ago(1),
            outcome="succeeded"),
        row(task_id="worker-lost-replayed", sent_at=ago(21), finished_at=ago(1),
            outcome="failed", lost_reason="worker_lost", replayed_at=ago(1), replayed_as="x"),
        row(task_id="discarded", sent_at=ago(21), received_at=ago(21), finished_at=ago(1),
            outcome="rejected", exception_type="NotRegistered",
            exception_message="task 'x' is not registered in this worker",
            lost_reason="discarded", worker_instance="alive"),
    )  # fmt: skip
    return {
        "dead-just-started": "worker_dead",
        "dead-acks-late-old": "worker_dead",
        "dead-received-old": "worker_dead",
        "returned-long-ago": "returned",
        "stopped-started": "not_finished",
        "never-beat-old": "not_finished",
        "worker-lost": "worker_lost",
        "discarded": "discarded",
    }


def test_liveness_reasons(settings: Settings) -> None:
    """A live instance's tasks are never lost however old; a dead one's started tasks are lost
    at once (received or acks_late ones after older_than); a cleanly stopped one's unstarted
    tasks are returned; lost pool processes and discarded messages are lost at once unless
    superseded or replayed; instances that never beat keep the age rule."""
    expected = liveness_scenario(settings)
    found = audit.lost(settings=settings, now=NOW)
    assert {t.task_id: t.reason for t in found} == expected
    discarded = next(t for t in found if t.task_id == "discarded")
    assert (discarded.exception_type, discarded.exception_message) == (
        "NotRegistered", "task 'x' is not registered in this worker",
    )  # fmt: skip
    recent = audit.lost(settings=settings, now=NOW, older_than=dt.timedelta(0))
    assert {t.task_id: t.reason for t in recent} == {
        **expected,
        "dead-acks-late-recent": "worker_dead",
        "dead-received-recent": "worker_dead",
        "returned-recently": "returned",
        "never-beat-recent": "not_finished",
    }
    assert set(LOST_REASONS) == set(schema("lost")["items"]["properties"]["reason"]["enum"])


def test_lost_reads_the_partial_index(tmp_path: Path, pg_url: str) -> None:
    """On PostgreSQL the lost query, heartbeat join included, can use ix_<table>_unfinished:
    its WHERE clause implies the index predicate."""
    settings = database("postgresql", tmp_path, pg_url)
    liveness_scenario(settings)
    with _db.open_db(settings) as db:
        stmt = _lost.lost_query(
            db, now=NOW, older_than=dt.timedelta(minutes=10), since=dt.timedelta(days=1),
            until=None,
        )  # fmt: skip
        compiled = stmt.compile(dialect=db.engine.dialect)
        with db.engine.connect() as conn:
            conn.exec_driver_sql("SET enable_seqscan = off")
            plan = "\n".join(
                r[0] for r in conn.exec_driver_sql("EXPLAIN " + compiled.string, compiled.params)
            )
    assert f"ix_{settings.table_name}_unfinished" in plan, plan
