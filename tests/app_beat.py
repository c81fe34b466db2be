"""``celery -A tests.app_beat beat``: the test app (:mod:`tests.app`) with one schedule entry.

The entry, named ``OCP_BEAT_ENTRY``, sends ``tests.add`` to ``OCP_QUEUE`` every
``OCP_BEAT_INTERVAL`` seconds; ``OCP_SETUP_SDK=1`` instruments the beat process in code.
"""

from __future__ import annotations

import os

from tests.app import app

app.conf.beat_schedule = {
    os.environ.get("OCP_BEAT_ENTRY", "ocp-beat"): {
        "task": "tests.add",
        "schedule": float(os.environ.get("OCP_BEAT_INTERVAL", "1")),
        "args": (2, 2),
        "options": {"queue": os.environ.get("OCP_QUEUE", "ocp-default")},
    }
}

__all__ = ["app"]
