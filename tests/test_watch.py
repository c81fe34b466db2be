"""``audit watch``: lost tasks replayed by policy, with real worker processes on Redis and a real
PostgreSQL. Each test has an audit table of its own (the in-process publisher and its workers
write there), so the watchdog sees that test's rows only."""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
import signal
import subprocess
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy
from celery import Celery
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from opentelemetry.sdk.trace import TracerProvider

from otel_celery_publish import CeleryPublishInstrumentor, audit
from otel_celery_publish.audit import _db, _watch
from otel_celery_publish.config import Settings, SettingsError
from tests.app import add, app, autoreplayed, sleep
from tests.audit_support import (
    NOW,
    ago,
    beat,
    celery_audit_popen,
    database,
    migrated,
    row,
    seed,
    stored,
    validated,
)
from tests.conftest import BROKER, Broker
from tests.otlp_receiver import wait_for

NO_AGE = dt.timedelta(0)


@dataclasses.dataclass
class Watched:
    """The test's audit table, its settings (no rule yet), its unconsumed queue ``nobody``
    and the environment its workers need to write there."""

    settings: Settings
    queue: str
    nobody: str

    def with_policy(self, autoreplay: str, **settings: Any) -> Settings:
        values: dict[str, Any] = {"autoreplay_min_age": 0, **settings}
        return dataclasses.replace(self.settings, autoreplay=autoreplay, **values)

    @property
    def worker_env(self) -> dict[str, str]:
        return {
            "OTEL_CELERY_PUBLISH_TABLE_NAME": self.settings.table_name,
            "OTEL_CELERY_PUBLISH_HEARTBEAT_INTERVAL": "1",
        }


@pytest.fixture
def watched(pg_url: str, broker: Broker, queue_name: str) -> Iterator[Watched]:
    table = f"watch_{uuid.uuid4().hex[:10]}"
    settings = migrated(pg_url, table)
    instrumentor = CeleryPublishInstrumentor()
    instrumentor.instrument(
        tracer_provider=TracerProvider(), audit_url=pg_url, table_name=table, flush_interval=0.05
    )
    nobody = f"{queue_name}-nobody"
    broker.queues.append(nobody)  # deleted with its messages at the end
    yield Watched(settings, queue_name, nobody)
    instrumentor.uninstrument()


def sent(settings: Settings, task_id: str) -> dict[str, Any]:
    """The row of ``task_id`` once its publish reached the broker."""
    return wait_for(
        lambda: next((r for r in stored(settings, task_id=task_id) if r["sent_at"]), None),
        10,
        f"sent_at of {task_id}",
    )


def stranded(watched: Watched, task: Any = add, args: tuple[Any, ...] = (2, 3)) -> dict[str, Any]:
    """A task published to a queue nobody consumes: lost as ``not_received``."""
    return sent(watched.settings, task.apply_async(args, queue=watched.nobody).id)


def replays_of(settings: Settings, publish_id: str) -> list[dict[str, Any]]:
    return stored(settings, replay_of=publish_id)


def test_a_stranded_task_is_replayed_to_the_policys_queue_runs_once_and_is_no_longer_lost(
    watched: Watched, start_worker: Any
) -> None:
    """Policy ``tests.add:not_received@<consumed queue>``: one cycle replays the task there, a
    worker runs it once, the original row says the watchdog replayed it with which rule, and
    ``lost`` (and the next cycle) then find nothing."""
    start_worker(env=watched.worker_env)
    rule = f"tests.add:not_received@{watched.queue}"
    settings = watched.with_policy(rule)
    original = stranded(watched)
    dog = audit.Watchdog(app, settings=settings)
    report = dog.run_once()
    [action] = report.actions
    assert (action.action, action.rule, action.queue, action.auto_replays) == (
        "replayed", rule, watched.queue, 0,
    )  # fmt: skip
    [done] = wait_for(
        lambda: [r for r in stored(settings, task_id=action.new_task_id) if r["outcome"]],
        20,
        "the replay to finish",
    )
    assert done["outcome"] == "succeeded" and done["replay_of"] == original["publish_id"]
    [row] = stored(settings, publish_id=original["publish_id"])
    assert row["replayed_by"] == f"watchdog:{rule}" and row["replayed_as"] == action.new_task_id
    assert audit.lost(settings=settings, older_than=NO_AGE) == []
    again = dog.run_once()
    assert (again.lost, again.actions) == (0, [])
    assert len(replays_of(settings, original["publish_id"])) == 1


