"""Records the audit database refuses: tell them from an outage, repair them, or set them aside.

An outage (connection refused, reset or hung, a lock wait past its deadline, a missing table)
is the database's problem: the writer backs off and retries, and every record waits. A refusal
is one record's problem: a NUL byte in a text column, a value longer than its column, a type
the driver cannot send or the column cannot hold. Retrying it would stall every record behind
it, forever. So the writer isolates it (the batch is split until the refused record stands
alone), repairs what can be repaired faithfully (NUL bytes stripped, unencodable characters
escaped, over-long text cut with a visible :data:`~otel_celery_publish.headers.TRUNCATED`
marker; the ``publish_id`` key is never rewritten) and writes what is still refused to a
quarantine file: ``<spool target dir>/quarantine/<host>-<pid>.q``, the spool's framing
(:mod:`.records`), mode 0600, fsynced, in a directory checked like the spool's
(:mod:`.directories`). Nothing is dropped silently: every quarantined record is logged, sent to
Sentry and counted in ``celery.audit.quarantined``, and :func:`quarantined` lists them for
``celery audit drain``.
"""

from __future__ import annotations

import datetime
import os
import pickle
import socket
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from sqlalchemy import JSON, String, Table
from sqlalchemy import exc as sa_exc

from otel_celery_publish import headers as hdr
from otel_celery_publish._guard import report
from otel_celery_publish.config import Settings
from otel_celery_publish.sink.directories import file_problem, open_dir
from otel_celery_publish.sink.records import Record, decode, encode
from otel_celery_publish.sink.spool import target_dir

SUBDIR = "quarantine"
SUFFIX = ".q"
# SQLSTATE classes that mean "this value": 22 data exception (too long, out of range, bad
# syntax for the type, untranslatable character), 23 integrity constraint violation (the upsert
# handles the only expected one, the publish_id conflict). 42804: a value of the wrong type (an
# int for a timestamp; the rest of class 42 - a missing table or column - is the schema's
# problem, retried). 54000: an index row too large.
_REFUSED_CLASSES = frozenset({"22", "23"})
_REFUSED_STATES = frozenset({"42804", "54000"})
# Client-side refusals without an SQLSTATE: the driver cannot send the value.
_DRIVER_REFUSALS = frozenset({"DataError", "IntegrityError"})
_BINDING_WORDS = ("adapt", "binding", "parameter", "not supported")
_KEY = "publish_id"
_PLAIN = frozenset({type(None), bool, int, float, str, bytes, datetime.timedelta})
_CONTAINERS = frozenset({list, tuple, set, frozenset})


def is_refusal(exc: BaseException) -> bool:
    """True when the database or its driver refused the *data* of a write (retrying the same
    record cannot succeed); False for an outage, a timeout or a schema problem (retry later)."""
    orig: BaseException = exc
    if isinstance(exc, sa_exc.StatementError) and exc.orig is not None:
        orig = exc.orig  # DBAPIError wraps the driver's error, StatementError a bind processor's
    elif isinstance(exc, (sa_exc.CompileError, sa_exc.ArgumentError)):
        return True  # a column the table does not have
    sqlstate = getattr(orig, "sqlstate", None)
    if isinstance(sqlstate, str) and sqlstate:
        return sqlstate[:2] in _REFUSED_CLASSES or sqlstate in _REFUSED_STATES
    names = {cls.__name__ for cls in type(orig).__mro__}
    if names & _DRIVER_REFUSALS:
        return True
    if names & {"ProgrammingError", "InterfaceError"}:
        # "cannot adapt type", "Error binding parameter": one value. Not "closed database".
        message = str(orig).lower()
        return any(word in message for word in _BINDING_WORDS)
    if isinstance(orig, OSError):
        return False
    # Client-side conversions of one value: JSON of an object, an int too large for SQLite,
    # a string with lone surrogates, a column name the statement cannot bind.
    return isinstance(orig, (TypeError, ValueError, OverflowError, KeyError))


def repair(row: Record, table: Table) -> tuple[Record, list[str]] | None:
    """A copy of ``row`` the database can take, and what was changed; None if nothing needed
    (or could) be repaired. Faithful changes only: NUL bytes stripped, unencodable characters
    escaped, text longer than its column cut and marked; the publish_id key is never touched."""
    fixed: Record | None = None
    notes: list[str] = []
    for name, value in row.items():
        column = table.c.get(name)
        if column is None or name == _KEY:
            continue
        if isinstance(value, str):
            length = column.type.length if isinstance(column.type, String) else None
            new: Any = _clean_text(value, length, name, notes)
        elif isinstance(column.type, JSON):
            new = _clean_json(value)
            if new != value:
                notes.append(f"{name}: NUL bytes or unencodable characters removed")
        else:
            continue
        if new is not value and new != value:
            fixed = dict(row) if fixed is None else fixed
            fixed[name] = new
    return None if fixed is None else (fixed, notes)


def _clean_text(value: str, length: int | None, name: str, notes: list[str]) -> str:
    text = value
    if "\x00" in text:
        text = text.replace("\x00", "")
        notes.append(f"{name}: NUL bytes stripped")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        text = text.encode("utf-8", "backslashreplace").decode("utf-8")
        notes.append(f"{name}: unencodable characters escaped")
    if length is not None and len(text) > length:
        notes.append(f"{name}: {len(text)} characters cut to {length}")
        return hdr.as_text(text, length)
    return text


