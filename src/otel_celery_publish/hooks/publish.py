"""Publish side: ``before_task_publish`` opens the PRODUCER span and starts writing the audit
row; ``after_task_publish`` sees the row durable, ends the span and marks the row sent.

Between the two, the open span waits in a bounded map keyed by our publish id; a publish whose
``after_task_publish`` never comes (it raised) has its span ended as an error by a sweep.
"""

from __future__ import annotations

import datetime as dt
import os
import random
import socket
import time
from typing import Any, NamedTuple

from opentelemetry import propagate, trace
from opentelemetry.trace import SpanKind, Status, StatusCode

from otel_celery_publish import headers as hdr
from otel_celery_publish import rows
from otel_celery_publish._guard import guard
from otel_celery_publish.config import Settings
from otel_celery_publish.hooks import _celery
from otel_celery_publish.hooks.pending import BoundedStore
from otel_celery_publish.sink.writer import AuditWriter

# A publish whose after_task_publish has not come within this long raised (broker down, bad
# payload): its span is ended as an error and its row stays visibly not-sent.
ABANDONED_AFTER_S = 300.0
SWEEP_EVERY_S = 1.0  # looked for at most this often, not on every publish
MAX_OPEN_PUBLISHES = 10_000


class _Open(NamedTuple):
    span: trace.Span
    started: float
    key: rows.RowKey


def _end_abandoned(_publish_id: str, state: _Open) -> None:
    state.span.set_status(Status(StatusCode.ERROR, "publish did not complete"))
    state.span.set_attribute("error.type", "celery.publish_incomplete")
    state.span.end()


def _end_failed(span: trace.Span, exc: BaseException) -> None:
    """End a span our own code failed to hand over: it must not stay open forever while the
    message may already carry its traceparent. The exception's text stays out of the span
    (the guard reports it, scrubbed); its type names the failure."""
    span.set_status(Status(StatusCode.ERROR, "otel-celery-publish failed (the publish continues)"))
    span.set_attribute("error.type", type(exc).__qualname__)
    span.end()


