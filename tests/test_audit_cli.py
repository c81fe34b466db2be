"""The ``audit`` commands' output and errors: show, prune, drain, error paths, and the pure
helpers they use (durations, timeline bars)."""

from __future__ import annotations

import dataclasses
import datetime as dt
import os
import sqlite3
from pathlib import Path

import click
import pytest

from otel_celery_publish import audit
from otel_celery_publish.audit import _maintenance
from otel_celery_publish.cli._options import parse_duration, parse_when
from otel_celery_publish.cli.show import lifecycle_bars
from otel_celery_publish.config import Settings
from otel_celery_publish.sink.quarantine import Quarantine
from otel_celery_publish.sink.spool import target_dir
from otel_celery_publish.timeline import Bar, render
from otel_celery_publish.timing import queue_waits
from tests.audit_support import (
    NOW,
    ago,
    celery_audit,
    cli,
    database,
    one_line_error,
    row,
    seed,
    stored,
    validated,
)


@pytest.fixture
def sqlite(tmp_path: Path, pg_url: str) -> Settings:
    return database("sqlite", tmp_path, pg_url)


def history(settings: Settings) -> dict[str, dict[str, object]]:
    """A task retried once whose second attempt was lost and replayed (new id), plus noise."""
    first = row(task_id="t-1", published_at=ago(50), sent_at=ago(50), received_at=ago(50),
                started_at=ago(50), finished_at=ago(49), outcome="retried")  # fmt: skip
    second = row(task_id="t-1", attempt=1, published_at=ago(49), sent_at=ago(49),
                 replayed_at=ago(10), replayed_as="t-2")  # fmt: skip
    replay = row(task_id="t-2", attempt=1, published_at=ago(10), sent_at=ago(10),
                 received_at=ago(10), started_at=ago(10), finished_at=ago(9),
                 outcome="succeeded", replay_of=second["publish_id"], runtime_s=60.0)  # fmt: skip
    seed(settings, first, second, replay, row(task_id="unrelated"))
    return {"first": first, "second": second, "replay": replay}


def test_show_follows_attempts_and_replays_both_ways(sqlite: Settings) -> None:
    """show of the original or of the replay lists all three attempts, oldest first."""
    rows = history(sqlite)
    for task_id in ("t-1", "t-2"):
        attempts = audit.show(task_id, settings=sqlite).attempts
        assert [a.publish_id for a in attempts] == [r["publish_id"] for r in rows.values()]
    replay = audit.show("t-2", settings=sqlite).attempts[2]
    assert replay.replay_of == rows["second"]["publish_id"] and replay.trace_url is None


def test_show_json_text_and_trace_url(sqlite: Settings) -> None:
    """--json follows the documented shape; the text has a trace URL and a timeline."""
    rows = history(sqlite)
    settings = Settings.from_env(
        environ={"OTEL_CELERY_PUBLISH_TRACE_URL": "http://jaeger:16686/trace/{trace_id}"},
        audit_url=sqlite.audit_url,
        table_name=sqlite.table_name,
    )
    data = validated("show", cli("show", "t-1", "--json", settings=sqlite).stdout)
    assert [a["attempt"] for a in data["attempts"]] == [0, 1, 1]
    assert data["attempts"][1]["replayed_as"] == "t-2"
    text = audit.show("t-2", settings=settings).attempts[2].trace_url
    assert text == f"http://jaeger:16686/trace/{rows['replay']['trace_id']}"
    out = cli("show", "t-2", settings=sqlite).stdout
    assert "tests.add[t-2] attempt 1: succeeded" in out and "replay of" in out
    assert "    run" in out and "1.0 min" in out


def test_lifecycle_bars_show_where_an_attempt_is_stuck() -> None:
    """A finished attempt has its four stages; a stuck one ends in an open bar."""
    rows = {
        "done": row(sent_at=ago(21), received_at=ago(20), started_at=ago(20),
                    finished_at=ago(19), outcome="failed"),
        "killed": row(sent_at=ago(21), received_at=ago(20), started_at=ago(20)),
        "nobody": row(sent_at=ago(21)),
        "eta": row(sent_at=ago(21), eta=ago(15), received_at=ago(20.9)),
    }  # fmt: skip
    bars = {name: lifecycle_bars(_attempt(fields)) for name, fields in rows.items()}
    assert [(b.label, b.end is None) for b in bars["done"][1:]] == [
        ("send", False), ("broker wait", False), ("worker wait", False), ("run", False)
    ]  # fmt: skip
    assert bars["done"][0].error
    assert [(b.label, b.end is None) for b in bars["killed"][1:]][-1] == ("run", True)
    assert [b.label for b in bars["nobody"][1:]] == ["send", "broker wait"]
    assert bars["nobody"][-1].end is None
    # Received before its ETA: the worker wait (open) starts at the ETA.
    assert bars["eta"][-1] == Bar("worker wait", ago(15).timestamp(), None, 1)


