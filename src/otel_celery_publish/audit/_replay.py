"""Re-publish stored attempts through the Celery app, safely and on the record.

Two steps, so a caller (the CLI) can show the plan and ask before anything is sent:
:func:`plan_replay` decides per task what would be sent, or why it is refused;
:func:`send_replay` sends the plan; :func:`replay` does both.

A replay is an ordinary publish through the app (same task name, args, kwargs, embedded
callbacks/chain/chord and options; a new task id unless kept), made while this process is
instrumented (:mod:`._publishing`: the process's own instrumentation, or one set up for the
sends and undone after), so it gets its own producer span and audit row. Its message carries
:data:`~otel_celery_publish.headers.REPLAY_OF` (the original ``publish_id``: the new row's
``replay_of``) and :data:`~otel_celery_publish.headers.REPLAY_LINK` (the original producer span:
the new span links to it). The original row is claimed (``replayed_at``, ``replayed_as``)
before the send and released if the send fails, so concurrent replays send a task once
(:mod:`._claims`).
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import getpass
import os
import socket
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from contextlib import nullcontext
from typing import Any, Literal

from kombu import serialization
from opentelemetry import metrics, propagate
from sqlalchemy import Row

from otel_celery_publish import headers as hdr
from otel_celery_publish.audit import _claims, _db
from otel_celery_publish.audit._db import TableAccess, first_line, open_db, utc
from otel_celery_publish.audit._publishing import publishing
from otel_celery_publish.config import Settings
from otel_celery_publish.rows import split_body
from otel_celery_publish.version import __version__

Status = Literal["sent", "would_send", "refused", "failed"]
STATUSES: tuple[Status, ...] = ("sent", "would_send", "refused", "failed")
# Publish options stored in the row's ``options`` that ``send_task`` takes back as they are.
_OPTIONS = (
    "serializer", "shadow", "time_limit", "soft_time_limit", "ignore_result", "group_index",
    "delivery_mode",
)  # fmt: skip
# Trace context of the *original* publish: a replay starts its own trace and links back.
_STALE_HEADERS = frozenset({"sentry-trace", "baggage"})
_NOT_OPTIONS = frozenset({"name", "args", "kwargs", "task_id"})
#: ``replayed_by`` of the replays ``audit watch`` makes: ``watchdog:<rule>``. Those are counted
#: ``celery.audit.trigger=auto`` by the watchdog; every other sent replay here, ``manual``.
WATCHDOG = "watchdog:"
REPLAYED_METRIC = "celery.audit.replayed"


def replayed_counter(meter_provider: Any = None) -> Any:
    """The ``celery.audit.replayed`` counter (``{task}``), on ``meter_provider`` or the
    global one."""
    meter = metrics.get_meter("otel_celery_publish", __version__, meter_provider)
    return meter.create_counter(
        REPLAYED_METRIC, unit="{task}", description="Lost tasks replayed, by trigger"
    )


@dataclasses.dataclass(frozen=True)
class Planned:
    """What replaying one task would do: send ``message`` as ``new_task_id``, or be refused."""

    task_id: str
    publish_id: str
    task_name: str
    new_task_id: str
    queue: str | None
    args_repr: str | None
    kwargs_repr: str | None
    force: bool = False
    replayed_by: str | None = None
    refused: str | None = None
    message: dict[str, Any] = dataclasses.field(default_factory=dict, repr=False)
    original: Any = dataclasses.field(default=None, repr=False, compare=False)

    @property
    def options(self) -> dict[str, Any]:
        """The publish options sent along (routing, limits, headers, embedded workflow...)."""
        return {k: v for k, v in self.message.items() if k not in _NOT_OPTIONS}


@dataclasses.dataclass(frozen=True)
class ReplayResult:
    """What happened to one task; ``new_task_id`` is set once it was sent."""

    task_id: str
    publish_id: str
    task_name: str
    status: Status
    reason: str | None
    new_task_id: str | None
    queue: str | None
    args_repr: str | None
    kwargs_repr: str | None
    options: dict[str, Any]


@dataclasses.dataclass(frozen=True)
class ReplayReport:
    dry_run: bool
    results: list[ReplayResult]

    def count(self, status: Status) -> int:
        return sum(1 for r in self.results if r.status == status)

    @property
    def ok(self) -> bool:
        """True when everything asked for was sent (or, in a dry run, would be)."""
        return all(r.status in ("sent", "would_send") for r in self.results)


@dataclasses.dataclass(frozen=True)
class Policy:
    """What a replay may do beyond re-sending a lost, unfinished task."""

    queue: str | None = None
    keep_id: bool = False
    force: bool = False
    allow_unregistered: bool = False
    allow_redacted: bool = False
    #: Who asks, recorded on the original row (``replayed_by``): ``django:<username>`` from the
    #: admin; None records this process's ``user@host`` (a person at the CLI, a script).
    replayed_by: str | None = None

    def requester(self) -> str:
        return (self.replayed_by or f"{_os_user()}@{socket.gethostname()}")[:255]


def _os_user() -> str:
    try:
        return getpass.getuser()
    except (KeyError, OSError):  # a uid without a passwd entry (containers) and no $USER
        return f"uid{os.getuid()}"


def plan_replay(
    app: Any,
    task_ids: Sequence[str] = (),
    *,
    publish_ids: Sequence[str] = (),
    policy: Policy = Policy(),
    settings: Settings | None = None,
    now: dt.datetime | None = None,
) -> list[Planned]:
    """Decide per task what a replay sends; nothing is written or sent.

    ``task_ids`` replays the latest attempt of each task; ``publish_ids`` exact attempts (what
    ``lost`` reports). Raises :class:`~otel_celery_publish.audit.UnknownTask` when a task id
    has no row.
    """
    now = now or _db.now_utc()
    task_ids = list(dict.fromkeys(task_ids))
    with open_db(settings) as db:
        latest = _claims.latest_attempts(db, task_ids) if task_ids else {}
        missing = [task_id for task_id in task_ids if task_id not in latest]
        if missing:
            raise _db.UnknownTask(f"no audit row for task id(s) {', '.join(missing)}")
        by_publish = _claims.rows_by_publish_id(db, publish_ids) if publish_ids else {}
        rows = [latest[t] for t in task_ids] + [by_publish[p] for p in publish_ids]
        replayed = _claims.replayed_by_row(db, [row.publish_id for row in rows])
    accept = serialization.prepare_accept_content(  # type: ignore[no-untyped-call]
        app.conf.accept_content
    )
    registered = set(app.tasks)
    return [
        _plan_one(row, policy, now=now, accept=accept, registered=registered, replayed=replayed)
        for row in rows
    ]


def send_replay(
    app: Any,
    planned: Sequence[Planned],
    *,
    settings: Settings | None = None,
    rate: float | None = None,
    on_done: Callable[[ReplayResult], None] | None = None,
    meter_provider: Any = None,
) -> ReplayReport:
    """Send every planned replay that was not refused, at most ``rate`` per second.

    Each original is claimed first (a replay already made by someone else is then reported
    refused), released again if the send raises, and every outcome is reported: one failure
    does not stop the others. Each one sent for a person (not ``replayed_by`` the watchdog,
    which counts its own) adds 1 to ``celery.audit.replayed{celery.audit.trigger=manual}``.
    """
    settings = settings or Settings.from_env()
    results: list[ReplayResult] = []
    pace = _Pacer(rate)
    sending = any(item.refused is None for item in planned)
    counter = replayed_counter(meter_provider) if sending else None
    with open_db(settings) as db, publishing(settings) if sending else nullcontext():
        for item in planned:
            result = _send_one(app, db, item, pace)
            results.append(result)
            manual = not (item.replayed_by or "").startswith(WATCHDOG)
            if counter is not None and result.status == "sent" and manual:
                attributes = {"celery.audit.trigger": "manual", "celery.task.name": item.task_name}
                counter.add(1, attributes)
            if on_done is not None:
                on_done(result)
    return ReplayReport(False, results)


def replay(
    app: Any,
    task_ids: Sequence[str] = (),
    *,
    publish_ids: Sequence[str] = (),
    policy: Policy = Policy(),
    dry_run: bool = False,
    rate: float | None = None,
    settings: Settings | None = None,
) -> ReplayReport:
    """:func:`plan_replay` then :func:`send_replay` (``dry_run``: report what would be sent)."""
    planned = plan_replay(app, task_ids, publish_ids=publish_ids, policy=policy, settings=settings)
    if dry_run:
        return dry_run_report(planned)
    return send_replay(app, planned, settings=settings, rate=rate)


def dry_run_report(planned: Sequence[Planned]) -> ReplayReport:
    return ReplayReport(
        True, [_result(p, "refused" if p.refused else "would_send") for p in planned]
    )


def _plan_one(
    row: Row[Any],
    policy: Policy,
    *,
    now: dt.datetime,
    accept: set[str],
    registered: set[str],
    replayed: set[str],
) -> Planned:
    new_task_id = row.task_id if policy.keep_id else str(uuid.uuid4())
    planned = Planned(
        task_id=row.task_id,
        publish_id=row.publish_id,
        task_name=row.task_name,
        new_task_id=new_task_id,
        queue=policy.queue or row.queue,
        args_repr=row.args_repr,
        kwargs_repr=row.kwargs_repr,
        force=policy.force,
        replayed_by=policy.requester(),
        original=row,
    )
    refused = _refusal(row, policy, now=now, registered=registered, replayed=replayed)
    if refused is None:
        try:
            body = serialization.loads(  # type: ignore[no-untyped-call]
                row.payload, row.content_type, row.content_encoding, accept=accept
            )
        except Exception as exc:  # kombu raises ContentDisallowed, DecodeError, or the codec's
            refused = f"stored payload cannot be decoded: {first_line(exc)}"
        else:
            message = _message(row, body, new_task_id, policy.queue, now)
            return dataclasses.replace(planned, message=message)
    return dataclasses.replace(planned, refused=refused)


def _refusal(
    row: Row[Any], policy: Policy, *, now: dt.datetime, registered: set[str], replayed: set[str]
) -> str | None:
    """Why this attempt must not be re-sent under ``policy``, or None. Safety refusals have
    their own flag; ``force`` overrides only the ones about the task's state."""
    expires = utc(row.expires)
    safety = [
        (
            row.payload is None,
            f"no stored payload{f' ({row.error})' if row.error else ''}: there is nothing "
            "faithful to re-send",
        ),
        (
            row.payload_redacted and not policy.allow_redacted,
            "its payload was redacted when published (sensitive values were stored as '***'); "
            "--allow-redacted sends it as stored",
        ),
        (
            bool((row.options or {}).get("headers_redacted")) and not policy.allow_redacted,
            "some of its custom headers were redacted when published (stored as '***'); "
            "--allow-redacted sends them as stored",
        ),
        (
            row.task_name not in registered and not policy.allow_unregistered,
            f"task {row.task_name!r} is not registered in this app (is its module in include=, "
            "imports= or autodiscover_tasks()?); --allow-unregistered",
        ),
    ]
    state = [
        (row.outcome == "succeeded", "it already succeeded; --force runs it again"),
        (
            row.replayed_at is not None or row.publish_id in replayed,
            f"it was already replayed{f' as {row.replayed_as}' if row.replayed_as else ''}; "
            "--force replays it again",
        ),
        (
            row.received_at is None and expires is not None and expires <= now,
            "it expired before any worker received it; --force sends it with the same expiry "
            "window from now",
        ),
    ]
    checks = safety if policy.force else safety + state
    return next((why for refused, why in checks if refused), None)


