"""What the sink stores, and how it is written down: the :data:`Record` and its framing on disk.

A :data:`Record` is one write for the audit table: column -> value, always with ``publish_id``
(a whole publish row, or a lifecycle update merged into it; the typed contracts are in
:mod:`otel_celery_publish.rows`). Spool segments and quarantine files are sequences of framed
records.

A frame is ``<length:u32><crc32:u32><pickle>``, written with one ``write(2)``. A torn last frame
(killed mid-write: shorter than its length says) is skipped: its publish never reached the
broker. A bad CRC or an impossible length is damage (a power cut without ``spool_fsync``, a disk
error, tampering). Records are read back by an unpickler that knows only the types a row holds,
so a file can never run code, and each spooled one must then have the shape of an audit row
(:func:`check_row`), so it cannot stall shipping either. No length prefix is trusted beyond
:data:`MAX_RECORD`: reading a crafted file takes bounded memory.
"""

from __future__ import annotations

import datetime
import functools
import io
import os
import pickle
import struct
import zlib
from collections.abc import Callable, Iterator
from typing import Any, NamedTuple

from sqlalchemy import JSON, Boolean, DateTime, Float, Integer, LargeBinary, MetaData, String

from otel_celery_publish.schema.table import audit_table

#: One write for the audit table: column -> value, with ``publish_id``.
Record = dict[str, Any]
HEADER = struct.Struct("<II")
READ_CHUNK = 512 << 10  # per shipped batch: bounds the shipping thread's memory
# No row comes near this (payloads above max_payload_bytes, 1 MiB by default, are not stored);
# a length prefix beyond it is corruption, never a reason to allocate.
MAX_RECORD = 64 << 20
_ROW_TYPES = {
    ("datetime", "datetime"): datetime.datetime,
    ("datetime", "timezone"): datetime.timezone,
    ("datetime", "timedelta"): datetime.timedelta,
}
# Bounds of the JSON ``options`` value: a pickle can share one list a million times over.
_JSON_MAX_DEPTH = 32
_JSON_MAX_NODES = 100_000


class CorruptRecord(ValueError):
    """A complete record (length and CRC match) that is not an audit row."""


# -- framing -------------------------------------------------------------------------------


class _RowUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        try:
            return _ROW_TYPES[module, name]
        except KeyError:
            raise pickle.UnpicklingError(f"{module}.{name} is not part of an audit row") from None


def encode(row: Record) -> bytes:
    """One framed record; ``ValueError`` beyond :data:`MAX_RECORD` (we never write what we
    would refuse to read)."""
    data = pickle.dumps(row, protocol=pickle.HIGHEST_PROTOCOL)
    if len(data) > MAX_RECORD:
        raise ValueError(
            f"audit record {row.get('publish_id')} takes {len(data)} bytes, more than the "
            f"spool's {MAX_RECORD}-byte record limit"
        )
    return HEADER.pack(len(data), zlib.crc32(data)) + data


class Decoded(NamedTuple):
    """What :func:`decode` found at the start of a chunk."""

    rows: list[Record]
    used: int  # bytes of the complete records read (rows and refused ones)
    refused: list[str]  # why each complete record that is not an audit row was skipped
    corrupt: str | None  # why nothing at ``used`` can be read (broken framing), if so


def decode(chunk: bytes, check: Callable[[Any], None] | None = None) -> Decoded:
    """The complete records at the start of ``chunk``; never raises.

    A record that is complete but does not unpickle, or that ``check`` (e.g. :func:`check_row`)
    refuses with :class:`CorruptRecord`, is skipped (its framing is intact, so the next one can
    still be read) and listed in ``refused``. Reading stops at an incomplete record (more bytes
    may follow, or it is a torn tail) and at a broken frame (``corrupt``).
    """
    rows: list[Record] = []
    refused: list[str] = []
    pos = 0
    while pos + HEADER.size <= len(chunk):
        length, crc = HEADER.unpack_from(chunk, pos)
        if not 0 < length <= MAX_RECORD:
            return Decoded(rows, pos, refused, f"a record length of {length} bytes")
        end = pos + HEADER.size + length
        if end > len(chunk):
            break
        data = chunk[pos + HEADER.size : end]
        if zlib.crc32(data) != crc:
            return Decoded(rows, pos, refused, "a record whose CRC does not match")
        try:
            record = load(data)
            if check is not None:
                check(record)
            rows.append(record)
        except CorruptRecord as exc:
            refused.append(str(exc))
        pos = end
    return Decoded(rows, pos, refused, None)


def load(data: bytes) -> Any:
    """Unpickle one record with the row-types-only unpickler, else :class:`CorruptRecord`."""
    try:
        return _RowUnpickler(io.BytesIO(data)).load()
    except Exception as exc:
        raise CorruptRecord(f"not a pickled audit record ({_short(exc)})") from None