class PublishHooks:
    """Receivers for the publish signals. Thin: guard, gather, hand off."""

    def __init__(self, tracer: trace.Tracer, writer: AuditWriter, settings: Settings) -> None:
        self._tracer = tracer
        self._writer = writer
        self._policy = rows.RowPolicy.from_settings(settings)
        self._open: BoundedStore[_Open] = BoundedStore(MAX_OPEN_PUBLISHES, _end_abandoned)
        self._host = socket.gethostname()
        self._next_sweep = 0.0

    def before_publish(
        self,
        *,
        sender: str | None = None,
        body: Any = None,
        exchange: Any = None,
        routing_key: str | None = None,
        headers: dict[str, Any] | None = None,
        properties: dict[str, Any] | None = None,
        **_: Any,
    ) -> None:
        with guard("before_task_publish"):
            # Not ``headers or {}``: protocol 1 hands us an empty dict, which is what it sends
            # as the message headers; ours must go into that very dict to reach the worker.
            msg_headers = headers if headers is not None else {}
            self._before(str(sender), body, exchange, routing_key, msg_headers, properties or {})

    def _before(  # noqa: PLR0917 - one call site, the receiver above
        self,
        name: str,
        body: Any,
        exchange: Any,
        routing_key: str | None,
        msg_headers: dict[str, Any],
        properties: dict[str, Any],
    ) -> None:
        self._sweep_abandoned()
        now = time.time()
        # Protocol 1 carries the id in the body (and has no headers for the worker to read).
        task_id = str(msg_headers.get("id") or (body.get("id") if isinstance(body, dict) else ""))
        app, per_call_serializer = _celery.sending_call()
        eta = rows.iso_to_dt(msg_headers.get("eta"))
        # Random, not uuid4(): os.urandom is a syscall on every publish; this is unique enough
        # for a primary key (128 bits from a generator seeded from urandom, reseeded at fork).
        publish_id = f"{random.getrandbits(128):032x}"
        replay_of = hdr.as_publish_id(hdr.lookup(msg_headers, hdr.REPLAY_OF))
        app_facts = _celery.app_facts(app)
        periodic = _celery.periodic_task(msg_headers)
        attributes = _span_attributes(app_facts, name, task_id, routing_key, msg_headers, eta, now)
        attributes["celery.audit.publish_id"] = publish_id
        if replay_of:
            attributes["celery.audit.replay_of"] = replay_of
        if periodic:
            attributes["celery.beat.entry"] = periodic
        span = self._tracer.start_span(
            f"send {name}",
            kind=SpanKind.PRODUCER,
            attributes=attributes,
            links=hdr.replay_links(msg_headers),
        )
        try:
            ours = _stamp(msg_headers, span, publish_id, now, eta)
            ctx = span.get_span_context()
            facts = rows.PublishFacts(
                publish_id=publish_id,
                task_id=task_id,
                task_name=name,
                body=body,
                headers=msg_headers,
                properties=properties,
                exchange=exchange,
                routing_key=routing_key,
                published_at=now,
                serializer=_celery.task_serializer(app, name, per_call_serializer),
                arg_names=_celery.arg_names(app, name) if self._policy.redact_keys else (),
                exclude_headers=(*ours, hdr.REPLAY_OF, hdr.REPLAY_LINK),
                host=self._host,
                pid=os.getpid(),
                trace_id=trace.format_trace_id(ctx.trace_id) if ctx.is_valid else None,
                span_id=trace.format_span_id(ctx.span_id) if ctx.is_valid else None,
                replay_of=replay_of,
                app=app_facts.name,
                broker=app_facts.broker,
                periodic_task=periodic,
            )
            row = rows.publish_row(facts, self._policy)
            if row["payload"] is not None and span.is_recording():
                span.set_attribute("messaging.message.body.size", len(row["payload"]))
        except BaseException as exc:
            # Not handed over yet: nothing else would ever end this span (then the guard
            # reports the error; the publish goes on).
            _end_failed(span, exc)
            raise
        key = rows.RowKey(
            publish_id=publish_id, task_id=task_id, task_name=name, published_at=row["published_at"]
        )
        # Handed over: from here after_task_publish, or the sweep, ends the span.
        self._open.put(publish_id, _Open(span, time.monotonic(), key))
        self._writer.begin_publish(row)  # after_task_publish ends it

    def _sweep_abandoned(self) -> None:
        now = time.monotonic()
        if now < self._next_sweep:
            return
        self._next_sweep = now + SWEEP_EVERY_S
        cutoff = now - ABANDONED_AFTER_S
        for publish_id, stale in self._open.pop_older(lambda s: s.started < cutoff):
            _end_abandoned(publish_id, stale)

    def after_publish(self, *, headers: dict[str, Any] | None = None, **_: Any) -> None:
        with guard("after_task_publish"):
            publish_id = headers and headers.get(hdr.PUBLISH_ID)
            state = self._open.pop(publish_id) if publish_id else None
            if state is None:
                return
            self._writer.end_publish(str(publish_id))  # the row is durable when apply_async returns
            state.span.end()
            # Batched from memory in every mode: a crash may lose the last moment's sent_at
            # (the row and the worker's received_at still tell), never the row itself.
            self._writer.record_update(rows.sent(state.key, time.time()), best_effort=True)


def _stamp(
    msg_headers: dict[str, Any], span: trace.Span, publish_id: str, now: float,
    eta: dt.datetime | None,
) -> dict[str, Any]:  # fmt: skip
    """Write our headers and the span's propagation fields into the message; return them."""
    ours: dict[str, Any] = {hdr.PUBLISH_ID: publish_id, hdr.PUBLISHED_AT: now}
    if eta is not None:
        ours[hdr.ETA] = eta.timestamp()
    propagate.inject(ours, context=trace.set_span_in_context(span))
    hdr.stamp(msg_headers, ours)
    return ours


def _span_attributes(  # noqa: PLR0917 - one call site, the hook above
    app: _celery.AppFacts,
    name: str,
    task_id: str,
    routing_key: str | None,
    headers: dict[str, Any],
    eta: dt.datetime | None,
    now: float,
) -> dict[str, Any]:
    """The producer span's attributes from the message (never the task's arguments)."""
    attributes: dict[str, Any] = {
        "messaging.system": app.system,
        "messaging.operation.type": "send",
        "messaging.operation.name": "send",
        "messaging.destination.name": routing_key or "",
        "messaging.message.id": task_id,
        "celery.task.name": name,
        "celery.task.retries": headers.get("retries") or 0,
    }
    if app.server_address:
        attributes["server.address"] = app.server_address
        if app.server_port:
            attributes["server.port"] = app.server_port
    attributes |= _celery.workflow_attributes(task_id, headers.get("root_id"), headers.get("group"))
    if eta is not None:
        attributes["celery.task.eta"] = eta.isoformat()
        attributes["celery.task.countdown_s"] = max(0.0, eta.timestamp() - now)
    return attributes
