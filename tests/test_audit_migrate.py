"""Migrations: a fresh database, a table the writer created adopted, ``--sql``, our own version
table, concurrent upgrades."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
from alembic.autogenerate import compare_metadata
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Column, Index, MetaData, String, Table, insert, inspect, select, text

from otel_celery_publish import audit
from otel_celery_publish.config import Settings, SettingsError
from otel_celery_publish.schema import migrate
from otel_celery_publish.schema.table import audit_table, workers_table
from otel_celery_publish.sink.database import make_engine
from tests.audit_support import celery_audit, cli, one_line_error, row, stored, validated

# The table as the writer created it before migrations existed (no replay bookkeeping columns,
# two indexes).
REPLAY_COLUMNS = ("replayed_at", "replayed_as")


def fresh(kind: str, tmp_path: Path, pg_url: str) -> Settings:
    url = f"sqlite:///{tmp_path / 'audit.db'}" if kind == "sqlite" else pg_url
    return Settings.from_env(environ={}, audit_url=url, table_name=f"m_{uuid.uuid4().hex[:10]}")


def schema_diff(settings: Settings) -> list[Any]:
    """What differs between the migrated tables and ``schema/table.py`` (only our tables)."""
    engine = make_engine(settings.audit_url)
    expected = MetaData()
    audit_table(settings.table_name, expected)
    workers_table(settings.table_name, expected)
    ours = {settings.table_name, f"{settings.table_name}_workers"}
    try:
        with engine.connect() as conn:
            context = MigrationContext.configure(
                conn,
                opts={"include_name": lambda name, kind, _parent: kind != "table" or name in ours},
            )
            return list(compare_metadata(context, expected))
    finally:
        engine.dispose()


def partial_indexes(settings: Settings) -> dict[str, str]:
    engine = make_engine(settings.audit_url)
    try:
        indexes = inspect(engine).get_indexes(settings.table_name)
    finally:
        engine.dispose()
    return {
        str(i["name"]): str(predicate)
        for i in indexes
        for key, predicate in i.get("dialect_options", {}).items()
        if key.endswith("_where")
    }


@pytest.mark.parametrize("kind", ["sqlite", "postgresql"])
def test_fresh_database_gets_exactly_the_schema(kind: str, tmp_path: Path, pg_url: str) -> None:
    """migrate creates the table as schema.py defines it, and its own version table."""
    settings = fresh(kind, tmp_path, pg_url)
    result = audit.migrate_schema(settings=settings)
    name = settings.table_name
    assert (result.action, result.from_revision, result.to_revision) == (
        "created",
        None,
        migrate.HEAD,
    )
    assert result.version_table == f"{name}_alembic_version"
    assert schema_diff(settings) == []
    assert set(partial_indexes(settings)) == {
        f"ix_{name}_unfinished",
        f"ix_{name}_replay_of",
        f"ix_{name}_group_id",
        f"ix_{name}_root_id",
    }
    assert stored_versions(settings) == [migrate.HEAD]
    again = audit.migrate_schema(settings=settings)
    assert (again.action, again.from_revision) == ("current", migrate.HEAD)


def stored_versions(settings: Settings) -> list[str]:
    engine = make_engine(settings.audit_url)
    versions = Table(
        migrate.version_table(settings.table_name), MetaData(), Column("version_num", String(32))
    )
    try:
        with engine.connect() as conn:
            return list(conn.execute(select(versions.c.version_num)).scalars())
    finally:
        engine.dispose()


@pytest.mark.parametrize("kind", ["sqlite", "postgresql"])
@pytest.mark.parametrize("created_by", ["writer-before-migrations", "writer-today"])
def test_table_created_by_the_writer_is_adopted(
    kind: str, created_by: str, tmp_path: Path, pg_url: str
) -> None:
    """A table made with create(checkfirst=True), old schema or current, is adopted: missing
    columns and indexes are added and its rows kept."""
    settings = fresh(kind, tmp_path, pg_url)
    name = settings.table_name
    current = audit_table(name, MetaData())
    if created_by == "writer-today":
        table = current
    else:
        table = Table(
            name,
            MetaData(),
            *(c._copy() for c in current.columns if c.name not in REPLAY_COLUMNS),
            Index(f"ix_{name}_published_at", "published_at"),
            Index(f"ix_{name}_task_id", "task_id"),
        )
    engine = make_engine(settings.audit_url)
    try:
        table.create(engine, checkfirst=True)
        old = row()
        with engine.connect() as conn:
            conn.execute(insert(table), [{c.name: old.get(c.name) for c in table.columns}])
    finally:
        engine.dispose()
    assert audit.migrate_schema(settings=settings).action == "adopted"
    assert schema_diff(settings) == []
    [kept] = stored(settings)
    assert kept["publish_id"] == old["publish_id"] and kept["replayed_at"] is None


@pytest.mark.parametrize("kind", ["sqlite", "postgresql"])
def test_a_table_at_0001_is_upgraded_in_place(kind: str, tmp_path: Path, pg_url: str) -> None:
    """A table at revision 0001 gets the liveness columns, the workers table and the wider
    partial index, and keeps its rows."""
    from alembic import command  # noqa: PLC0415 - what migrate imports lazily too

    settings = fresh(kind, tmp_path, pg_url)
    engine = make_engine(settings.audit_url)
    try:
        with engine.begin() as conn:
            config = Config()
            config.set_main_option("script_location", migrate.SCRIPT_LOCATION)
            config.attributes.update(
                table_name=settings.table_name, connection=conn, dialect_name=None
            )
            command.upgrade(config, "0001")
        old = row()
        with engine.connect() as conn:
            columns = {c["name"] for c in inspect(conn).get_columns(settings.table_name)}
            conn.execute(
                insert(audit_table(settings.table_name, MetaData())),
                [{k: v for k, v in old.items() if k in columns}],
            )
            conn.commit()
    finally:
        engine.dispose()
    result = audit.migrate_schema(settings=settings)
    assert (result.action, result.from_revision, result.to_revision) == (
        "upgraded", "0001", migrate.HEAD,
    )  # fmt: skip
    assert schema_diff(settings) == []
    assert "lost_reason" in partial_indexes(settings)[f"ix_{settings.table_name}_unfinished"]
    [kept] = stored(settings)
    assert kept["publish_id"] == old["publish_id"] and kept["worker_instance"] is None


def test_the_hosts_alembic_version_is_never_touched(tmp_path: Path) -> None:
    """The application's own alembic_version keeps its revision; ours lives elsewhere."""
    url = f"sqlite:///{tmp_path / 'host.db'}"
    engine = make_engine(url)
    with engine.connect() as conn:
        conn.execute(text("CREATE TABLE alembic_version (version_num VARCHAR(32) PRIMARY KEY)"))
        conn.execute(text("INSERT INTO alembic_version VALUES ('host_app_rev')"))
    settings = Settings.from_env(environ={}, audit_url=url)
    audit.migrate_schema(settings=settings)
    with engine.connect() as conn:
        assert list(conn.execute(text("SELECT version_num FROM alembic_version")).scalars()) == [
            "host_app_rev"
        ]
    engine.dispose()
    assert stored_versions(settings) == [migrate.HEAD]