def _message(
    row: Row[Any], body: Any, new_task_id: str, queue: str | None, now: dt.datetime
) -> dict[str, Any]:
    """``send_task`` keyword arguments re-creating the original publish."""
    args, kwargs, embed = split_body(body)
    options: Mapping[str, Any] = row.options or {}
    message: dict[str, Any] = {
        "name": row.task_name,
        "args": tuple(args),
        "kwargs": dict(kwargs),
        "task_id": new_task_id,
        "retries": row.attempt or 0,
        "headers": _headers(row, options),
        **{key: options[key] for key in _OPTIONS if options.get(key) is not None},
    }
    if queue:
        message["queue"] = queue
    elif row.exchange:
        message.update(exchange=row.exchange, routing_key=row.routing_key)
    elif row.queue:
        message["queue"] = row.queue
    for column in ("priority", "group_id", "root_id", "parent_id"):
        if getattr(row, column) is not None:
            message[column] = getattr(row, column)
    for key, option in (("callbacks", "link"), ("errbacks", "link_error"), ("chain", "chain")):
        if embed.get(key):
            message[option] = embed[key]
    if embed.get("chord"):
        message["chord"] = embed["chord"]
    published, eta, expires = (utc(v) for v in (row.published_at, row.eta, row.expires))
    if eta is not None and eta > now:
        message["eta"] = eta
    if expires is not None and published is not None and expires > published:
        # The publisher allowed this long from publish to run: allow it again from now.
        message["expires"] = now + (expires - published)
    return message