def _short(exc: BaseException) -> str:
    text = f"{type(exc).__name__}: {exc}"
    return text if len(text) <= 200 else text[:197] + "..."


# -- the row shape -------------------------------------------------------------------------

_Check = Callable[[Any], bool]


@functools.cache
def _column_checks() -> dict[str, tuple[_Check, bool]]:
    """Column name -> (value check, None allowed), from the audit table's definition."""
    checks: dict[str, tuple[_Check, bool]] = {}
    for column in audit_table("spool_shape", MetaData()).columns:
        kind = column.type
        check: _Check
        if isinstance(kind, JSON):
            check = _json_ok
        elif isinstance(kind, Boolean):
            check = _is(bool)
        elif isinstance(kind, Integer):
            check = _is(int)
        elif isinstance(kind, Float):
            check = _number
        elif isinstance(kind, DateTime):
            check = _datetime
        elif isinstance(kind, LargeBinary):
            check = _is(bytes)
        elif isinstance(kind, String):  # Text too
            check = _is(str)
        else:  # a column type added without a rule here: plain values only
            check = _is(str, int, float, bool, bytes, datetime.datetime)
        checks[column.name] = (check, bool(column.nullable) and not column.primary_key)
    return checks


def _is(*types: type) -> _Check:
    return lambda value: type(value) in types


def _number(value: Any) -> bool:
    return type(value) in (int, float)


def _datetime(value: Any) -> bool:
    return type(value) is datetime.datetime and type(value.tzinfo) in (
        type(None),
        datetime.timezone,
    )


def _json_ok(value: Any) -> bool:
    """Plain JSON data (what ``rows.storable`` produces), bounded in depth and size (the
    values themselves are the database's business: see :mod:`.quarantine`)."""
    budget = [_JSON_MAX_NODES]

    def ok(item: Any, depth: int) -> bool:
        budget[0] -= 1
        if budget[0] < 0 or depth > _JSON_MAX_DEPTH:
            return False
        kind = type(item)
        if item is None or kind in (bool, int, float, str):
            return True
        if kind in (list, tuple):
            return all(ok(v, depth + 1) for v in item)
        if kind is dict:
            return all(type(k) is str and ok(v, depth + 1) for k, v in item.items())
        return False

    return ok(value, 0)


def check_row(row: Any) -> None:
    """Raise :class:`CorruptRecord` unless ``row`` is a dict of audit columns with values of
    their types (None where the column allows it) and a ``publish_id``.

    Types only: a value the database refuses (a NUL byte, too long for its column) is the
    writer's to repair or quarantine. This keeps out what no database write could make sense
    of, which would otherwise fail every batch it is in.
    """
    if type(row) is not dict:
        raise CorruptRecord(f"a {type(row).__name__}, not a row")
    if type(row.get("publish_id")) is not str or not row["publish_id"]:
        raise CorruptRecord("a row without a publish_id")
    checks = _column_checks()
    for key, value in row.items():
        rule = checks.get(key) if type(key) is str else None
        if rule is None:
            raise CorruptRecord(f"{_shown(key)} is not a column of the audit table")
        check, nullable = rule
        if not ((value is None and nullable) or (value is not None and check(value))):
            raise CorruptRecord(f"column {key} cannot hold a {type(value).__name__}")


def _shown(value: Any) -> str:
    text = repr(value) if type(value) in (str, int, float, bytes) else type(value).__name__
    return text if len(text) <= 80 else text[:77] + "..."


# -- reading files -------------------------------------------------------------------------


def scan(
    fd: int, start: int, end: int, check: Callable[[Any], None] | None = None
) -> Iterator[tuple[Decoded, int]]:
    """The records of ``fd[start:end]`` in batches (see :func:`decode`): ``(batch, offset
    after it)``.

    Stops at an incomplete record (a torn tail, when it is the last) and at broken framing
    (``batch.corrupt``); the caller compares the last offset with ``end``. Memory is bounded by
    :data:`READ_CHUNK`, or by one record of at most :data:`MAX_RECORD`.
    """
    pos = start
    while pos < end:
        chunk = os.pread(fd, min(end - pos, READ_CHUNK), pos)
        batch = decode(chunk, check)
        if not batch.used and batch.corrupt is None and len(chunk) >= HEADER.size:
            # One record bigger than a chunk (decode checked its length): read exactly it.
            length = HEADER.unpack_from(chunk)[0]
            if pos + HEADER.size + length <= end:
                batch = decode(os.pread(fd, HEADER.size + length, pos), check)
        pos += batch.used
        yield batch, pos
        if not batch.used or batch.corrupt is not None:
            return


def read_batches(fd: int, start: int, end: int) -> Iterator[tuple[list[Any], int]]:
    """The records of ``fd[start:end]`` that unpickle, in batches: ``(records, offset after
    them)``, for files in the spool's framing that do not hold rows (the quarantine); stops
    like :func:`scan`."""
    for batch, offset in scan(fd, start, end):
        yield batch.rows, offset
