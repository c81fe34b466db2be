"""The local spool: audit records that must survive this process before they reach the database.

Layout: ``<spool_dir>/<target>/`` where ``target`` is a hash of the audit database URL (password
left out) and table, so two apps with different audit databases never ship each other's rows.
Each process appends to a segment of its own, ``<host>-<pid>-<random>.seg``, and holds an
exclusive ``flock`` on it for as long as it lives. The kernel drops that lock when the process
dies, SIGKILL included, so a segment nobody holds belongs to a dead process: whoever finds it
first (any process starting with the same spool directory, or ``celery audit drain``) ships it
and deletes it. Shipping a record twice is harmless: every write is an idempotent upsert.

A record is ``<length:u32><crc32:u32><pickle>``, written with one ``write(2)`` before the message
goes to the broker. A torn last record (killed mid-write: shorter than its length says) is
skipped: its publish never reached the broker. A bad CRC or an impossible length is damage (a
power cut without ``spool_fsync``, a disk error, tampering), handled as below. Records are read
back by an unpickler that knows only the types a row holds, so a spool file can never run code,
and each must then have the shape of an audit row (:func:`check_row`), so it cannot stall
shipping either.

Another local user must not be able to plant, read or delete records (a forged row would show up
in ``audit lost``; a planted tree could make us ship their rows or drop ours). So the directories
are checked, from ``/`` down, each time a segment is created and each time orphans are adopted
(never per record), walking with ``O_NOFOLLOW`` descriptors so nothing can be swapped in between:

* a directory we create is made ``0700`` and must then be ours and ``0700``;
* a directory above ``spool_dir/<target>`` that already exists must belong to root or to us and,
  if others may write to it, carry the sticky bit (like ``/tmp``); a symbolic link above the
  target is followed only if root or we own it, and the real directories are checked;
* the target directory itself must not be a symbolic link, must be ours and must give nothing to
  group or others.

A directory failing a check raises :class:`SpoolRefused` naming the path and why (the writer then
keeps its records in memory and reports it). Segments are created ``0600`` with ``O_NOFOLLOW``
and checked with ``fstat``. A segment found while adopting that is not a regular file of ours is
refused and left alone; one whose records are not audit rows, or whose framing is broken before
its end (a bad CRC, an absurd length), ships the records it can and is renamed ``<name>.bad``
for a human to look at, so it is never retried. No length prefix is trusted beyond
:data:`MAX_RECORD`: reading a crafted segment takes bounded memory.
"""

from __future__ import annotations

import datetime
import errno
import fcntl
import functools
import hashlib
import io
import logging
import os
import pickle
import socket
import stat
import struct
import threading
import time
import uuid
import zlib
from collections.abc import Callable, Iterator
from typing import Any, NamedTuple

from sqlalchemy import JSON, Boolean, DateTime, Float, Integer, LargeBinary, MetaData, String
from sqlalchemy.engine import make_url

from otel_celery_publish._guard import report
from otel_celery_publish.schema.table import audit_table

logger = logging.getLogger("otel_celery_publish")

Row = dict[str, Any]
HEADER = struct.Struct("<II")
SUFFIX = ".seg"
BAD_SUFFIX = ".bad"
READ_CHUNK = 512 << 10  # per shipped batch: bounds the shipping thread's memory
# No row comes near this (payloads above max_payload_bytes, 1 MiB by default, are not stored);
# a length prefix beyond it is corruption, never a reason to allocate.
MAX_RECORD = 64 << 20
_ROW_TYPES = {
    ("datetime", "datetime"): datetime.datetime,
    ("datetime", "timezone"): datetime.timezone,
    ("datetime", "timedelta"): datetime.timedelta,
}
# A refused spool directory is checked again after this long, not on every publish.
RECHECK_REFUSED_S = 5.0
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
# Bounds of the JSON ``options`` value: a pickle can share one list a million times over.
_JSON_MAX_DEPTH = 32
_JSON_MAX_NODES = 100_000


def target_dir(spool_dir: str, audit_url: str, table_name: str) -> str:
    """The spool directory for one audit database and table."""
    safe_url = make_url(audit_url).render_as_string(hide_password=True)
    digest = hashlib.sha256(f"{safe_url}\0{table_name}".encode()).hexdigest()[:16]
    return os.path.join(spool_dir, digest)


class SpoolRefused(OSError):
    """A spool directory or segment another user could plant, change or delete records in."""


class CorruptRecord(ValueError):
    """A complete spool record (length and CRC match) that is not an audit row."""


