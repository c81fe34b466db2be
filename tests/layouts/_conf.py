"""The configuration every layout's app shares: the test's broker and result backend."""

from __future__ import annotations

import os
from typing import Any


def conf() -> dict[str, Any]:
    """``Celery(...)`` keyword arguments from the test's environment."""
    return {
        "broker": os.environ.get("OCP_BROKER_URL", "redis://127.0.0.1:6379/9"),
        "backend": os.environ.get("OCP_RESULT_BACKEND") or None,
    }
