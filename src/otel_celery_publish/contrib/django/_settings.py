"""What the Django side reads: our settings with Django's, the audit table's database alias, and
the Celery app the admin replays through."""

from __future__ import annotations

from typing import Any

from django.core.exceptions import ImproperlyConfigured

from otel_celery_publish.config import Settings, SettingsError
from otel_celery_publish.contrib.django._layer import django_database_alias


def current_settings() -> Settings:
    """``Settings.from_env()`` (keywords aside, what ``instrument()`` resolves here); a bad value
    is Django's ImproperlyConfigured, one line naming the setting or variable."""
    try:
        return Settings.from_env()
    except SettingsError as exc:
        raise ImproperlyConfigured(f"otel-celery-publish: {exc}") from None


def database_alias() -> str:
    """The ``DATABASES`` alias the model and the admin read: ``OTEL_CELERY_PUBLISH["DATABASE"]``."""
    try:
        return django_database_alias()
    except SettingsError as exc:
        raise ImproperlyConfigured(f"otel-celery-publish: {exc}") from None


def celery_app() -> Any:
    """The project's Celery app: Celery's current app, which ``proj/__init__.py`` imports in the
    documented layout (``from .celery import app as celery_app``)."""
    from celery import current_app  # noqa: PLC0415 - only when replaying

    return current_app._get_current_object()
