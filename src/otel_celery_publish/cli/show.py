"""``audit show ID``: every attempt and replay of a task, each with its fields and its
lifecycle drawn as a timeline (:mod:`.timeline`); and when ID is a group id (a chord's too) or
the root id of other tasks, the whole workflow: its tasks by publish time, their outcomes and
timings, the chord callback and what it waited for, and the totals."""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable
from typing import Any, TypeVar

import click

from otel_celery_publish import audit as api
from otel_celery_publish.cli._options import as_names, common_options, now, settings_from
from otel_celery_publish.cli._output import clip, print_json, print_table, utc_time
from otel_celery_publish.timeline import Bar, duration, render

T = TypeVar("T")


@click.command()
@common_options
@click.argument("task_id", callback=as_names)
def show(*, audit_url: str | None, table: str | None, as_json: bool, task_id: str) -> None:
    """Every attempt and replay of TASK_ID: lifecycle, arguments, trace, timeline.

    When TASK_ID is a group id (a chord's header) or the root id of other tasks, also the whole
    workflow: every task with its outcome and timings, the chord callback, the totals.
    """
    settings = settings_from(audit_url, table)
    history = _or_none(lambda: api.show(task_id, settings=settings))
    flow = _or_none(lambda: api.workflow(task_id, settings=settings))
    if history is None and flow is None:
        raise api.UnknownTask(
            f"no audit row for task id {task_id!r}, nor as a group id or a root id"
        )
    if as_json:
        shown: dict[str, Any] = {
            "task_id": task_id,
            "attempts": history.attempts if history is not None else [],
        }
        if flow is not None:
            shown["workflow"] = flow
        print_json(shown)
        return
    at = now().timestamp()
    for number, a in enumerate(history.attempts if history is not None else []):
        if number:
            click.echo()
        click.echo(f"{a.task_name}[{a.task_id}] attempt {a.attempt}: {a.status}")
        for label, value in _attempt_fields(a):
            if value not in (None, ""):
                click.echo(f"  {label:<14} {value}")
        click.echo("\n".join(render(lifecycle_bars(a), now=at)))
    if flow is not None:
        if history is not None:
            click.echo()
        _print_workflow(flow, at)


def _or_none(lookup: Callable[[], T]) -> T | None:
    """What the lookup finds, or None where it knows no such id."""
    try:
        return lookup()
    except api.UnknownTask:
        return None


def _print_workflow(flow: api.Workflow, at: float) -> None:
    t = flow.totals
    what = {"group": "group", "chord": "chord (group id)", "root": "workflow (root id)"}
    click.echo(
        f"{what[flow.kind]} {flow.id}: {t.tasks} task(s), {t.done} done, {t.failed} failed, "
        f"{t.unfinished} unfinished" + (f", {t.replayed} replayed" if t.replayed else "")
    )
    span = f"  first published {utc_time(t.first_published_at)}"
    if t.last_finished_at is not None and t.elapsed_s is not None:
        so_far = " so far" if t.unfinished else ""
        span += f", last finished {utc_time(t.last_finished_at)} ({duration(t.elapsed_s)}{so_far})"
    click.echo(span)
    if flow.truncated:
        click.echo(f"  (cut: the workflow has more rows than the {len(flow.tasks)} tasks shown)")
    print_table(
        ["PUBLISHED (UTC)", "TASK ID", "TASK", "ROLE", "ATTEMPTS", "STATUS", "QUEUE WAIT",
         "RUN", "WORKER", "NOTE"],
        [
            [utc_time(w.published_at), w.task_id, clip(w.task_name), _role(w), w.attempts,
             w.status, _seconds(w.queue_wait_s), _seconds(w.runtime_s), w.worker, _note(w)]
            for w in flow.tasks
        ],
    )  # fmt: skip
    bars = [
        Bar(f"{_role(w)} {w.task_name}", w.published_at.timestamp(), _timestamp(w.finished_at),
            error=w.failed, note=w.status)
        for w in flow.tasks
    ]  # fmt: skip
    # Drawn up to now only while tasks are open: a finished workflow fills the width.
    click.echo("\n".join(render(bars, now=at if any(b.end is None for b in bars) else None)))


