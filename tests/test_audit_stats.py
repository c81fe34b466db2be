"""``stats`` on a seeded table (SQLite and PostgreSQL) against a hand computation."""

from __future__ import annotations

import datetime as dt
import math
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select

from otel_celery_publish import audit, timing
from otel_celery_publish.audit import _db, _stats
from otel_celery_publish.config import Settings
from tests.audit_support import NOW, celery_audit, cli, database, row, seed, validated

T0 = NOW - dt.timedelta(minutes=30)
PERCENTILES = {"p50": 0.5, "p95": 0.95, "p99": 0.99}


@pytest.fixture(params=["sqlite", "postgresql"])
def settings(request: pytest.FixtureRequest, tmp_path: Path, pg_url: str) -> Settings:
    return database(request.param, tmp_path, pg_url)


def timed(n: int, task: str, queue: str, **offsets: Any) -> dict[str, Any]:
    """Row ``n`` published at T0 + n minutes; lifecycle edges given as seconds after that."""
    published = T0 + dt.timedelta(minutes=n)
    fields = {"published_at": published, "task_name": task, "queue": queue}
    for name in ("sent_at", "received_at", "started_at", "finished_at", "eta"):
        if offsets.get(name) is not None:
            fields[name] = published + dt.timedelta(seconds=offsets[name])
    fields["runtime_s"] = offsets.get("runtime_s")
    fields["outcome"] = offsets.get("outcome")
    return row(**fields)


ADD = [
    # sent, received, started, finished, runtime_s, eta (s after publish) -> by hand:
    #   ready = max(published, eta); broker = received - ready (sent_at plays no part);
    #   worker = started - max(received, ready); run = runtime_s or finished - started;
    #   end to end = finished - ready
    dict(sent_at=0.01, received_at=0.51, started_at=0.61, finished_at=1.61, runtime_s=1.0),
    dict(sent_at=0.01, received_at=1.01, started_at=1.21, finished_at=3.21),  # run 2.0
    dict(sent_at=0.02, received_at=2.02, started_at=2.12, finished_at=2.62, runtime_s=0.5),
    dict(received_at=4.0, started_at=4.5, finished_at=8.5, runtime_s=4.0),  # never marked sent
    # Countdown 5 s, received at once and held: no broker wait, worker wait from its ETA.
    dict(sent_at=0.01, eta=5.0, received_at=0.21, started_at=10.0, finished_at=10.5,
         runtime_s=0.5),
    # The publisher's clock is 0.2 s ahead: ready and received clamp to the start, waits are 0.
    dict(sent_at=0.3, received_at=-0.2, started_at=-0.1, finished_at=0.1, runtime_s=0.2),
    dict(sent_at=0.01, received_at=3.01, outcome=None),  # still waiting for a pool process
    dict(sent_at=0.01, received_at=0.51, finished_at=0.61, outcome="revoked"),
]  # fmt: skip
ADD_EXPECTED = {
    "broker_wait": [0.51, 1.01, 2.02, 4.0, 0.0, 0.0, 3.01, 0.51],
    "worker_wait": [0.1, 0.2, 0.1, 0.5, 5.0, 0.0],
    "run_time": [1.0, 2.0, 0.5, 4.0, 0.5, 0.2],
    "end_to_end": [1.61, 3.21, 2.62, 8.5, 5.5, 0.2, 0.61],
}
FAIL = [
    dict(sent_at=0.01, received_at=0.11, started_at=0.21, finished_at=1.71, runtime_s=1.5),
    dict(sent_at=0.01, received_at=0.21, started_at=0.31, finished_at=2.81, runtime_s=2.5),
    dict(sent_at=0.01, received_at=0.31, started_at=0.41, finished_at=3.91, runtime_s=3.5),
]
FAIL_EXPECTED = {
    "broker_wait": [0.11, 0.21, 0.31],
    "worker_wait": [0.1, 0.1, 0.1],
    "run_time": [1.5, 2.5, 3.5],
    "end_to_end": [1.71, 2.81, 3.91],
}


