"""The commands' inputs: durations, ``--since``/``--until``, bounded values, the options every
command takes, the settings they select and the Celery app they act through. A value out of
range is a ``click.BadParameter`` naming the option (exit code 2), never a traceback further
down.

The app of ``celery -A`` is loaded here, once per command and before any setting is resolved:
its task modules imported as a worker imports them (:func:`app_of`).
"""

from __future__ import annotations

import contextlib
import datetime as dt
import logging
import math
import re
from collections.abc import Callable, Iterator
from types import TracebackType
from typing import Any, TypeVar

import click

from otel_celery_publish import audit as api
from otel_celery_publish.audit import _db
from otel_celery_publish.cli._output import UTC, utc_time
from otel_celery_publish.config import Settings, SettingsError

F = TypeVar("F", bound=Callable[..., Any])
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}
_DURATION = re.compile(r"(\d+(?:\.\d+)?)([smhdw])")
# Longer durations reach before the year 1 of a datetime (OverflowError), and a typo such as
# 3000000d is then a clear usage error rather than a traceback.
MAX_DURATION = dt.timedelta(days=36525)
DURATION_HELP = "a duration from 0 to 100 years, like 90s, 10m, 1h30m, 30d, 2w (bare: seconds)"
# Bounds of the counting options: past them a query holds the table or the memory too long.
MAX_LIMIT = 1_000_000
MAX_SLOWEST = 1000
MAX_BATCH_SIZE = 100_000
MIN_RATE, MAX_RATE = 0.001, 100_000.0
MAX_NAME = 255  # the audit table's task id, task name and queue columns


def parse_duration(text: str) -> dt.timedelta:
    """``90s``, ``10m``, ``1h30m``, ``30d``, ``2w``; a bare number is seconds; 0 to 100 years."""
    text = text.strip().lower()
    try:
        seconds = float(text)
    except ValueError:
        parts = _DURATION.findall(text)
        if not parts or "".join(n + u for n, u in parts) != text:
            raise click.BadParameter(f"{text!r} is not {DURATION_HELP}") from None
        seconds = sum(float(n) * _UNITS[u] for n, u in parts)
    if not (math.isfinite(seconds) and 0 <= seconds <= MAX_DURATION.total_seconds()):
        raise click.BadParameter(f"{text!r} is not {DURATION_HELP}")
    return dt.timedelta(seconds=seconds)


def parse_when(text: str) -> dt.datetime | dt.timedelta:
    """A time: ISO-8601 (naive means UTC; returned in UTC), or a duration meaning that long ago."""
    try:
        parsed = dt.datetime.fromisoformat(text.strip().replace("Z", "+00:00"))
    except ValueError:
        return parse_duration(text)
    try:
        return parsed.replace(tzinfo=UTC) if parsed.tzinfo is None else parsed.astimezone(UTC)
    except OverflowError:  # e.g. 0001-01-01T00:00+01:00 is before the year 1 in UTC
        raise click.BadParameter(f"{text.strip()!r} is out of range in UTC") from None


def resolve_window(
    since: dt.datetime | dt.timedelta,
    until: dt.datetime | dt.timedelta | None,
    now: dt.datetime,
) -> tuple[dt.datetime, dt.datetime | None]:
    """``--since``/``--until`` as times (a duration is that long before ``now``): ``since`` not
    in the future, ``until`` after ``since``; else a usage error naming the option."""
    start = now - since if isinstance(since, dt.timedelta) else since
    end = now - until if isinstance(until, dt.timedelta) else until
    if start > now:
        raise click.BadParameter(f"{utc_time(start)} is in the future", param_hint="'--since'")
    if end is not None and end <= start:
        raise click.BadParameter(
            f"{utc_time(end)} is not after --since ({utc_time(start)})", param_hint="'--until'"
        )
    return start, end


def as_duration(_ctx: click.Context, _param: click.Parameter, value: str | None) -> Any:
    """Option callback: :func:`parse_duration`."""
    return None if value is None else parse_duration(value)


def as_when(_ctx: click.Context, _param: click.Parameter, value: str | None) -> Any:
    """Option callback: :func:`parse_when`."""
    return None if value is None else parse_when(value)


def as_names(_ctx: click.Context, param: click.Parameter, value: Any) -> Any:
    """A task id, task name glob or queue (or a tuple of them): 1 to 255 printable characters."""
    for text in value if isinstance(value, tuple) else () if value is None else (value,):
        if not text or len(text) > MAX_NAME or not text.isprintable():
            raise click.BadParameter(
                f"{_short(text)} is not 1 to {MAX_NAME} printable characters", param=param
            )
    return value


def _short(text: str, width: int = 40) -> str:
    shown = repr(text)
    return shown if len(shown) <= width else shown[: width - 4] + "...'"


class FiniteRange(click.FloatRange):
    """A FloatRange that also refuses ``nan`` (which compares false with both bounds)."""

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        number = super().convert(value, param, ctx)
        if not math.isfinite(number):
            self.fail(f"{value!r} is not a finite number", param, ctx)
        return number


def common_options(func: F) -> F:
    """``--audit-url``, ``--table`` (see :func:`settings_from`) and ``--json``."""
    options = [
        click.option(
            "--audit-url", help="SQLAlchemy URL of the audit database (postgresql or sqlite)."
        ),
        click.option("--table", help="Audit table name."),
        click.option("--json", "as_json", is_flag=True, help="JSON output (docs/audit.md)."),
    ]
    for option in reversed(options):
        func = option(func)
    return func


