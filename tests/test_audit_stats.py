"""``stats`` on a seeded table (SQLite and PostgreSQL) against a hand computation."""

from __future__ import annotations

import datetime as dt
import math
import re
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select

from otel_celery_publish import audit, timing
from otel_celery_publish.audit import _db, _stats
from otel_celery_publish.config import Settings
from tests.app import add as add_task
from tests.audit_support import NOW, celery_audit, cli, database, row, seed, validated
from tests.conftest import wait_row

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
    assert (pending.scheduled_delay, fail.scheduled_delay) == (None, None)  # no countdown
    assert add.scheduled_delay is not None  # the one countdown task: ready - published = 5 s
    assert add.scheduled_delay.count == 1
    assert add.scheduled_delay.max == pytest.approx(5.0, abs=1e-6)
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


# The same three runs, published for now and with a countdown (held by the worker until due).
RUNS = [(0.1, 0.3, 1.3), (0.2, 0.5, 1.5), (0.1, 1.0, 2.0)]  # received, started, finished
COUNTDOWNS = [60.0, 60.0, 120.0]


def countdown_rows() -> list[dict[str, Any]]:
    """``tests.now`` runs at once; ``tests.later`` is the same runs after a countdown (received
    at once and held), plus one whose countdown has not come yet."""
    rows = [
        timed(i, "tests.now", "q-due", received_at=r, started_at=st, finished_at=f,
              outcome="succeeded")
        for i, (r, st, f) in enumerate(RUNS)
    ]  # fmt: skip
    rows += [
        timed(5 + i, "tests.later", "q-due", eta=d, received_at=r, started_at=d + st,
              finished_at=d + f, outcome="succeeded")
        for i, ((r, st, f), d) in enumerate(zip(RUNS, COUNTDOWNS, strict=True))
    ]  # fmt: skip
    rows.append(timed(9, "tests.later", "q-due", eta=3600.0, received_at=0.1))  # not due yet
    return rows


def test_a_countdown_is_a_scheduled_delay_not_end_to_end(settings: Settings) -> None:
    """End to end counts from when a task was due: the same runs after a countdown give the
    same percentiles as without one; the countdown is the scheduled delay, over ETA tasks only."""
    seed(settings, *countdown_rows())
    groups = {g.task_name: g for g in audit.stats(settings=settings, now=NOW).groups}
    now_, later = groups["tests.now"], groups["tests.later"]
    assert (now_.count, later.count) == (3, 4)
    assert later.end_to_end is not None and now_.end_to_end is not None
    assert (now_.end_to_end.count, later.end_to_end.count) == (3, 3)  # one is not due yet
    for name, p in PERCENTILES.items():
        want = percentile_cont([f for (_, _, f) in RUNS], p)  # finished - due, by hand
        assert getattr(now_.end_to_end, name) == pytest.approx(want, abs=1e-6), name
        assert getattr(later.end_to_end, name) == pytest.approx(want, abs=1e-6), name
    assert later.end_to_end.max == pytest.approx(2.0, abs=1e-6)  # not 60 s and more
    # Received at once and held until due: no broker wait; the worker wait starts when due.
    assert later.broker_wait is not None and later.broker_wait.max == pytest.approx(0.0)
    assert later.worker_wait is not None and now_.worker_wait is not None
    assert later.worker_wait.max == pytest.approx(1.0, abs=1e-6)
    assert now_.scheduled_delay is None  # no countdown: no sample, not a 0
    delays = [*COUNTDOWNS, 3600.0]
    assert later.scheduled_delay is not None and later.scheduled_delay.count == 4
    for name, p in PERCENTILES.items():
        want_p = percentile_cont(delays, p)
        assert getattr(later.scheduled_delay, name) == pytest.approx(want_p, abs=1e-6), name
    assert later.scheduled_delay.max == pytest.approx(3600.0, abs=1e-6)


def test_cli_stats_names_the_scheduled_delay_and_the_due_edge(settings: Settings) -> None:
    """The table has a "scheduled delay" row and says waits and end to end count from when a
    task was due; the JSON carries ``scheduled_delay`` as documented."""
    seed(settings, *countdown_rows())
    table = cli("stats", settings=settings)
    assert table.exit_code == 0, table.output
    later = [line.split() for line in table.stdout.splitlines() if line.startswith("tests.later")]
    assert later[0][:5] == ["tests.later", "q-due", "scheduled", "delay", "4"]
    assert "end to end count from when a task was due" in table.stdout
    assert "scheduled delay" not in "\n".join(
        line for line in table.stdout.splitlines() if line.startswith("tests.now")
    )
    data = validated("stats", cli("stats", "--json", settings=settings).stdout)
    by_name = {g["task_name"]: g for g in data["groups"]}
    assert by_name["tests.now"]["scheduled_delay"] is None
    assert by_name["tests.later"]["scheduled_delay"]["count"] == 4
    assert by_name["tests.later"]["end_to_end"]["max"] < 2.5


