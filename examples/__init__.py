"""Runnable examples for otel-celery-publish."""
