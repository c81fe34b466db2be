"""Celery's documented project layout: ``proj/celery.py`` holds the app, ``proj/__init__.py``
imports it, and ``app.autodiscover_tasks`` finds ``tasks.py`` in each package."""

from proj.celery import app as celery_app

__all__ = ("celery_app",)
