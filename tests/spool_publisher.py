"""A publishing process for the spool tests: ``python -m tests.spool_publisher MODE COUNT``.

Instruments itself (audit database and spool directory from ``OTEL_CELERY_PUBLISH_*``), then
publishes ``COUNT`` tasks to ``OCP_QUEUE`` (0: until killed), printing each task id once its
``apply_async`` has returned - the tests kill it with SIGKILL mid-stream and check those ids.
"""

from __future__ import annotations

import itertools
import sys

from opentelemetry.sdk.trace import TracerProvider

from otel_celery_publish import CeleryPublishInstrumentor
from tests.app import add


def main() -> None:
    mode, count = sys.argv[1], int(sys.argv[2])
    CeleryPublishInstrumentor().instrument(tracer_provider=TracerProvider(), durability=mode)
    for i in itertools.count() if count == 0 else range(count):
        task_id = add.apply_async((i, i)).id
        print(task_id, flush=True)


if __name__ == "__main__":
    main()