def test_lifecycle_bars_wait_on_the_spans_edges() -> None:
    """show's broker and worker waits are timing.queue_waits' edges: from published_at or eta."""
    late = row(published_at=ago(22), sent_at=ago(21), received_at=ago(20), started_at=ago(19))
    waits = queue_waits(ago(22).timestamp(), None, ago(20).timestamp(), ago(19).timestamp())
    assert lifecycle_bars(_attempt(late))[2:4] == [
        Bar("broker wait", waits.ready, ago(20).timestamp(), 1),
        Bar("worker wait", ago(20).timestamp(), ago(19).timestamp(), 1),
    ]
    assert waits.ready == ago(22).timestamp()


def _attempt(fields: dict[str, object]) -> audit.Attempt:
    """A seeded row as ``show`` returns it (the payload left out), for the pure bar builder."""
    names = {f.name for f in dataclasses.fields(audit.Attempt)}
    known = {name: fields.get(name) for name in names}
    known |= {"attempt": fields.get("attempt", 0), "payload_redacted": False, "options": {}}
    return audit.Attempt(**known)  # type: ignore[arg-type]


def test_timeline_render_matches_the_demo_and_adds_open_bars() -> None:
    """Closed bars draw as the demo draws them; open bars, notes and errors add to that."""
    lines = render([("send", 0.0, 0.001, 0), ("run", 0.002, 0.004, 1)], width=8)
    assert lines == [f"  {'send':<34} ██ 1.0 ms", f"  {'  run':<34}     ████ 2.0 ms"]
    more = render(
        [Bar("wait", 0.0, None, 0, note="(worker)"), Bar("x", 1.0, 2.0, 1, error=True)],
        width=4,
        now=4.0,
    )
    assert more == [f"  {'wait':<34} ░░░░ > 4.00 s  (worker)", f"  {'  x':<34}  █ 1.00 s ✗"]
    assert render([]) == []


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("90s", 90), ("10m", 600), ("1h30m", 5400), ("30d", 2592000), ("2w", 1209600), ("5", 5)],
)
def test_durations(text: str, seconds: float) -> None:
    """Durations read like 10m, 1h30m, 30d; a bare number is seconds."""
    assert parse_duration(text) == dt.timedelta(seconds=seconds)


def test_times_and_bad_durations() -> None:
    """--since takes an ISO time (naive is UTC) or a duration ago; nonsense is a usage error."""
    naive = NOW.replace(tzinfo=None).isoformat()
    assert parse_when(naive) == NOW
    assert parse_when(NOW.astimezone(dt.timezone(dt.timedelta(hours=1))).isoformat()) == NOW
    assert parse_when(naive + "Z") == NOW
    assert parse_when("1h") == dt.timedelta(hours=1)
    for bad in ("10x", "1h-", "m"):
        with pytest.raises(click.BadParameter):
            parse_duration(bad)
    assert cli("lost", "--older-than", "soon").exit_code == 2


def test_prune_deletes_old_rows_in_batches(sqlite: Settings) -> None:
    """prune removes rows older than the cutoff, batch by batch, and keeps the rest."""
    old = [row(published_at=NOW - dt.timedelta(days=40 + i)) for i in range(5)]
    recent = [row(published_at=NOW - dt.timedelta(days=1))]
    seed(sqlite, *old, *recent)
    result = audit.prune(settings=sqlite, older_than=dt.timedelta(days=30), batch_size=2, now=NOW)
    assert (result.deleted, result.batches) == (5, 3)
    assert result.cutoff == NOW - dt.timedelta(days=30)
    assert [r["publish_id"] for r in stored(sqlite)] == [recent[0]["publish_id"]]


def test_prune_asks_first(sqlite: Settings) -> None:
    """Without --yes, prune asks; declining deletes nothing and exits 1."""
    seed(sqlite, row(published_at=NOW - dt.timedelta(days=400)))
    declined = cli("prune", "--older-than", "30d", settings=sqlite, input="n\n")
    assert declined.exit_code == 1 and len(stored(sqlite)) == 1
    accepted = cli("prune", "--older-than", "30d", "--json", settings=sqlite, input="y\n")
    assert validated("prune", accepted.stdout)["deleted"] == 1 and stored(sqlite) == []


