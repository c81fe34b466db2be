"""``show``: one task's history, every attempt (retries) and replay, following replay links;
``workflow``: every task of a group, a chord or a root id's tree.

Each :class:`Attempt` is one audit row without its payload; :attr:`Attempt.waits` gives its
lifecycle edges and waits by the one definition in :mod:`otel_celery_publish.timing`. A
:class:`WorkflowTask` is one task of a workflow by its latest attempt.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
from collections.abc import Collection
from typing import Any, Literal

from sqlalchemy import Row, Select, Table, null, or_, select

from otel_celery_publish import timing
from otel_celery_publish.audit._db import AuditError, TableAccess, UnknownTask, open_db, utc
from otel_celery_publish.config import Settings

#: Outcomes that mean the task's work did not succeed (``show`` marks them).
FAILED_OUTCOMES = frozenset({"failed", "revoked", "rejected"})
# ``show`` follows replay links at most this many hops from the asked-for task.
MAX_REPLAY_HOPS = 20


@dataclasses.dataclass(frozen=True)
class Attempt:
    """One audit row (a publish attempt) as ``show`` reports it; the payload itself is left out."""

    publish_id: str
    task_id: str
    task_name: str
    attempt: int
    queue: str | None
    exchange: str | None
    routing_key: str | None
    priority: int | None
    root_id: str | None
    parent_id: str | None
    group_id: str | None
    published_at: dt.datetime
    sent_at: dt.datetime | None
    received_at: dt.datetime | None
    started_at: dt.datetime | None
    finished_at: dt.datetime | None
    eta: dt.datetime | None
    expires: dt.datetime | None
    outcome: str | None
    worker: str | None
    runtime_s: float | None
    exception_type: str | None
    exception_message: str | None
    args_repr: str | None
    kwargs_repr: str | None
    payload_bytes: int | None
    payload_redacted: bool
    options: dict[str, Any]
    publisher_host: str | None
    publisher_pid: int | None
    error: str | None
    trace_id: str | None
    span_id: str | None
    trace_url: str | None
    replay_of: str | None
    replayed_at: dt.datetime | None
    replayed_as: str | None
    replayed_by: str | None
    app: str | None
    broker: str | None
    periodic_task: str | None
    dead_lettered_at: dt.datetime | None

    @property
    def status(self) -> str:
        """Its outcome; else ``replayed`` (a replay took over), ``dead-lettered`` (the
        watchdog used up its automatic replays) or ``unfinished``."""
        if self.outcome:
            return self.outcome
        if self.replayed_at:
            return "replayed"
        return "dead-lettered" if self.dead_lettered_at else "unfinished"

    @property
    def failed(self) -> bool:
        return self.outcome in FAILED_OUTCOMES

    @property
    def waits(self) -> timing.Edges:
        """Its lifecycle edges (epoch seconds) and waits, as the queue-wait spans and ``stats``
        define them: ready, received, started, finished; broker wait, worker wait, end to end."""
        return timing.edges(
            self.published_at.timestamp(),
            _epoch(self.eta),
            _epoch(self.received_at),
            _epoch(self.started_at),
            _epoch(self.finished_at),
        )


def _epoch(value: dt.datetime | None) -> float | None:
    return None if value is None else value.timestamp()


@dataclasses.dataclass(frozen=True)
class TaskHistory:
    """Every attempt of a task, of its replays and of what it replays, oldest first."""

    task_id: str
    attempts: list[Attempt]


def show(task_id: str, *, settings: Settings | None = None) -> TaskHistory:
    """The history of ``task_id``: its attempts (retries) and replays, following replay links
    both ways; ``trace_url`` is filled from ``settings.trace_url`` (``{trace_id}``)."""
    with open_db(settings) as db:
        t = db.table
        found = {r.publish_id: r for r in db.rows(select(t).where(t.c.task_id == task_id))}
        if not found:
            raise UnknownTask(f"no audit row for task id {task_id!r}")
        for _ in range(MAX_REPLAY_HOPS):
            origins = {r.replay_of for r in found.values() if r.replay_of}
            related = or_(
                t.c.task_id.in_({r.task_id for r in found.values()}),
                t.c.replay_of.in_(set(found)),
                t.c.publish_id.in_(origins - set(found)),
            )
            new = [r for r in db.rows(select(t).where(related)) if r.publish_id not in found]
            if not new:
                break
            found.update((r.publish_id, r) for r in new)
        rows = sorted(found.values(), key=lambda r: (utc(r.published_at), r.attempt or 0))
        template = db.settings.trace_url
        return TaskHistory(task_id, [attempt_of(r, template) for r in rows])


def trace_url(template: str, trace_id: str | None) -> str | None:
    """``template`` (e.g. ``http://jaeger:16686/trace/{trace_id}``) filled in, if both exist."""
    if not template or not trace_id:
        return None
    try:
        return template.format(trace_id=trace_id)
    except (KeyError, IndexError, ValueError):
        raise AuditError(
            f"OTEL_CELERY_PUBLISH_TRACE_URL {template!r} must be a format string using "
            "{trace_id} and no other field"
        ) from None


def attempt_of(row: Row[Any], template: str) -> Attempt:
    """The :class:`Attempt` of an audit row (all columns), its trace URL from ``template``."""
    m = row._mapping
    fields: dict[str, Any] = {name: m[name] for name in ATTEMPT_COLUMNS}
    fields.update({name: utc(m[name]) for name in ATTEMPT_TIMES})
    return Attempt(
        **fields,
        attempt=m["attempt"] or 0,
        payload_bytes=None if m["payload"] is None else len(m["payload"]),
        payload_redacted=bool(m["payload_redacted"]),
        options=dict(m["options"] or {}),
        trace_url=trace_url(template, m["trace_id"]),
    )


# The columns an Attempt copies as they are, and the times it makes aware UTC.
ATTEMPT_COLUMNS = (
    "publish_id", "task_id", "task_name", "queue", "exchange", "routing_key", "priority",
    "root_id", "parent_id", "group_id", "outcome", "worker", "runtime_s", "exception_type",
    "exception_message", "args_repr", "kwargs_repr", "publisher_host", "publisher_pid", "error",
    "trace_id", "span_id", "replay_of", "replayed_as", "replayed_by", "app", "broker",
    "periodic_task",
)  # fmt: skip
ATTEMPT_TIMES = (
    "published_at", "sent_at", "received_at", "started_at", "finished_at", "eta", "expires",
    "replayed_at", "dead_lettered_at",
)  # fmt: skip


# -- workflows: show <group id | root id> ---------------------------------------------------

#: How a task sits in a workflow: the workflow's ``root`` task, a ``member`` of a group or of a
#: chord's header, a chord ``callback`` (its group's members have an index, it has none), or
#: another ``task`` of the workflow (a chain's next step, a ``link`` callback, a nested publish).
Role = Literal["root", "member", "callback", "task"]
#: What the asked-for id was: a group's id (a ``chord`` when a callback waits for it) or the
#: root id (``root_id``) its tasks share.
WorkflowKind = Literal["group", "chord", "root"]
#: ``workflow`` follows group and root ids at most this many hops, and reads at most this many
#: rows (then ``truncated`` says so).
MAX_WORKFLOW_HOPS = 20
MAX_WORKFLOW_ROWS = 10_000


@dataclasses.dataclass(frozen=True)
class WorkflowTask:
    """One task of a workflow: its latest attempt, and where it sits."""

    task_id: str
    task_name: str
    role: Role
    #: The group id a chord callback waited for (its header's members); else None.
    waited_for: str | None
    attempts: int
    status: str
    outcome: str | None
    group_id: str | None
    group_index: int | None
    parent_id: str | None
    root_id: str | None
    queue: str | None
    worker: str | None
    published_at: dt.datetime
    started_at: dt.datetime | None
    finished_at: dt.datetime | None
    queue_wait_s: float | None
    runtime_s: float | None
    end_to_end_s: float | None
    exception_type: str | None
    exception_message: str | None
    trace_id: str | None
    publish_id: str
    replay_of: str | None

    @property
    def failed(self) -> bool:
        return self.outcome in FAILED_OUTCOMES


@dataclasses.dataclass(frozen=True)
class WorkflowTotals:
    """Counts by the tasks' latest attempts, and the workflow's span of time."""

    tasks: int
    done: int
    failed: int
    unfinished: int
    replayed: int
    first_published_at: dt.datetime
    last_finished_at: dt.datetime | None
    #: First publish to last finish, in seconds (so far, while ``unfinished`` is not 0).
    elapsed_s: float | None


@dataclasses.dataclass(frozen=True)
class Workflow:
    """Every task of a group, a chord or a root id's tree, by publish time."""

    id: str
    kind: WorkflowKind
    tasks: list[WorkflowTask]
    totals: WorkflowTotals
    truncated: bool


def workflow(workflow_id: str, *, settings: Settings | None = None) -> Workflow:
    """The workflow ``workflow_id`` names: a group's (or chord header's) id, or a root id.

    Its tasks: the group's members (and the chord callback, which Celery sends with the group's
    id), or the tasks whose ``root_id`` it is (and the root itself); then, followed until
    nothing new comes, the tasks rooted at any of them and the members of any group among them.
    Raises :class:`UnknownTask` if no row has it as group id or as root id of another task.
    Reads the partial indexes ``ix_<table>_group_id`` and ``ix_<table>_root_id``.
    """
    with open_db(settings) as db:
        found, kind, truncated = _workflow_rows(db, workflow_id)
        template = db.settings.trace_url
        attempts = [attempt_of(r, template) for r in found]
    return _assemble(workflow_id, kind, attempts, truncated)


def _rows(t: Table) -> Select[Any]:
    """Every column but the payload (a workflow may hold thousands of rows; only ``show <task
    id>`` says how big each payload is), at most one row past the cap. Unordered: with an
    ORDER BY published_at, PostgreSQL may walk the published_at index instead of the partial
    one (a LIMIT makes an ordered scan look cheap); the rows are sorted here."""
    columns = [c for c in t.c if c.name != "payload"]
    return select(*columns, null().label("payload")).limit(MAX_WORKFLOW_ROWS + 1)


def _by_group(t: Table, ids: Collection[str]) -> Select[Any]:
    # The partial index's predicate, repeated so PostgreSQL can prove the index applies.
    return _rows(t).where(t.c.group_id.is_not(None), t.c.group_id.in_(ids))


def _by_root(t: Table, ids: Collection[str]) -> Select[Any]:
    return _rows(t).where(
        t.c.root_id.is_not(None), t.c.root_id != t.c.task_id, t.c.root_id.in_(ids)
    )


def _workflow_rows(db: TableAccess, workflow_id: str) -> tuple[list[Row[Any]], WorkflowKind, bool]:
    t = db.table
    members = db.rows(_by_group(t, [workflow_id]))
    descendants = db.rows(_by_root(t, [workflow_id]))
    if not members and not descendants:
        raise UnknownTask(f"no audit row has group id or root id {workflow_id!r}")
    found: dict[str, Row[Any]] = {}
    for r in (*members, *descendants, *db.rows(_rows(t).where(t.c.task_id == workflow_id))):
        found[r.publish_id] = r
    groups_seen, roots_seen = {workflow_id}, {workflow_id}
    for _ in range(MAX_WORKFLOW_HOPS):
        if len(found) > MAX_WORKFLOW_ROWS:
            break
        groups = {r.group_id for r in found.values() if r.group_id} - groups_seen
        roots = {r.task_id for r in found.values()} - roots_seen
        if not groups and not roots:
            break
        groups_seen |= groups
        roots_seen |= roots
        if groups:
            found.update((r.publish_id, r) for r in db.rows(_by_group(t, groups)))
        if roots:
            found.update((r.publish_id, r) for r in db.rows(_by_root(t, roots)))
    rows = sorted(found.values(), key=lambda r: (utc(r.published_at), r.attempt or 0))
    kind: WorkflowKind = "group" if members else "root"
    return rows[:MAX_WORKFLOW_ROWS], kind, len(rows) > MAX_WORKFLOW_ROWS


def _assemble(
    workflow_id: str, kind: WorkflowKind, attempts: list[Attempt], truncated: bool
) -> Workflow:
    by_task: dict[str, list[Attempt]] = {}
    for a in attempts:  # oldest first
        by_task.setdefault(a.task_id, []).append(a)
    indexed_groups = {a.group_id for a in attempts if a.group_id and _group_index(a) is not None}
    tasks = [
        _workflow_task(history, workflow_id, kind, indexed_groups) for history in by_task.values()
    ]
    tasks.sort(key=lambda w: (w.published_at, w.task_id))
    if kind == "group" and any(w.role == "callback" and w.waited_for == workflow_id for w in tasks):
        kind = "chord"
    return Workflow(workflow_id, kind, tasks, _totals(tasks), truncated)


def _group_index(a: Attempt) -> int | None:
    value = a.options.get("group_index")
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _workflow_task(
    history: list[Attempt], workflow_id: str, kind: WorkflowKind, indexed_groups: set[str]
) -> WorkflowTask:
    first, last = history[0], history[-1]
    index = _group_index(last)
    role: Role
    if kind == "root" and last.task_id == workflow_id:
        role = "root"
    elif last.group_id and index is None and last.group_id in indexed_groups:
        # Celery freezes a chord's body with its header's group id and no index.
        role = "callback"
    elif last.group_id:
        role = "member"
    else:
        role = "task"
    waits = last.waits
    queue_wait = None if waits.started is None else waits.started - waits.ready
    return WorkflowTask(
        task_id=last.task_id,
        task_name=last.task_name,
        role=role,
        waited_for=last.group_id if role == "callback" else None,
        attempts=len(history),
        status=last.status,
        outcome=last.outcome,
        group_id=last.group_id,
        group_index=index,
        parent_id=last.parent_id,
        root_id=last.root_id,
        queue=last.queue,
        worker=last.worker,
        published_at=first.published_at,
        started_at=last.started_at,
        finished_at=last.finished_at,
        queue_wait_s=queue_wait,
        runtime_s=last.runtime_s,
        end_to_end_s=waits.end_to_end,
        exception_type=last.exception_type,
        exception_message=last.exception_message,
        trace_id=last.trace_id,
        publish_id=last.publish_id,
        replay_of=last.replay_of,
    )


def _totals(tasks: list[WorkflowTask]) -> WorkflowTotals:
    failed = sum(1 for w in tasks if w.failed)
    replayed = sum(1 for w in tasks if w.status == "replayed")
    # ``retried`` as the latest attempt: its next attempt has not been recorded (yet).
    unfinished = sum(1 for w in tasks if w.outcome is None and w.status != "replayed")
    unfinished += sum(1 for w in tasks if w.outcome == "retried")
    first = min(w.published_at for w in tasks)
    finished = [w.finished_at for w in tasks if w.finished_at is not None]
    last = max(finished) if finished else None
    return WorkflowTotals(
        tasks=len(tasks),
        done=len(tasks) - failed - replayed - unfinished,
        failed=failed,
        unfinished=unfinished,
        replayed=replayed,
        first_published_at=first,
        last_finished_at=last,
        elapsed_s=None if last is None else max(0.0, (last - first).total_seconds()),
    )
