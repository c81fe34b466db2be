"""Pure functions over message headers, and the wire format: what we stamp at publish and
read back on the worker.

Every name has the prefix ``otel_celery_publish_``. The publish hook (``before_task_publish``,
``after_task_publish``) writes its headers at the top level of the message headers and in the nested
``headers["headers"]`` (:func:`stamp`); readers look in both (:func:`lookup`), and check and bound
every value they read (any broker client can send any header). The worker hooks are
``task_received`` and every later signal of the task, in the worker's main process or the pool
child. ``audit replay`` hands its two to ``apply_async(headers=...)``.

================================= =============== ============= ===================================
Header                            Written by      Read by       Meaning
================================= =============== ============= ===================================
otel_celery_publish_id            publish hook    publish hook  This attempt's id (32 hex digits):
                                                  worker hooks  the audit row's primary key.
otel_celery_publish_published_at  publish hook    worker hooks  Publish time, epoch seconds on the
                                                                publisher's clock: in every
                                                                update's key; the queue wait's
                                                                start.
otel_celery_publish_eta           publish hook    task_prerun   The eta, epoch seconds: a delayed
                                  (eta only)                    task's queue wait starts there.
otel_celery_publish_replay_of     audit replay    publish hook  The original attempt's publish_id:
                                                                the new row's replay_of.
otel_celery_publish_replay_link   audit replay    publish hook  {trace_id}-{span_id} (hex) of the
                                                                original producer span, linked
                                                                from the new one.
otel_celery_publish_received_at   task_received   task_prerun   When the worker took the message,
                                  (main process)  (pool child)  epoch seconds: splits broker and
                                                                worker wait. Not a message header
                                                                (see below).
================================= =============== ============= ===================================

``otel_celery_publish_received_at`` is not a message header: the worker's main process adds it
to the request dict it hands to the pool child, the only channel from ``task_received`` (main)
to ``task_prerun`` (child). The propagator's fields (``traceparent``, ``tracestate``,
``baggage``...) are stamped with ours and read by the worker through :func:`carrier`.

We are pre-release: earlier builds named three of these ``otel_celery_published_at``,
``otel_celery_eta`` and ``otel_celery_received_at``. The old names are not read: a message
stamped with them is handled like one from an uninstrumented publisher (its process span still
joins the trace; no lifecycle updates, no queue-wait spans).
"""

from __future__ import annotations

from collections.abc import Mapping, MutableMapping
from typing import Any, TypeGuard

from opentelemetry import propagate, trace

PUBLISH_ID = "otel_celery_publish_id"
PUBLISHED_AT = "otel_celery_publish_published_at"
ETA = "otel_celery_publish_eta"
REPLAY_OF = "otel_celery_publish_replay_of"
REPLAY_LINK = "otel_celery_publish_replay_link"
RECEIVED_AT = "otel_celery_publish_received_at"


def stamp(headers: MutableMapping[str, Any], ours: Mapping[str, Any]) -> None:
    """Add ``ours`` to ``headers`` at the top level and in the nested ``headers["headers"]``.

    Celery hands custom headers to the task either as request attributes or inside
    ``request.headers`` depending on version and protocol (celery#4875), so write both, like
    Sentry and ddtrace do. The nested dict is copied: it may be an object the caller still owns.
    """
    headers.update(ours)
    nested = headers.get("headers")
    headers["headers"] = {**nested, **ours} if _is_mapping(nested) else dict(ours)


def lookup(request: Any, key: str) -> Any:
    """Read one of our headers from a worker ``task.request`` / ``Context`` or a plain mapping."""
    if _is_mapping(request):
        value = request.get(key)
        nested = request.get("headers")
    else:
        value = getattr(request, key, None)
        nested = getattr(request, "headers", None)
    if value is None and _is_mapping(nested):
        value = nested.get(key)
    return value


def _is_mapping(value: Any) -> TypeGuard[Mapping[str, Any]]:
    # A publish's headers are a dict: spare it the ABC check (several per publish).
    return type(value) is dict or isinstance(value, Mapping)


def carrier(request: Any) -> dict[str, str]:
    """The propagation fields (traceparent, tracestate, baggage...) found on ``request``."""
    found: dict[str, str] = {}
    for field in propagate.get_global_textmap().fields:
        value = lookup(request, field)
        if isinstance(value, str):
            found[field] = value
    return found


# Any broker client can send any header: every value we read back is checked and bounded
# before it reaches a span or a row. Timestamps outside these years are forged or broken
# (a 0 would be a 56-year queue wait, a huge one a span that never ends).
MIN_TIMESTAMP = 946_684_800.0  # 2000-01-01
MAX_TIMESTAMP = 4_102_444_800.0  # 2100-01-01
# The widest value of an id or name column (task_id, task_name, ...): longer is cut, marked.
MAX_TEXT = 255
TRUNCATED = "…[truncated]"
_HEX = frozenset("0123456789abcdef-")


def as_timestamp(value: Any) -> float | None:
    """A header timestamp as epoch seconds; None when missing, malformed, not finite or
    outside :data:`MIN_TIMESTAMP` .. :data:`MAX_TIMESTAMP`."""
    if isinstance(value, bool) or value is None:
        return None
    try:
        number = float(value)
    except (TypeError, ValueError, OverflowError):
        return None
    return number if MIN_TIMESTAMP <= number <= MAX_TIMESTAMP else None


def as_publish_id(value: Any) -> str | None:
    """Our publish id (32 hex digits; a uuid's 36 characters accepted), else None."""
    if not isinstance(value, str) or not 0 < len(value) <= 36 or not _HEX.issuperset(value):
        return None
    return value


def as_text(value: Any, limit: int = MAX_TEXT) -> str:
    """``value`` as a string of at most ``limit`` characters, without NUL bytes (which
    PostgreSQL refuses in text); a longer one is cut and ends with :data:`TRUNCATED`."""
    text = ("" if value is None else str(value)).replace("\x00", "")
    if len(text) <= limit:
        return text
    marker = TRUNCATED[:limit]
    return text[: limit - len(marker)] + marker


def replay_links(headers: Mapping[str, Any]) -> list[trace.Link]:
    """A span link to the original attempt's producer span, when this publish is a replay."""
    value = lookup(headers, REPLAY_LINK)
    if not value:
        return []
    trace_id, _, span_id = str(value).partition("-")
    try:
        context = trace.SpanContext(
            int(trace_id, 16), int(span_id, 16), is_remote=True, trace_flags=trace.TraceFlags(1)
        )
    except ValueError:
        return []
    return [trace.Link(context, {"celery.audit.link": "replay_of"})] if context.is_valid else []
