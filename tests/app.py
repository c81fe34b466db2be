"""The Celery app the test workers run (``celery -A tests.app worker``) and tests publish with.

Configured from the environment so one module serves every test: broker, queue, and whether to
set the OpenTelemetry SDK up in code (``OCP_SETUP_SDK=1``) instead of via opentelemetry-instrument;
``OCP_RESULT_BACKEND`` and ``OCP_VISIBILITY_TIMEOUT`` (seconds, Redis) for the liveness tests.
"""

from __future__ import annotations

import os
import signal
import time
from typing import Any

from celery import Celery, signals
from celery.exceptions import Ignore

app = Celery("ocp_tests", broker=os.environ.get("OCP_BROKER_URL", "redis://127.0.0.1:6379/9"))
app.conf.update(
    task_default_queue=os.environ.get("OCP_QUEUE", "ocp-default"),
    broker_connection_retry_on_startup=True,
    worker_hijack_root_logger=False,
    worker_prefetch_multiplier=1,
    task_acks_late=False,
)
if os.environ.get("OCP_RESULT_BACKEND"):
    app.conf.result_backend = os.environ["OCP_RESULT_BACKEND"]
if os.environ.get("OCP_VISIBILITY_TIMEOUT"):
    # Restore abandoned messages within a second of the timeout, not every 100 s.
    app.conf.broker_transport_options = {
        "visibility_timeout": float(os.environ["OCP_VISIBILITY_TIMEOUT"]),
        "unacked_restore_interval": 1,
        "unacked_restore_throttle": 1,
    }

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


@app.task(name="tests.sleep_late", bind=True, acks_late=True)
def sleep_late(self: Any, seconds: float) -> str:
    """Acknowledged after it ran (a dead worker's broker redelivers it); sleeps on its first
    delivery only, so a redelivery is quick."""
    if not (self.request.delivery_info or {}).get("redelivered"):
        sleep(seconds)
    return "ran"


@app.task(
    name="tests.sleep_first", bind=True, retry_on_worker_lost=True, max_retries=1,
    default_retry_delay=0,
)  # fmt: skip
def sleep_first(self: Any, seconds: float) -> str:
    """Sleeps on its first attempt only; re-sent (Celery 5.7) if its pool process dies."""
    if self.request.retries == 0:
        sleep(seconds)
    return "ran again"


@app.task(name="tests.sleep_until_redelivered", bind=True, acks_late=True, acks_on_timeout=False)
def sleep_until_redelivered(self: Any, seconds: float) -> str:
    """Sleeps past its time limit on the first delivery (requeued on timeout), then returns."""
    if not (self.request.delivery_info or {}).get("redelivered"):
        sleep(seconds)
    return "redelivered"


@app.task(name="tests.fail_unacked", acks_late=True, acks_on_failure=False)
def fail_unacked() -> None:
    """Fails with acks_on_failure=False: Celery rejects the message instead of acking it."""
    raise ValueError("dropped, not acked")


@app.task(name="tests.succeed_then_die")
def succeed_then_die() -> str:
    """Succeeds; its pool process is then killed in task_postrun (see below)."""
    return "stored"


@signals.task_postrun.connect
def _die_after_success(sender: Any = None, **_: Any) -> None:
    # After our own postrun receiver (connected when the app was instrumented, above): the
    # SUCCESS is stored, then the process dies as an OOM kill would.
    if getattr(sender, "name", None) == "tests.succeed_then_die":
        os.kill(os.getpid(), signal.SIGKILL)