def test_tasks_outside_the_policy_are_left_alone(watched: Watched) -> None:
    """A task whose name no rule matches, and one whose lost reason its rule does not list,
    are lost and stay untouched; with no rule at all nothing is replayed either."""
    other_name = stranded(watched, sleep, (0,))
    other_reason = stranded(watched)
    for policy in ("tests.add:not_sent,worker_dead;tests.other*:all", ""):
        report = audit.Watchdog(app, settings=watched.with_policy(policy)).run_once()
        assert (report.lost, report.actions) == (2, [])
    for original in (other_name, other_reason):
        assert replays_of(watched.settings, original["publish_id"]) == []
        [row] = stored(watched.settings, publish_id=original["publish_id"])
        assert row["replayed_at"] is None and row["dead_lettered_at"] is None


def test_a_task_that_keeps_getting_lost_is_dead_lettered_after_the_maximum(
    watched: Watched,
) -> None:
    """Replayed to a queue nobody consumes: two automatic replays (AUTOREPLAY_MAX=2), then
    its latest attempt is dead-lettered, shown by ``lost`` (API, table, JSON), never replayed
    automatically again; a person can still replay it, which gives it a fresh budget."""
    settings = watched.with_policy(f"tests.add:not_received@{watched.nobody}", autoreplay_max=2)
    original = stranded(watched)
    dog = audit.Watchdog(app, settings=settings)
    latest = original
    for used in (0, 1):
        [action] = dog.run_once().actions
        assert (action.action, action.auto_replays) == ("replayed", used)
        assert action.publish_id == latest["publish_id"]
        latest = sent(settings, str(action.new_task_id))
    [action] = dog.run_once().actions
    assert (action.action, action.auto_replays) == ("dead_lettered", 2)
    assert action.publish_id == latest["publish_id"]
    for _ in range(2):
        report = dog.run_once()
        assert (report.actions, report.lost, report.dead_lettered) == ([], 1, 1)
    assert replays_of(settings, latest["publish_id"]) == []
    [found] = audit.lost(settings=settings, older_than=NO_AGE)
    assert found.publish_id == latest["publish_id"] and found.dead_lettered_at is not None

    listed = celery_audit_env("lost", "--older-than", "0s", "--json", settings=settings)
    [entry] = validated("lost", listed.stdout)
    assert entry["dead_lettered_at"] is not None
    table = celery_audit_env("lost", "--older-than", "0s", settings=settings)
    assert "[dead-lettered]" in table.stdout, table.stdout

    manual = audit.replay(app, publish_ids=[latest["publish_id"]], settings=settings)
    assert [r.status for r in manual.results] == ["sent"]
    by_person = sent(settings, str(manual.results[0].new_task_id))
    [again] = dog.run_once().actions  # a person's replay: a fresh budget
    assert (again.action, again.auto_replays, again.publish_id) == (
        "replayed", 0, by_person["publish_id"],
    )  # fmt: skip


