"""The demo stack's producer: a steady trickle of orders, some failing, some lost.

Each tick opens a ``place order`` span (standing in for the web request that would publish in a
real application) and publishes one task inside it, so the trace reads
``place order`` -> ``send {task}`` -> ``queue wait {task}`` / ``process {task}``. Tick ``n``
(counting from 1) publishes:

- to the lost queue (``STACK_LOST_QUEUE``, consumed by nobody) when ``n`` is a multiple of
  ``--lost-every``;
- else a failing ``stack.charge_card`` when ``n`` is a multiple of ``--fail-every``;
- else alternately ``stack.process_order`` and a succeeding ``stack.charge_card``.

One JSON line per publish goes to stdout (``n``, ``kind``, ``task``, ``task_id``, ``queue``,
``trace_id``): ``scripts/verify-stack`` and the end-to-end test read it.

OpenTelemetry is set up here in code, from the standard environment (``OTEL_SERVICE_NAME``,
``OTEL_EXPORTER_OTLP_ENDPOINT``, ...; spans go out over OTLP/HTTP), and the audit database from
``OTEL_CELERY_PUBLISH_AUDIT_URL``. Run: ``python -m examples.stack.producer --count 10``.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import threading
from pathlib import Path
from typing import Any

from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor
from opentelemetry.trace import format_trace_id

from examples.stack.app import LOST_QUEUE, QUEUE, charge_card, process_order
from otel_celery_publish import CeleryPublishInstrumentor

DEFAULT_SERVICE_NAME = "stack-producer"


def plan(n: int, fail_every: int, lost_every: int) -> str:
    """What tick ``n`` (from 1) publishes: ``lost``, ``fail`` or ``ok`` (0 turns a kind off)."""
    if lost_every and n % lost_every == 0:
        return "lost"
    if fail_every and n % fail_every == 0:
        return "fail"
    return "ok"


def publish(n: int, kind: str) -> dict[str, Any]:
    """Publish tick ``n``'s task; return what was sent (without the trace id)."""
    work_ms = 5 + (n * 37) % 120
    if kind == "lost":
        result = process_order.apply_async((n, work_ms), queue=LOST_QUEUE)
        task, queue = process_order.name, LOST_QUEUE
    elif kind == "fail":
        result = charge_card.apply_async((n, True), queue=QUEUE)
        task, queue = charge_card.name, QUEUE
    elif n % 2:
        result = process_order.apply_async((n, work_ms), queue=QUEUE)
        task, queue = process_order.name, QUEUE
    else:
        result = charge_card.apply_async((n, False), queue=QUEUE)
        task, queue = charge_card.name, QUEUE
    return {"n": n, "kind": kind, "task": task, "task_id": result.id, "queue": queue}


def tracer_provider() -> TracerProvider:
    """An SDK provider exporting over OTLP/HTTP unless ``OTEL_TRACES_EXPORTER=none``."""
    resource = Resource.create()  # OTEL_SERVICE_NAME, OTEL_RESOURCE_ATTRIBUTES
    if str(resource.attributes.get("service.name", "")).startswith("unknown_service"):
        resource = resource.merge(Resource({"service.name": DEFAULT_SERVICE_NAME}))
    provider = TracerProvider(resource=resource)
    if os.environ.get("OTEL_TRACES_EXPORTER", "otlp") != "none":
        provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
    return provider


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--count", type=int, default=0, help="publishes, then exit (0: forever)")
    parser.add_argument("--interval", type=float, default=2.0, help="seconds between publishes")
    parser.add_argument("--fail-every", type=int, default=5, help="every Nth task fails (0: off)")
    parser.add_argument("--lost-every", type=int, default=11, help="every Nth is lost (0: off)")
    parser.add_argument("--heartbeat", type=Path, help="touch this file after each publish")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())  # docker stop: flush, then exit
    provider = tracer_provider()
    instrumentor = CeleryPublishInstrumentor()
    instrumentor.instrument(tracer_provider=provider)
    tracer = provider.get_tracer("examples.stack.producer")
    n = 0
    try:
        while not stop.is_set() and (args.count == 0 or n < args.count):
            n += 1
            kind = plan(n, args.fail_every, args.lost_every)
            with tracer.start_as_current_span("place order", attributes={"order.id": n}) as span:
                sent = publish(n, kind)
                sent["trace_id"] = format_trace_id(span.get_span_context().trace_id)
            print(json.dumps(sent), flush=True)
            if args.heartbeat is not None:
                args.heartbeat.touch()
            if args.count == 0 or n < args.count:
                stop.wait(args.interval)  # pacing between publishes
    finally:
        instrumentor.uninstrument()  # flushes the audit rows still batched
        provider.shutdown()  # flushes the spans
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
