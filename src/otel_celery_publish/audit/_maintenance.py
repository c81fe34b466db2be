"""Keeping the audit table in shape: retention (``prune``), schema (``migrate_schema``), and the
local spool (``drain``, ``quarantined``, and ``ship``, the sidecar shipper).

``migrate_schema`` runs :mod:`otel_celery_publish.schema.migrate` (Alembic, imported only when a
migration runs); ``drain`` and ``quarantined`` read the spool through the sink's shipping and
quarantine modules, not through a running writer.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import threading

from sqlalchemy import delete, inspect, select

from otel_celery_publish.audit import _db
from otel_celery_publish.audit._db import AuditError, db_errors, open_db
from otel_celery_publish.config import Settings
from otel_celery_publish.schema import migrate
from otel_celery_publish.schema.table import workers_table
from otel_celery_publish.sink import sidecar
from otel_celery_publish.sink.quarantine import QuarantinedRecord
from otel_celery_publish.sink.quarantine import quarantined as read_quarantine
from otel_celery_publish.sink.shipping import drain_spool


@dataclasses.dataclass(frozen=True)
class PruneResult:
    deleted: int
    cutoff: dt.datetime
    batches: int


def prune(
    *,
    older_than: dt.timedelta,
    settings: Settings | None = None,
    batch_size: int = 5000,
    now: dt.datetime | None = None,
) -> PruneResult:
    """Delete rows published before ``now - older_than``, ``batch_size`` rows per statement.

    Each batch is its own short transaction selecting victims by primary key through the
    ``published_at`` index, so locks are held for one batch only and writers never wait long.
    Heartbeat rows of worker instances last seen before the cutoff go too.
    """
    if batch_size < 1:
        raise AuditError("batch size must be at least 1")
    with open_db(settings) as db:
        t = db.table
        cutoff = (now or _db.now_utc()) - older_than
        victims = (
            select(t.c.publish_id)
            .where(t.c.published_at < cutoff)
            .order_by(t.c.published_at)
            .limit(batch_size)
        )
        stmt = delete(t).where(t.c.publish_id.in_(victims.scalar_subquery()))
        deleted = batches = 0
        while True:
            count = db.run(stmt)
            deleted += count
            batches += 1
            if count < batch_size:
                break
        # Heartbeats of worker instances gone before the cutoff: one row per worker boot.
        workers = workers_table(t.name)
        db.run(delete(workers).where(workers.c.heartbeat_at < cutoff))
        return PruneResult(deleted, cutoff, batches)


@dataclasses.dataclass(frozen=True)
class Migration:
    """``action``: ``created``, ``adopted`` (made without Alembic), ``upgraded`` or ``current``."""

    table: str
    version_table: str
    action: str
    from_revision: str | None
    to_revision: str


def migrate_schema(*, settings: Settings | None = None) -> Migration:
    """Create, adopt or upgrade the audit table of ``settings`` (see :mod:`.migrate`)."""
    with open_db(settings, migrated=False) as db:
        name = db.table.name
        with db.connection() as conn:
            before = migrate.current(conn, name)
            existed = inspect(conn).has_table(name)
        with db.errors():
            migrate.upgrade(db.engine, name)
        if before == migrate.HEAD:
            action = "current"
        elif before is not None:
            action = "upgraded"
        else:
            action = "adopted" if existed else "created"
        return Migration(name, migrate.version_table(name), action, before, migrate.HEAD)


def quarantined(*, settings: Settings | None = None) -> list[QuarantinedRecord]:
    """The records the audit database refused even repaired, kept in the spool's quarantine."""
    settings = settings or Settings.from_env()
    try:
        return read_quarantine(settings)
    except OSError as exc:
        raise AuditError(f"cannot read the quarantine in {settings.spool_dir}: {exc}") from None


def drain(*, settings: Settings | None = None) -> int:
    """Ship what dead processes left in the local spool now; the number of records shipped.

    The table must be migrated, as for every operation here (:class:`SchemaNotMigrated`
    otherwise): shipping never runs DDL from the read side.
    """
    settings = settings or Settings.from_env()
    with open_db(settings):
        pass
    with db_errors(settings.audit_url):
        try:
            return drain_spool(dataclasses.replace(settings, create_schema=False))
        except OSError as exc:
            raise AuditError(f"cannot read the spool in {settings.spool_dir}: {exc}") from None


def ship(
    *,
    settings: Settings | None = None,
    follow: bool = False,
    interval: float = 0.5,
    stop: threading.Event | None = None,
) -> int:
    """Ship every spool segment of this spool directory, live ones included: once, or
    (``follow``) every ``interval`` seconds until ``stop`` is set, as the host's sidecar
    shipper; the number of records shipped. While it runs, the writers' threads on the same
    spool directory stand down (:mod:`otel_celery_publish.sink.sidecar`).

    Unlike ``drain``, it creates or upgrades the table as a writer does (``create_schema``):
    with a sidecar, the publishing processes of a ``spool`` app never connect."""
    settings = settings or Settings.from_env()
    with db_errors(settings.audit_url):
        try:
            return sidecar.run(
                settings,
                follow=follow,
                interval=interval,
                stop=stop or threading.Event(),
            )
        except OSError as exc:
            raise AuditError(f"cannot read the spool in {settings.spool_dir}: {exc}") from None