# Each caller imports first, then waits (polling, with a deadline) until all are ready, so the
# upgrades really overlap.
UPGRADE_WHEN_ALL_READY = """
import sys, time
from pathlib import Path
from otel_celery_publish.schema.migrate import upgrade
from otel_celery_publish.sink.database import make_engine
url, table, barrier, me, callers = sys.argv[1:]
(Path(barrier) / me).touch()
deadline = time.monotonic() + 30
while len(list(Path(barrier).iterdir())) < int(callers) and time.monotonic() < deadline:
    time.sleep(0.005)
upgrade(make_engine(url), table)
"""


@pytest.mark.parametrize("kind", ["sqlite", "postgresql"])
def test_concurrent_upgrades_all_succeed_once(kind: str, tmp_path: Path, pg_url: str) -> None:
    """Processes (and threads) starting together may all call upgrade(): every call returns
    and the table is versioned once."""
    settings = fresh(kind, tmp_path, pg_url)
    # The writer's engine switches a brand-new SQLite file to WAL on connect, which can itself
    # hit "database is locked" when processes open it at once; not what this test is about.
    with make_engine(settings.audit_url).connect():
        pass
    barrier = tmp_path / "barrier"
    barrier.mkdir()
    callers = 3
    procs = [
        subprocess.Popen(
            [
                sys.executable,
                "-c",
                UPGRADE_WHEN_ALL_READY,
                settings.audit_url,
                settings.table_name,
                str(barrier),
                str(i),
                str(callers),
            ],
            stderr=subprocess.PIPE,
        )
        for i in range(callers)
    ]

    def in_thread() -> None:
        engine = make_engine(settings.audit_url)
        try:
            migrate.upgrade(engine, settings.table_name)
        finally:
            engine.dispose()

    with ThreadPoolExecutor(2) as pool:
        threads = [pool.submit(in_thread) for _ in range(2)]
        for proc in procs:
            _, err = proc.communicate(timeout=60)
            assert proc.returncode == 0, err.decode()
        for future in threads:
            future.result(timeout=60)
    assert stored_versions(settings) == [migrate.HEAD]
    assert schema_diff(settings) == []


