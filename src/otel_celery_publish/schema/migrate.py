"""Create, adopt and upgrade the audit table with the Alembic migrations shipped in the package.

Every configured table has its own version table, ``<table>_alembic_version``: the host's
``alembic_version`` is never read or written. A table created before migrations existed
(``table.create(checkfirst=True)`` in the writer) is adopted by the first revision.

Called by ``celery ... audit migrate`` and by every process that writes the table, on startup::

    upgrade(engine, settings.table_name)

The common case (already at head) is two small queries and never imports Alembic (~70 ms).
"""

from __future__ import annotations

import io
import os
import threading
import zlib

from opentelemetry.instrumentation.utils import suppress_instrumentation
from sqlalchemy import Column, Connection, Engine, MetaData, String, Table, func, inspect, select
from sqlalchemy.engine import make_url

from otel_celery_publish.config import check_table_name

# The newest revision in ``migrations/versions`` (a test checks they agree).
HEAD = "0004"
SCRIPT_LOCATION = "otel_celery_publish.schema:migrations"
# Alembic's ``context`` and ``op`` are process-wide proxies: one migration per process at a time.
_ALEMBIC_LOCK = threading.Lock()


def _fresh_lock_after_fork() -> None:
    # The writer migrates in a background thread at startup, and a prefork worker forks right
    # after: a child could inherit the lock held, by a thread it does not have.
    global _ALEMBIC_LOCK  # noqa: PLW0603 - rebinding a module lock is the point
    _ALEMBIC_LOCK = threading.Lock()


os.register_at_fork(after_in_child=_fresh_lock_after_fork)

# A fork while one of our threads imports a module would hand the child that module's import
# lock, held by a thread it does not have (its first import of Alembic would hang forever). Our
# threads import Alembic under this lock, and a fork waits for it (an import, ~0.1 s).
_IMPORTING = threading.Lock()


def _release_importing() -> None:
    _IMPORTING.release()


os.register_at_fork(
    before=_IMPORTING.acquire,
    after_in_parent=_release_importing,
    after_in_child=_release_importing,
)


def version_table(table_name: str) -> str:
    """The name of the Alembic version table that belongs to audit table ``table_name``."""
    return f"{table_name}_alembic_version"


def current(conn: Connection, table_name: str) -> str | None:
    """The revision the audit table is at, or None when it was never migrated."""
    name = version_table(table_name)
    if not inspect(conn).has_table(name):
        return None
    versions = Table(name, MetaData(), Column("version_num", String(32), primary_key=True))
    return conn.execute(select(versions.c.version_num)).scalar()


def upgrade(engine: Engine, table_name: str) -> None:
    """Bring ``table_name`` to :data:`HEAD`: create it, adopt it, or migrate it.

    Idempotent, and safe when several processes (or threads) call it at once: they queue on a
    lock held for the migration's transaction (PostgreSQL: an advisory lock; SQLite: the
    database's write lock, taken up front), then find the work done. The engine may be an
    autocommit one (the writer's): the migration still runs in a transaction of its own.
    """
    check_table_name(table_name)
    with suppress_instrumentation(), engine.connect() as conn:
        if current(conn, table_name) == HEAD:
            return
        conn.rollback()  # end the autobegun read before switching the isolation level
        if conn.dialect.name == "sqlite":
            _upgrade_sqlite(conn, table_name)
            return
        tx = conn.execution_options(isolation_level=conn.default_isolation_level)
        with tx.begin():
            tx.execute(select(func.pg_advisory_xact_lock(_lock_key(table_name))))
            if current(tx, table_name) != HEAD:  # else migrated while we waited
                _alembic_upgrade(table_name, connection=tx)


def _upgrade_sqlite(conn: Connection, table_name: str) -> None:
    """Migrate inside ``BEGIN IMMEDIATE``: SQLite's DDL is transactional, and the write lock
    taken at BEGIN makes concurrent callers wait (busy timeout) instead of colliding. pysqlite
    issues BEGIN only before DML, so the transaction is driven by hand in autocommit mode."""
    raw = conn.execution_options(isolation_level="AUTOCOMMIT")
    raw.exec_driver_sql("BEGIN IMMEDIATE")
    try:
        if current(raw, table_name) != HEAD:
            _alembic_upgrade(table_name, connection=raw)
    except BaseException:
        raw.exec_driver_sql("ROLLBACK")
        raise
    raw.exec_driver_sql("COMMIT")


def upgrade_sql(dialect_name: str, table_name: str) -> str:
    """The DDL :func:`upgrade` would run on an empty database, as a SQL script (offline)."""
    check_table_name(table_name)
    buffer = io.StringIO()
    _alembic_upgrade(table_name, dialect_name=dialect_name, output_buffer=buffer)
    return buffer.getvalue()


def dialect_of(url: str) -> str:
    """``postgresql`` or ``sqlite`` for a SQLAlchemy URL (for :func:`upgrade_sql`)."""
    return make_url(url).get_backend_name()


def _alembic_upgrade(
    table_name: str,
    *,
    connection: Connection | None = None,
    dialect_name: str | None = None,
    output_buffer: io.StringIO | None = None,
) -> None:
    # Alembic is imported only when the schema actually changes, not by every publishing process.
    with _IMPORTING:
        from alembic import command  # noqa: PLC0415
        from alembic.config import Config  # noqa: PLC0415
        from alembic.runtime import migration  # noqa: F401, PLC0415 - what upgrade imports
        from alembic.script import ScriptDirectory  # noqa: F401, PLC0415

    config = Config(output_buffer=output_buffer)
    config.set_main_option("script_location", SCRIPT_LOCATION)
    config.attributes.update(
        table_name=table_name, connection=connection, dialect_name=dialect_name
    )
    with _ALEMBIC_LOCK:
        command.upgrade(config, "head", sql=connection is None)


def _lock_key(table_name: str) -> int:
    """A stable signed 64-bit advisory lock key per table (namespaced so it is ours)."""
    return zlib.crc32(f"otel_celery_publish:{table_name}".encode()) | (0x0CE1 << 32)