def test_two_watchdogs_at_once_replay_each_task_once(watched: Watched) -> None:
    """Two watchdogs (threads started together, then two `audit watch --once` processes)
    replay each of five lost tasks exactly once between them: the replay claim decides."""
    settings = watched.with_policy(f"tests.add:not_received@{watched.nobody}")
    originals = [stranded(watched) for _ in range(5)]
    barrier = threading.Barrier(2)
    reports: list[audit.WatchReport] = []

    def run() -> None:
        dog = audit.Watchdog(app, settings=settings)
        barrier.wait(10)
        reports.append(dog.run_once())

    threads = [threading.Thread(target=run) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert sum(r.count("replayed") for r in reports) == 5, reports
    for original in originals:
        assert len(replays_of(settings, original["publish_id"])) == 1

    # The replays are lost in turn (nobody consumes them): two CLI processes at once.
    latest = [sent(settings, r.new_task_id) for rep in reports for r in rep.actions
              if r.new_task_id]  # fmt: skip
    env = policy_env(settings)
    procs = [
        celery_audit_popen("watch", "--once", "--json", settings=settings, env=env)
        for _ in range(2)
    ]
    outputs = [p.communicate(timeout=60) for p in procs]
    assert all(p.returncode == 0 for p in procs), outputs
    cycles = [json.loads(out) for out, _ in outputs]
    replayed = [a for c in cycles for a in c["actions"] if a["action"] == "replayed"]
    assert sorted(a["publish_id"] for a in replayed) == sorted(r["publish_id"] for r in latest)
    for replay in latest:
        assert len(replays_of(settings, replay["publish_id"])) == 1


def test_a_task_running_on_a_live_worker_is_never_touched(
    watched: Watched, start_worker: Any
) -> None:
    """Policy ``tests.sleep:all`` and no minimum age: cycles while it runs for many heartbeat
    intervals find nothing lost and do nothing; it finishes once."""
    start_worker(pool="prefork", env=watched.worker_env)
    settings = watched.with_policy("tests.sleep:all")
    task_id = sleep.apply_async((5,), queue=watched.queue).id
    wait_for(lambda: [r for r in stored(settings, task_id=task_id) if r["started_at"]], 20, "start")
    dog = audit.Watchdog(app, settings=settings)
    cycles = 0

    def finished_with_nothing_done() -> bool:
        nonlocal cycles
        report = dog.run_once()
        cycles += 1
        assert (report.lost, report.actions) == (0, []), report
        return any(r["outcome"] for r in stored(settings, task_id=task_id))

    wait_for(finished_with_nothing_done, 30, "the long task to finish")
    assert cycles >= 3
    [row] = stored(settings, task_id=task_id)
    assert row["outcome"] == "succeeded" and row["replayed_at"] is None
    assert replays_of(settings, row["publish_id"]) == []


def test_dry_run_sends_nothing(watched: Watched) -> None:
    """``dry_run`` (and ``audit watch --once --dry-run``) reports would_replay and
    would_dead_letter; no replay row, no claim, no dead letter."""
    settings = watched.with_policy(f"tests.add:not_received@{watched.nobody}", autoreplay_max=1)
    original = stranded(watched)
    report = audit.Watchdog(app, settings=settings).run_once(dry_run=True)
    assert [(a.action, a.publish_id) for a in report.actions] == [
        ("would_replay", original["publish_id"])
    ]
    env = policy_env(settings)
    done = celery_audit_env("watch", "--once", "--dry-run", "--json", settings=settings, env=env)
    cycle = validated("watch", done.stdout)
    assert cycle["dry_run"] is True and [a["action"] for a in cycle["actions"]] == ["would_replay"]
    assert replays_of(settings, original["publish_id"]) == []
    [row] = stored(settings, publish_id=original["publish_id"])
    assert row["replayed_at"] is None and row["dead_lettered_at"] is None
    # Once its budget is used up, a dry run says it would dead-letter it, and does not.
    [action] = audit.Watchdog(app, settings=settings).run_once().actions
    sent(settings, str(action.new_task_id))
    report = audit.Watchdog(app, settings=settings).run_once(dry_run=True)
    assert [a.action for a in report.actions] == ["would_dead_letter"]
    assert all(r["dead_lettered_at"] is None for r in stored(settings))


def test_the_cli_loop_replays_each_interval_and_stops_on_sigterm(watched: Watched) -> None:
    """``audit watch --interval 0.2 --json``: a JSON line per cycle (documented schema), the
    stranded task replayed once over the cycles, exit code 0 on SIGTERM."""
    settings = watched.with_policy(f"tests.add:not_received@{watched.nobody}", autoreplay_max=1)
    original = stranded(watched)
    proc = celery_audit_popen(
        "watch", "--interval", "0.2", "--json", settings=settings, env=policy_env(settings)
    )
    try:
        assert proc.stdout is not None
        cycles = [validated("watch", proc.stdout.readline()) for _ in range(4)]
    finally:
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err
    actions = [a["action"] for c in cycles for a in c["actions"]]
    assert actions[:2] == ["replayed", "dead_lettered"] and len(actions) == 2, cycles
    assert len(replays_of(settings, original["publish_id"])) == 1
    assert "audit watch: task" in err and "dead-lettered after 1 automatic replay" in err, err


def _points(reader: InMemoryMetricReader, name: str) -> dict[frozenset[Any], float]:
    data = reader.get_metrics_data()
    found: dict[frozenset[Any], float] = {}
    for rm in data.resource_metrics if data else ():
        for sm in rm.scope_metrics:
            for metric in sm.metrics:
                if metric.name == name:
                    assert sm.scope.name == "otel_celery_publish"
                    assert metric.unit == "{task}"
                    for p in metric.data.data_points:
                        found[frozenset(p.attributes.items())] = p.value
    return found


def test_metrics_lost_replayed_auto_and_manual_dead_lettered(watched: Watched) -> None:
    """``celery.audit.lost`` (by reason, task, queue), ``celery.audit.replayed`` (trigger auto
    from the watchdog, manual from a person's send_replay) and ``celery.audit.dead_lettered``."""
    reader = InMemoryMetricReader()
    provider = MeterProvider(metric_readers=[reader])
    settings = watched.with_policy(f"tests.add:not_received@{watched.nobody}", autoreplay_max=1)
    original = stranded(watched)
    dog = audit.Watchdog(app, settings=settings, meter_provider=provider)
    [action] = dog.run_once().actions
    where = {"celery.task.name": "tests.add", "messaging.destination.name": watched.nobody}
    lost_key = frozenset({"celery.audit.lost_reason": "not_received", **where}.items())
    auto = frozenset({"celery.audit.trigger": "auto", "celery.task.name": "tests.add"}.items())
    manual = frozenset({"celery.audit.trigger": "manual", "celery.task.name": "tests.add"}.items())
    assert _points(reader, "celery.audit.lost") == {lost_key: 1}
    assert _points(reader, "celery.audit.replayed") == {auto: 1}
    assert _points(reader, "celery.audit.dead_lettered") == {}
    sent(settings, str(action.new_task_id))
    [action] = dog.run_once().actions
    assert action.action == "dead_lettered"
    assert _points(reader, "celery.audit.dead_lettered") == {frozenset(where.items()): 1}
    planned = audit.plan_replay(app, publish_ids=[action.publish_id], settings=settings)
    audit.send_replay(app, planned, settings=settings, meter_provider=provider)
    assert _points(reader, "celery.audit.replayed") == {auto: 1, manual: 1}
    assert len(replays_of(settings, original["publish_id"])) == 1


def test_the_rate_limit_spaces_the_replays(watched: Watched) -> None:
    """AUTOREPLAY_RATE=2: four replays of one cycle are published at least 1.5 s apart from
    first to last (a bound that holds however slow the machine)."""
    settings = watched.with_policy(f"tests.add:not_received@{watched.nobody}", autoreplay_rate=2.0)
    for _ in range(4):
        stranded(watched)
    report = audit.Watchdog(app, settings=settings).run_once()
    assert report.count("replayed") == 4
    times = sorted(sent(settings, str(a.new_task_id))["published_at"] for a in report.actions)
    assert (times[-1] - times[0]).total_seconds() >= 1.5 - 0.05, times


def test_loss_to_recovery_with_the_loop(watched: Watched, start_worker: Any) -> None:
    """``run_forever`` with interval 1 s and minimum age 2 s recovers a stranded task: the time
    from its publish to its replay's success is printed, and at least the minimum age."""
    start_worker(env=watched.worker_env)
    settings = watched.with_policy(
        f"tests.add:not_received@{watched.queue}", autoreplay_min_age=2.0
    )
    dog = audit.Watchdog(app, settings=settings)
    stop = threading.Event()
    loop = threading.Thread(target=dog.run_forever, args=(1.0,), kwargs={"stop": stop})
    loop.start()
    try:
        original = stranded(watched)
        [replay] = wait_for(
            lambda: [r for r in replays_of(settings, original["publish_id"]) if r["outcome"]],
            30,
            "the automatic replay to succeed",
        )
    finally:
        stop.set()
        loop.join(30)
    assert replay["outcome"] == "succeeded" and replay["queue"] == watched.queue
    took = (replay["finished_at"] - original["published_at"]).total_seconds()
    print(f"\nloss to recovery: {took:.2f} s (min age 2 s, interval 1 s)")
    assert 2.0 <= took <= 2.0 + 1.0 + 5.0
    assert len(replays_of(settings, original["publish_id"])) == 1


def test_the_periodic_task_runs_a_cycle_and_the_task_option_opts_in(
    watched: Watched, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``register_watch_task(app)`` registers ``otel_celery_publish.audit.watch``; run, it is
    one cycle with the environment's settings. With no AUTOREPLAY rule, the task option
    ``audit_autoreplay=("not_received",)`` opts ``tests.autoreplayed`` in (replayed to where
    it was routed, ``watchdog:task:not_received`` on its row); ``tests.add`` stays lost."""
    for name, value in {
        "AUDIT_URL": watched.settings.audit_url,
        "TABLE_NAME": watched.settings.table_name,
        "AUTOREPLAY_MIN_AGE": "0",
    }.items():
        monkeypatch.setenv(f"OTEL_CELERY_PUBLISH_{name}", value)
    monkeypatch.setattr(_watch, "_WATCHDOGS", {})
    task = audit.register_watch_task(app)
    assert app.tasks[audit.WATCH_TASK] is task and task.ignore_result
    opted_in = stranded(watched, autoreplayed, (7,))
    left = stranded(watched)
    counts = task()
    assert (counts["lost"], counts["replayed"]) == (2, 1), counts
    [replay] = replays_of(watched.settings, opted_in["publish_id"])
    assert replay["queue"] == watched.nobody
    [row] = stored(watched.settings, publish_id=opted_in["publish_id"])
    assert row["replayed_by"] == "watchdog:task:not_received"
    assert replays_of(watched.settings, left["publish_id"]) == []


def test_check_results_leaves_what_the_result_backend_saw_finish(
    tmp_path: Path, pg_url: str, broker: Broker, queue_name: str
) -> None:
    """With ``check_results`` (for uninstrumented workers), a lost row whose result says
    SUCCESS is not replayed; one the backend knows nothing of is. Without a result backend
    the cycle fails and replays nothing."""
    settings = dataclasses.replace(
        database("postgresql", tmp_path, pg_url),
        autoreplay=f"tests.add:all@{queue_name}",
        autoreplay_min_age=0,
    )
    done, unknown = row(sent_at=ago(20)), row(sent_at=ago(20))
    seed(settings, done, unknown)
    with_backend = Celery("ocp_watch_results", broker=BROKER, backend=BROKER, set_as_current=False)

    @with_backend.task(name="tests.add")
    def _add(x: int, y: int) -> int:
        return x + y

    with_backend.backend.store_result(done["task_id"], 5, "SUCCESS")
    try:
        with pytest.raises(audit.AuditError, match="needs a result backend"):
            audit.Watchdog(app, settings=settings, check_results=True).run_once()
        assert stored(settings, replay_of=unknown["publish_id"]) == []
        dog = audit.Watchdog(with_backend, settings=settings, check_results=True)
        report = dog.run_once()
        assert [(a.action, a.task_id) for a in report.actions] == [("replayed", unknown["task_id"])]
        assert stored(settings, replay_of=done["publish_id"]) == []
    finally:
        with_backend.backend.forget(done["task_id"])
        with_backend.close()


def test_automatic_replays_are_counted_along_the_replay_chain(tmp_path: Path, pg_url: str) -> None:
    """The budget walks ``replay_of`` back, through a retry of a replay (same task id), one per
    link the watchdog made; a person's replay ends the walk (a fresh budget)."""
    settings = database("postgresql", tmp_path, pg_url)
    by_dog = {"replayed_at": ago(15), "replayed_by": "watchdog:tests.add:all"}
    first = row(sent_at=ago(20), **by_dog)
    second = row(sent_at=ago(14), replay_of=first["publish_id"])  # then retried
    second_retry = row(task_id=second["task_id"], attempt=1, sent_at=ago(13), **by_dog)
    third = row(sent_at=ago(12), replay_of=second_retry["publish_id"])
    person = row(sent_at=ago(20), replayed_at=ago(15), replayed_by="alice@host")
    after_person = row(sent_at=ago(14), replay_of=person["publish_id"], **by_dog)
    last = row(sent_at=ago(12), replay_of=after_person["publish_id"])
    seed(settings, first, second, second_retry, third, person, after_person, last)
    with _db.open_db(settings) as db:
        assert _watch.automatic_replays(db, third["publish_id"], 10) == 2
        assert _watch.automatic_replays(db, third["publish_id"], 1) == 1
        assert _watch.automatic_replays(db, first["publish_id"], 10) == 0
        assert _watch.automatic_replays(db, last["publish_id"], 10) == 1


@pytest.mark.parametrize(
    ("raw", "problem"),
    [
        ("billing.*", "';'-separated rules"),
        ("billing.*:not_recieved", "'not_recieved'"),
        ("billing.*:all@", "';'-separated rules"),
        ("a b:all", "';'-separated rules"),
    ],
)
def test_a_bad_autoreplay_rule_is_a_settings_error(raw: str, problem: str) -> None:
    """AUTOREPLAY is checked when the settings are built, naming the variable and the rule."""
    with pytest.raises(SettingsError, match="OTEL_CELERY_PUBLISH_AUTOREPLAY") as caught:
        Settings.from_env({"OTEL_CELERY_PUBLISH_AUTOREPLAY": raw})
    assert problem in str(caught.value)
    rules = Settings.from_env(
        {"OTEL_CELERY_PUBLISH_AUTOREPLAY": " billing.*:not_sent,not_received@retry ; r.*:all"}
    ).autoreplay
    assert [str(r) for r in rules] == ["billing.*:not_received,not_sent@retry", "r.*:all"]


def celery_audit_env(
    *args: str, settings: Settings, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    proc = celery_audit_popen(*args, settings=settings, env=env)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def policy_env(settings: Settings) -> dict[str, str]:
    """The environment giving a CLI process the settings' policy."""
    return {
        "OTEL_CELERY_PUBLISH_AUTOREPLAY": ";".join(map(str, settings.autoreplay)),
        "OTEL_CELERY_PUBLISH_AUTOREPLAY_MIN_AGE": str(settings.autoreplay_min_age),
        "OTEL_CELERY_PUBLISH_AUTOREPLAY_MAX": str(settings.autoreplay_max),
    }


def test_a_replay_whose_send_raised_is_not_lost_itself(tmp_path: Path, pg_url: str) -> None:
    """A replay whose send raised leaves its row (``replay_of`` set, never sent) and its claim
    released: only the original is lost, so a cycle replays the task once, not twice. A row
    whose claim still stands (killed between claim and send) stays listed, for a person."""
    settings = dataclasses.replace(
        database("sqlite", tmp_path, pg_url), autoreplay="tests.add:all", autoreplay_min_age=0
    )
    original = row(sent_at=ago(20))
    failed = row(published_at=ago(19), replay_of=original["publish_id"])
    claimed = row(sent_at=ago(20), replayed_at=ago(19), replayed_by="alice@host")
    killed = row(published_at=ago(19), replay_of=claimed["publish_id"])
    claimed["replayed_as"] = killed["task_id"]
    seed(settings, original, failed, claimed, killed)
    found = audit.lost(settings=settings, older_than=NO_AGE)
    assert sorted(t.publish_id for t in found) == sorted(
        [original["publish_id"], killed["publish_id"]]
    )
    report = audit.Watchdog(app, settings=settings).run_once(dry_run=True)
    assert original["publish_id"] in [a.publish_id for a in report.actions]
    assert failed["publish_id"] not in [a.publish_id for a in report.actions]


@pytest.mark.parametrize("reason", ["worker_dead", "worker_lost"])
def test_the_minimum_age_holds_for_every_reason(tmp_path: Path, pg_url: str, reason: str) -> None:
    """``worker_dead`` and a reason the worker recorded are reported by ``lost`` at once; the
    watchdog still waits AUTOREPLAY_MIN_AGE from the attempt's latest edge (its start)."""
    settings = dataclasses.replace(
        database("sqlite", tmp_path, pg_url), autoreplay="tests.add:all", autoreplay_min_age=600
    )
    fields: dict[str, Any] = {"sent_at": ago(20), "received_at": ago(1), "started_at": ago(1)}
    if reason == "worker_dead":
        instance = f"dead-{uuid.uuid4().hex[:8]}"
        beat(settings, instance, heartbeat_at=ago(2), expires_at=ago(1, 30))
        fields["worker_instance"] = instance
    else:
        fields.update(lost_reason=reason, finished_at=ago(1), outcome="failed")
    seed(settings, row(**fields))
    [found] = audit.lost(settings=settings, older_than=NO_AGE)
    assert found.reason == reason
    # At the rows' own clock (NOW is taken when the suite imports audit_support: real time may
    # be minutes later in a full run).
    report = audit.Watchdog(app, settings=settings).run_once(dry_run=True, now=NOW)
    assert (report.lost, report.actions) == (1, [])
    old = dataclasses.replace(settings, autoreplay_min_age=30)
    [action] = audit.Watchdog(app, settings=old).run_once(dry_run=True, now=NOW).actions
    assert (action.action, action.reason) == ("would_replay", reason)


@pytest.mark.parametrize("edge", ["received_at", "started_at", "finished_at"])
def test_a_task_a_worker_took_between_plan_and_claim_is_not_replayed(
    tmp_path: Path, pg_url: str, edge: str
) -> None:
    """Planned while lost, then a worker received/started/finished it: the claim re-checks
    (IS NULL on the edges the plan saw empty) and refuses; nothing is claimed or sent."""
    settings = database("sqlite", tmp_path, pg_url)
    original = row(sent_at=ago(20))
    seed(settings, original)
    [planned] = audit.plan_replay(app, publish_ids=[original["publish_id"]], settings=settings)
    with _db.open_db(settings) as db:
        db.run(
            sqlalchemy.update(db.table)
            .where(db.table.c.publish_id == original["publish_id"])
            .values({edge: ago(1)})
        )
    [result] = audit.send_replay(app, [planned], settings=settings).results
    assert (result.status, result.reason) == ("refused", "it was replayed by someone else just now")
    [stored_row] = stored(settings, publish_id=original["publish_id"])
    assert stored_row["replayed_at"] is None
    assert stored(settings, replay_of=original["publish_id"]) == []


def test_a_task_refused_at_plan_time_is_dead_lettered_and_does_not_starve_the_rest(
    tmp_path: Path, pg_url: str
) -> None:
    """No stored payload, or a redacted one: the plan refuses it, so the cycle dead-letters it
    (refusal as detail; a dry run says would_dead_letter) instead of refusing it every cycle
    and filling ``limit``; the next cycle gets to the sendable task behind it."""
    settings = dataclasses.replace(
        database("sqlite", tmp_path, pg_url), autoreplay="tests.add:all", autoreplay_min_age=0
    )
    no_payload = row(sent_at=ago(20), published_at=ago(23), payload=None)
    redacted = row(sent_at=ago(20), published_at=ago(22), payload_redacted=True)
    sendable = row(sent_at=ago(20))
    seed(settings, no_payload, redacted, sendable)
    dog = audit.Watchdog(app, settings=settings, limit=2)
    dry = dog.run_once(dry_run=True).actions
    assert [(a.action, a.publish_id) for a in dry] == [
        ("would_dead_letter", no_payload["publish_id"]),
        ("would_dead_letter", redacted["publish_id"]),
    ]
    assert "no stored payload" in str(dry[0].detail) and "redacted" in str(dry[1].detail)
    assert all(r["dead_lettered_at"] is None for r in stored(settings))
    done = dog.run_once().actions
    assert [(a.action, a.detail) for a in done] == [("dead_lettered", a.detail) for a in dry]
    for original in (no_payload, redacted):
        [stored_row] = stored(settings, publish_id=original["publish_id"])
        assert stored_row["dead_lettered_at"] is not None
    report = dog.run_once(dry_run=True)
    assert [(a.action, a.publish_id) for a in report.actions] == [
        ("would_replay", sendable["publish_id"])
    ]
    assert report.dead_lettered == 2


def test_check_results_replays_only_what_the_backend_says_is_pending(
    tmp_path: Path, pg_url: str, broker: Broker, queue_name: str
) -> None:
    """With ``check_results``, STARTED (running) and RETRY (a retry is queued) are left alone;
    only a task the backend knows nothing of (PENDING) is replayed."""
    settings = dataclasses.replace(
        database("sqlite", tmp_path, pg_url),
        autoreplay=f"tests.add:all@{queue_name}",
        autoreplay_min_age=0,
    )
    running, retrying, unknown = (row(sent_at=ago(20)) for _ in range(3))
    seed(settings, running, retrying, unknown)
    with_backend = Celery("ocp_watch_pending", broker=BROKER, backend=BROKER, set_as_current=False)

    @with_backend.task(name="tests.add")
    def _add(x: int, y: int) -> int:
        return x + y

    with_backend.backend.store_result(running["task_id"], None, "STARTED")
    with_backend.backend.store_result(retrying["task_id"], None, "RETRY")
    try:
        dog = audit.Watchdog(with_backend, settings=settings, check_results=True)
        report = dog.run_once(dry_run=True)
        assert [(a.action, a.task_id) for a in report.actions] == [
            ("would_replay", unknown["task_id"])
        ]
    finally:
        for task in (running, retrying):
            with_backend.backend.forget(task["task_id"])
        with_backend.close()