def test_a_real_countdown_is_reported_apart_from_end_to_end(
    publisher: Any, start_worker: Any, pg: Any, pg_url: str, queue_name: str
) -> None:
    """On a real worker (Redis, PostgreSQL): a task sent with a countdown of 2 s shows about
    2 s of scheduled delay and an end to end like the task sent without one, not 2 s more; the
    queue shows both published and processed."""
    start_worker()
    prompt = add_task.apply_async((1, 2), queue=queue_name).id
    later = add_task.apply_async((3, 4), queue=queue_name, countdown=2).id
    for task_id in (prompt, later):
        wait_row(pg, task_id, lambda rows: rows[-1]["outcome"] == "succeeded")
    settings = Settings.from_env(environ={}, audit_url=pg_url)
    result = audit.stats(settings=settings, queue=queue_name)
    [group] = result.groups
    # The worker's own finished_at: both published and processed in the window, on this queue.
    [queue_stats] = result.queues
    assert (queue_stats.queue, queue_stats.published, queue_stats.processed) == (queue_name, 2, 2)
    assert sum(m.processed for m in queue_stats.minutes) == 2
    assert (group.count, group.outcomes) == (2, {"succeeded": 2})
    assert group.scheduled_delay is not None and group.scheduled_delay.count == 1
    assert 1.9 < group.scheduled_delay.max < 2.1
    assert group.end_to_end is not None and group.end_to_end.count == 2
    assert group.end_to_end.max < 1.5  # each from when it was due


def test_replayed_originals_are_not_unfinished(settings: Settings) -> None:
    """An original that ``audit replay`` re-sent counts as ``replayed``, its replay by its own
    outcome; ``unfinished`` is only what has no outcome and was not replayed; an original that
    finished keeps its outcome even when replayed."""
    stranded = timed(1, "tests.add", "q-rp")
    replay = timed(2, "tests.add", "q-rp", received_at=0.1, started_at=0.2, finished_at=0.3,
                   outcome="succeeded", replay_of=stranded["publish_id"])  # fmt: skip
    stranded.update(replayed_at=replay["published_at"], replayed_as=replay["task_id"])
    stuck = timed(3, "tests.add", "q-rp")
    failed = timed(4, "tests.add", "q-rp", received_at=0.1, started_at=0.2, finished_at=0.3,
                   outcome="failed", replayed_at=NOW - dt.timedelta(minutes=1))  # fmt: skip
    seed(settings, stranded, replay, stuck, failed)
    result = audit.stats(settings=settings, now=NOW)
    want = {"failed": 1, "replayed": 1, "succeeded": 1, "unfinished": 1}
    assert (result.outcomes, result.groups[0].outcomes, result.count) == (want, want, 4)
    table = cli("stats", settings=settings)
    assert "failed 1, replayed 1, succeeded 1, unfinished 1" in table.stdout, table.output
    data = validated("stats", cli("stats", "--json", settings=settings).stdout)
    assert data["outcomes"] == want


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


# Published vs processed per queue and minute: a minute-aligned window of ten minutes.
M0 = NOW.replace(second=0) - dt.timedelta(minutes=30)


def at(minutes: float) -> dt.datetime:
    return M0 + dt.timedelta(minutes=minutes)