def percentile_cont(values: list[float], p: float) -> float:
    """The textbook definition: linear interpolation at 0-based position p * (n - 1)."""
    ordered = sorted(values)
    position = p * (len(ordered) - 1)
    low = math.floor(position)
    if low + 1 == len(ordered):
        return ordered[low]
    return ordered[low] + (ordered[low + 1] - ordered[low]) * (position - low)


def seeded(settings: Settings) -> None:
    rows = [
        timed(i, "tests.add", "q1", **{"outcome": "succeeded", **fields})
        for i, fields in enumerate(ADD)
    ]
    rows += [
        timed(10 + i, "tests.fail", "q2", outcome="failed", **fields)
        for i, fields in enumerate(FAIL)
    ]
    rows.append(timed(20, "tests.pending", "q3"))  # published, nothing since: no samples
    # Published before the window: must not count.
    rows.append(timed(-40, "tests.add", "q1", sent_at=0, received_at=99, started_at=99,
                      finished_at=999, runtime_s=900, outcome="succeeded"))  # fmt: skip
    seed(settings, *rows)


def test_percentiles_counts_and_slowest_match_a_hand_computation(settings: Settings) -> None:
    """p50/p95/p99/max of each metric per task and queue, outcome counts and the slowest runs
    are what the definitions give by hand."""
    seeded(settings)
    result = audit.stats(settings=settings, since=dt.timedelta(hours=1), now=NOW)
    assert (result.since, result.until) == (NOW - dt.timedelta(hours=1), NOW)
    assert result.count == 12
    assert result.outcomes == {"failed": 3, "revoked": 1, "succeeded": 6, "unfinished": 2}
    add, fail, pending = result.groups
    assert (pending.task_name, pending.count, pending.outcomes) == (
        "tests.pending", 1, {"unfinished": 1},
    )  # fmt: skip
    assert [pending.broker_wait, pending.worker_wait, pending.run_time, pending.end_to_end] == [
        None, None, None, None,
    ]  # fmt: skip
    assert (add.task_name, add.queue, add.count) == ("tests.add", "q1", 8)
    assert add.outcomes == {"revoked": 1, "succeeded": 6, "unfinished": 1}
    assert (fail.task_name, fail.queue, fail.outcomes) == ("tests.fail", "q2", {"failed": 3})
    for group, expected in ((add, ADD_EXPECTED), (fail, FAIL_EXPECTED)):
        for metric, samples in expected.items():
            got = getattr(group, metric)
            assert got.count == len(samples), (group.task_name, metric)
            want = {name: percentile_cont(samples, p) for name, p in PERCENTILES.items()}
            want["max"] = max(samples)
            for name, value in want.items():
                assert getattr(got, name) == pytest.approx(value, abs=1e-6), (metric, name)
    assert [(s.task_name, s.run_time) for s in result.slowest[:3]] == [
        ("tests.add", 4.0),
        ("tests.fail", 3.5),
        ("tests.fail", 2.5),
    ]
    assert result.slowest[0].end_to_end == pytest.approx(8.5, abs=1e-6)
    assert len(result.slowest) == 9  # every row that ran, within the window


def test_filters_and_an_empty_window(settings: Settings) -> None:
    """Task glob and queue narrow the groups; a window without rows has no groups."""
    seeded(settings)
    only = audit.stats(settings=settings, now=NOW, task="tests.f*")
    assert [g.task_name for g in only.groups] == ["tests.fail"]
    assert audit.stats(settings=settings, now=NOW, queue="q1").count == 8
    assert audit.stats(settings=settings, now=NOW, queue="q3").groups[0].run_time is None
    empty = audit.stats(settings=settings, now=NOW - dt.timedelta(days=1))
    assert (empty.count, empty.groups, empty.slowest, empty.outcomes) == (0, [], [], {})


def test_cli_stats_json_and_table(settings: Settings) -> None:
    """``stats --json`` follows the documented shape and carries the API's numbers."""
    seeded(settings)
    since = (NOW - dt.timedelta(hours=1)).isoformat()
    result = cli("stats", "--json", "--since", since, "--until", NOW.isoformat(), "--slowest", "2",
                 settings=settings)  # fmt: skip
    assert result.exit_code == 0, result.output
    data = validated("stats", result.stdout)
    assert data["count"] == 12 and len(data["slowest"]) == 2
    add = data["groups"][0]
    assert add["run_time"]["p50"] == pytest.approx(percentile_cont([1, 2, 0.5, 4, 0.5, 0.2], 0.5))
    table = cli("stats", "--since", since, "--until", NOW.isoformat(), settings=settings)
    assert "broker wait" in table.stdout and "slowest runs" in table.stdout


