"""``lost`` on seeded tables (SQLite and PostgreSQL): each reason, every known false positive."""

from __future__ import annotations

import datetime as dt
from pathlib import Path
from typing import Any

import pytest
from celery import Celery

from otel_celery_publish import audit
from otel_celery_publish.config import Settings
from tests.audit_support import NOW, ago, cli, database, row, seed, validated
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
