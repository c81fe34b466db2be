"""The never-raise-into-the-host guard.

Every hook body runs inside :func:`guard`. An internal failure is logged (rate-limited per place
and exception type) and sent to Sentry when sentry-sdk is initialised. Our logger is ignored by
Sentry's logging integration so the same failure does not become a second event, and because we
never let the exception escape, Celery's ``Signal.send`` never logs it either.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable, Iterator

import sentry_sdk
from sentry_sdk.integrations.logging import ignore_logger

logger = logging.getLogger("otel_celery_publish")
ignore_logger(logger.name)

REPEAT_AFTER_S = 60.0
_last_report: dict[tuple[str, type[BaseException]], float] = {}

# Tests set this to collect swallowed errors and fail at teardown instead of hiding them in a log.
on_internal_error: Callable[[str, BaseException], None] | None = None


@contextlib.contextmanager
def guard(where: str) -> Iterator[None]:
    """Run the block; report and swallow any ``Exception`` it raises (ours, never the host's)."""
    try:
        yield
    except Exception as exc:
        report(where, exc)


def report(where: str, exc: BaseException, message: str | None = None) -> None:
    """Log and capture ``exc`` once per (where, type) per :data:`REPEAT_AFTER_S`.

    Without ``message`` it is our bug (logged as an internal error, with the traceback); with
    one it is a condition the operator must know about, e.g. the audit database being down.
    """
    if on_internal_error is not None:
        on_internal_error(where, exc)
    key = (where, type(exc))
    now = time.monotonic()
    last = _last_report.get(key)
    if last is not None and now - last < REPEAT_AFTER_S:
        return
    _last_report[key] = now
    if message is None:
        logger.error(
            "otel-celery-publish internal error in %s (publish and task continue): %r",
            where,
            exc,
            exc_info=exc,
        )
    else:
        logger.warning("otel-celery-publish: %s (publish and task continue)", message)
    if sentry_sdk.get_client().is_active():
        sentry_sdk.capture_exception(exc)
