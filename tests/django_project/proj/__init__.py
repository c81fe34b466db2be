"""The test project, laid out as Celery's "First steps with Django": importing the package
imports the Celery app, so ``shared_task`` uses it."""

from .celery import app as celery_app

__all__ = ("celery_app",)
