"""``celery -A proj audit ...``: click commands and their output. No logic: each command calls
the read API in :mod:`otel_celery_publish.audit` and formats what it returns."""

from otel_celery_publish.cli.commands import audit

__all__ = ["audit"]
