"""What the commands print: aligned text tables, and the documented JSON (docs/audit.md) with
``--json``. Times print in UTC, with milliseconds."""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
from collections.abc import Iterable, Sequence
from typing import Any

import click

UTC = dt.timezone.utc


def to_json(value: Any) -> Any:
    """Dataclasses as objects, times as ISO-8601 UTC strings, everything else as JSON has it."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: to_json(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, dict):
        return {str(k): to_json(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [to_json(v) for v in value]
    if isinstance(value, dt.datetime):
        aware = value if value.tzinfo else value.replace(tzinfo=UTC)
        return aware.astimezone(UTC).isoformat()
    return value


def print_json(value: Any) -> None:
    click.echo(json.dumps(to_json(value), indent=2))


def utc_time(value: dt.datetime | None) -> str | None:
    """``2024-05-01 12:00:00.000`` in UTC (None stays None)."""
    # isoformat, not strftime: %Y does not pad the years before 1000.
    utc = None if value is None else value.astimezone(UTC).replace(tzinfo=None)
    return None if utc is None else utc.isoformat(" ", "milliseconds")


def clip(text: str | None, width: int = 40) -> str | None:
    return text if text is None or len(text) <= width else text[: width - 1] + "…"


def print_table(headers: Sequence[str], rows: Iterable[Sequence[Any]], err: bool = False) -> None:
    """Columns as wide as their widest cell; None prints as nothing; no rows, no output."""
    cells = [["" if v is None else str(v) for v in row] for row in rows]
    if not cells:
        return
    widths = [max(len(h), *(len(row[i]) for row in cells)) for i, h in enumerate(headers)]
    for row in [list(headers), *cells]:
        click.echo(
            "  ".join(v.ljust(w) for v, w in zip(row, widths, strict=True)).rstrip(), err=err
        )