def test_stats_through_the_celery_entry_point(tmp_path: Path, pg_url: str) -> None:
    """``celery -A tests.app audit stats --json`` runs as a real celery subcommand."""
    settings = database("postgresql", tmp_path, pg_url)
    seeded(settings)
    since = (NOW - dt.timedelta(hours=1)).isoformat()
    done = celery_audit("stats", "--json", "--since", since, "--until", NOW.isoformat(),
                        settings=settings)  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert validated("stats", done.stdout)["outcomes"]["failed"] == 3


EDGE_CASES = {
    "plain": dict(received_at=1.0, started_at=1.5, finished_at=3.0),
    "eta, held by the worker": dict(eta=5.0, received_at=0.2, started_at=6.0, finished_at=7.0),
    "eta later than the start": dict(eta=5.0, received_at=0.2, started_at=4.0, finished_at=4.5),
    "publisher ahead": dict(received_at=-0.3, started_at=-0.2, finished_at=0.5),
    "received after the start": dict(received_at=2.0, started_at=1.0, finished_at=3.0),
    "received only": dict(received_at=2.0),
    "received before a later eta": dict(eta=9.0, received_at=2.0),
    "started, never received": dict(started_at=1.0, finished_at=2.0),
    "finished before its eta": dict(eta=5.0, received_at=0.5, finished_at=0.6),
    "nothing yet": dict(),
    "eta, nothing yet": dict(eta=30.0),
}  # fmt: skip


def test_sql_and_python_define_the_same_edges(settings: Settings) -> None:
    """Row by row, timing's SQL (stats over epoch seconds, lost over the timestamp columns)
    gives the edges and waits timing.edges gives in Python (show's Attempt.waits), and
    queue_waits (the spans) the same edges wherever the task started."""
    rows = {
        name: timed(i, "tests.edges", "q-edges", **f)
        for i, (name, f) in enumerate(EDGE_CASES.items())
    }
    seed(settings, *rows.values())
    with _db.open_db(settings) as db:
        c = db.table.c
        in_time = timing.edges_sql(
            c.published_at, c.eta, c.received_at, c.started_at, c.finished_at
        )
        base = _stats.samples(db, [c.task_name == "tests.edges"], materialized=True)
        stmt = select(
            base, in_time.ready.label("ready_at"), in_time.received.label("received_edge_at")
        ).join(db.table, c.publish_id == base.c.publish_id)
        found = {r.publish_id: r for r in db.rows(stmt)}
    assert len(found) == len(EDGE_CASES)
    for name, seeded_row in rows.items():
        published, eta, received, started, finished = (
            _seconds(seeded_row.get(key))
            for key in ("published_at", "eta", "received_at", "started_at", "finished_at")
        )
        assert published is not None
        python = timing.edges(published, eta, received, started, finished)
        [attempt] = audit.show(seeded_row["task_id"], settings=settings).attempts
        assert attempt.waits == python, name
        sql = found[seeded_row["publish_id"]]
        assert _seconds(sql.ready_at) == pytest.approx(python.ready, abs=1e-6), name
        assert _seconds(sql.received_edge_at) == _approx(python.received), name
        for metric in ("broker_wait", "worker_wait", "end_to_end"):
            assert getattr(sql, metric) == _approx(getattr(python, metric)), (name, metric)
        if started is not None:
            waits = timing.queue_waits(published, eta, received, started)
            assert (waits.ready, waits.received, waits.skew_s) == (
                python.ready, python.received, python.skew_s,
            ), name  # fmt: skip


def _seconds(value: dt.datetime | None) -> float | None:
    aware = _db.utc(value)
    return None if aware is None else aware.timestamp()


def _approx(value: float | None) -> Any:
    return None if value is None else pytest.approx(value, abs=1e-6)
