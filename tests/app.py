"""The Celery app the test workers run (``celery -A tests.app worker``) and tests publish with.

Configured from the environment so one module serves every test: broker, queue, and whether to
set the OpenTelemetry SDK up in code (``OCP_SETUP_SDK=1``) instead of via opentelemetry-instrument.
"""

from __future__ import annotations

import os
import time

from celery import Celery
from celery.exceptions import Ignore

app = Celery("ocp_tests", broker=os.environ.get("OCP_BROKER_URL", "redis://127.0.0.1:6379/9"))
app.conf.update(
    task_default_queue=os.environ.get("OCP_QUEUE", "ocp-default"),
    broker_connection_retry_on_startup=True,
    worker_hijack_root_logger=False,
    worker_prefetch_multiplier=1,
    task_acks_late=False,
)

if os.environ.get("OCP_SETUP_SDK") == "1":
    from opentelemetry.exporter.otlp.proto.http.metric_exporter import OTLPMetricExporter
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
    from opentelemetry.sdk.metrics import MeterProvider
    from opentelemetry.sdk.metrics.export import PeriodicExportingMetricReader
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor

    from otel_celery_publish import CeleryPublishInstrumentor

    resource = Resource.create({"service.name": "ocp-test-worker"})
    tracer_provider = TracerProvider(resource=resource)
    tracer_provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
    meter_provider = MeterProvider(
        resource=resource,
        metric_readers=[PeriodicExportingMetricReader(OTLPMetricExporter(), 500)],
    )
    CeleryPublishInstrumentor().instrument(
        tracer_provider=tracer_provider, meter_provider=meter_provider
    )


class ExpectedError(Exception):
    """Raised by ``expected`` and declared in its ``throws``: a business outcome, not a bug."""


@app.task(name="tests.add")
def add(x: int, y: int) -> int:
    return x + y


@app.task(name="tests.login")
def login(user: str, password: str, **extra: object) -> str:
    return user


@app.task(name="tests.fail")
def fail(message: str) -> None:
    raise ValueError(message)


@app.task(name="tests.expected", throws=(ExpectedError,))
def expected() -> None:
    raise ExpectedError("business as usual")


@app.task(name="tests.retry_once", bind=True, max_retries=3)
def retry_once(self: object) -> str:
    if self.request.retries == 0:  # type: ignore[attr-defined]
        raise self.retry(exc=RuntimeError("first attempt"), countdown=0)  # type: ignore[attr-defined]
    return "second attempt"


@app.task(name="tests.sleep")
def sleep(seconds: float) -> float:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        time.sleep(0.05)
    return seconds


@app.task(name="tests.ignored")
def ignored() -> None:
    raise Ignore()
