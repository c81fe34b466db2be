"""Worker side: the CONSUMER process span, the queue-wait spans, lifecycle rows and metrics.

Signals arrive in two processes under prefork: ``task_received``, ``task_revoked``,
``task_rejected``, ``task_unknown`` and the failure of a killed child in the main process;
``task_prerun``/``task_failure``/``task_retry``/``task_postrun`` in the pool child. State is keyed
by task id in bounded stores, so nothing leaks when a closing signal never comes.

Every received and started row names the worker instance holding it (its heartbeat,
:mod:`otel_celery_publish.sink.heartbeat`), so ``lost`` can tell a running task from a dead
worker's. An outcome whose work was not done is marked with ``lost_reason``: ``worker_lost`` (the
pool child died running it, recorded by the main process) and ``discarded`` (unregistered task,
rejected message).

The receivers live here. The pure functions that tell how a run ended are in
:mod:`._outcomes`; the updates are built by :mod:`otel_celery_publish.rows`.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any

from billiard.exceptions import WorkerLostError
from opentelemetry import context as otel_context
from opentelemetry import metrics, propagate, trace
from opentelemetry.trace import Link, SpanKind, Status, StatusCode

from otel_celery_publish import headers as hdr
from otel_celery_publish import rows
from otel_celery_publish._guard import guard
from otel_celery_publish.config import Settings
from otel_celery_publish.hooks import _celery
from otel_celery_publish.hooks._outcomes import (
    message_source,
    outcome_of,
    requeued_after_timeout,
    unwrap,
)
from otel_celery_publish.hooks.pending import BoundedStore
from otel_celery_publish.schema.table import RecordedLostReason
from otel_celery_publish.sink.heartbeat import Heartbeat
from otel_celery_publish.sink.writer import AuditWriter
from otel_celery_publish.timing import Waits, queue_waits

MAX_TRACKED = 10_000
# The semconv's advisory buckets for durations in seconds (the SDK's default ones are for ms).
SECONDS_BUCKETS = [0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 0.75, 1, 2.5, 5, 7.5, 10]


def _ns(seconds: float) -> int:
    return int(seconds * 1e9)


def row_key(source: Any) -> rows.RowKey | None:
    """The key of the row a request, Context or headers belong to (every update carries it).

    None when the publisher did not stamp the message (it was not instrumented by us).
    """
    publish_id = hdr.as_publish_id(hdr.lookup(source, hdr.PUBLISH_ID))
    published_at = hdr.as_timestamp(hdr.lookup(source, hdr.PUBLISHED_AT))
    if publish_id is None or published_at is None:
        return None
    return {
        "publish_id": publish_id,
        "task_id": hdr.as_text(hdr.lookup(source, "id")),
        "task_name": hdr.as_text(hdr.lookup(source, "task")),
        "published_at": rows.epoch_to_dt(published_at),
    }


@dataclasses.dataclass
class _Running:
    span: trace.Span
    token: object
    started: float
    name: str
    queue: str
    key: rows.RowKey | None
    exc: BaseException | None = None
    expected: bool = False
    retry_reason: str | None = None


def attempt_key(task_id: object, request: Any) -> str:
    """The key of one run in the running store: task id *and* retry count.

    Not the task id alone: ``retry()`` publishes the next attempt before its own run has
    ended (``task_retry`` receivers, the result backend, postrun still to come), and on a
    threads or greenlet pool that next attempt, same task id, may start meanwhile. Keyed by id,
    it would take the running attempt's entry: that attempt's span never ends and its row
    never finishes, and the next attempt's context is detached from the wrong thread.
    """
    return f"{task_id}#{getattr(request, 'retries', None) or 0}"


def _abandon(_key: str, run: _Running) -> None:
    run.span.set_status(Status(StatusCode.ERROR, "task end was never signalled"))
    run.span.end()


class WorkerHooks:
    """Receivers for the worker signals."""

    def __init__(
        self,
        tracer: trace.Tracer,
        meter: metrics.Meter,
        writer: AuditWriter,
        settings: Settings,
        heartbeat: Heartbeat | None = None,
    ) -> None:
        self._tracer = tracer
        self._writer = writer
        self._heartbeat = heartbeat
        self._use_links = settings.use_links
        self._wait_children = settings.queue_wait_children
        self._running: BoundedStore[_Running] = BoundedStore(MAX_TRACKED, _abandon)
        # Main process: row keys of received tasks, for outcomes decided there (child killed).
        self._received: BoundedStore[rows.RowKey] = BoundedStore(MAX_TRACKED)
        self._queue_wait = meter.create_histogram(
            "celery.task.queue_wait.duration",
            unit="s",
            description="Time from publish (or ETA) until the task started running.",
            explicit_bucket_boundaries_advisory=SECONDS_BUCKETS,
        )
        self._process_duration = meter.create_histogram(
            "messaging.process.duration",
            unit="s",
            description="Duration of task execution.",
            explicit_bucket_boundaries_advisory=SECONDS_BUCKETS,
        )

    # -- main process ----------------------------------------------------------------------

    def on_received(self, request: Any = None, **_: Any) -> None:
        with guard("task_received"):
            now = time.time()
            request_dict = request.request_dict
            # Rides along to the pool child, which builds task.request from this dict.
            request_dict[hdr.RECEIVED_AT] = now
            key = row_key(request_dict)
            if key is None:
                return
            self._received.put(request.id, key)
            acks_late = bool(getattr(request.task, "acks_late", False))
            self._writer.record_update(
                rows.received(key, now, request.hostname, self._instance(), acks_late=acks_late)
            )

    def _instance(self) -> str | None:
        """This worker instance's heartbeat id (inherited by pool children), if it beats."""
        return self._heartbeat.instance_id if self._heartbeat is not None else None

    def on_revoked(
        self, request: Any = None, terminated: bool = False, signum: Any = None,
        expired: bool = False, **_: Any,
    ) -> None:  # fmt: skip
        with guard("task_revoked"):
            reason = "expired" if expired else f"terminated ({signum})" if terminated else "revoked"
            self._finish_elsewhere(request, "revoked", "Revoked", reason)

    def on_rejected(self, message: Any = None, exc: Any = None, **_: Any) -> None:
        with guard("task_rejected"):
            reason = repr(exc) if exc is not None else "unknown message"
            self._finish_elsewhere(
                message_source(message), "rejected", type(exc).__name__, reason, "discarded"
            )

    def on_unknown(self, message: Any = None, name: str | None = None, **_: Any) -> None:
        with guard("task_unknown"):
            reason = f"task {name!r} is not registered in this worker"
            self._finish_elsewhere(
                message_source(message), "rejected", "NotRegistered", reason, "discarded"
            )

    def _finish_elsewhere(
        self, source: Any, outcome: str, exc_type: str, message: str,
        lost_reason: RecordedLostReason | None = None,
    ) -> None:  # fmt: skip
        """An outcome decided outside a running task: record it and show it as an error span."""
        self._received.pop(str(hdr.lookup(source, "id")))
        # From the message as any client sent it: bounded before it names a span.
        task_id = hdr.as_text(hdr.lookup(source, "id"))
        name = hdr.as_text(hdr.lookup(source, "task"))
        span = self._tracer.start_span(
            f"process {name}",
            context=propagate.extract(hdr.carrier(source)),
            kind=SpanKind.CONSUMER,
            attributes={
                "messaging.operation.type": "process",
                "messaging.operation.name": "process",
                "messaging.message.id": task_id,
                "celery.task.name": name,
                "celery.task.outcome": outcome,
                "error.type": exc_type,
            },
        )
        span.set_status(Status(StatusCode.ERROR, message))
        span.end()
        key = row_key(source)
        if key is not None:
            self._finish(key, outcome, exc_type, message, lost_reason=lost_reason)

    def _finish(
        self, key: rows.RowKey, outcome: str, exc_type: str | None, message: str | None,
        runtime: float | None = None, *, lost_reason: RecordedLostReason | None = None,
    ) -> None:  # fmt: skip
        self._writer.record_update(
            rows.finished(
                key,
                time.time(),
                outcome,
                runtime_s=runtime,
                exception_type=exc_type,
                exception_message=message,
                lost_reason=lost_reason,
            )
        )

    # -- pool child (or the only process with solo/threads) -------------------------------

    def on_prerun(self, task_id: str | None = None, task: Any = None, **_: Any) -> None:
        with guard("task_prerun"):
            self._prerun(str(task_id), task)

    def _prerun(self, task_id: str, task: Any) -> None:
        now = time.time()
        req = task.request
        if req.is_eager:
            return  # apply() / task_always_eager: never published, so neither span nor row
        name = task.name
        queue = hdr.as_text((req.delivery_info or {}).get("routing_key"))
        message_id = hdr.as_text(task_id)
        parent = propagate.extract(hdr.carrier(req))
        published_at = hdr.as_timestamp(hdr.lookup(req, hdr.PUBLISHED_AT))
        if published_at is not None:
            waits = queue_waits(
                published_at,
                hdr.as_timestamp(hdr.lookup(req, hdr.ETA)),
                hdr.as_timestamp(hdr.lookup(req, hdr.RECEIVED_AT)),
                now,
            )
            self._wait_span(parent, waits, name, queue, message_id)
        attributes: dict[str, Any] = {
            "messaging.system": _celery.app_system(task.app),
            "messaging.destination.name": queue,
            "messaging.message.id": message_id,
            "messaging.operation.type": "process",
            "messaging.operation.name": "process",
            "celery.task.name": name,
            "celery.task.retries": req.retries or 0,
        }
        attributes |= _celery.workflow_attributes(task_id, req.root_id, req.group)
        if self._use_links:
            producer = trace.get_current_span(parent).get_span_context()
            span = self._tracer.start_span(
                f"process {name}",
                context=otel_context.Context(),
                kind=SpanKind.CONSUMER,
                attributes=attributes,
                links=[Link(producer)] if producer.is_valid else None,
            )
        else:
            span = self._tracer.start_span(
                f"process {name}", context=parent, kind=SpanKind.CONSUMER, attributes=attributes
            )
        token = otel_context.attach(trace.set_span_in_context(span))
        key = row_key(req)
        self._running.put(
            attempt_key(task_id, req), _Running(span, token, time.monotonic(), name, queue, key)
        )
        if key is not None:
            redelivered = bool((req.delivery_info or {}).get("redelivered"))
            self._writer.record_update(
                rows.started(key, now, req.hostname, self._instance(), redelivered=redelivered)
            )

    def _wait_span(
        self, parent: otel_context.Context, waits: Waits, name: str, queue: str, message_id: str
    ) -> None:
        """The queue wait as one span with its real start and end, a child of the producer.

        Where the message was received is known, the split is on the span itself: the
        ``received`` event at that moment and the two waits as attributes; the ``broker wait``
        and ``worker wait`` child spans only with ``queue_wait_children`` (each span costs the
        worker as much as the task's own process span).
        """
        base: dict[str, Any] = {
            "messaging.destination.name": queue,
            "messaging.message.id": message_id,
            "celery.task.name": name,
        }
        attributes = dict(base)
        if waits.received is not None:
            attributes["celery.queue_wait.broker_s"] = waits.received - waits.ready
            attributes["celery.queue_wait.worker_s"] = waits.started - waits.received
        if waits.skew_s > 0:
            attributes["celery.queue_wait.clamped"] = True
            attributes["celery.queue_wait.clock_skew_s"] = waits.skew_s
        wait = self._tracer.start_span(
            f"queue wait {name}", context=parent, start_time=_ns(waits.ready),
            attributes=attributes,
        )  # fmt: skip
        if waits.received is not None:
            wait.add_event("received", timestamp=_ns(waits.received))
            if self._wait_children:
                inner = trace.set_span_in_context(wait, parent)
                for label, start, end in (
                    ("broker wait", waits.ready, waits.received),
                    ("worker wait", waits.received, waits.started),
                ):
                    part = self._tracer.start_span(
                        f"{label} {name}", context=inner, start_time=_ns(start), attributes=base
                    )
                    part.end(end_time=_ns(end))
        wait.end(end_time=_ns(waits.started))
        self._queue_wait.record(
            waits.total, {"celery.task.name": name, "messaging.destination.name": queue}
        )

    def on_failure(
        self, sender: Any = None, task_id: str | None = None, exception: Any = None,
        einfo: Any = None, **_: Any,
    ) -> None:  # fmt: skip
        with guard("task_failure"):
            exc = unwrap(exception, einfo)
            # The sender's request is the failing run's (still pushed while failure is sent).
            run = self._running.get(attempt_key(task_id, getattr(sender, "request", None)))
            if run is not None:
                run.exc = exc
                run.expected = exc is not None and isinstance(exc, getattr(sender, "throws", ()))
                return
            # No running span here: this is the main process after the child died (hard time
            # limit, worker lost). The child's span died with it; record the outcome. A lost
            # child's work was not done (Celery sends no failure when the message is requeued).
            key = self._received.pop(str(task_id))
            if key is None or requeued_after_timeout(sender, exc):
                return
            lost: RecordedLostReason | None = (
                "worker_lost" if isinstance(exc, WorkerLostError) else None
            )
            self._finish(key, "failed", type(exc).__name__, str(exc), lost_reason=lost)

    def on_retry(
        self, request: Any = None, reason: Any = None, einfo: Any = None, **_: Any
    ) -> None:
        with guard("task_retry"):
            task_id = str(getattr(request, "id", None))
            run = self._running.get(attempt_key(task_id, request))
            if run is not None:
                run.retry_reason = str(reason)
                return
            # The main process re-sent a task whose pool child died (task_retry_on_worker_lost,
            # Celery 5.7): the re-send is the next attempt's row; this attempt ends retried.
            exc = unwrap(None, einfo)
            if isinstance(exc, WorkerLostError):
                key = self._received.pop(task_id)
                if key is not None:
                    self._finish(key, "retried", type(exc).__name__, str(exc))

    def on_postrun(
        self, task_id: str | None = None, task: Any = None, state: str | None = None, **_: Any
    ) -> None:
        with guard("task_postrun"):
            # Sent before Celery pops the run's request: ``task.request`` is still this run's.
            run = self._running.pop(attempt_key(task_id, getattr(task, "request", None)))
            if run is None:
                return
            try:
                self._end_process(run, state)
            finally:
                otel_context.detach(run.token)  # type: ignore[arg-type]

    def _end_process(self, run: _Running, state: str | None) -> None:
        runtime = time.monotonic() - run.started
        span = run.span
        if state is None:
            # The run was interrupted (revoke with terminate, SystemExit): Celery sends postrun
            # without a state. The worker's main process records the outcome; the row is its.
            span.set_status(Status(StatusCode.ERROR, "task interrupted"))
            span.set_attribute("error.type", "celery.task.interrupted")
            span.end()
            return
        outcome = outcome_of(state)
        metric_attrs = {"celery.task.name": run.name, "messaging.destination.name": run.queue}
        span.set_attribute("celery.task.outcome", outcome)
        if run.retry_reason is not None:
            span.set_attribute("celery.retry.reason", run.retry_reason)
        exc = run.exc
        if exc is not None:
            span.record_exception(exc)
            if not run.expected:
                span.set_status(Status(StatusCode.ERROR, str(exc)))
                span.set_attribute("error.type", type(exc).__qualname__)
                metric_attrs["error.type"] = type(exc).__qualname__
        span.end()
        self._process_duration.record(runtime, metric_attrs)
        if run.key is not None:
            self._finish(
                run.key,
                outcome,
                type(exc).__qualname__ if exc is not None else None,
                str(exc) if exc is not None else None,
                runtime,
            )