def throughput_rows() -> list[dict[str, Any]]:
    """Rows around the window [M0, M0 + 10 min) and, per queue, what each must count as."""

    def attempt(queue: str | None, published: float, finished: float | None = None,
                **fields: Any) -> dict[str, Any]:  # fmt: skip
        done = {} if finished is None else {"finished_at": at(finished), "outcome": "succeeded"}
        return row(queue=queue, published_at=at(published), **{**done, **fields})

    return [
        attempt("tp-a", 10 / 60, 50 / 60),  # published minute 0, processed minute 0
        attempt("tp-a", 20 / 60, 65 / 60),  # published 0, processed 1
        # Countdown of 5 min: published counts at the publish, processed when it finished.
        attempt("tp-a", 0.5, 6, eta=at(5.5)),  # published 0, processed 6
        # One microsecond before minute 2 (SQLite's date functions alone would round it up).
        attempt("tp-a", 2 - 1e-6 / 60, 2),  # published 1, processed 2
        attempt("tp-a", 3),  # published 3, never finished
        attempt("tp-a", 3.5, 3 + 40 / 60, outcome="failed"),  # a failure is processed too
        attempt("tp-a", 9 + 50 / 60, 10.5),  # published 9, finished after the window: not counted
        attempt("tp-a", -1, 0.5),  # published before the window: neither
        attempt("tp-a", 10, 10.1),  # published at the window's end (exclusive): neither
        attempt("tp-b", 2, 5),  # published 2, processed 5
        attempt(None, 4 + 10 / 60, 4 + 20 / 60),  # no queue recorded: a queue of its own
    ]


THROUGHPUT = {  # queue -> (published, processed, {minute: (published, processed)})
    "tp-a": (7, 5, {0: (3, 1), 1: (1, 1), 2: (0, 1), 3: (2, 1), 6: (0, 1), 9: (1, 0)}),
    None: (1, 1, {4: (1, 1)}),
    "tp-b": (1, 1, {2: (1, 0), 5: (0, 1)}),
}


def test_published_vs_processed_per_queue_and_minute(settings: Settings) -> None:
    """Per queue, busiest first: attempts published in the window by the minute of their
    publish, and those of them that finished (any outcome) within the window by the minute
    they finished; exact at a minute's edge; before, at or after the window not counted."""
    seed(settings, *throughput_rows())
    result = audit.stats(settings=settings, since=at(0), until=at(10), now=NOW)
    assert [q.queue for q in result.queues] == list(THROUGHPUT)
    for queue_stats, (published, processed, minutes) in zip(
        result.queues, THROUGHPUT.values(), strict=True
    ):
        assert (queue_stats.published, queue_stats.processed) == (published, processed)
        assert [(m.minute, m.published, m.processed) for m in queue_stats.minutes] == [
            (at(n), p, f) for n, (p, f) in sorted(minutes.items())
        ], queue_stats.queue
        assert all(m.minute.tzinfo == dt.timezone.utc for m in queue_stats.minutes)
    assert result.count == sum(p for p, _, _ in THROUGHPUT.values())
    only_b = audit.stats(settings=settings, since=at(0), until=at(10), queue="tp-b", now=NOW)
    assert [(q.queue, q.published, q.processed) for q in only_b.queues] == [("tp-b", 1, 1)]
    assert audit.stats(settings=settings, since=at(20), until=at(25), now=NOW).queues == []


def test_cli_stats_per_queue_table_per_minute_and_json(settings: Settings) -> None:
    """The table shows published vs processed per queue (and per minute with --per-minute, not
    without); --json carries the per-minute counts in the documented shape."""
    seed(settings, *throughput_rows())
    window = ["--since", at(0).isoformat(), "--until", at(10).isoformat()]
    table = cli("stats", *window, settings=settings)
    assert table.exit_code == 0, table.output
    lines = [line.split() for line in table.stdout.splitlines()]
    assert ["QUEUE", "PUBLISHED", "PROCESSED", "PUBLISHED/MIN", "PROCESSED/MIN"] in lines
    assert ["tp-a", "7", "5", "0.7", "0.5"] in lines and ["tp-b", "1", "1", "0.1", "0.1"] in lines
    assert "MINUTE" not in table.stdout
    detailed = cli("stats", *window, "--per-minute", settings=settings)
    rows = [line.split() for line in detailed.stdout.splitlines() if line.startswith("tp-a ")]
    minute_rows = [r for r in rows if re.fullmatch(r"\d{4}-\d\d-\d\d", r[1])]  # not totals
    assert [(r[2], r[3], r[4]) for r in minute_rows] == [
        (at(n).strftime("%H:%M"), str(p), str(f))
        for n, (p, f) in sorted(THROUGHPUT["tp-a"][2].items())
    ]
    data = validated("stats", cli("stats", *window, "--json", settings=settings).stdout)
    by_queue = {q["queue"]: q for q in data["queues"]}
    assert (by_queue["tp-b"]["published"], by_queue["tp-b"]["processed"]) == (1, 1)
    assert by_queue["tp-b"]["minutes"] == [
        {"minute": at(2).isoformat(), "published": 1, "processed": 0},
        {"minute": at(5).isoformat(), "published": 0, "processed": 1},
    ]
