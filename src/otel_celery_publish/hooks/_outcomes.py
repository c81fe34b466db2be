"""How a task's run ended, as the worker hooks record it: pure functions over what Celery's
signals hand them (no spans, no rows, no state), tested without a worker.
"""

from __future__ import annotations

from typing import Any

from billiard.einfo import ExceptionWithTraceback
from billiard.exceptions import TimeLimitExceeded

# Celery's postrun ``state`` -> the row's outcome.
OUTCOMES = {
    "SUCCESS": "succeeded",
    "FAILURE": "failed",
    "RETRY": "retried",
    "REJECTED": "rejected",
    "IGNORED": "ignored",
}


def outcome_of(state: str) -> str:
    """The row's ``outcome`` for a postrun ``state`` (an unknown custom state, lower-cased)."""
    return OUTCOMES.get(state, state.lower())


def unwrap(exception: Any, einfo: Any) -> BaseException | None:
    """The task's real exception: billiard >= 4 wraps it in ExceptionWithTraceback."""
    exc = exception if exception is not None else getattr(einfo, "exception", None)
    if isinstance(exc, ExceptionWithTraceback):
        exc = exc.exc
    return exc if isinstance(exc, BaseException) else None


def requeued_after_timeout(task: Any, exc: BaseException | None) -> bool:
    """A hard time limit of an ``acks_late`` task with ``acks_on_timeout=False``: Celery
    reports the failure, then requeues the message. The attempt is not over: its redelivery
    records the end."""
    return (
        isinstance(exc, TimeLimitExceeded)
        and bool(getattr(task, "acks_late", False))
        and getattr(task, "acks_on_timeout", True) is False
    )


def message_source(message: Any) -> dict[str, Any]:
    """What identifies a message the worker discarded: its headers, plus the protocol 1 body,
    which is where that protocol keeps the task id and name."""
    source = dict(message.headers or {})
    payload = getattr(message, "payload", None)
    if isinstance(payload, dict) and "id" in payload and "task" in payload:
        source = {"id": payload["id"], "task": payload["task"], "headers": source, **source}
    return source
