"""The AppConfig: at ``django.setup()``, our settings are checked, ``migrate`` is taught to
migrate the audit table, and an instrumentation set up before Django is re-resolved.

Why re-instrument: ``opentelemetry-instrument celery -A proj worker`` instruments when the
interpreter starts, and a ``CeleryPublishInstrumentor().instrument()`` in ``proj/celery.py`` runs
while Django imports the project's settings; either way Django's settings could not be read
(:mod:`otel_celery_publish.config` never makes Django load them). Celery's Django fixup calls
``django.setup()`` when the worker imports its task modules, before the pool forks and before
``worker_init``, and a web process sets Django up before it serves: nothing is published yet, so
uninstrumenting (which flushes) and instrumenting again with the full settings loses nothing.
Settings given complete (``instrument(settings=...)``) or already read with Django's stay as
they are (:meth:`~otel_celery_publish.config.Settings.refreshed`).
"""

from __future__ import annotations

import logging
from typing import Any

from django.apps import AppConfig
from django.db.models.signals import post_migrate

from otel_celery_publish._guard import guard
from otel_celery_publish.contrib.django._settings import current_settings, database_alias

logger = logging.getLogger("otel_celery_publish")


class OtelCeleryPublishConfig(AppConfig):
    name = "otel_celery_publish.contrib.django"
    label = "otel_celery_publish"
    verbose_name = "Celery publish audit"
    default_auto_field = "django.db.models.AutoField"

    def ready(self) -> None:
        current_settings()  # a bad setting fails here, at startup, naming itself
        post_migrate.connect(
            migrate_audit_table, sender=self, dispatch_uid="otel_celery_publish.migrate"
        )
        reinstrument()


def reinstrument() -> bool:
    """Re-instrument with Django's settings if the process was instrumented without them and
    they change something; True when it did."""
    from otel_celery_publish import CeleryPublishInstrumentor  # noqa: PLC0415 - see the docstring

    ours = CeleryPublishInstrumentor()
    if not ours.is_instrumented_by_opentelemetry:
        return False
    active = ours.writer.settings
    fresh = active.refreshed()
    if fresh == active:
        return False
    with guard("django re-instrument"):
        # The providers instrument() was given (None: the global ones) carry over.
        providers = {
            "tracer_provider": getattr(ours, "_tracer_provider", None),
            "meter_provider": getattr(ours, "_meter_provider", None),
        }
        logger.info("otel-celery-publish: Django is set up: instrumenting with its settings")
        ours.uninstrument()
        ours.instrument(settings=fresh, **providers)
        return True
    return False


def migrate_audit_table(
    sender: Any, using: str, verbosity: int = 1, stdout: Any = None, **_: Any
) -> None:
    """``post_migrate`` receiver: bring the audit table to our head revision with our Alembic
    migrations when ``migrate`` runs on its database (idempotent: at head it is two queries)."""
    from otel_celery_publish.audit import AuditError, migrate_schema  # noqa: PLC0415
    from otel_celery_publish.audit._db import safe_url  # noqa: PLC0415

    if using != database_alias():
        return
    settings = current_settings()
    try:
        done = migrate_schema(settings=settings)
    except AuditError as exc:
        from django.core.management.base import CommandError  # noqa: PLC0415

        raise CommandError(f"otel-celery-publish: {exc}") from None
    if verbosity >= 1 and stdout is not None and done.action != "current":
        stdout.write(
            f"  Audit table {done.table!r} at {safe_url(settings.audit_url)}: {done.action} "
            f"(revision {done.from_revision or 'none'} -> {done.to_revision})"
        )
