"""The ``audit`` commands' inputs: every value out of range is one ``Error:`` line naming the
option or variable (exit 2), a runtime failure one line with exit 1, never a traceback; values
within range still work."""

from __future__ import annotations

import datetime as dt
import json
import sys
import uuid
from pathlib import Path

import pytest

from otel_celery_publish.cli._options import parse_duration, parse_when, resolve_window
from otel_celery_publish.config import Settings
from tests.audit_support import (
    NOW,
    celery_audit,
    cli,
    migrated,
    one_line_error,
    row,
    seed,
    stored,
)


@pytest.fixture
def sqlite(tmp_path: Path) -> Settings:
    """A migrated SQLite audit table of this test's own."""
    return migrated(f"sqlite:///{tmp_path / 'audit.db'}", "audit_inputs")


def usage_error(result_stderr: str, exit_code: int, named: str) -> None:
    """A usage error: exit code 2, one ``Error:`` line naming ``named``, no traceback."""
    lines = [line for line in result_stderr.splitlines() if line.strip()]
    assert exit_code == 2, (exit_code, result_stderr)
    assert "Traceback" not in result_stderr, result_stderr
    assert len(lines) == 1 and lines[0].startswith("Error: "), result_stderr
    assert named in lines[0], result_stderr


FUTURE = (NOW + dt.timedelta(days=1)).isoformat()
BAD_OPTIONS = [
    (["lost", "--older-than", "inf"], "'--older-than'"),
    (["lost", "--older-than", "nan"], "'--older-than'"),
    (["lost", "--older-than", "-5"], "'--older-than'"),
    (["lost", "--older-than", "-1h"], "'--older-than'"),
    (["lost", "--older-than", "1e400"], "'--older-than'"),
    (["lost", "--older-than", "36526d"], "'--older-than'"),
    (["lost", "--older-than", "soon"], "'--older-than'"),
    (["lost", "--since", "3000000d"], "'--since'"),
    (["lost", "--since", "9" * 400 + "s"], "'--since'"),
    (["lost", "--since", FUTURE], "'--since'"),
    (["lost", "--since", "0001-01-01T00:00:00+01:00"], "'--since'"),
    (["lost", "--since", "1h", "--until", "2h"], "'--until'"),
    (["lost", "--since", "1h", "--until", "1h"], "'--until'"),
    (["lost", "--until", "nan"], "'--until'"),
    (["lost", "--limit", "0"], "'--limit'"),
    (["lost", "--limit", "10000001"], "'--limit'"),
    (["lost", "--limit", str(2**64)], "'--limit'"),
    (["lost", "--task", "x" * 256], "'--task'"),
    (["lost", "--queue", "q\x00"], "'--queue'"),
    (["lost", "--audit-url", "mysql://u:pw@db/audit"], "'--audit-url'"),
    (["lost", "--audit-url", "not a url"], "'--audit-url'"),
    (["lost", "--audit-url", ""], "'--audit-url'"),
    (["lost", "--table", "bad-name"], "'--table'"),
    (["lost", "--table", "t" * 44], "'--table'"),
    (["migrate", "--table", "t" * 44], "'--table'"),
    (["migrate", "--table", "x;drop"], "'--table'"),
    (["stats", "--since", FUTURE], "'--since'"),
    (["stats", "--since", "2h", "--until", "3h"], "'--until'"),
    (["stats", "--since", "100000w"], "'--since'"),
    (["stats", "--slowest", "-1"], "'--slowest'"),
    (["stats", "--slowest", "1001"], "'--slowest'"),
    (["replay", "--lost", "--rate", "1e-300", "--dry-run"], "'--rate'"),
    (["replay", "--lost", "--rate", "nan", "--dry-run"], "'--rate'"),
    (["replay", "--lost", "--rate", "inf", "--dry-run"], "'--rate'"),
    (["replay", "--lost", "--rate", "0", "--dry-run"], "'--rate'"),
    (["replay", "--lost", "--older-than", "inf", "--dry-run"], "'--older-than'"),
    (["replay", "--lost", "--since", FUTURE, "--dry-run"], "'--since'"),
    (["replay", "t-1", "--queue", ""], "'--queue'"),
    (["replay", "--dry-run"], "TASK_IDS or --lost"),
    (["prune", "--older-than", "inf", "--yes"], "'--older-than'"),
    (["prune", "--older-than", "3000000d", "--yes"], "'--older-than'"),
    (["prune", "--batch-size", "0", "--yes"], "'--batch-size'"),
    (["prune", "--batch-size", "1000000000000", "--yes"], "'--batch-size'"),
    (["show", "x" * 300], "'TASK_ID'"),
    (["migrate", "--sql", "--json"], "--sql"),
    (["lost", "--no-such-option"], "--no-such-option"),
]


