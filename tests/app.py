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


# -- Publish paths and pools (tests/test_publish_paths.py, tests/test_pools.py) ---------------

if os.environ.get("OCP_ACCEPT_PICKLE") == "1":
    # A second app in one publisher may send pickle (tests/test_publish_paths.py).
    app.conf.accept_content = ["json", "pickle"]


@app.task(name="tests.spawn", bind=True)
def spawn(self: Any, seconds: float = 0.0, queue: str | None = None) -> str:
    """Sleeps ``seconds``, then publishes ``tests.add`` from inside its run (a nested publish)
    to ``queue``, by default the queue it came from; returns the child's task id."""
    if seconds:
        sleep(seconds)
    queue = queue or (self.request.delivery_info or {}).get("routing_key")
    return str(add.apply_async((1, 1), queue=queue).id)


@app.task(name="tests.retry_countdown", bind=True, max_retries=2)
def retry_countdown(self: Any) -> str:
    """Retries twice with a countdown (attempts 0 and 1 end ``retried``), then succeeds."""
    if self.request.retries < 2:
        raise self.retry(exc=RuntimeError(f"attempt {self.request.retries}"), countdown=0.3)
    return "third attempt"


@app.task(
    name="tests.autoretry", bind=True, autoretry_for=(RuntimeError,), retry_backoff=True,
    retry_jitter=False, max_retries=2,
)  # fmt: skip
def autoretry(self: Any) -> str:
    """Raises on its first two attempts; Celery retries it after 1 s, then 2 s (backoff)."""
    if self.request.retries < 2:
        raise RuntimeError(f"attempt {self.request.retries}")
    return "third attempt"


# -- canvas (tests/test_canvas.py) -------------------------------------------------------------


@app.task(name="tests.tsum")
def tsum(values: list[int]) -> int:
    """A chord callback: the sum of its header's results."""
    return sum(values)


@app.task(name="tests.errback")
def errback(task_id: str) -> str:
    """A ``link_error`` callback taking only the failed task's id: Celery publishes it as a
    task (an errback with more parameters is called in the worker's process, not published)."""
    return task_id


# -- A retry whose next attempt starts before its own run ended (tests/test_pools.py) ----------


@app.task(name="tests.retry_overlap", bind=True, max_retries=1)
def retry_overlap(self: Any) -> str:
    """Retries at once; a slow ``task_retry`` receiver (below) keeps this run from ending, so
    on a threads or greenlet pool the next attempt of the same task id runs meanwhile."""
    if self.request.retries == 0:
        raise self.retry(countdown=0)
    return "second attempt"


@signals.task_retry.connect
def _slow_retry_receiver(sender: Any = None, **_: Any) -> None:
    # Connected after our own task_retry receiver: a host's slow receiver, as any may be.
    if getattr(sender, "name", None) == "tests.retry_overlap":
        time.sleep(1.0)


# -- audit watch (tests/test_watch.py) ---------------------------------------------------------


@app.task(name="tests.autoreplayed", audit_autoreplay=("not_received",))
def autoreplayed(x: int) -> int:
    """Opts in to automatic replay by its task option, for one lost reason."""
    return x


if os.environ.get("OCP_BROKER_HEARTBEAT"):
    # AMQP heartbeats (checked every half interval) wake kombu's event loop, which otherwise
    # sleeps up to 10 s on an idle RabbitMQ connection: a warm shutdown then waits as long.
    app.conf.broker_heartbeat = int(os.environ["OCP_BROKER_HEARTBEAT"])