def _headers(row: Row[Any], options: Mapping[str, Any]) -> dict[str, Any]:
    stale = _STALE_HEADERS.union(propagate.get_global_textmap().fields)
    headers = {k: v for k, v in (options.get("headers") or {}).items() if k not in stale}
    headers[hdr.REPLAY_OF] = row.publish_id
    if row.trace_id and row.span_id:
        headers[hdr.REPLAY_LINK] = f"{row.trace_id}-{row.span_id}"
    return headers


class _Pacer:
    """Starts sends at least ``1 / rate`` seconds apart (no limit without a rate)."""

    def __init__(self, rate: float | None) -> None:
        self._interval = 1.0 / rate if rate else 0.0
        self._next = 0.0

    def wait(self) -> None:
        time.sleep(max(0.0, self._next - time.monotonic()))  # a rate limit, not synchronisation

    def sending(self) -> None:
        self._next = time.monotonic() + self._interval


def _send_one(app: Any, db: TableAccess, item: Planned, pace: _Pacer) -> ReplayResult:
    if item.refused is not None:
        return _result(item, "refused")
    pace.wait()  # before the claim: an interrupted wait leaves nothing claimed
    claimed = _claims.claim_replay(
        db, item.publish_id, item.new_task_id, force=item.force, replayed_by=item.replayed_by,
        original=item.original,
    )  # fmt: skip
    if not claimed:
        # Or a worker received/started/finished it since the plan; the wording is a contract.
        return _result(item, "refused", "it was replayed by someone else just now")
    try:
        pace.sending()
        app.send_task(**item.message)
    except Exception as exc:  # broker down, routing, encoding: reported, the rest go on
        _claims.release_replay(db, item.original, item.new_task_id)
        return _result(item, "failed", f"{type(exc).__name__}: {first_line(exc)}")
    return _result(item, "sent")


def _result(item: Planned, status: Status, reason: str | None = None) -> ReplayResult:
    return ReplayResult(
        task_id=item.task_id,
        publish_id=item.publish_id,
        task_name=item.task_name,
        status=status,
        reason=reason or item.refused,
        new_task_id=item.new_task_id if status == "sent" else None,
        queue=item.queue,
        args_repr=item.args_repr,
        kwargs_repr=item.kwargs_repr,
        options=item.options,
    )
