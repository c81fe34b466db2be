"""Publishing on the record from the read side: the one place it reaches the publish side.

A replay is an ordinary publish that must get a producer span and an audit row in the same
table as its original. The read side imports neither the hooks nor the sink's writer thread, so
that ``audit.lost`` in a web process loads neither; :func:`publishing` is the deliberate
exception: it imports the instrumentor inside its body, only when a replay actually sends.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator
from typing import Any

from otel_celery_publish.audit._db import AuditError, safe_url
from otel_celery_publish.config import Settings

FLUSH_TIMEOUT_S = 10.0
# opentelemetry-instrumentation-celery, which our instrumentor switches off while it is on.
OFFICIAL = "opentelemetry.instrumentation.celery"


@contextlib.contextmanager
def publishing(settings: Settings) -> Iterator[None]:
    """Sends in the block get a producer span and a durable audit row in ``settings``' table.

    When the process is instrumented already (``opentelemetry-instrument celery ...``, or the app
    instruments itself), the block uses that, as it is, after checking that it records into
    the same table; its writer is flushed afterwards. Otherwise the process is instrumented for
    the block only (``durability="sync"``) and restored afterwards: our signal receivers
    disconnected, the writer flushed and closed, and opentelemetry-instrumentation-celery, which
    we switch off while we are on, instrumented again if it was (with its defaults: the keyword
    arguments it was first instrumented with are its own).
    """
    # Imported here, not at the top: see the module docstring.
    from otel_celery_publish.instrumentor import CeleryPublishInstrumentor  # noqa: PLC0415

    ours = CeleryPublishInstrumentor()
    if ours.is_instrumented_by_opentelemetry:
        _same_table(ours.writer.settings, settings)
        try:
            yield
        finally:
            ours.writer.flush(FLUSH_TIMEOUT_S)
        return
    official = _official()
    official_was_on = official is not None and official.is_instrumented_by_opentelemetry
    ours.instrument(settings=settings, durability="sync")
    try:
        yield
    finally:
        ours.uninstrument()
        if official_was_on and not official.is_instrumented_by_opentelemetry:
            official.instrument()


def _same_table(active: Settings, wanted: Settings) -> None:
    if (active.audit_url, active.table_name) != (wanted.audit_url, wanted.table_name):
        raise AuditError(
            "this process is already instrumented with another audit table "
            f"({active.table_name!r} at {safe_url(active.audit_url)}): replays would be "
            "recorded there, not next to their originals"
        )


def _official() -> Any:
    """The official Celery instrumentor, if its module is loaded (if not, nobody turned it on)."""
    module = sys.modules.get(OFFICIAL)
    return None if module is None else module.CeleryInstrumentor()
