"""The commands' inputs: durations, ``--since``/``--until``, bounded values, the options every
command takes, and the settings they select. A value out of range is a ``click.BadParameter``
naming the option (exit code 2), never a traceback further down."""

from __future__ import annotations

import datetime as dt
import math
import re
from collections.abc import Callable
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
    be importable (not for ``migrate --sql``, which connects nowhere)."""
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
    """The Celery app of ``celery -A``, as celery's own subcommands read it."""
    return ctx.find_root().obj.app
