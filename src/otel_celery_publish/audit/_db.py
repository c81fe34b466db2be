"""The read side's access to the audit database: errors, the clock, one table per API call.

* :class:`AuditError` and its subclasses: what an operator can act on, in one line;
* :func:`open_db` -> :class:`TableAccess`: the audit table of some settings, its schema checked,
  every statement run untraced with driver errors turned into :class:`AuditError`;
* :func:`now_utc`: the one clock every default "now" of the API and the CLI is read from;
* small helpers the operations share (:func:`utc`, :func:`filters`, :func:`first_line`...).
"""

from __future__ import annotations

import contextlib
import datetime as dt
import os
from collections.abc import Iterator, Sequence
from typing import Any

from opentelemetry.instrumentation.utils import suppress_instrumentation
from sqlalchemy import ColumnElement, Connection, Engine, Executable, Row, Table
from sqlalchemy.engine import make_url
from sqlalchemy.exc import DBAPIError

from otel_celery_publish.config import Settings
from otel_celery_publish.schema import migrate
from otel_celery_publish.schema.table import audit_table
from otel_celery_publish.sink.database import make_engine

UTC = dt.timezone.utc


class AuditError(Exception):
    """A failure an operator can act on, said in one line (the CLI prints no traceback)."""


class DatabaseUnavailable(AuditError):
    """The audit database cannot be reached."""


class SchemaNotMigrated(AuditError):
    """The audit table is missing or at another revision than this package expects."""


class UnknownTask(AuditError):
    """No audit row has the asked-for task id."""


def now_utc() -> dt.datetime:
    """The read side's clock: every default "now" of the API and the CLI is read from here.

    Call it as ``_db.now_utc()`` (never import the function itself), so that a test can pin it
    in one place for every reader.
    """
    return dt.datetime.now(UTC)


def utc(value: dt.datetime | None) -> dt.datetime | None:
    """Aware UTC: SQLite hands back naive UTC, PostgreSQL the session's time zone."""
    if value is None:
        return None
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


def first_line(exc: BaseException) -> str:
    """The driver's message without SQLAlchemy's SQL echo and background link."""
    inner = getattr(exc, "orig", None) or exc
    text = str(inner).strip().splitlines()
    return text[0] if text else type(inner).__name__


def safe_url(url: str) -> str:
    """``url`` without its password, for messages."""
    return make_url(url).render_as_string(hide_password=True)


@contextlib.contextmanager
def db_errors(url: str) -> Iterator[None]:
    """Our database calls, untraced, with driver errors as one-line :class:`AuditError`."""
    with suppress_instrumentation():
        try:
            yield
        except DBAPIError as exc:
            # Refused, unknown host, missing file: raised before any statement ran.
            if exc.connection_invalidated or exc.statement is None:
                raise DatabaseUnavailable(
                    f"audit database {safe_url(url)} is unreachable: {first_line(exc)}"
                ) from None
            raise AuditError(f"audit database error: {first_line(exc)}") from None


class TableAccess:
    """One audit table (and its database) for the duration of one API call.

    Not the sink's :class:`~otel_celery_publish.sink.database.Database` (the writer's engine
    and prepared statements): this one runs the read side's statements, one short connection
    each, and says what went wrong in one line.
    """

    def __init__(self, settings: Settings, engine: Engine) -> None:
        self.settings = settings
        self.engine = engine
        self.table = audit_table(settings.table_name)
        self.dialect = engine.dialect.name

    def rows(self, stmt: Executable) -> Sequence[Row[Any]]:
        with self.connection() as conn:
            return conn.execute(stmt).all()

    def run(self, stmt: Executable) -> int:
        """Execute a write; its row count. Each call commits on its own (autocommit engine)."""
        with self.connection() as conn:
            return conn.execute(stmt).rowcount

    def errors(self) -> contextlib.AbstractContextManager[None]:
        return db_errors(self.settings.audit_url)

    @contextlib.contextmanager
    def connection(self) -> Iterator[Connection]:
        with self.errors(), self.engine.connect() as conn:
            yield conn

    def check_schema(self) -> None:
        """Fail with a one-line hint unless the table is at the revision this package expects."""
        with self.connection() as conn:
            revision = migrate.current(conn, self.table.name)
        if revision == migrate.HEAD:
            return
        hint = "run `celery -A <app> audit migrate`"
        if revision is None:
            raise SchemaNotMigrated(f"audit table {self.table.name!r} is not migrated: {hint}")
        raise SchemaNotMigrated(
            f"audit table {self.table.name!r} is at revision {revision}, this version of "
            f"otel-celery-publish needs {migrate.HEAD}: {hint} (or upgrade the package)"
        )


@contextlib.contextmanager
def open_db(settings: Settings | None, *, migrated: bool = True) -> Iterator[TableAccess]:
    """The audit table of ``settings`` (default: the environment), schema checked."""
    settings = settings or Settings.from_env()
    url = make_url(settings.audit_url)
    path = url.database or ":memory:"
    # SQLite would silently create an empty file for a mistyped path.
    sqlite_file = url.get_backend_name() == "sqlite" and path != ":memory:"
    if migrated and sqlite_file and not os.path.exists(path):
        raise DatabaseUnavailable(f"audit database file {path} does not exist")
    try:
        engine = make_engine(settings.audit_url, settings.db_timeout)
    except ValueError as exc:
        raise AuditError(str(exc)) from None
    try:
        db = TableAccess(settings, engine)
        if migrated:
            db.check_schema()
        yield db
    finally:
        engine.dispose()


def glob_to_like(pattern: str) -> str:
    """A shell glob (``*``, ``?``) as a LIKE pattern with backslash escapes."""
    escaped = pattern.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
    return escaped.replace("*", "%").replace("?", "_")


def filters(table: Table, task: str | None, queue: str | None) -> list[ColumnElement[bool]]:
    """Task-name glob and exact queue filters shared by ``lost`` and ``stats``."""
    out: list[ColumnElement[bool]] = []
    if task:
        out.append(table.c.task_name.like(glob_to_like(task), escape="\\"))
    if queue:
        out.append(table.c.queue == queue)
    return out
