"""``celery -A proj audit ...``: a thin click layer over :mod:`otel_celery_publish.audit`."""

from __future__ import annotations

import click


@click.group()
def audit() -> None:
    """Find lost tasks, replay them, report latency (otel-celery-publish)."""