@pytest.mark.parametrize(("args", "named"), BAD_OPTIONS)
def test_bad_option_is_a_one_line_usage_error(
    sqlite: Settings, args: list[str], named: str
) -> None:
    """An option value out of range: exit 2, one line naming the option, no traceback."""
    settings = None if {"--audit-url", "--table"} & set(args) else sqlite
    result = cli(*args, settings=settings)
    usage_error(result.stderr, result.exit_code, named)
    assert result.stdout == ""


BAD_VARIABLES = [
    ("DB_TIMEOUT", "0"),
    ("DB_TIMEOUT", "inf"),
    ("FLUSH_INTERVAL", "0"),
    ("USE_LINKS", "maybe"),
    ("MAX_PENDING", "-1"),
    ("SPOOL_DIR", "relative"),
    ("TRACE_URL", "http://j/{span_id}"),
    ("AUDIT_URL", "mysql://db/audit"),
    ("TABLE_NAME", "sqlite_master"),
]


@pytest.mark.parametrize(("name", "value"), BAD_VARIABLES)
def test_bad_variable_is_a_one_line_usage_error(
    monkeypatch: pytest.MonkeyPatch, name: str, value: str
) -> None:
    """A bad OTEL_CELERY_PUBLISH_* variable: exit 2, one line naming the variable."""
    monkeypatch.setenv(f"OTEL_CELERY_PUBLISH_{name}", value)
    # The variable itself must be the culprit: no --audit-url/--table overriding it.
    result = cli("lost")
    usage_error(result.stderr, result.exit_code, f"OTEL_CELERY_PUBLISH_{name} must be")


DOWN = "postgresql+psycopg://u@127.0.0.1:1/x"
RUNTIME_ERRORS = [
    (["stats"], {"audit_url": DOWN}, "127.0.0.1:1/x is unreachable"),
    (["lost"], {"audit_url": "sqlite:///{tmp}/nope.db"}, "nope.db does not exist"),
    (["show", "t-1"], {"table_name": "never_migrated"}, "'never_migrated' is not migrated"),
    (["lost", "--check-results"], {}, "needs a result backend"),
    (["lost"], {"audit_url": DOWN, "no_driver": True}, "the driver for postgresql+psycopg://u@"),
]


@pytest.mark.parametrize(("args", "where", "expected"), RUNTIME_ERRORS)
def test_runtime_errors_are_one_line_with_exit_code_1(
    sqlite: Settings,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    args: list[str],
    where: dict[str, object],
    expected: str,
) -> None:
    """Unreachable database, missing file, unmigrated table, no result backend, no driver:
    one ``Error:`` line, exit 1."""
    if where.get("no_driver"):
        monkeypatch.setitem(sys.modules, "psycopg", None)  # as if the extra were not installed
    url = str(where.get("audit_url", sqlite.audit_url)).format(tmp=tmp_path)
    table = str(where.get("table_name", sqlite.table_name))
    result = cli(*args, settings=Settings.from_env({}, audit_url=url, table_name=table))
    one_line_error(result.stderr, result.exit_code, expected)


def test_migrate_sql_needs_no_driver(monkeypatch: pytest.MonkeyPatch) -> None:
    """migrate --sql connects nowhere, so it works without the database driver installed."""
    monkeypatch.setitem(sys.modules, "psycopg", None)
    sql = cli("migrate", "--sql", settings=Settings.from_env({}, audit_url=DOWN))
    assert sql.exit_code == 0 and "CREATE TABLE" in sql.stdout, sql.stderr


