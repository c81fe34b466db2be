"""``show``: one task's history, every attempt (retries) and replay, following replay links.

Each :class:`Attempt` is one audit row without its payload; :attr:`Attempt.waits` gives its
lifecycle edges and waits by the one definition in :mod:`otel_celery_publish.timing`.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
from typing import Any

from sqlalchemy import Row, or_, select

from otel_celery_publish import timing
from otel_celery_publish.audit._db import AuditError, UnknownTask, open_db, utc
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

    @property
    def status(self) -> str:
        """Its outcome; else ``replayed`` (a replay took over) or ``unfinished``."""
        return self.outcome or ("replayed" if self.replayed_at else "unfinished")

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
    "trace_id", "span_id", "replay_of", "replayed_as",
)  # fmt: skip
ATTEMPT_TIMES = (
    "published_at", "sent_at", "received_at", "started_at", "finished_at", "eta", "expires",
    "replayed_at",
)  # fmt: skip
