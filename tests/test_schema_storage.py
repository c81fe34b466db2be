"""Storage of the audit table on PostgreSQL: the heap fillfactor of migration 0004, and the HOT
updates it is there for."""

from __future__ import annotations

import datetime as dt
import time
import uuid

from alembic import command
from alembic.config import Config
from sqlalchemy import MetaData, insert, text

from otel_celery_publish import audit, rows
from otel_celery_publish.config import Settings
from otel_celery_publish.schema import migrate
from otel_celery_publish.schema.table import FILLFACTOR, audit_table
from otel_celery_publish.sink.database import Database, make_engine
from tests.audit_support import cli, row, stored


def fresh(pg_url: str) -> Settings:
    return Settings.from_env(environ={}, audit_url=pg_url, table_name=f"s_{uuid.uuid4().hex[:10]}")


def reloptions(settings: Settings) -> list[str]:
    engine = make_engine(settings.audit_url)
    try:
        with engine.connect() as conn:
            found = conn.execute(
                text("SELECT reloptions FROM pg_class WHERE relname = :t"),
                {"t": settings.table_name},
            ).scalar()
    finally:
        engine.dispose()
    return list(found or [])


def alembic(settings: Settings, action: str, revision: str) -> None:
    engine = make_engine(settings.audit_url)
    try:
        with engine.begin() as conn:
            config = Config()
            config.set_main_option("script_location", migrate.SCRIPT_LOCATION)
            config.attributes.update(
                table_name=settings.table_name, connection=conn, dialect_name=None
            )
            getattr(command, action)(config, revision)
    finally:
        engine.dispose()


def test_the_migrated_table_has_the_fillfactor_table_py_declares(pg_url: str) -> None:
    """A fresh table gets fillfactor 70, the value schema/table.py declares for it."""
    settings = fresh(pg_url)
    audit.migrate_schema(settings=settings)
    assert reloptions(settings) == [f"fillfactor={FILLFACTOR}"]
    declared = audit_table(settings.table_name, MetaData()).dialect_options["postgresql"]["with"]
    assert declared == {"fillfactor": FILLFACTOR}


def test_a_table_at_0003_gets_the_fillfactor_and_keeps_its_rows(pg_url: str) -> None:
    """Upgrading from 0003 sets the fillfactor in place (no rewrite: the rows stay); a
    downgrade resets it."""
    settings = fresh(pg_url)
    alembic(settings, "upgrade", "0003")
    assert reloptions(settings) == []
    old = row()
    engine = make_engine(settings.audit_url)
    try:
        with engine.connect() as conn:
            conn.execute(insert(audit_table(settings.table_name, MetaData())), [old])
    finally:
        engine.dispose()
    result = audit.migrate_schema(settings=settings)
    assert (result.action, result.from_revision) == ("upgraded", "0003")
    assert reloptions(settings) == [f"fillfactor={FILLFACTOR}"]
    assert [r["publish_id"] for r in stored(settings)] == [old["publish_id"]]
    alembic(settings, "downgrade", "0003")
    assert reloptions(settings) == []


def test_sql_sets_the_fillfactor_on_postgresql_only() -> None:
    """``migrate --sql`` prints the ALTER TABLE for PostgreSQL; SQLite's script has none."""
    assert f"ALTER TABLE t_ops SET (fillfactor = {FILLFACTOR})" in migrate.upgrade_sql(
        "postgresql", "t_ops"
    )
    assert "fillfactor" not in migrate.upgrade_sql("sqlite", "t_ops")
    settings = Settings.from_env(
        environ={}, audit_url="postgresql+psycopg://nobody@127.0.0.1:1/none", table_name="t_ops"
    )
    result = cli("migrate", "--sql", settings=settings)
    assert result.exit_code == 0, result.output
    assert f"SET (fillfactor = {FILLFACTOR})" in result.stdout


def test_lifecycle_updates_of_fresh_rows_are_hot(pg_url: str) -> None:
    """With room left on each page, ``sent`` updates written as the writer writes them (sync
    insert, then one batch) are HOT updates: on the row's page, no new index entries."""
    settings = fresh(pg_url)
    audit.migrate_schema(settings=settings)
    table = audit_table(settings.table_name)
    db = Database(settings, table)
    published = dt.datetime.now(dt.timezone.utc)
    publishes = [row(published_at=published) for _ in range(60)]
    try:
        for publish in publishes:
            db.insert_now(publish)
        keys = [
            {k: p[k] for k in ("publish_id", "task_id", "task_name", "published_at")}
            for p in publishes
        ]
        db.upsert([dict(rows.sent(k, time.time())) for k in keys])
    finally:
        db.dispose()  # the backends exit and flush their statistics
    engine = make_engine(settings.audit_url)
    try:
        deadline = time.monotonic() + 30
        while True:
            with engine.connect() as conn:
                updates, hot = conn.execute(
                    text(
                        "SELECT n_tup_upd, n_tup_hot_upd FROM pg_stat_user_tables "
                        "WHERE relname = :t"
                    ),
                    {"t": settings.table_name},
                ).one()
            if updates >= len(publishes) or time.monotonic() > deadline:
                break
            time.sleep(0.1)  # polling the statistics collector, with a deadline
    finally:
        engine.dispose()
    assert updates == len(publishes)
    # Fillfactor 100 leaves no room: then (almost) none is HOT. 70 leaves room for about one
    # new version in three rows of this size.
    assert hot >= len(publishes) // 5, (updates, hot)
