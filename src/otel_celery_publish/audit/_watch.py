"""``audit watch``: recover by itself. Every interval, replay what ``lost`` finds, by policy.

Opt-in: nothing is replayed unless a rule allows it: ``AUTOREPLAY`` (``<glob>:<reasons>
[@<queue>]`` rules, :class:`~otel_celery_publish.config.AutoreplayRule`) or the task option
``@app.task(audit_autoreplay=True)`` (any reason) / ``audit_autoreplay=("not_received", ...)``.

Nothing here decides what is safe to re-send: a cycle is the liveness-aware :func:`lost` (a
task held by a worker whose heartbeat is fresh is never lost, a finished one is not either;
``check_results``: nor one the result backend saw finish), stuck for ``AUTOREPLAY_MIN_AGE``,
then :func:`plan_replay` and :func:`send_replay` with a :class:`Policy` whose ``replayed_by``
is ``watchdog:<rule>``. The claim of :mod:`._claims` makes two watchdogs (or a watchdog and a
person) send a task once.

Each task gets ``AUTOREPLAY_MAX`` automatic replays: counted by walking its ``replay_of``
chain back (index ``ix_<table>_replay_of`` and the primary key; a retry of a replay is
followed to the replay through ``task_id``) while the attempt each link replays was
``replayed_by`` the watchdog. A replay by a person ends the walk: it gives the task a fresh
budget. When the budget is used up, the latest lost attempt gets ``dead_lettered_at``: still
listed by ``lost`` (with the field), never replayed automatically again.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import logging
import threading
from collections.abc import Callable, Iterable, Sequence
from typing import Any, Literal

from opentelemetry import metrics
from opentelemetry.metrics import CallbackOptions, Observation
from sqlalchemy import select, update

from otel_celery_publish.audit import _db
from otel_celery_publish.audit._db import AuditError, TableAccess, open_db
from otel_celery_publish.audit._lost import LostTask, check_results, lost
from otel_celery_publish.audit._replay import (
    WATCHDOG,
    Planned,
    Policy,
    ReplayResult,
    dry_run_report,
    plan_replay,
    replayed_counter,
    send_replay,
)
from otel_celery_publish.config import AutoreplayRule, Settings
from otel_celery_publish.schema.table import LOST_REASONS
from otel_celery_publish.version import __version__

logger = logging.getLogger("otel_celery_publish")

Action = Literal[
    "replayed", "would_replay", "dead_lettered", "would_dead_letter", "refused", "failed"
]
ACTIONS: tuple[Action, ...] = (
    "replayed", "would_replay", "dead_lettered", "would_dead_letter", "refused", "failed",
)  # fmt: skip
_KINDS: dict[str, Action] = {"sent": "replayed", "would_send": "would_replay", "failed": "failed"}
#: The name :func:`register_watch_task` gives the periodic task, for a beat schedule.
WATCH_TASK = "otel_celery_publish.audit.watch"
#: The task option naming which lost reasons of that task may be replayed automatically.
TASK_OPTION = "audit_autoreplay"
#: At most this many lost attempts are read per cycle (oldest first): the gauges count them.
SCAN_LIMIT = 10_000


@dataclasses.dataclass(frozen=True)
class WatchAction:
    """What one cycle did with one lost attempt that a rule covers."""

    task_id: str
    publish_id: str
    task_name: str
    reason: str
    action: Action
    rule: str
    auto_replays: int
    queue: str | None
    new_task_id: str | None = None
    detail: str | None = None


@dataclasses.dataclass(frozen=True)
class WatchReport:
    """One cycle: how many attempts were lost (``dead_lettered`` of them dead-lettered, now)
    and what was done with those a rule covers."""

    dry_run: bool
    lost: int
    dead_lettered: int
    actions: list[WatchAction]

    def count(self, action: Action) -> int:
        return sum(1 for a in self.actions if a.action == action)


def rule_for(app: Any, task: LostTask, rules: Sequence[AutoreplayRule]) -> str | None:
    """The first rule allowing ``task`` to be replayed automatically, as recorded on its row
    (``AUTOREPLAY``'s rule text, or ``task`` for the task option), or None. Never the watch
    task itself: its next scheduled run does what a lost one would have done."""
    if task.task_name == WATCH_TASK:
        return None
    for rule in rules:
        if rule.allows(task.task_name, task.reason):
            return str(rule)
    option = getattr(app.tasks.get(task.task_name), TASK_OPTION, None)
    if option is True or option == "all":
        return "task"
    if isinstance(option, str):
        option = (option,)
    if isinstance(option, (tuple, list, set, frozenset)) and task.reason in option:
        return "task:" + ",".join(sorted(str(r) for r in option))
    return None


def target_queue(rule: str, rules: Sequence[AutoreplayRule]) -> str | None:
    return next((r.queue for r in rules if str(r) == rule), None)


class Watchdog:
    """Runs cycles (:meth:`run_once`) for one app; keeps the gauges' last values between them.

    ``meter_provider``: where the metrics go (default: the global one, e.g. under
    ``opentelemetry-instrument``). ``check_results``: also drop what the app's result backend
    saw finish (for uninstrumented workers); a backend error then fails the cycle, which
    replays nothing.
    """

    def __init__(
        self,
        app: Any,
        *,
        settings: Settings | None = None,
        meter_provider: Any = None,
        check_results: bool = False,
        since: dt.timedelta = dt.timedelta(days=1),
        limit: int = 100,
    ) -> None:
        self.app = app
        self.settings = settings or Settings.from_env()
        self.check_results = check_results
        self.since = since
        self.limit = limit
        self._lock = threading.Lock()
        self._lost: dict[tuple[str, str, str], int] = {}
        self._dead: dict[tuple[str, str], int] = {}
        meter = metrics.get_meter("otel_celery_publish", __version__, meter_provider)
        meter.create_observable_gauge(
            "celery.audit.lost", [self._observe_lost], unit="{task}",
            description="Lost tasks, as audit watch last found them",
        )  # fmt: skip
        meter.create_observable_gauge(
            "celery.audit.dead_lettered", [self._observe_dead], unit="{task}",
            description="Lost tasks that audit watch gave up replaying",
        )  # fmt: skip
        self._replayed = replayed_counter(meter_provider)

    def run_once(self, *, dry_run: bool = False, now: dt.datetime | None = None) -> WatchReport:
        """One cycle: find, decide, replay or dead-letter (``dry_run``: only report)."""
        settings = self.settings
        now = now or _db.now_utc()
        older_than = dt.timedelta(seconds=settings.autoreplay_min_age)
        found = lost(
            settings=settings, older_than=older_than, since=self.since, limit=SCAN_LIMIT, now=now
        )
        if self.check_results and found:
            found = check_results(self.app, found)
        covered = [
            (task, rule)
            for task in found
            if task.dead_lettered_at is None
            and _latest_edge(task) <= now - older_than
            # STARTED: it is running; RETRY: a retry is queued. Only PENDING (unknown) is lost.
            and (not self.check_results or task.result_state == "PENDING")
            and (rule := rule_for(self.app, task, settings.autoreplay)) is not None
        ][: self.limit]
        actions: list[WatchAction] = []
        to_send: list[tuple[LostTask, str, int]] = []
        with open_db(settings) as db:
            for task, rule in covered:
                used = automatic_replays(db, task.publish_id, settings.autoreplay_max)
                if used < settings.autoreplay_max:
                    to_send.append((task, rule, used))
                elif dry_run:
                    actions.append(_action(task, "would_dead_letter", rule, used))
                elif dead_letter(db, task.publish_id, now):
                    actions.append(_action(task, "dead_lettered", rule, used))
                    _log(actions[-1])
        actions += self._replay(to_send, dry_run=dry_run, now=now)
        newly_dead = {a.publish_id for a in actions if a.action == "dead_lettered"}
        dead = self._snapshot(found, newly_dead)
        return WatchReport(dry_run, len(found), dead, actions)

    def run_forever(
        self,
        interval: float,
        *,
        dry_run: bool = False,
        stop: threading.Event | None = None,
        on_report: Callable[[WatchReport], None] | None = None,
    ) -> None:
        """Cycles every ``interval`` seconds until ``stop`` is set. A cycle that fails (the
        database down, a bad result backend) is logged and the next one tries again."""
        stop = stop or threading.Event()
        while not stop.is_set():
            try:
                report = self.run_once(dry_run=dry_run)
            except AuditError as exc:  # the database down, a bad result backend
                logger.warning("audit watch: cycle failed: %s", exc)
            except Exception:  # a bug of ours must not end the watch: the next cycle retries
                logger.exception("audit watch: cycle failed")
            else:
                if on_report is not None:
                    on_report(report)
            stop.wait(interval)

    def _replay(
        self, items: list[tuple[LostTask, str, int]], *, dry_run: bool, now: dt.datetime
    ) -> list[WatchAction]:
        if not items:
            return []
        rules = self.settings.autoreplay
        used = {task.publish_id: (task, rule, n) for task, rule, n in items}
        planned: list[Planned] = []
        for rule in dict.fromkeys(rule for _, rule, _ in items):
            policy = Policy(queue=target_queue(rule, rules), replayed_by=f"{WATCHDOG}{rule}")
            ids = [task.publish_id for task, r, _ in items if r == rule]
            planned += plan_replay(self.app, publish_ids=ids, policy=policy, settings=self.settings)
        if dry_run:
            report = dry_run_report(planned)
        else:
            rate = self.settings.autoreplay_rate
            report = send_replay(self.app, planned, settings=self.settings, rate=rate)
        # Refused by the plan (no or redacted payload, unregistered, expired, untrusted content):
        # the next cycle would refuse it again, forever, and take a place of ``limit``.
        # Dead-lettered, it leaves the automatic loop and shows up for a person.
        hopeless = {p.publish_id for p in planned if p.refused is not None}
        actions = []
        with open_db(self.settings) as db:
            for result in report.results:
                actions.append(self._outcome(db, result, used, hopeless, dry_run=dry_run, now=now))
        return actions

    def _outcome(
        self,
        db: TableAccess,
        result: ReplayResult,
        used: dict[str, tuple[LostTask, str, int]],
        hopeless: set[str],
        *,
        dry_run: bool,
        now: dt.datetime,
    ) -> WatchAction:
        task, rule, n = used[result.publish_id]
        kind = _KINDS.get(result.status, "refused")
        if result.publish_id in hopeless:
            if dry_run:
                kind = "would_dead_letter"
            elif dead_letter(db, result.publish_id, now):
                kind = "dead_lettered"
        action = dataclasses.replace(
            _action(task, kind, rule, n),
            queue=result.queue,
            new_task_id=result.new_task_id,
            detail=result.reason,
        )
        if kind == "replayed":
            self._replayed.add(
                1, {"celery.audit.trigger": "auto", "celery.task.name": task.task_name}
            )
        if not dry_run:
            _log(action)
        return action

    # -- gauges ------------------------------------------------------------------------------

    def _snapshot(self, found: Iterable[LostTask], newly_dead: set[str]) -> int:
        """The gauges' values from this cycle (what it found lost, replayed ones included:
        the next cycle no longer finds them); a series seen before and gone now reads 0, so a
        recovered task's series drops to 0 instead of holding its last value. Returns how many
        are dead-lettered."""
        lost_now: dict[tuple[str, str, str], int] = {}
        dead_now: dict[tuple[str, str], int] = {}
        for task in found:
            key = (task.reason, task.task_name, task.queue or "")
            lost_now[key] = lost_now.get(key, 0) + 1
            if task.dead_lettered_at is not None or task.publish_id in newly_dead:
                where = (task.task_name, task.queue or "")
                dead_now[where] = dead_now.get(where, 0) + 1
        with self._lock:
            self._lost = {**dict.fromkeys(self._lost, 0), **lost_now}
            self._dead = {**dict.fromkeys(self._dead, 0), **dead_now}
        return sum(dead_now.values())

    def _observe_lost(self, _options: CallbackOptions) -> Iterable[Observation]:
        with self._lock:
            values = list(self._lost.items())
        return [
            Observation(n, {"celery.audit.lost_reason": reason, "celery.task.name": name,
                            "messaging.destination.name": queue})
            for (reason, name, queue), n in values
        ]  # fmt: skip

    def _observe_dead(self, _options: CallbackOptions) -> Iterable[Observation]:
        with self._lock:
            values = list(self._dead.items())
        return [
            Observation(n, {"celery.task.name": name, "messaging.destination.name": queue})
            for (name, queue), n in values
        ]


def _latest_edge(task: LostTask) -> dt.datetime:
    """When the attempt last moved. ``lost`` reports ``worker_dead`` and what a worker recorded
    (``worker_lost``, ``discarded``) at once; the watchdog still waits AUTOREPLAY_MIN_AGE
    from this edge for every reason, so a broker redelivery can come first."""
    edges = (task.started_at, task.received_at, task.sent_at, task.published_at)
    return max(edge for edge in edges if edge is not None)


def _action(task: LostTask, action: Action, rule: str, used: int) -> WatchAction:
    return WatchAction(
        task_id=task.task_id,
        publish_id=task.publish_id,
        task_name=task.task_name,
        reason=task.reason,
        action=action,
        rule=rule,
        auto_replays=used,
        queue=task.queue,
    )


def _log(action: WatchAction) -> None:
    """One line per action: ids, name, reason, rule; never the args."""
    words = LOST_REASONS.get(action.reason, action.reason)  # type: ignore[call-overload]
    what = {
        "replayed": f"replayed as {action.new_task_id} to {action.queue or 'its queue'}",
        "dead_lettered": (
            f"dead-lettered: {action.detail}"
            if action.detail
            else f"dead-lettered after {action.auto_replays} automatic replay(s)"
        ),
        "refused": f"refused: {action.detail}",
        "failed": f"send failed: {action.detail}",
    }.get(action.action, action.action)
    level = logging.INFO if action.action == "replayed" else logging.WARNING
    logger.log(
        level, "audit watch: task %s (%s, %s; rule %s) %s",
        action.task_id, action.task_name, words, action.rule, what,
    )  # fmt: skip


def automatic_replays(db: TableAccess, publish_id: str, limit: int) -> int:
    """How many automatic replays led to attempt ``publish_id`` since a person last replayed
    it (at most ``limit``): the ``replay_of`` chain walked back, one link per replay whose
    original was ``replayed_by`` the watchdog."""
    t = db.table
    count, current, seen = 0, publish_id, {publish_id}
    while count < limit:
        [row] = db.rows(select(t.c.task_id, t.c.replay_of).where(t.c.publish_id == current))
        origin = row.replay_of
        if origin is None:  # a retry of a replay: its first attempt carries replay_of
            stmt = select(t.c.replay_of).where(
                t.c.task_id == row.task_id, t.c.replay_of.is_not(None)
            )
            origin = next((r.replay_of for r in db.rows(stmt.limit(1))), None)
        if origin is None or origin in seen:
            break
        parent = db.rows(select(t.c.replayed_by).where(t.c.publish_id == origin))
        if not parent or not (parent[0].replayed_by or "").startswith(WATCHDOG):
            break
        count, current = count + 1, origin
        seen.add(origin)
    return count


def dead_letter(db: TableAccess, publish_id: str, now: dt.datetime) -> bool:
    """Mark the attempt dead-lettered; False if it already was, or was replayed meanwhile
    (two watchdogs at once: one of them marks it, and logs it)."""
    t = db.table
    stmt = (
        update(t)
        .where(t.c.publish_id == publish_id, t.c.dead_lettered_at.is_(None))
        .where(t.c.replayed_at.is_(None))
        .values(dead_lettered_at=now)
    )
    return db.run(stmt) == 1


# -- as a periodic task --------------------------------------------------------------------

_WATCHDOGS: dict[int, Watchdog] = {}
_WATCHDOGS_LOCK = threading.Lock()


def watch_once(app: Any, *, dry_run: bool = False) -> WatchReport:
    """One cycle for ``app`` with the environment's settings, on a watchdog kept per app in
    this process (so its gauges keep their series between cycles)."""
    with _WATCHDOGS_LOCK:
        dog = _WATCHDOGS.get(id(app))
        if dog is None:
            dog = _WATCHDOGS[id(app)] = Watchdog(app)
    return dog.run_once(dry_run=dry_run)


def register_watch_task(app: Any, name: str = WATCH_TASK, **options: Any) -> Any:
    """Register a task running one watchdog cycle on ``app``; put it in the beat schedule::

        register_watch_task(app)
        app.conf.beat_schedule = {"audit-watch": {"task": WATCH_TASK, "schedule": 60.0,
                                                  "options": {"expires": 55}}}

    It returns the cycle's counts (never the args). ``ignore_result`` by default; ``options``
    are the task's (e.g. ``queue``).
    """

    def watch(dry_run: bool = False) -> dict[str, int]:
        report = watch_once(app, dry_run=dry_run)
        return {"lost": report.lost, "dead_lettered": report.dead_lettered,
                **{a: report.count(a) for a in ACTIONS}}  # fmt: skip

    options.setdefault("ignore_result", True)
    return app.task(name=name, **options)(watch)
