"""otel-celery-publish: every Celery task publish is a PRODUCER span *and* a durable audit row.

Zero code::

    pip install otel-celery-publish
    export OTEL_CELERY_PUBLISH_AUDIT_URL=postgresql+psycopg://app@db/app
    opentelemetry-instrument celery -A proj worker
    opentelemetry-instrument gunicorn proj.wsgi

Or in code (keywords override the environment; ``settings=Settings(...)`` replaces it)::

    from otel_celery_publish import CeleryPublishInstrumentor
    CeleryPublishInstrumentor().instrument(audit_url="sqlite:///celery_audit.db")

Per publish (``apply_async`` / ``delay`` / ``send_task``): a ``send {task}`` PRODUCER span and a
row committed in the audit table *before* the message goes to the broker, holding the replayable
payload and the span's trace and span ids; the message carries trace context and our publish
timestamp. Per task on the worker: a ``queue wait {task}`` span (split into broker and worker
wait), a ``process {task}`` CONSUMER span in the same trace (or linked, with ``use_links``), the
row's lifecycle (received, started, finished with outcome) and two histograms. Internal errors
are logged, and sent to Sentry (scrubbed) when the host uses it (``pip install
'otel-celery-publish[sentry]'``). See the README for every setting, and
:mod:`otel_celery_publish.audit` for the read side (lost tasks, replay, stats).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from otel_celery_publish.config import Settings, SettingsError
from otel_celery_publish.version import __version__

if TYPE_CHECKING:
    from otel_celery_publish.instrumentor import CeleryPublishInstrumentor

__all__ = ["CeleryPublishInstrumentor", "Settings", "SettingsError", "__version__"]


def __getattr__(name: str) -> Any:
    """The instrumentor, imported on first use: every ``import otel_celery_publish.<module>``
    runs this file first, and the read side (``audit``, the ``celery audit`` commands) must not
    load the hooks and the writer's thread with it."""
    if name == "CeleryPublishInstrumentor":
        from otel_celery_publish.instrumentor import (  # noqa: PLC0415 - see the docstring
            CeleryPublishInstrumentor,
        )

        globals()[name] = CeleryPublishInstrumentor
        return CeleryPublishInstrumentor
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
