"""The Celery app, as "First steps with Django" writes it; ``OCP_INSTRUMENT_IN_CODE=1``
instruments here, before Django is set up (what a project does without opentelemetry-instrument),
with the keywords of ``OCP_INSTRUMENT_KWARGS`` (JSON)."""

import json
import os

from celery import Celery

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "proj.settings")

app = Celery("proj")
app.config_from_object("django.conf:settings", namespace="CELERY")
app.autodiscover_tasks()

if os.environ.get("OCP_INSTRUMENT_IN_CODE") == "1":
    from otel_celery_publish import CeleryPublishInstrumentor

    CeleryPublishInstrumentor().instrument(
        **json.loads(os.environ.get("OCP_INSTRUMENT_KWARGS", "{}"))
    )
