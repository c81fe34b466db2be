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

import contextlib
import datetime
import functools
import io
import os
import pickle
import queue
import struct
import threading
import zlib
from collections.abc import Callable, Generator, Iterator
from typing import Any, NamedTuple, TypeVar

from sqlalchemy import JSON, Boolean, DateTime, Float, Integer, LargeBinary, MetaData, String

from otel_celery_publish.schema.table import audit_table

#: One write for the audit table: column -> value, with ``publish_id``.
Record = dict[str, Any]
_T = TypeVar("_T")
HEADER = struct.Struct("<II")
READ_CHUNK = 512 << 10  # one read of a spool file
# Records per shipped batch (one COPY and one transaction), in bytes of spool file: spreads a
# batch's fixed costs (a commit, a round trip per statement) over thousands of rows, and a
# publish's later updates (its "sent") found in the same batch are merged into its row before it
# is written. It bounds the shipper's memory: a drain peaks ~40 MiB above an idle process (a
# batch shipped, one being decoded, in Python objects); measured 8 MiB: +200 MiB for ~10% more.
BATCH_BYTES = 2 << 20
# A batch ends early after this many refused records (a crafted file): their reasons take memory.
MAX_REFUSED = 1000
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
    would refuse to read).

    A timestamp column's aware UTC datetime is written as microseconds since the epoch, an
    int (:func:`load` turns it back, exactly): pickling a datetime and its timezone costs the
    publish four times as much, and unpickling it twice as much.
    """
    frame = row
    for name in _shape().stamps & row.keys():  # the few a record has, found in C
        value = row[name]
        if type(value) is datetime.datetime and value.tzinfo is _UTC:
            if frame is row:
                frame = dict(row)  # the caller's row is never changed
            frame[name] = (value - _EPOCH) // _MICROSECOND
    data = pickle.dumps(frame, protocol=pickle.HIGHEST_PROTOCOL)
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


def decode(chunk: bytes, read: Callable[[bytes], Any] | None = None) -> Decoded:
    """The complete records at the start of ``chunk``, each read by ``read`` (:func:`load`, or
    :func:`load_row` for audit rows); never raises.

    A record that is complete but that ``read`` refuses with :class:`CorruptRecord` (it does
    not unpickle, or is not an audit row) is skipped (its framing is intact, so the next one can
    still be read) and listed in ``refused``. Reading stops at an incomplete record (more bytes
    may follow, or it is a torn tail) and at a broken frame (``corrupt``).
    """
    read = load if read is None else read
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
            rows.append(read(data))
        except CorruptRecord as exc:
            refused.append(str(exc))
        pos = end
    return Decoded(rows, pos, refused, None)


def load(data: bytes) -> Any:
    """Unpickle one record with the row-types-only unpickler, else :class:`CorruptRecord`; a
    timestamp column's microseconds (see :func:`encode`) become an aware UTC datetime again
    (records written as datetimes, by an earlier version, are read as they are)."""
    record = _unpickle(data)
    if type(record) is dict:
        for name in _shape().stamps.intersection(record):
            value = record[name]
            if type(value) is int:
                record[name] = _from_micros(value)
    return record


def load_row(data: bytes) -> Record:
    """:func:`load` and :func:`check_row` in one, for draining (every record of a spool passes
    here): the row's shape (its columns and the types of its values, in order) says once which
    timestamps are framed as microseconds and which values need a further look."""
    row = _unpickle(data)
    stamps = _check(row, framed=True)
    for name in stamps:
        row[name] = _from_micros(row[name])
    return row  # type: ignore[no-any-return]


def _unpickle(data: bytes) -> Any:
    try:
        return _RowUnpickler(io.BytesIO(data)).load()
    except Exception as exc:
        raise CorruptRecord(f"not a pickled audit record ({_short(exc)})") from None


def _from_micros(value: int) -> datetime.datetime:
    try:
        return _EPOCH + _MICROSECOND * value
    except OverflowError:
        # Not the value: a crafted int may have more digits than str() will write.
        raise CorruptRecord("a timestamp beyond the years a datetime holds") from None


def _short(exc: BaseException) -> str:
    text = f"{type(exc).__name__}: {exc}"
    return text if len(text) <= 200 else text[:197] + "..."


# -- the row shape -------------------------------------------------------------------------

_NONE = type(None)
_JSON_SCALARS = frozenset({_NONE, bool, int, float, str})
_JSON_TYPES = _JSON_SCALARS | {list, tuple, dict}
_STR = frozenset({str})
_TZ_TYPES = frozenset({_NONE, datetime.timezone})
_UTC = datetime.timezone.utc
_EPOCH = datetime.datetime(1970, 1, 1, tzinfo=_UTC)
_MICROSECOND = datetime.timedelta(microseconds=1)
# Row shapes (columns and value types, in order) found to be audit rows -> their timestamps
# framed as microseconds, and their columns that need a further look; bounded, so a crafted
# file cannot grow it.
_KNOWN: dict[tuple[tuple[str, ...], tuple[type, ...]], tuple[tuple[str, ...], ...]] = {}
_MAX_KNOWN = 256


class _Shape(NamedTuple):
    """What :func:`check_row` needs of the audit table, from its definition."""

    types: dict[str, frozenset[type]]  # column -> the types of its values (NoneType: nullable)
    stamps: frozenset[str]  # DateTime columns: their tzinfo is checked too
    documents: tuple[str, ...]  # JSON columns: their content is checked too


@functools.cache
def _shape() -> _Shape:
    types: dict[str, frozenset[type]] = {}
    stamps: list[str] = []
    documents: list[str] = []
    for column in audit_table("spool_shape", MetaData()).columns:
        kind = column.type
        allowed: set[type]
        if isinstance(kind, JSON):
            allowed = set(_JSON_TYPES - {_NONE})
            documents.append(column.name)
        elif isinstance(kind, Boolean):
            allowed = {bool}
        elif isinstance(kind, Integer):
            allowed = {int}
        elif isinstance(kind, Float):
            allowed = {int, float}
        elif isinstance(kind, DateTime):
            allowed = {datetime.datetime}
            stamps.append(column.name)
        elif isinstance(kind, LargeBinary):
            allowed = {bytes}
        elif isinstance(kind, String):  # Text too
            allowed = {str}
        else:  # a column type added without a rule here: plain values only
            allowed = {str, int, float, bool, bytes, datetime.datetime}
        if column.nullable and not column.primary_key:
            allowed.add(_NONE)
        types[column.name] = frozenset(allowed)
    return _Shape(types, frozenset(stamps), tuple(documents))


def _json_ok(value: Any) -> bool:
    """Plain JSON data (what ``rows.storable`` produces), bounded in depth and size (the
    values themselves are the database's business: see :mod:`.quarantine`)."""
    if (
        type(value) is dict
        and len(value) < _JSON_MAX_NODES
        and _STR.issuperset(map(type, value))
        and _JSON_SCALARS.issuperset(map(type, value.values()))
    ):
        return True  # the common case, one flat object: checked without a call per value
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
    of, which would otherwise fail every batch it is in. Every record of a drain passes here
    (:func:`load_row`), so the shape of a row (its columns and the types of its values, in
    order) is checked once, then only looked up; timestamps and JSON are checked in every row.
    """
    _check(row, framed=False)


def _check(row: Any, *, framed: bool) -> tuple[str, ...]:
    """:func:`check_row`; with ``framed`` (a record as :func:`encode` frames it) a timestamp
    column may hold an int of microseconds: those columns are returned, to be converted."""
    if type(row) is not dict:
        raise CorruptRecord(f"a {type(row).__name__}, not a row")
    shape = (tuple(row), tuple(map(type, row.values())))
    plan = _KNOWN.get(shape)
    if plan is None:
        plan = _plan(row)
        if len(_KNOWN) < _MAX_KNOWN:
            _KNOWN[shape] = plan
    micros, further = plan
    if micros and not framed:
        raise CorruptRecord(f"column {micros[0]} cannot hold a int")
    if not row["publish_id"]:
        raise CorruptRecord("a row without a publish_id")
    for name in further:
        value = row[name]
        if type(value) is datetime.datetime:
            if type(value.tzinfo) not in _TZ_TYPES:
                raise CorruptRecord(f"column {name} cannot hold a {type(value).__name__}")
        elif not _json_ok(value):
            raise CorruptRecord(f"column {name} cannot hold a {type(value).__name__}")
    return micros


def _plan(row: Record) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """Raise unless each value of ``row`` has a type its column takes (a timestamp may be
    framed as an int); return the timestamp columns holding ints, and the columns whose values
    need a further look (datetimes, JSON)."""
    if type(row.get("publish_id")) is not str:
        raise CorruptRecord("a row without a publish_id")
    shape = _shape()
    micros = []
    further = []
    for key, value in row.items():
        allowed = shape.types.get(key) if type(key) is str else None
        if allowed is None:
            raise CorruptRecord(f"{_shown(key)} is not a column of the audit table")
        if type(value) is int and key in shape.stamps:
            micros.append(key)
        elif type(value) not in allowed:
            raise CorruptRecord(f"column {key} cannot hold a {type(value).__name__}")
        elif value is not None and (key in shape.stamps or key in shape.documents):
            further.append(key)
    return tuple(micros), tuple(further)


def _shown(value: Any) -> str:
    text = repr(value) if type(value) in (str, int, float, bytes) else type(value).__name__
    return text if len(text) <= 80 else text[:77] + "..."


# -- reading files -------------------------------------------------------------------------


def scan(
    fd: int, start: int, end: int, read: Callable[[bytes], Any] | None = None
) -> Generator[tuple[Decoded, int]]:
    """The records of ``fd[start:end]`` in batches (see :func:`decode`): ``(batch, offset
    after it)``.

    Stops at an incomplete record (a torn tail, when it is the last) and at broken framing
    (``batch.corrupt``); the caller compares the last offset with ``end``. A batch holds the
    records of about :data:`BATCH_BYTES` (read :data:`READ_CHUNK` at a time), or one record of
    at most :data:`MAX_RECORD`: that bounds memory.
    """
    pos = start
    while pos < end:
        batch = _batch(fd, pos, end, read)
        pos += batch.used
        yield batch, pos
        if not batch.used or batch.corrupt is not None:
            return


def to_ship(fd: int, start: int, end: int) -> Iterator[tuple[Decoded, int]]:
    """:func:`scan` of audit rows (:func:`load_row`), made for shipping them: the next batch
    is decoded on a thread while the caller ships this one (the database's work and ours
    overlap), and the records of the next batch that belong to a publish of this one (its
    "sent" update, spooled a while after its row) are moved into this one, so that they are
    merged before either is written. A record shipped early is shipped again if the caller
    resumes from this batch's offset: harmless, shipping is idempotent.

    At most four batches are in memory; the thread is gone (``fd`` no longer read) once the
    iterator is exhausted or closed.
    """
    batches = scan(fd, start, end, load_row)
    decoded = batches if end - start <= BATCH_BYTES else _ahead(batches)
    held: tuple[Decoded, int] | None = None
    with contextlib.closing(decoded):
        for batch, offset in decoded:
            rest = batch.rows
            if held is not None:
                rows, rest = _pull_forward(held[0].rows, batch.rows)
                yield held[0]._replace(rows=rows), held[1]
            held = batch._replace(rows=rest), offset
    if held is not None:
        yield held


def _pull_forward(first: list[Record], then: list[Record]) -> tuple[list[Record], list[Record]]:
    """``first`` and the records of ``then`` that belong to its publishes; the rest of ``then``
    (each publish's records stay in their order)."""
    ids = {row["publish_id"] for row in first}
    later = [row for row in then if row["publish_id"] in ids]
    if not later:
        return first, then
    return first + later, [row for row in then if row["publish_id"] not in ids]


def _ahead(items: Iterator[_T]) -> Generator[_T]:
    """``items``, each one produced on a thread while the caller handles the one before."""
    ready: queue.Queue[tuple[bool, Any]] = queue.Queue(maxsize=1)
    stop = threading.Event()

    def produce() -> None:
        try:
            for item in items:
                ready.put((True, item))
                if stop.is_set():
                    return
            ready.put((False, None))
        except BaseException as exc:  # handed to the caller, raised there
            ready.put((False, exc))

    thread = threading.Thread(target=produce, name="otel-celery-publish-scan", daemon=True)
    thread.start()
    try:
        while True:
            more, item = ready.get()
            if not more:
                if item is not None:
                    raise item
                return
            yield item
    finally:
        stop.set()
        with contextlib.suppress(queue.Empty):
            ready.get_nowait()  # unblocks a put: the thread then sees stop
        thread.join()


def _batch(fd: int, start: int, end: int, read: Callable[[bytes], Any] | None) -> Decoded:
    rows: list[Record] = []
    refused: list[str] = []
    pos = start
    while True:
        chunk = os.pread(fd, min(end - pos, READ_CHUNK), pos)
        part = decode(chunk, read)
        if not part.used and part.corrupt is None and len(chunk) >= HEADER.size:
            # One record bigger than a chunk (decode checked its length): read exactly it.
            length = HEADER.unpack_from(chunk)[0]
            if pos + HEADER.size + length <= end:
                part = decode(os.pread(fd, HEADER.size + length, pos), read)
        rows += part.rows
        refused += part.refused
        pos += part.used
        full = pos - start >= BATCH_BYTES or len(refused) >= MAX_REFUSED
        if full or part.corrupt is not None or not part.used or pos >= end:
            return Decoded(rows, pos - start, refused, part.corrupt)


def read_batches(fd: int, start: int, end: int) -> Iterator[tuple[list[Any], int]]:
    """The records of ``fd[start:end]`` that unpickle, in batches: ``(records, offset after
    them)``, for files in the spool's framing that do not hold rows (the quarantine); stops
    like :func:`scan`."""
    for batch, offset in scan(fd, start, end):
        yield batch.rows, offset