def test_a_child_forked_mid_migration_can_migrate(tmp_path: Path) -> None:
    """A process forked while another thread migrates (the writer at a prefork worker's
    start) does not inherit the held migration lock."""
    holding, release = threading.Event(), threading.Event()

    def migrating() -> None:
        with migrate._ALEMBIC_LOCK:
            holding.set()
            release.wait(30)

    thread = threading.Thread(target=migrating)
    thread.start()
    try:
        assert holding.wait(10)
        pid = os.fork()
        if pid == 0:  # the child: migrate a fresh table, exit without atexit hooks
            code = 1
            try:
                migrate.upgrade(make_engine(f"sqlite:///{tmp_path / 'child.db'}"), "t")
                code = 0
            finally:
                os._exit(code)
        deadline = time.monotonic() + 30
        while (done := os.waitpid(pid, os.WNOHANG))[0] == 0 and time.monotonic() < deadline:
            time.sleep(0.02)  # polling the child with a deadline
        if done[0] == 0:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
        assert done[0] == pid and os.waitstatus_to_exitcode(done[1]) == 0
    finally:
        release.set()
        thread.join(10)


def test_head_is_the_newest_shipped_revision() -> None:
    """migrate.HEAD (checked on every command without loading Alembic) is the scripts' head."""
    config = Config()
    config.set_main_option("script_location", migrate.SCRIPT_LOCATION)
    assert ScriptDirectory.from_config(config).get_heads() == [migrate.HEAD]


def test_sql_prints_the_ddl_without_connecting() -> None:
    """--sql works offline (the URL points nowhere) and honours the table name."""
    settings = Settings.from_env(
        environ={}, audit_url="postgresql+psycopg://nobody@127.0.0.1:1/none", table_name="t_ops"
    )
    result = cli("migrate", "--sql", settings=settings)
    assert result.exit_code == 0, result.output
    ddl = result.stdout
    assert "CREATE TABLE t_ops_alembic_version" in ddl and "CREATE TABLE t_ops (" in ddl
    assert (
        "CREATE INDEX ix_t_ops_unfinished ON t_ops (published_at) "
        "WHERE replayed_at IS NULL AND (finished_at IS NULL OR lost_reason IS NOT NULL)" in ddl
    )
    assert "CREATE TABLE t_ops_workers (" in ddl
    assert "INSERT INTO t_ops_alembic_version (version_num) VALUES ('0001')" in ddl
    assert f"SET version_num='{migrate.HEAD}'" in ddl
    assert " alembic_version" not in ddl
    assert cli("migrate", "--sql", "--json", settings=settings).exit_code == 2


def test_commands_refuse_an_unmigrated_table(tmp_path: Path, pg_url: str) -> None:
    """A table that was never migrated is a one-line error naming the fix."""
    for kind in ("sqlite", "postgresql"):
        settings = fresh(kind, tmp_path, pg_url)
        if kind == "sqlite":
            make_engine(settings.audit_url).dispose()
            (tmp_path / "audit.db").touch()
        result = cli("lost", settings=settings)
        one_line_error(result.stderr, result.exit_code, "is not migrated: run `celery -A")


def test_migrate_through_the_celery_entry_point(tmp_path: Path, pg_url: str) -> None:
    """``celery -A tests.app audit migrate`` creates the table (its own version table)."""
    settings = fresh("postgresql", tmp_path, pg_url)
    done = celery_audit("migrate", "--json", settings=settings)
    assert done.returncode == 0, done.stderr
    assert validated("migrate", done.stdout)["action"] == "created"
    assert stored_versions(settings) == [migrate.HEAD]


@pytest.mark.parametrize("name", ["x" * 44, "bad-name", "1abc", 'q"; drop'])
def test_migrations_refuse_a_table_name_postgresql_cannot_hold(name: str, tmp_path: Path) -> None:
    """upgrade() and upgrade_sql() refuse a bad table name before touching any database."""
    with pytest.raises(SettingsError, match="table_name"):
        migrate.upgrade_sql("postgresql", name)
    engine = make_engine(f"sqlite:///{tmp_path / 'never.db'}")
    with pytest.raises(SettingsError, match="table_name"):
        migrate.upgrade(engine, name)
    engine.dispose()
    assert not (tmp_path / "never.db").exists()