def _role(w: api.WorkflowTask) -> str:
    return f"member {w.group_index}" if w.role == "member" and w.group_index is not None else w.role


def _note(w: api.WorkflowTask) -> str | None:
    if w.waited_for:
        return f"waited for group {w.waited_for}"
    if w.exception_type:
        return clip(f"{w.exception_type}: {w.exception_message or ''}")
    return None


def _seconds(value: float | None) -> str | None:
    return None if value is None else duration(value)


def _attempt_fields(a: api.Attempt) -> list[tuple[str, Any]]:
    exception = f"{a.exception_type}: {a.exception_message}" if a.exception_type else None
    payload = ("none" if a.payload_bytes is None else f"{a.payload_bytes} bytes") + (
        " (redacted)" if a.payload_redacted else ""
    )
    return [
        ("publish id", a.publish_id),
        ("queue", a.queue),
        ("args", a.args_repr),
        ("kwargs", a.kwargs_repr),
        ("payload", payload),
        ("error", a.error),
        ("eta", utc_time(a.eta)),
        ("expires", utc_time(a.expires)),
        ("published", utc_time(a.published_at)),
        ("sent", utc_time(a.sent_at)),
        ("received", utc_time(a.received_at)),
        ("started", utc_time(a.started_at)),
        ("finished", utc_time(a.finished_at)),
        ("worker", a.worker),
        ("runtime", None if a.runtime_s is None else duration(a.runtime_s)),
        ("exception", exception),
        ("publisher", f"{a.publisher_host} pid {a.publisher_pid}" if a.publisher_host else None),
        ("app", f"{a.app} on {a.broker}" if a.app else None),
        ("beat entry", a.periodic_task),
        ("trace id", a.trace_id),
        ("trace", a.trace_url),
        ("replay of", a.replay_of),
        ("replayed", f"{utc_time(a.replayed_at)} as {a.replayed_as}" if a.replayed_at else None),
        ("replayed by", a.replayed_by),
        ("dead-lettered", utc_time(a.dead_lettered_at) if a.dead_lettered_at else None),
    ]


def lifecycle_bars(a: api.Attempt) -> list[Bar]:
    """One attempt as timeline bars: the attempt, then its stages: send (published -> sent),
    then the queue wait on the edges the worker's spans use (``Attempt.waits``): broker wait
    (ready -> received), worker wait (received -> started), then run (-> finished). Where an
    unfinished attempt is stuck, the stage is an open bar."""
    published = a.published_at.timestamp()
    sent = _timestamp(a.sent_at)
    waits = a.waits
    started, finished = waits.started, waits.finished
    picked_up = waits.ready if waits.received is None else waits.received
    stages = [
        ("send", published, sent),
        ("broker wait", waits.ready, waits.received),
        ("worker wait", picked_up, started),
        ("run", started, finished)
        if started is not None
        else (a.outcome or "finished", picked_up, finished),
    ]
    last_known = max((i for i, (*_, end) in enumerate(stages) if end is not None), default=-1)
    # An unfinished original that a replay took over is not stuck any more: its open stage
    # ends where the replay took over.
    replaced = _timestamp(a.replayed_at) if finished is None else None
    bars = [
        Bar(
            f"attempt {a.attempt} {a.task_name}",
            published,
            finished if replaced is None else max(published, replaced),
            error=a.failed,
            note=a.outcome or ("replayed" if replaced is not None else ""),
        )
    ]
    for i, (label, begin, end) in enumerate(stages):
        if end is not None:
            bars.append(Bar(label, min(begin, end), end, 1))
        elif i > last_known:
            if replaced is None:
                bars.append(Bar(label, begin, None, 1))  # where it is stuck
            else:
                bars.append(Bar(f"{label} (replayed)", begin, max(begin, replaced), 1))
            break
    return bars


def _timestamp(value: dt.datetime | None) -> float | None:
    return None if value is None else value.timestamp()