_OPTIONS = {"audit_url": "'--audit-url'", "table_name": "'--table'"}


def settings_from(audit_url: str | None, table: str | None, *, driver: bool = True) -> Settings:
    """The environment's settings with the options applied. A bad option is a usage error
    naming it, a bad variable one naming the variable; ``driver``: the database driver must
    be importable (not for ``migrate --sql``, which connects nowhere).

    Resolved after the app is loaded (:func:`app_of`; a command that needs no task only warns
    when that fails), because a Django project's settings, configured only then, may give
    the audit URL.
    """
    ctx = click.get_current_context(silent=True)
    if ctx is not None:
        _load_app(ctx, required=False)
    try:
        settings = Settings.from_env(audit_url=audit_url, table_name=table)
    except SettingsError as exc:
        if exc.source.startswith("keyword ") and exc.field in _OPTIONS:
            raise click.BadParameter(exc.problem, param_hint=_OPTIONS[exc.field]) from None
        raise
    if driver:
        from sqlalchemy.engine import make_url  # noqa: PLC0415 - the CLI's own check

        try:
            make_url(settings.audit_url).get_dialect().import_dbapi()
        except ImportError as exc:
            raise api.AuditError(
                f"the driver for {_db.safe_url(settings.audit_url)} is not installed: {exc}"
            ) from None
    return settings


def now() -> dt.datetime:
    """The read side's clock, which tests pin (looked up on each call for that reason)."""
    return _db.now_utc()


def app_of(ctx: click.Context) -> Any:
    """The Celery app of ``celery -A`` (as celery's own subcommands read it), loaded as a
    worker loads it: for the commands that need its tasks or its result backend.

    ``celery -A proj`` only imports the module that defines the app. A worker also imports
    the app's task modules (``include=``, the ``imports`` setting, ``autodiscover_tasks``),
    and for a Django project sets Django up first (Celery's Django fixup runs
    ``django.setup()`` on ``import_modules``), before it needs ``app.tasks`` or a result
    backend such as django-db: ``app.loader.import_default_modules()`` then finalizing the
    app, as ``celery beat`` and ``celery shell`` do. A task module that fails to import is an
    :class:`~otel_celery_publish.audit.AuditError` naming it (one ``Error:`` line, exit 1).
    """
    return _load_app(ctx, required=True)


_LOADED = "otel_celery_publish.app_loaded"
# Celery logs a failing import_modules receiver (an autodiscovered module) with its traceback
# before the loader re-raises it; the command reports it in one line instead.
_SIGNAL_LOGGER = "celery.utils.dispatch.signal"


def _load_app(ctx: click.Context, *, required: bool) -> Any:
    """The app, its task modules imported once per command (``ctx.meta`` is shared by the
    command's contexts). ``required=False``: a failure only warns, once, on stderr: the
    commands that read only the audit table must work while a task module is broken."""
    root = ctx.find_root()
    app = getattr(root.obj, "app", None)
    # ``celery`` without ``-A`` (or ``CELERY_APP``) still hands us an app: Celery's default one
    # (``CLIContext``: ``app or get_current_app()``), whose broker is amqp://localhost and which
    # knows none of the project's tasks. Only the ``-A`` value says whether a project app was
    # named; a root without that parameter is the group invoked on its own (its ``obj`` says).
    named = root.params.get("app", app)
    if app is None or not named:
        if required:
            raise api.AuditError("this command needs the Celery app: celery -A proj audit ...")
        return None
    state = ctx.meta.get(_LOADED)
    if state is None:
        try:
            with _quiet(_SIGNAL_LOGGER):
                app.loader.import_default_modules()
                app.finalize()
        except Exception as exc:  # whatever a task module raises on import
            state = api.AuditError(_load_failure(app, exc))
        else:
            state = True
        ctx.meta[_LOADED] = state
        if isinstance(state, api.AuditError) and not required:
            click.echo(f"Warning: {state} (this command reads only the audit table)", err=True)
    if isinstance(state, api.AuditError) and required:
        raise state
    return app


@contextlib.contextmanager
def _quiet(name: str) -> Iterator[None]:
    logger = logging.getLogger(name)
    disabled, logger.disabled = logger.disabled, True
    try:
        yield
    finally:
        logger.disabled = disabled


def _load_failure(app: Any, exc: BaseException) -> str:
    """``cannot load the task modules of app 'proj': proj.orders.tasks: ImportError: ...``."""
    where = _failed_module(exc.__traceback__)
    if where is None and isinstance(exc, SyntaxError) and exc.filename:
        where = f"{exc.filename}, line {exc.lineno}"
    return (
        f"cannot load the task modules of Celery app {getattr(app, 'main', None)!r}: "
        f"{f'{where}: ' if where else ''}{type(exc).__name__}: {_db.first_line(exc)}"
    )


def _failed_module(tb: TracebackType | None) -> str | None:
    """The outermost module whose body was running when the import failed: the task module
    (or the module of a Django app) Celery was importing, not the dependency it lacked."""
    while tb is not None:
        if tb.tb_frame.f_code.co_name == "<module>":
            name = tb.tb_frame.f_globals.get("__name__")
            return str(name) if name else None
        tb = tb.tb_next
    return None