# -- valid values ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "args",
    [
        ["lost", "--older-than", "0"],
        ["lost", "--older-than", "36525d", "--since", "36525d"],
        ["lost", "--since", NOW.isoformat(), "--limit", "1000000"],
        ["lost", "--since", "0001-01-01", "--until", "1s"],
        ["lost", "--task", "x" * 255, "--queue", "q1"],
        ["stats", "--since", "2h", "--until", "1h", "--slowest", "0"],
        ["stats", "--since", "1970-01-01T00:00:00Z", "--until", FUTURE, "--slowest", "1000"],
        ["replay", "--lost", "--rate", "0.001", "--dry-run"],
        ["replay", "--lost", "--rate", "100000", "--dry-run", "--limit", "1"],
        ["prune", "--older-than", "36525d", "--batch-size", "100000", "--yes"],
    ],
)
def test_values_within_range_work(sqlite: Settings, args: list[str]) -> None:
    """Bounds and ordinary values are accepted and the command succeeds."""
    result = cli(*args, settings=sqlite)
    assert result.exit_code == 0, result.stderr
    assert result.stderr == ""


def test_longest_table_name_migrates_on_postgresql(pg_url: str) -> None:
    """A 43-character table name (the longest accepted) really migrates on PostgreSQL."""
    name = "t" * 35 + uuid.uuid4().hex[:8]
    result = cli("migrate", "--json", "--audit-url", pg_url, "--table", name)
    assert result.exit_code == 0, result.stderr
    assert json.loads(result.stdout)["version_table"] == f"{name}_alembic_version"
    settings = Settings.from_env({}, audit_url=pg_url, table_name=name)
    assert cli("lost", settings=settings).stdout == "no lost tasks\n"


def test_bounded_lost_still_finds_what_it_should(sqlite: Settings) -> None:
    """With bounds at their limits, lost still reports a stuck task (the window is real)."""
    stuck = row(published_at=NOW - dt.timedelta(days=400))
    seed(sqlite, stuck)
    found = cli("lost", "--since", "36525d", "--older-than", "0", settings=sqlite)
    assert stuck["task_id"] in found.stdout and "1 lost task(s)" in found.stdout
    pruned = cli("prune", "--older-than", "365d", "--yes", settings=sqlite)
    assert pruned.exit_code == 0 and stored(sqlite) == []


def test_duration_and_time_parsers_bound_their_values() -> None:
    """Durations: finite, 0 to 100 years; ISO times come back in UTC; windows are ordered."""
    assert parse_duration("0") == dt.timedelta(0)
    assert parse_duration("36525d") == dt.timedelta(days=36525)
    assert parse_duration("1.5h") == dt.timedelta(minutes=90)
    assert parse_when("2024-01-01T01:00:00+01:00") == dt.datetime(
        2024, 1, 1, tzinfo=dt.timezone.utc
    )
    hour = dt.timedelta(hours=1)
    assert resolve_window(2 * hour, hour, NOW) == (NOW - 2 * hour, NOW - hour)
    assert resolve_window(NOW, None, NOW) == (NOW, None)


@pytest.mark.parametrize(
    ("args", "env", "named"),
    [
        (["lost", "--older-than", "inf"], {}, "'--older-than'"),
        (["stats"], {"OTEL_CELERY_PUBLISH_DB_TIMEOUT": "0"}, "OTEL_CELERY_PUBLISH_DB_TIMEOUT"),
        (["show", "t-1", "--audit-url", "mysql://u:pw@db/a"], {}, "'--audit-url'"),
    ],
)
def test_entry_point_usage_errors_are_one_line(
    sqlite: Settings, args: list[str], env: dict[str, str], named: str
) -> None:
    """Through ``celery -A tests.app audit``, a usage error is one line and exit code 2 too."""
    result = celery_audit(*args, settings=sqlite, env=env)
    usage_error(result.stderr, result.returncode, named)
    assert "pw@" not in result.stderr
