"""The local spool: audit records that must survive this process before they reach the database.

Layout: ``<spool_dir>/<target>/`` where ``target`` is a hash of the audit database URL (password
left out) and table, so two apps with different audit databases never ship each other's rows.
Each process appends to a segment of its own, ``<host>-<pid>-<random>.seg``, and holds an
exclusive ``flock`` on it for as long as it lives. The kernel drops that lock when the process
dies, SIGKILL included, so a segment nobody holds belongs to a dead process: whoever finds it
first (any process starting with the same spool directory, or ``celery audit drain``) ships it
and deletes it. Shipping a record twice is harmless: every write is an idempotent upsert.

A record is ``<length:u32><crc32:u32><pickle>``, written with one ``write(2)`` before the message
goes to the broker. A torn last record (killed mid-write) fails its length or CRC and is skipped:
its publish never reached the broker. Records are read back by an unpickler that knows only the
types a row holds, so a spool file can never run code.
"""

from __future__ import annotations

import datetime
import fcntl
import hashlib
import io
import logging
import os
import pickle
import socket
import struct
import threading
import uuid
import zlib
from collections.abc import Callable, Iterator
from typing import Any

from sqlalchemy.engine import make_url

logger = logging.getLogger("otel_celery_publish")

Row = dict[str, Any]
HEADER = struct.Struct("<II")
SUFFIX = ".seg"
READ_CHUNK = 512 << 10  # per shipped batch: bounds the shipping thread's memory
_ROW_TYPES = {
    ("datetime", "datetime"): datetime.datetime,
    ("datetime", "timezone"): datetime.timezone,
    ("datetime", "timedelta"): datetime.timedelta,
}


def target_dir(spool_dir: str, audit_url: str, table_name: str) -> str:
    """The spool directory for one audit database and table."""
    safe_url = make_url(audit_url).render_as_string(hide_password=True)
    digest = hashlib.sha256(f"{safe_url}\0{table_name}".encode()).hexdigest()[:16]
    return os.path.join(spool_dir, digest)


class _RowUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        try:
            return _ROW_TYPES[module, name]
        except KeyError:
            raise pickle.UnpicklingError(f"{module}.{name} is not part of an audit row") from None


def encode(row: Row) -> bytes:
    data = pickle.dumps(row, protocol=pickle.HIGHEST_PROTOCOL)
    return HEADER.pack(len(data), zlib.crc32(data)) + data


def decode(chunk: bytes) -> tuple[list[Row], int]:
    """The complete records at the start of ``chunk`` and the bytes they take."""
    rows: list[Row] = []
    pos = 0
    while pos + HEADER.size <= len(chunk):
        length, crc = HEADER.unpack_from(chunk, pos)
        data = chunk[pos + HEADER.size : pos + HEADER.size + length]
        if len(data) < length or zlib.crc32(data) != crc:
            break
        rows.append(_RowUnpickler(io.BytesIO(data)).load())
        pos += HEADER.size + length
    return rows, pos


def read_batches(fd: int, start: int, end: int) -> Iterator[tuple[list[Row], int]]:
    """Complete records of ``fd[start:end]`` in batches: ``(rows, offset after them)``.

    Stops early at a torn or corrupt record; the caller compares the last offset with ``end``.
    """
    pos = start
    while pos < end:
        chunk = os.pread(fd, min(end - pos, READ_CHUNK), pos)
        rows, used = decode(chunk)
        if not rows and len(chunk) >= HEADER.size:
            # One record bigger than a chunk: read exactly that record.
            length = HEADER.unpack_from(chunk)[0]
            if pos + HEADER.size + length <= end:
                rows, used = decode(os.pread(fd, HEADER.size + length, pos))
        if not rows:
            return
        pos += used
        yield rows, pos


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
        self._path = ""
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
        for rows, offset in read_batches(fd, self.shipped, end):
            ship(rows)
            self.shipped = offset
            count += len(rows)
        with self._lock:
            if self.shipped == self.size >= rotate_at:
                self._drop()
        return count

    def close(self, *, delete: bool) -> None:
        """Release the segment; ``delete`` only when everything in it reached the database."""
        with self._lock:
            if self._fd is not None and delete:
                self._drop()
            elif self._fd is not None:
                os.close(self._fd)
                self._fd = None

    def forget(self) -> None:
        """In a forked child: drop the parent's segment without touching it (its lock and file
        stay the parent's: closing our copy of the descriptor releases nothing)."""
        if self._fd is not None:
            os.close(self._fd)
        self._fd = None
        self.size = self.shipped = 0

    def _open(self) -> int:
        os.makedirs(self.directory, mode=0o700, exist_ok=True)
        name = f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:8]}{SUFFIX}"
        path = os.path.join(self.directory, name)
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_APPEND | os.O_CLOEXEC, 0o600)
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        self._fd, self._path = fd, path
        self.size = self.shipped = 0
        return fd

    def _drop(self) -> None:
        assert self._fd is not None
        os.unlink(self._path)  # before the lock goes, so nobody adopts what we already shipped
        os.close(self._fd)
        self._fd = None
        self.size = self.shipped = 0


def adopt_orphans(directory: str, ship: Callable[[list[Row]], None]) -> int:
    """Ship and delete the segments of dead processes in ``directory``; return records shipped.

    A segment whose lock we cannot take is alive (or being adopted by someone else): skipped.
    If shipping fails the segment stays for the next attempt.
    """
    try:
        names = sorted(n for n in os.listdir(directory) if n.endswith(SUFFIX))
    except FileNotFoundError:
        return 0
    count = 0
    for name in names:
        path = os.path.join(directory, name)
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            if os.fstat(fd).st_ino != os.stat(path).st_ino:
                continue  # adopted and deleted by someone else while we opened it
            end = os.fstat(fd).st_size
            offset = 0
            for rows, offset in read_batches(fd, 0, end):  # noqa: B007 - offset read below
                ship(rows)
                count += len(rows)
            if offset < end:
                logger.warning(
                    "otel-celery-publish: spool segment %s ends with %d unreadable bytes (a "
                    "process killed mid-write; that publish never reached the broker)",
                    path,
                    end - offset,
                )
            os.unlink(path)
        except (BlockingIOError, FileNotFoundError):
            continue
        finally:
            os.close(fd)
    return count
