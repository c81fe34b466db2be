"""``audit show TASK_ID``: every attempt and replay of a task, each with its fields and its
lifecycle drawn as a timeline (:mod:`.timeline`)."""

from __future__ import annotations

import datetime as dt
from typing import Any

import click

from otel_celery_publish import audit as api
from otel_celery_publish.cli._options import as_names, common_options, now, settings_from
from otel_celery_publish.cli._output import print_json, utc_time
from otel_celery_publish.timeline import Bar, duration, render


@click.command()
@common_options
@click.argument("task_id", callback=as_names)
def show(*, audit_url: str | None, table: str | None, as_json: bool, task_id: str) -> None:
    """Every attempt and replay of TASK_ID: lifecycle, arguments, trace, timeline."""
    history = api.show(task_id, settings=settings_from(audit_url, table))
    if as_json:
        print_json(history)
        return
    at = now().timestamp()
    for number, a in enumerate(history.attempts):
        if number:
            click.echo()
        click.echo(f"{a.task_name}[{a.task_id}] attempt {a.attempt}: {a.status}")
        for label, value in _attempt_fields(a):
            if value not in (None, ""):
                click.echo(f"  {label:<14} {value}")
        click.echo("\n".join(render(lifecycle_bars(a), now=at)))


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
        ("trace id", a.trace_id),
        ("trace", a.trace_url),
        ("replay of", a.replay_of),
        ("replayed", f"{utc_time(a.replayed_at)} as {a.replayed_as}" if a.replayed_at else None),
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
    bars = [
        Bar(
            f"attempt {a.attempt} {a.task_name}",
            published,
            finished,
            error=a.failed,
            note=a.outcome or "",
        )
    ]
    for i, (label, begin, end) in enumerate(stages):
        if end is not None:
            bars.append(Bar(label, min(begin, end), end, 1))
        elif i > last_known:
            bars.append(Bar(label, begin, None, 1))  # where it is stuck
            break
    return bars


def _timestamp(value: dt.datetime | None) -> float | None:
    return None if value is None else value.timestamp()
