"""A publisher without the task code: an app with no tasks that sends one by name.

``opentelemetry-instrument python -m tests.app_notasks TASK_ID QUEUE`` sends ``tests.login``
with ``app.send_task`` on ``OCP_BROKER_URL`` and exits (spans and rows are flushed at exit).
"""

from __future__ import annotations

import os
import sys

from celery import Celery

app = Celery("ocp_notasks", broker=os.environ.get("OCP_BROKER_URL", "redis://127.0.0.1:6379/9"))


def main(task_id: str, queue: str) -> None:
    app.send_task(
        "tests.login", ("ada", "hunter2"), {"token": "t0k3n"}, task_id=task_id, queue=queue
    )


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