# -- the record format ---------------------------------------------------------------------


class _RowUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        try:
            return _ROW_TYPES[module, name]
        except KeyError:
            raise pickle.UnpicklingError(f"{module}.{name} is not part of an audit row") from None


def encode(row: Row) -> bytes:
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

    rows: list[Row]
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
    rows: list[Row] = []
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
    """Plain JSON data (what ``record.jsonable`` produces), bounded in depth and size (the
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


# -- reading segments ----------------------------------------------------------------------


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


# -- checked directories -------------------------------------------------------------------


def open_dir(path: str, *, create: bool) -> int | None:
    """A descriptor of directory ``path`` once it and every directory above it pass the checks
    of the module docstring, creating missing ones ``0700`` when ``create``; None when it does
    not exist and ``create`` is false. Raises :class:`SpoolRefused`."""
    parent, leaf = os.path.split(os.path.abspath(path))
    _check_links(parent)
    real_parent = os.path.realpath(parent)
    names = [name for name in real_parent.split(os.sep) if name]
    fd = os.open("/", _DIR_FLAGS)
    try:
        _check_dir(fd, "/", created=False, leaf=False)
        current = "/"
        for i, name in enumerate([*names, leaf]):
            current = os.path.join(current, name)
            child, created = _open_child(fd, name, current, create=create)
            os.close(fd)
            fd = -1
            if child is None:
                return None
            fd = child
            _check_dir(fd, current, created=created, leaf=i == len(names))
        result, fd = fd, -1
        return result
    finally:
        if fd >= 0:
            os.close(fd)


def _check_links(path: str) -> None:
    """Symbolic links above the spool are followed only when root or we own them: in ``/tmp``
    anyone may plant ``/tmp/otel-celery-publish-<uid>`` as a link, and swap it later."""
    prefix = "/"
    for name in path.split(os.sep):
        if not name:
            continue
        prefix = os.path.join(prefix, name)
        try:
            st = os.lstat(prefix)
        except FileNotFoundError:
            return
        if stat.S_ISLNK(st.st_mode) and st.st_uid not in (0, os.geteuid()):
            raise SpoolRefused(
                f"{prefix} above the spool is a symbolic link owned by uid {st.st_uid}: that "
                "user could point the spool anywhere"
            )


def _open_child(dirfd: int, name: str, path: str, *, create: bool) -> tuple[int | None, bool]:
    created = False
    try:
        try:
            return os.open(name, _DIR_FLAGS, dir_fd=dirfd), False
        except FileNotFoundError:
            if not create:
                return None, False
        try:
            os.mkdir(name, 0o700, dir_fd=dirfd)
            created = True
        except FileExistsError:
            pass  # made by someone else meanwhile: checked as found
        return os.open(name, _DIR_FLAGS, dir_fd=dirfd), created
    except OSError as exc:
        if exc.errno in (errno.ELOOP, errno.ENOTDIR):
            raise SpoolRefused(
                f"spool directory {path} is a symbolic link or not a directory: refusing to "
                "use it (another user could point it at their own files)"
            ) from None
        raise


def _check_dir(fd: int, path: str, *, created: bool, leaf: bool) -> None:
    euid = os.geteuid()
    st = os.fstat(fd)
    if created and st.st_uid == euid:
        os.fchmod(fd, 0o700)  # whatever the umask
        st = os.fstat(fd)
    mode = stat.S_IMODE(st.st_mode)
    if created or leaf:
        if st.st_uid != euid:
            raise SpoolRefused(
                f"spool directory {path} belongs to uid {st.st_uid}, not to this process's "
                f"user (uid {euid}): another user could plant or delete audit records there"
            )
        if mode & 0o077:
            raise SpoolRefused(
                f"spool directory {path} has mode {mode:04o}: it must be 0700 (other users "
                "could read or change the audit records in it)"
            )
        return
    if st.st_uid not in (0, euid):
        raise SpoolRefused(
            f"directory {path} above the spool belongs to uid {st.st_uid} (neither root nor "
            f"this process's user, uid {euid}): that user could replace the spool"
        )
    if mode & 0o022 and not mode & stat.S_ISVTX:
        raise SpoolRefused(
            f"directory {path} above the spool has mode {mode:04o}: other users can write to "
            "it and it has no sticky bit, so they could replace the spool"
        )


def _segment_problem(st: os.stat_result) -> str | None:
    if stat.S_ISLNK(st.st_mode):
        return "is a symbolic link"
    if not stat.S_ISREG(st.st_mode):
        return "is not a regular file"
    if st.st_uid != os.geteuid():
        return f"belongs to uid {st.st_uid}, not to this process's user (uid {os.geteuid()})"
    return None


# -- this process's segment ----------------------------------------------------------------


class SpoolFull(Exception):
    """The segment reached ``spool_max_bytes``; the record was not written."""


class Spool:
    """This process's segment: appended to by publishing threads, shipped by the writer thread."""

    def __init__(self, directory: str, *, fsync: bool, max_bytes: int) -> None:
        self.directory = directory
        self._fsync = fsync
        self._max_bytes = max_bytes
        self._lock = threading.Lock()
        self._fd: int | None = None
        self._dirfd = -1  # the checked directory, held with the segment
        self._name = ""
        self._path = ""
        self._refused: tuple[float, str] | None = None  # (until, why): no check per publish
        self.size = 0  # bytes written to the current segment
        self.shipped = 0  # bytes of it already in the database

    def append(self, row: Row) -> None:
        """Write one record and hand it to the OS (and the disk, with ``spool_fsync``)."""
        frame = encode(row)
        with self._lock:
            if self.size + len(frame) > self._max_bytes:
                raise SpoolFull(
                    f"spool segment {self._path} is full ({self.size} bytes, spool_max_bytes="
                    f"{self._max_bytes}): audit record {row.get('publish_id')} not spooled"
                )
            fd = self._fd if self._fd is not None else self._open()
            written = os.write(fd, frame)
            if written != len(frame):
                # Disk full mid-record: cut the torn tail so later records stay readable.
                os.ftruncate(fd, self.size)
                raise OSError(f"short write to spool segment {self._path} (disk full?)")
            if self._fsync:
                os.fsync(fd)
            self.size += written

    def pending(self) -> bool:
        return self.size > self.shipped

    def ship(self, ship: Callable[[list[Row]], None], rotate_at: int) -> int:
        """Ship what was appended since the last call; delete the segment once it is large and
        fully shipped (the next append starts a new one). Returns the records shipped."""
        with self._lock:
            fd, end = self._fd, self.size
        if fd is None:
            return 0
        count = 0
        refused: list[str] = []
        corrupt: str | None = None
        for batch, offset in scan(fd, self.shipped, end, check_row):
            if batch.rows:
                ship(batch.rows)
                count += len(batch.rows)
            self.shipped = offset
            refused += batch.refused
            corrupt = batch.corrupt
        if refused:
            # We wrote these records ourselves: a row our own code builds fails check_row.
            report(
                "audit spool read",
                CorruptRecord(
                    f"{len(refused)} record(s) of spool segment {self._path} skipped: {refused[0]}"
                ),
            )
        with self._lock:
            if self.shipped < end:
                # Only a damaged file (or another writer) breaks the framing of our own segment;
                # later records cannot be found in it: keep it aside, start a new one.
                bad = self._set_aside()
                exc = SpoolRefused(
                    f"spool segment {self._path} is damaged ({corrupt}): moved to {bad}"
                )
                report("audit spool damaged", exc, str(exc))
            elif self.shipped == self.size >= rotate_at:
                self._drop()
        return count

    def close(self, *, delete: bool) -> None:
        """Release the segment; ``delete`` only when everything in it reached the database."""
        with self._lock:
            if self._fd is not None and delete:
                self._drop()
            elif self._fd is not None:
                self._release()

    def forget(self) -> None:
        """In a forked child: drop the parent's segment without touching it (its lock and file
        stay the parent's: closing our copy of the descriptor releases nothing)."""
        if self._fd is not None:
            self._release()
        self.size = self.shipped = 0

    def _open(self) -> int:
        if self._refused is not None and time.monotonic() < self._refused[0]:
            raise SpoolRefused(self._refused[1])
        try:
            dirfd = open_dir(self.directory, create=True)
        except SpoolRefused as exc:
            self._refused = (time.monotonic() + RECHECK_REFUSED_S, str(exc))
            raise
        assert dirfd is not None
        name = f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:8]}{SUFFIX}"
        path = os.path.join(self.directory, name)
        try:
            flags = os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_APPEND | os.O_CLOEXEC | os.O_NOFOLLOW
            fd = os.open(name, flags, 0o600, dir_fd=dirfd)
        except BaseException:
            os.close(dirfd)
            raise
        try:
            problem = _segment_problem(os.fstat(fd))
            if problem:
                raise SpoolRefused(f"spool segment {path} {problem}")
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BaseException:
            os.close(fd)
            os.close(dirfd)
            raise
        self._fd, self._dirfd, self._name, self._path = fd, dirfd, name, path
        self.size = self.shipped = 0
        return fd

    def _drop(self) -> None:
        # Unlinked before the lock goes, so nobody adopts what we already shipped.
        os.unlink(self._name, dir_fd=self._dirfd)
        self._release()
        self.size = self.shipped = 0

    def _set_aside(self) -> str:
        bad = self._path + BAD_SUFFIX
        os.rename(
            self._name, self._name + BAD_SUFFIX, src_dir_fd=self._dirfd, dst_dir_fd=self._dirfd
        )
        self._release()
        self.size = self.shipped = 0
        return bad

    def _release(self) -> None:
        assert self._fd is not None
        os.close(self._fd)
        os.close(self._dirfd)
        self._fd, self._dirfd = None, -1