def _clean_json(value: Any) -> Any:
    if isinstance(value, str):
        text = value.replace("\x00", "")
        return text.encode("utf-8", "backslashreplace").decode("utf-8")
    if isinstance(value, Mapping):
        return {_clean_json(k): _clean_json(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean_json(v) for v in value]
    return value


def _storable(value: Any) -> Any:
    """``value`` made of types the spool's unpickler reads back; anything else as its repr."""
    kind = type(value)
    if kind is datetime.datetime:
        tz = value.tzinfo
        return value if tz is None or type(tz) is datetime.timezone else value.isoformat()
    if kind in _PLAIN:
        return value
    if kind is dict:
        return {_storable(k): _storable(v) for k, v in value.items()}
    if kind in _CONTAINERS:
        return kind(_storable(v) for v in value)
    return repr(value)


def reason_of(exc: BaseException) -> str:
    """One line naming the refusal: the driver's class and message, without SQL or params."""
    orig = exc.orig if isinstance(exc, sa_exc.StatementError) and exc.orig is not None else exc
    first = str(orig).strip().splitlines()[0] if str(orig).strip() else ""
    return f"{type(orig).__module__}.{type(orig).__qualname__}: {first}"[:500]


class Quarantine:
    """This process's quarantine file in ``<directory>/quarantine/``; safe between threads."""

    def __init__(self, directory: str, count: Callable[[int], None]) -> None:
        self.directory = os.path.join(directory, SUBDIR)
        self._count = count
        self._lock = threading.Lock()

    def refuse(self, row: Record, exc: BaseException) -> None:
        """A record the database refused even repaired: :meth:`put` here, reported (raises as
        :meth:`put` does: the record then stays where it is and is retried)."""
        path = self.put(row, exc)
        report(
            "audit record quarantined",
            exc,
            f"the audit database refused record {row.get('publish_id')} (task "
            f"{row.get('task_id')}): {reason_of(exc)}; kept in {path} (see celery audit drain)",
        )

    def put(self, row: Record, exc: BaseException) -> str:
        """Append ``row`` with the reason ``exc`` gives, durably; return the file's path.

        Raises OSError when the disk refuses it: the caller keeps the record and retries.
        """
        entry = {
            "record": {str(k): _storable(v) for k, v in row.items()},
            "reason": reason_of(exc),
            "quarantined_at": datetime.datetime.now(datetime.timezone.utc),
        }
        frame = encode(entry)
        name = f"{socket.gethostname()}-{os.getpid()}{SUFFIX}"
        path = os.path.join(self.directory, name)
        with self._lock:
            # The spool's own checks: created 0700 (whatever the umask), every directory above
            # ours or root's, no foreign symlink (raises SpoolRefused, an OSError).
            dirfd = open_dir(self.directory, create=True)
            assert dirfd is not None
            flags = os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC | os.O_NOFOLLOW
            try:
                fd = os.open(name, flags, 0o600, dir_fd=dirfd)
            finally:
                os.close(dirfd)
            try:
                if os.write(fd, frame) != len(frame):
                    raise OSError(f"short write to quarantine file {path} (disk full?)")
                os.fsync(fd)  # rare, and the only copy left: worth a disk flush
            finally:
                os.close(fd)
        self._count(1)
        return path


@dataclass(frozen=True)
class QuarantinedRecord:
    """One record the audit database refused, even repaired, kept on disk."""

    publish_id: str
    task_id: str
    reason: str
    path: str
    quarantined_at: datetime.datetime | None
    record: Record


def _entries(data: bytes) -> list[dict[str, Any]]:
    """The intact entries of a quarantine file, read like a spool segment (the same framing and
    row-types-only unpickler); a damaged entry is skipped, a broken frame ends the file."""
    decoded = decode(data)
    return [e for e in decoded.rows if type(e) is dict and type(e.get("record")) is dict]


def _read_own(path: str) -> bytes | None:
    """The content of ``path`` if it is a regular file of ours (never following a link)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as exc:
        if isinstance(exc, FileNotFoundError):
            raise
        return None
    with os.fdopen(fd, "rb") as file:
        if file_problem(os.fstat(file.fileno())):
            return None
        return file.read()


def quarantined(settings: Settings) -> list[QuarantinedRecord]:
    """Every record in the quarantine of ``settings``' audit database (all processes of this
    spool directory), oldest first per file; an identical record quarantined twice (shipping
    interrupted by an outage half-way through isolating it) is listed once."""
    spool = target_dir(settings.spool_dir, settings.audit_url, settings.table_name)
    directory = os.path.join(spool, SUBDIR)
    try:
        names = sorted(n for n in os.listdir(directory) if n.endswith(SUFFIX))
    except FileNotFoundError:
        return []
    found: list[QuarantinedRecord] = []
    seen: set[bytes] = set()
    for name in names:
        path = os.path.join(directory, name)
        try:
            data = _read_own(path)
        except FileNotFoundError:
            continue
        if data is None:
            continue  # a symlink, not a regular file, or another user's: not ours to show
        for entry in _entries(data):
            record: Record = entry["record"]
            key = pickle.dumps((record, entry.get("reason")))
            if key in seen:
                continue
            seen.add(key)
            at = entry.get("quarantined_at")
            found.append(
                QuarantinedRecord(
                    publish_id=str(record.get(_KEY, "")),
                    task_id=str(record.get("task_id", "")),
                    reason=str(entry.get("reason", "")),
                    path=path,
                    quarantined_at=at if isinstance(at, datetime.datetime) else None,
                    record=record,
                )
            )
    return found
