"""The demo stack's Celery app, shared by its worker and its producer.

The worker runs it under ``opentelemetry-instrument celery -A examples.stack.app worker``: the SDK
and our instrumentation come from the environment (``OTEL_*``, ``OTEL_CELERY_PUBLISH_*``), not from
this module. The producer (:mod:`examples.stack.producer`) sets the SDK up in code.

Configured from the environment, so the same module runs in docker-compose.yml and in the
end-to-end test:

- ``STACK_BROKER_URL``: the broker (default ``redis://localhost:6379/0``);
- ``STACK_QUEUE``: the queue the worker consumes (default ``demo``);
- ``STACK_LOST_QUEUE``: a queue nobody consumes; a task routed there is "lost" and
  ``celery audit lost`` finds it (default ``demo-unconsumed``).
"""

from __future__ import annotations

import os
import time

from celery import Celery

BROKER_URL = os.environ.get("STACK_BROKER_URL", "redis://localhost:6379/0")
QUEUE = os.environ.get("STACK_QUEUE", "demo")
LOST_QUEUE = os.environ.get("STACK_LOST_QUEUE", "demo-unconsumed")

app = Celery("otel_celery_publish_stack", broker=BROKER_URL)
app.conf.update(
    task_default_queue=QUEUE,
    task_ignore_result=True,  # no result backend: the audit table is the record
    worker_prefetch_multiplier=1,
    broker_connection_retry_on_startup=True,
)


class PaymentDeclinedError(Exception):
    """A card was declined: the demo's failing task raises it (an error, not in ``throws``)."""


@app.task(name="stack.process_order")
def process_order(order_id: int, work_ms: int) -> int:
    """Pretend to process an order for ``work_ms`` milliseconds."""
    time.sleep(work_ms / 1000)
    return order_id


@app.task(name="stack.charge_card")
def charge_card(order_id: int, decline: bool) -> int:
    """Charge the card of an order; ``decline`` makes it fail."""
    if decline:
        raise PaymentDeclinedError(f"card declined for order {order_id}")
    return order_id