# -- dead processes' segments --------------------------------------------------------------


def adopt_orphans(directory: str, ship: Callable[[list[Row]], None]) -> int:
    """Ship and delete the segments of dead processes in ``directory``; return records shipped.

    A segment whose lock we cannot take is alive (or being adopted by someone else): skipped.
    If shipping fails the segment stays for the next attempt. A directory failing the checks
    raises :class:`SpoolRefused`; a segment failing them is refused alone (see the module
    docstring) and the others are still shipped.
    """
    dirfd = open_dir(directory, create=False)
    if dirfd is None:
        return 0
    try:
        names = sorted(n for n in os.listdir(dirfd) if n.endswith(SUFFIX))
        return sum(_adopt(dirfd, os.path.join(directory, name), name, ship) for name in names)
    finally:
        os.close(dirfd)


def _adopt(dirfd: int, path: str, name: str, ship: Callable[[list[Row]], None]) -> int:
    fd = -1
    try:
        problem = _segment_problem(os.stat(name, dir_fd=dirfd, follow_symlinks=False))
        if not problem:
            # O_NONBLOCK: a FIFO swapped in after the stat must not hang us on open.
            flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
            fd = os.open(name, flags, dir_fd=dirfd)
    except FileNotFoundError:
        return 0  # adopted and deleted by someone else
    except OSError as exc:
        if exc.errno != errno.ELOOP:
            raise
        problem = "is a symbolic link"
    if fd < 0:
        return _refuse(path, str(problem))
    try:
        st = os.fstat(fd)
        problem = _segment_problem(st)
        if problem:
            return _refuse(path, problem)
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        if os.stat(name, dir_fd=dirfd, follow_symlinks=False).st_ino != st.st_ino:
            return 0  # adopted and deleted by someone else while we opened it
        return _ship_segment(fd, dirfd, path, name, ship)
    except (BlockingIOError, FileNotFoundError):
        return 0
    finally:
        os.close(fd)


