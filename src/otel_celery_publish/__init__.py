"""otel-celery-publish: every Celery task publish is a PRODUCER span *and* a durable audit row.

Zero code::

    pip install otel-celery-publish
    export OTEL_CELERY_PUBLISH_AUDIT_URL=postgresql+psycopg://app@db/app
    opentelemetry-instrument celery -A proj worker
    opentelemetry-instrument gunicorn proj.wsgi

Or in code::

    from otel_celery_publish import CeleryPublishInstrumentor
    CeleryPublishInstrumentor().instrument(audit_url="sqlite:///celery_audit.db")

Per publish (``apply_async`` / ``delay`` / ``send_task``): a ``send {task}`` PRODUCER span and a
row committed in the audit table *before* the message goes to the broker, holding the replayable
payload and the span's trace and span ids; the message carries trace context and our publish
timestamp. Per task on the worker: a ``queue wait {task}`` span (split into broker and worker
wait), a ``process {task}`` CONSUMER span in the same trace (or linked, with ``use_links``), the
row's lifecycle (received, started, finished with outcome) and two histograms. See the README for
every setting.
"""

from otel_celery_publish.config import Settings, SettingsError
from otel_celery_publish.instrumentor import CeleryPublishInstrumentor
from otel_celery_publish.version import __version__

__all__ = ["CeleryPublishInstrumentor", "Settings", "SettingsError", "__version__"]
