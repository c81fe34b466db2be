"""The audit table as an unmanaged Django model: the ORM and the admin read it, Django never
creates, alters or flushes it (our Alembic migrations own it, see :mod:`.apps`).

One field per column of :func:`otel_celery_publish.schema.table.audit_table` (a test compares
them). The table name is the configured one (``OTEL_CELERY_PUBLISH_TABLE_NAME``, or
``OTEL_CELERY_PUBLISH["TABLE_NAME"]``), read when Django loads the models; the manager reads
the database ``OTEL_CELERY_PUBLISH["DATABASE"]`` names.
"""

from __future__ import annotations

from typing import Any

from django.db import models

from otel_celery_publish.contrib.django._settings import current_settings, database_alias
from otel_celery_publish.schema.table import LOST_REASONS

_TABLE = current_settings().table_name
#: :data:`LOST_REASONS` keyed by any text (a column holds text, not a LostReason).
LOST_WORDS: dict[str, str] = {str(reason): words for reason, words in LOST_REASONS.items()}


class _AuditManager(models.Manager):
    """Queries go to the audit table's database, not necessarily ``default``."""

    def get_queryset(self) -> Any:
        return super().get_queryset().using(database_alias())


class _JSONColumn(models.JSONField):
    """Our ``options`` column is ``json`` (SQLAlchemy's JSON), which psycopg 3 decodes by itself:
    Django's JSONField expects text from PostgreSQL (it switches that decoding off for
    ``jsonb`` only) and would decode it twice. SQLite hands text over, as Django expects."""

    def from_db_value(self, value: Any, expression: Any, connection: Any) -> Any:
        if connection.vendor == "postgresql":
            return value
        return super().from_db_value(value, expression, connection)


class _RootIdField(models.CharField):
    """``root_id``, with the ``ne`` lookup: ``root_id = X AND root_id <> task_id`` is what lets
    PostgreSQL use the partial index ``ix_<table>_root_id`` (its predicate, verbatim); Django's
    ``~Q(root_id=F("task_id"))`` adds NULL handling that hides it."""


@_RootIdField.register_lookup
class _NotEqual(models.Lookup):
    lookup_name = "ne"

    def as_sql(self, compiler: Any, connection: Any) -> tuple[str, list[Any]]:
        lhs, lhs_params = self.process_lhs(compiler, connection)
        rhs, rhs_params = self.process_rhs(compiler, connection)
        return f"{lhs} <> {rhs}", [*lhs_params, *rhs_params]


def _text(length: int) -> Any:
    return models.CharField(max_length=length, null=True, blank=True)


def _time(name: str) -> Any:
    return models.DateTimeField(name, null=True, blank=True)


class PublishAttempt(models.Model):
    """One publish attempt of a task (a retry or a replay is another row)."""

    publish_id = models.CharField("publish id", max_length=36, primary_key=True)
    task_id = models.CharField("task id", max_length=255)
    task_name = models.CharField("task name", max_length=255)
    published_at = models.DateTimeField("published")
    attempt = models.IntegerField(null=True, blank=True)
    root_id = _RootIdField(max_length=255, null=True, blank=True)
    parent_id = _text(255)
    group_id = _text(255)
    queue = _text(255)
    exchange = _text(255)
    routing_key = _text(255)
    priority = models.IntegerField(null=True, blank=True)
    eta = _time("ETA")
    expires = _time("expires")
    payload = models.BinaryField(null=True, blank=True)
    content_type = _text(128)
    content_encoding = _text(64)
    payload_redacted = models.BooleanField(null=True, blank=True)
    options = _JSONColumn(null=True, blank=True)
    args_repr = models.TextField("args", null=True, blank=True)
    kwargs_repr = models.TextField("kwargs", null=True, blank=True)
    publisher_host = _text(255)
    publisher_pid = models.IntegerField(null=True, blank=True)
    trace_id = _text(32)
    span_id = _text(16)
    error = models.TextField(null=True, blank=True)
    replay_of = _text(36)
    replayed_at = _time("replayed")
    replayed_as = _text(255)
    sent_at = _time("sent")
    received_at = _time("received")
    started_at = _time("started")
    finished_at = _time("finished")
    outcome = _text(16)
    worker = _text(255)
    runtime_s = models.FloatField("runtime (s)", null=True, blank=True)
    exception_type = _text(255)
    exception_message = models.TextField(null=True, blank=True)
    worker_instance = _text(36)
    acks_late = models.BooleanField(null=True, blank=True)
    lost_reason = _text(32)
    app = _text(255)
    broker = _text(255)
    periodic_task = _text(255)
    replayed_by = _text(255)
    dead_lettered_at = _time("dead-lettered")

    objects = _AuditManager()

    class Meta:
        managed = False
        db_table = _TABLE
        app_label = "otel_celery_publish"
        verbose_name = "published task"
        verbose_name_plural = "published tasks"
        ordering = ("-published_at",)
        default_permissions = ("view",)
        permissions = (("replay_publishattempt", "Can replay a published task"),)

    def __str__(self) -> str:
        return f"{self.task_name}[{self.task_id}]"

    @property
    def status(self) -> str:
        """Its outcome; else ``replayed`` (a replay took over), ``dead-lettered`` (``audit
        watch`` used up its automatic replays) or ``unfinished``, as ``audit show`` says."""
        if self.outcome:
            return str(self.outcome)
        if self.replayed_at:
            return "replayed"
        return "dead-lettered" if self.dead_lettered_at else "unfinished"

    @property
    def stage(self) -> str:
        """Where an unfinished attempt is now, or what the worker recorded as lost."""
        if self.lost_reason:
            return LOST_WORDS.get(str(self.lost_reason), str(self.lost_reason))
        if self.finished_at is not None:
            return ""
        if self.started_at is not None:
            return "unfinished: running"
        if self.received_at is not None:
            return "unfinished: received, not started"
        if self.sent_at is not None:
            return "unfinished: on the broker"
        return "unfinished: publish not completed"