def _ship_segment(
    fd: int, dirfd: int, path: str, name: str, ship: Callable[[list[Row]], None]
) -> int:
    end = os.fstat(fd).st_size
    count = offset = 0
    refused: list[str] = []
    corrupt: str | None = None
    for batch, offset in scan(fd, 0, end, check_row):  # noqa: B007 - offset read below
        if batch.rows:
            ship(batch.rows)
            count += len(batch.rows)
        refused += batch.refused
        corrupt = batch.corrupt
    if refused or corrupt:
        why = f"{len(refused)} record(s) that are not audit rows ({refused[0]})" if refused else ""
        why += " and " if refused and corrupt else ""
        why += f"{corrupt} at byte {offset}" if corrupt else ""
        os.rename(name, name + BAD_SUFFIX, src_dir_fd=dirfd, dst_dir_fd=dirfd)
        exc = SpoolRefused(
            f"spool segment {path} holds {why}: shipped the {count} readable record(s) and "
            f"moved it to {path}{BAD_SUFFIX}"
        )
        report("audit spool: damaged segment", exc, str(exc))
        return count
    if offset < end:
        logger.warning(
            "otel-celery-publish: spool segment %s ends with %d unreadable bytes (a "
            "process killed mid-write; that publish never reached the broker)",
            path,
            end - offset,
        )
    os.unlink(name, dir_fd=dirfd)
    return count


def _refuse(path: str, problem: str) -> int:
    exc = SpoolRefused(f"spool segment {path} {problem}: not adopted, left as it is")
    report("audit spool: segment refused", exc, str(exc))
    return 0
