"""Helpers for the audit operation tests: migrated databases, seeded rows, the CLI in-process
and through the real ``celery -A tests.app audit`` entry point, the JSON Schemas of the docs."""

from __future__ import annotations

import datetime as dt
import json
import os
import re
import subprocess
import uuid
from pathlib import Path
from types import SimpleNamespace
from typing import Any
from unittest import mock

import jsonschema
from click.testing import CliRunner, Result
from sqlalchemy import MetaData, Table, insert, select

from otel_celery_publish.audit import _db
from otel_celery_publish.cli import audit
from otel_celery_publish.config import Settings
from otel_celery_publish.schema.migrate import upgrade
from otel_celery_publish.schema.table import audit_table, workers_table
from otel_celery_publish.sink.database import make_engine
from tests.app import app
from tests.conftest import BIN, BROKER, ROOT

UTC = dt.timezone.utc
# "Now" for seeded tables: every seeded time is relative to it, the API is called with it and
# the in-process CLI's clock is pinned to it. It is the real time the session started, so a
# subprocess CLI (real clock) sees the seeded rows as just as old, give or take the session.
NOW = dt.datetime.now(UTC).replace(microsecond=0)
DOCS = ROOT / "docs" / "audit.md"


def ago(minutes: float = 0, seconds: float = 0) -> dt.datetime:
    return NOW - dt.timedelta(minutes=minutes, seconds=seconds)


def database(kind: str, tmp_path: Path, pg_url: str) -> Settings:
    """A migrated audit table of its own (fresh name) in SQLite or the session's PostgreSQL."""
    url = f"sqlite:///{tmp_path / 'audit.db'}" if kind == "sqlite" else pg_url
    return migrated(url, f"audit_{uuid.uuid4().hex[:10]}")


def migrated(url: str, table: str = "celery_publish_audit") -> Settings:
    engine = make_engine(url)
    try:
        upgrade(engine, table)
    finally:
        engine.dispose()
    return Settings.from_env(environ={}, audit_url=url, table_name=table)


def row(**fields: Any) -> dict[str, Any]:
    """A complete audit row, as the publish hook writes it, with ``fields`` overriding."""
    task_id = str(fields.pop("task_id", uuid.uuid4()))
    base: dict[str, Any] = {
        "publish_id": str(uuid.uuid4()),
        "task_id": task_id,
        "task_name": "tests.add",
        "attempt": 0,
        "queue": "q1",
        "exchange": "",
        "routing_key": fields.get("queue", "q1"),
        "published_at": ago(21),
        "payload": b'[[2, 3], {}, {"callbacks": null, "errbacks": null, "chain": null}]',
        "content_type": "application/json",
        "content_encoding": "utf-8",
        "payload_redacted": False,
        "options": {"serializer": "json"},
        "args_repr": "(2, 3)",
        "kwargs_repr": "{}",
        "publisher_host": "test-host",
        "publisher_pid": 4242,
        "trace_id": uuid.uuid4().hex,
        "span_id": uuid.uuid4().hex[:16],
    }
    return {**base, **fields}


def seed(settings: Settings, *rows: dict[str, Any]) -> list[dict[str, Any]]:
    """Insert complete rows (see :func:`row`) into the settings' audit table."""
    engine = make_engine(settings.audit_url)
    try:
        table = audit_table(settings.table_name)
        full = [{column.name: r.get(column.name) for column in table.columns} for r in rows]
        with engine.connect() as conn:
            conn.execute(insert(table), full)
    finally:
        engine.dispose()
    return list(rows)


def stored(settings: Settings, **where: Any) -> list[dict[str, Any]]:
    """Rows of the settings' table whose columns equal ``where``, oldest first."""
    engine = make_engine(settings.audit_url)
    try:
        table = Table(settings.table_name, MetaData(), autoload_with=engine)
        stmt = select(table).where(*(table.c[k] == v for k, v in where.items()))
        with engine.connect() as conn:
            found = [dict(r._mapping) for r in conn.execute(stmt.order_by(table.c.published_at))]
    finally:
        engine.dispose()
    return found


def cli(
    *args: str, settings: Settings | None = None, input: str | None = None, app_: Any = app
) -> Result:
    """``celery -A tests.app audit ARGS`` in this process (click's CliRunner)."""
    extra = ["--audit-url", settings.audit_url, "--table", settings.table_name] if settings else []
    with mock.patch.object(_db, "now_utc", return_value=NOW):
        return CliRunner().invoke(
            audit,
            [*args, *extra],
            obj=SimpleNamespace(app=app_),
            input=input,
            catch_exceptions=False,
        )


def _audit_command(
    args: tuple[str, ...], settings: Settings, env: dict[str, str] | None
) -> tuple[list[str], dict[str, str]]:
    """The argv and environment of ``celery -A tests.app audit ARGS`` on the settings' table."""
    full_env = {
        **os.environ,
        "PYTHONPATH": str(ROOT),
        "OCP_BROKER_URL": BROKER,
        "OTEL_CELERY_PUBLISH_AUDIT_URL": settings.audit_url,
        "OTEL_CELERY_PUBLISH_TABLE_NAME": settings.table_name,
        "OTEL_PYTHON_DISABLED_INSTRUMENTATIONS": "celery",
        **(env or {}),
    }
    return [str(BIN / "celery"), "-A", "tests.app", "audit", *args], full_env


def celery_audit_popen(
    *args: str, settings: Settings, env: dict[str, str] | None = None
) -> subprocess.Popen[str]:
    """``celery -A tests.app audit ARGS`` started as a real process (a long-running command)."""
    argv, full_env = _audit_command(args, settings, env)
    return subprocess.Popen(
        argv, env=full_env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )


def celery_audit(
    *args: str, settings: Settings, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    """``celery -A tests.app audit ARGS`` as a real subprocess through the entry point."""
    argv, full_env = _audit_command(args, settings, env)
    return subprocess.run(
        argv,
        env=full_env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def one_line_error(stderr: str, exit_code: int, expected: str) -> None:
    """The failure is one ``Error:`` line on stderr, exit code 1, and no traceback."""
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert exit_code == 1, (exit_code, stderr)
    assert len(lines) == 1 and lines[0].startswith("Error: "), stderr
    assert expected in lines[0], stderr


def schema(command: str) -> dict[str, Any]:
    """The JSON Schema documented for ``command`` in docs/audit.md."""
    text = DOCS.read_text()
    match = re.search(rf"<!-- schema: {command} -->\s*```json\n(.*?)```", text, re.S)
    assert match, f"no schema for {command} in {DOCS}"
    loaded: dict[str, Any] = json.loads(match.group(1))
    return loaded


def validated(command: str, output: str) -> Any:
    """``output`` parsed as JSON and validated against the documented schema of ``command``."""
    data = json.loads(output)
    jsonschema.Draft202012Validator.check_schema(schema(command))
    jsonschema.validate(data, schema(command), cls=jsonschema.Draft202012Validator)
    return data


def beat(settings: Settings, instance_id: str, **fields: Any) -> None:
    """A heartbeat row of worker instance ``instance_id`` (alive unless ``fields`` say so)."""
    engine = make_engine(settings.audit_url)
    values = {
        "instance_id": instance_id, "nodename": f"{instance_id}@host", "pid": 1,
        "started_at": ago(60), "heartbeat_at": NOW, "expires_at": NOW + dt.timedelta(minutes=1),
        "interval_s": 30.0, "stopped_at": None, **fields,
    }  # fmt: skip
    try:
        with engine.connect() as conn:
            conn.execute(insert(workers_table(settings.table_name)), [values])
    finally:
        engine.dispose()