def test_drain_reports_what_the_writer_shipped(
    sqlite: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    """drain calls the writer's drain_spool with the settings and reports its count."""
    calls: list[Settings] = []

    def fake_drain(settings: Settings) -> int:
        calls.append(settings)
        return 7

    monkeypatch.setattr(_maintenance, "drain_spool", fake_drain)
    result = cli("drain", "--json", settings=sqlite)
    assert validated("drain", result.stdout) == {"shipped": 7, "quarantined": []}
    assert [c.audit_url for c in calls] == [sqlite.audit_url]
    assert cli("drain", settings=sqlite).stdout == "shipped 7 spooled record(s)\n"


def test_drain_needs_a_migrated_table(tmp_path: Path) -> None:
    """drain refuses a database whose table is not migrated (one line, exit 1) and runs no DDL
    there: the read side never creates the table behind the operator's back."""
    path = tmp_path / "empty.db"
    sqlite3.connect(path).close()
    empty = Settings.from_env(environ={}, audit_url=f"sqlite:///{path}")
    result = cli("drain", settings=empty)
    one_line_error(result.stderr, result.exit_code, "is not migrated")
    with sqlite3.connect(path) as conn:
        assert conn.execute("SELECT name FROM sqlite_master").fetchall() == []


def test_drain_lists_the_quarantine(sqlite: Settings, tmp_path: Path) -> None:
    """drain shows every record the database refused, with its reason and file, in both forms."""
    # The CLI's spool directory is the environment's (the session's), not the fixture's default.
    spool = target_dir(
        os.environ["OTEL_CELERY_PUBLISH_SPOOL_DIR"], sqlite.audit_url, sqlite.table_name
    )
    counted: list[int] = []
    bad = row(task_id="bad-task", task_name="x" * 300)
    path = Quarantine(spool, counted.append).put(bad, ValueError("value too long for column"))
    assert counted == [1] and os.stat(path).st_mode & 0o777 == 0o600
    # A link planted next to it is not read (it would show whatever it points at).
    elsewhere = Quarantine(str(tmp_path / "elsewhere"), counted.append)
    planted = elsewhere.put(row(task_id="planted"), ValueError("forged"))
    os.symlink(planted, os.path.join(os.path.dirname(path), "planted.q"))
    listed = validated("drain", cli("drain", "--json", settings=sqlite).stdout)
    [held] = listed["quarantined"]
    assert (held["publish_id"], held["task_id"], held["path"]) == (
        bad["publish_id"],
        "bad-task",
        path,
    )
    assert "value too long for column" in held["reason"] and held["quarantined_at"]
    table = cli("drain", settings=sqlite).stdout
    assert "1 record(s) in quarantine" in table and bad["publish_id"] in table


def test_errors_are_one_line(sqlite: Settings, tmp_path: Path) -> None:
    """Unreachable database, missing SQLite file and unknown task id: one line, exit 1."""
    down = Settings.from_env(environ={}, audit_url="postgresql+psycopg://u@127.0.0.1:1/x")
    result = cli("lost", settings=down)
    one_line_error(result.stderr, result.exit_code, "postgresql+psycopg://u@127.0.0.1:1/x is unr")
    missing = Settings.from_env(environ={}, audit_url=f"sqlite:///{tmp_path / 'nope.db'}")
    result = cli("stats", settings=missing)
    one_line_error(result.stderr, result.exit_code, "nope.db does not exist")
    assert not (tmp_path / "nope.db").exists()
    for args in (["show", "missing-id"], ["replay", "missing-id", "--yes"]):
        result = cli(*args, settings=sqlite)
        one_line_error(result.stderr, result.exit_code, "no audit row for task id")


def test_entry_point_commands_and_their_errors(tmp_path: Path, pg_url: str) -> None:
    """show, prune, drain through ``celery -A tests.app audit``; an error stays one line."""
    settings = database("postgresql", tmp_path, pg_url)
    history(settings)
    shown = celery_audit("show", "t-2", "--json", settings=settings)
    assert shown.returncode == 0, shown.stderr
    assert len(validated("show", shown.stdout)["attempts"]) == 3
    # Seeded rows are at most days old: a century keeps them all.
    pruned = celery_audit("prune", "--older-than", "36500d", "--yes", "--json", settings=settings)
    assert validated("prune", pruned.stdout)["deleted"] == 0
    spool = {"OTEL_CELERY_PUBLISH_SPOOL_DIR": str(tmp_path / "spool")}
    drained = celery_audit("drain", "--json", settings=settings, env=spool)
    assert validated("drain", drained.stdout) == {"shipped": 0, "quarantined": []}
    unknown = celery_audit("show", "no-such-task", settings=settings)
    one_line_error(unknown.stderr, unknown.returncode, "no audit row for task id 'no-such-task'")
